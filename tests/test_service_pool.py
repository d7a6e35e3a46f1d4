"""The tuning pool on a real local Ray runtime (issue 19): least-loaded actors, documents
published into the store, an actor killed with SIGKILL mid-job (its documents resume on
another actor from their checkpoints), and a service restarted over half-tuned documents."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, HUGE, make_tiny_model_dir, wait_until
from lift_engine.config import BatchConfig
from lift_engine.service.config import ServiceConfig
from lift_engine.service.documents import DocumentError, DocumentService
from lift_engine.store import AdapterStore
from test_batch_job import tiny_config

LONG = DOCUMENT * 2  # ~950 tokens: far over the window (32), ~20 steps
SHORT = "Anouk Seldt closed the lab."  # fits the window: hybrid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("pool") / "model")


def service_config(store: Path, model_dir: Path, workers: int, **kw) -> ServiceConfig:
    cfg = tiny_config("lora")
    cfg.train.stage2_epochs = 3
    return ServiceConfig(store=str(store), base_model=str(model_dir), tune_workers=workers,
                         tune_config=cfg.to_dict(), tuning=BatchConfig(max_active=4), **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is dead


def all_settled(service: DocumentService, pairs) -> bool:
    return all(service.get(t, i).state in ("ready", "failed") for t, i in pairs)


def test_bad_uploads_are_refused_with_nothing_stored(ray_runtime, model_dir, tmp_path):
    service = DocumentService(service_config(tmp_path / "store", model_dir, workers=0, max_document_bytes=4000,
                                             max_queued_per_tenant=1))
    cases = [(b"", 400), (b"   \n", 400), (b"abc\x00def", 400), (b"\xff\xfe bad", 400), (b"x" * 4001, 413)]
    for data, status in cases:
        with pytest.raises(DocumentError) as err:
            service.create("acme", data)
        assert err.value.status == status, data[:10]
    for name in ("../etc", ".hidden", "a/b", "x" * 65, ""):
        with pytest.raises(DocumentError) as err:
            service.create("acme", SHORT.encode(), name=name)
        assert err.value.status == 400
    with pytest.raises(DocumentError) as err:  # needs tuning, and this server has no workers
        service.create("acme", LONG.encode())
    assert err.value.status == 503
    assert service.list("acme") == [] and not any((tmp_path / "store" / ".lift-documents" / "records").rglob("*.*"))
    record = service.create("acme", SHORT.encode(), name="note")
    assert (record.state, record.mode) == ("ready", "hybrid") and record.context_ids
    with pytest.raises(DocumentError) as err:
        service.create("acme", SHORT.encode(), name="note")
    assert err.value.status == 409
    assert service.get("globex", record.id) is None  # another tenant's id: like a missing one
    assert service.delete("globex", record.id) is None and service.get("acme", record.id) is not None


def test_pool_tunes_publishes_and_survives_sigkill_of_an_actor(ray_runtime, model_dir, tmp_path):
    store = AdapterStore(tmp_path / "store", create=True)
    service = DocumentService(service_config(store.root, model_dir, workers=2))
    try:
        service.start()
        pids = service.pool.wait_actors(timeout=180)
        assert len(set(pids)) == 2
        import ray  # each actor computes on the CPUs it reserved (ServiceConfig.actor_cpus, `lift serve --tune-cpus`)
        handles = [ray.get_actor(f"{service.pool.name_prefix}-{a['index']}") for a in service.pool.actors()]
        assert ray.get([h.threads.remote() for h in handles], timeout=120) == [1, 1]
        docs = [("acme", service.create("acme", (LONG + f" Copy {i}.").encode(), name=f"long{i}").id) for i in range(2)]
        docs += [("globex", service.create("globex", (LONG + " Other.").encode(), name="long0").id)]
        hybrid = service.create("globex", SHORT.encode(), name="memo")
        assert hybrid.state == "ready"
        # least-loaded: 3 documents over 2 actors → 2 and 1
        loads = wait_until(lambda: (sorted(len(a["inflight"]) for a in service.pool.actors()) == [1, 2]
                                    and service.pool.actors()), 10, "documents spread over the actors")
        victim = max(loads, key=lambda a: len(a["inflight"]))
        victim_docs = set(victim["inflight"])
        # kill it once one of its documents has a checkpoint (step ≥ 2) and is far from done
        def mid_job():
            steps = [service.pool.progress(d) or {} for d in victim_docs]
            return any(2 <= s.get("step", 0) < s.get("steps", 0) - 3 for s in steps)
        wait_until(mid_job, 240, "a document of the victim to be mid-job")
        progress = {d: (service.pool.progress(d) or {}).get("step", 0) for d in victim_docs}
        assert max(progress.values()) >= 2
        states = {d: service.get(t, d).state for t, d in docs}
        assert "tuning" in states.values(), states
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: all_settled(service, docs), 300, "every document to settle", every=0.2)
        for tenant, doc_id in docs:
            record = service.get(tenant, doc_id)
            assert record.state == "ready", record.error
            assert record.worker.split(":")[1] != str(victim["pid"])
            info = store.get(tenant, record.name)
            assert info is not None and info.version == record.adapter_version
            assert (info.manifest().get("extra") or {}).get("source") == doc_id
            if doc_id in victim_docs and progress[doc_id] >= 2:
                assert record.attempts == 2 and record.resumed_from >= 1  # from its checkpoint, not from scratch
        assert {a["pid"] for a in service.pool.actors()}.isdisjoint({victim["pid"]})
        assert len(service.pool.actors()) == 2  # a replacement was started
        nodes = {service.get(t, d).worker.split(":")[0] for t, d in docs}
        assert len(nodes) == 2  # the session's cluster has two nodes of one CPU: one actor on each
        work = tmp_path / "store" / ".lift-documents" / "work"
        assert not [p for p in work.iterdir() if p.name.startswith("doc-") or ".lift-partial" in p.name]
        # the adapters are distinct documents' (two tenants, same name "long0")
        assert store.get("acme", "long0").version != store.get("globex", "long0").version
        # delete: the adapter leaves the store
        record = service.delete("acme", docs[0][1])
        assert record is not None and store.get("acme", "long0") is None and service.get("acme", docs[0][1]) is None
    finally:
        service.close()


def test_restarted_service_finishes_queued_and_half_tuned_documents(ray_runtime, model_dir, tmp_path):
    store_root = tmp_path / "store"
    first = DocumentService(service_config(store_root, model_dir, workers=1))
    try:
        first.start()
        first.pool.wait_actors(timeout=180)
        ids = [first.create("acme", (LONG + f" Part {i}.").encode(), name=f"part{i}").id for i in range(2)]
        wait_until(lambda: (first.pool.progress(ids[0]) or {}).get("step", 0) >= 2, 240, "a checkpoint")
        pid = first.pool.actors()[0]["pid"]
    finally:
        first.close()  # the server goes: its dispatcher stops and its actor is killed mid-job
    wait_until(lambda: not pid_alive(pid), 30, "the actor to die")
    states = {i: first.get("acme", i).state for i in ids}
    assert all(s in ("queued", "tuning") for s in states.values()), states
    # a serving replica without tuning workers (same store) leaves them pending and sees them
    replica = DocumentService(service_config(store_root, model_dir, workers=0))
    assert replica.start() == 0
    assert replica.find_by_name("acme", "part0").state == states[ids[0]]
    second = DocumentService(service_config(store_root, model_dir, workers=1))
    try:
        assert [r.state for r in second.list("acme")] == [states[i] for i in ids]
        assert second.start() == 2
        wait_until(lambda: all_settled(second, [("acme", i) for i in ids]), 300, "the restarted service", every=0.2)
        assert [replica.get("acme", i).state for i in ids] == ["ready", "ready"]  # read from the shared records
        records = [second.get("acme", i) for i in ids]
        assert [r.state for r in records] == ["ready", "ready"], [r.error for r in records]
        assert records[0].resumed_from >= 1
        assert all(AdapterStore(store_root).get("acme", r.name) is not None for r in records)
    finally:
        second.close()


def actor_progress(service: DocumentService) -> dict:
    """Every live actor's job progress ({doc id: summary}), asked of the actors themselves."""
    import ray

    out = {}
    for actor in service.pool.actors():
        handle = ray.get_actor(f"{service.pool.name_prefix}-{actor['index']}")
        out.update(ray.get(handle.progress.remote(), timeout=30))
    return out


