"""Documents in, answers out (issue 19): the document service behind `lift serve`.

    config.py     ServiceConfig: limits, tuning workers, Ray address (a dataclass)
    records.py    durable document records beside the store (one JSON file each)
    pool.py       TuningPool: Ray actors, each one base model + one BatchTuneJob
    documents.py  DocumentService: validate uploads, hybrid or tune, recover after a restart
    api.py        the /v1/documents routes and the rewrite of a completion request that
                  names a document (truncated context + adapter, as `lift ask`)
    queue_front.py  `lift tune-service`: a queue directory as a front end of the same pool
                  (the one tuning service; there is no other)

Layout beside the store (`<store>/` is what serving reads):

    <store>/tenants/<tenant>/<name>/                 published adapters (AdapterStore)
    <store>/.lift-documents/records/<tenant>/<id>.json   one record per document
    <store>/.lift-documents/records/<tenant>/<id>.txt    its text (until it is tuned)
    <store>/.lift-documents/records/<tenant>/<id>.deleted  tombstone: deleted while queued or tuning
    <store>/.lift-documents/work/<id>/               an actor's finished adapter before publishing
    <store>/.lift-documents/work/.<id>.lift-partial/ its per-step checkpoints (BatchTuneJob)

The work dir is shared by every actor, so a document whose actor died resumes from its
checkpoint on any other actor (the store path must be shared by all machines).
"""