def test_delete_cancels_a_queued_and_a_tuning_document(ray_runtime, model_dir, tmp_path):
    """One actor with one slot: A tunes, B and C wait in its job. Deleting B (queued) and A
    (mid-job, with checkpoints) takes them out of the job at once / at the step boundary:
    C gets the slot, nothing of A or B is published, their work dirs are gone."""
    store = AdapterStore(tmp_path / "store", create=True)
    cfg = service_config(store.root, model_dir, workers=1)
    cfg.tuning = BatchConfig(max_active=1)
    service = DocumentService(cfg)
    work = tmp_path / "store" / ".lift-documents" / "work"
    try:
        service.start()
        service.pool.wait_actors(timeout=180)
        # A is long (hundreds of steps): on a quiet machine a ~40-step A and B finished between
        # two polls of A's progress, before the test could see B queued. B and C are created
        # once A trains: created together, B's tune call could reach the actor first (its
        # text is shorter), take the one slot and finish before A's second step.
        a = service.create("acme", (HUGE + " Copy a.").encode(), name="a")
        wait_until(lambda: 2 <= (service.pool.progress(a.id) or {}).get("step", 0), 240, "A to be mid-job")
        b, c = (service.create("acme", (LONG + f" Copy {n}.").encode(), name=n) for n in ("b", "c"))
        wait_until(lambda: {b.id, c.id} <= set(actor_progress(service)), 60, "B and C to reach the actor", every=0.2)
        assert (work / f".{a.id}.lift-partial").is_dir()
        jobs = actor_progress(service)
        assert jobs[b.id]["status"] == "queued" and jobs[c.id]["status"] == "queued"
        assert service.delete("acme", b.id) is not None and service.delete("acme", a.id) is not None
        assert service.get("acme", a.id) is None and service.get("acme", b.id) is None
        wait_until(lambda: service.pool.load() == 1, 60, "A and B to leave the pool")
        jobs = actor_progress(service)
        assert jobs[a.id]["status"] == "cancelled" and jobs[a.id]["step"] < jobs[a.id]["steps"] - 3
        assert jobs[b.id]["status"] == "cancelled" and jobs[b.id]["step"] == 0
        # C takes A's slot at the job's next admission, a moment after A leaves
        wait_until(lambda: actor_progress(service)[c.id]["status"] in ("training", "done"), 60, "C to take A's slot")
        assert not [p for p in work.iterdir() if a.id in p.name or b.id in p.name]
        wait_until(lambda: all_settled(service, [("acme", c.id)]), 300, "C", every=0.2)
        assert service.get("acme", c.id).state == "ready"
        assert [i.name for i in store.list("acme")] == ["c"]
        records = tmp_path / "store" / ".lift-documents" / "records" / "acme"
        assert sorted(p.name for p in records.iterdir()) == [f"{c.id}.json"]  # no record, text or tombstone left
    finally:
        service.close()


class _StoreDeletingAtPublish(AdapterStore):
    """A store whose publish lets `delete()` land right before or right after the copy, as a
    DELETE racing with a finishing actor would."""

    def __init__(self, root, delete, when: str) -> None:
        super().__init__(root)
        self.delete, self.when, self.published = delete, when, []

    def publish(self, tenant, name, src_dir, replace=True):
        if self.when == "before":
            self.delete()
        info = super().publish(tenant, name, src_dir, replace)
        self.published.append(info.version)
        if self.when == "after":
            self.delete()
        return info


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_delete_racing_with_the_publish_leaves_no_adapter(model_dir, tmp_path, when):
    """The actor passed its last check and publishes while the document is deleted (just
    before the copy, or just after it): the adapter must end absent either way."""
    from lift_engine.service.pool import TuneWorker
    from lift_engine.service.records import DocumentRecord, RecordStore, new_id

    cfg = service_config(tmp_path / "store", model_dir, workers=0)
    AdapterStore(cfg.store, create=True)
    records = RecordStore(cfg.records_dir)
    record = DocumentRecord(id=new_id(), tenant="acme", name="race", state="tuning")
    records.save(record)
    replica = DocumentService(cfg)  # a server without workers deletes it (from the shared records)
    worker = TuneWorker(cfg.base_model, cfg.lift_config().to_dict(), str(cfg.work_dir), cfg.store,
                        {"max_active": 2, "checkpoint_every": 1})
    try:
        worker.store = _StoreDeletingAtPublish(cfg.store, lambda: replica.delete("acme", record.id), when)
        path = records.root / "acme" / f"{record.id}.json"
        tombstone = str(records.tombstone_path("acme", record.id))
        result = worker.tune(record.id, DOCUMENT, "acme", "race", str(path), tombstone)
        # handed over again after the delete (e.g. a retry): refused before any tuning
        assert worker.tune(record.id, DOCUMENT, "acme", "race", str(path), tombstone)["cancelled"] is True
        assert len(worker.store.published) == 1
    finally:
        worker.job.close()
    assert worker.store.published  # it did publish
    assert result["ok"] is False and result["cancelled"] is True
    assert AdapterStore(cfg.store).get("acme", "race") is None
    assert not [p for p in cfg.work_dir.iterdir() if record.id in p.name]
    assert records.load("acme", record.id) is None
