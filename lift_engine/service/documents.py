"""DocumentService: a tenant's documents, from upload to answerable (issue 19).

    service = DocumentService(ServiceConfig(store=..., base_model=..., tune_workers=2))
    service.start()                                   # recovers queued / half-tuned documents
    record = service.create("acme", data, name="contract")    # DocumentError(status, message) on bad input
    service.get("acme", record.id); service.list("acme"); service.delete("acme", record.id)
    service.find_by_name("acme", "contract")          # what a completion request names

Upload checks, in order, each a clear 4xx with nothing stored: size (413), text that is
empty, binary or not UTF-8 (400), a bad or taken name (400 / 409), the tenant's queue
limit (429). A document whose tokens fit the answering window is ready at once (hybrid:
answered in context, no adapter); a longer one is queued on the tuning pool (pool.py)
and answered with its adapter plus its middle-truncated context once ready.

Deleting a queued or tuning document cancels its tuning: it leaves the pool's queue or
its actor's running job, its work dir and checkpoints are removed, and it is never
published, even when its actor was publishing at that very moment (the tombstone of
records.py is checked before and after publishing).
"""
from __future__ import annotations

import logging
import threading
import time

from lift_engine.errors import InputError, LiftError
from lift_engine.service.config import ServiceConfig
from lift_engine.checkpoint import partial_dir_for, remove_work_dir
from lift_engine.service.records import PENDING, DocumentRecord, RecordStore, new_id, remove_document_adapter
from lift_engine.store import AdapterStore, InvalidName, validate_name

logger = logging.getLogger("lift_engine.service")


class DocumentError(LiftError):
    """A request the tenant can fix; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DocumentService:
    """Documents of every tenant of one server: records, validation, tuning, recovery.

    pool_factory: builds the tuning pool (default: TuningPool on Ray); not called when
    cfg.tune_workers is 0 (then only documents that fit the window are accepted).
    """

    def __init__(self, cfg: ServiceConfig, pool_factory=None) -> None:
        from transformers import AutoTokenizer

        from lift_engine.prompts import PromptBuilder

        self.cfg = cfg
        self.store = AdapterStore(cfg.store, create=True)
        self.records = RecordStore(cfg.records_dir)
        self.lift_cfg = cfg.lift_config()
        self.window = int(self.lift_cfg.inference.window)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
        self.prompts = PromptBuilder(self.tokenizer, self.lift_cfg.inference.use_chat_template)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Records this server tunes (or that need no tuning) are kept in memory; with no pool,
        # records are read from disk on every lookup, so a replica without tuning workers sees
        # the documents another replica (sharing the store) accepted and tunes.
        self._docs: dict[tuple[str, str], DocumentRecord] = {}
        self.pool = None
        self.pool_error: str | None = None
        if cfg.tune_workers > 0:
            try:
                if pool_factory is None:
                    from lift_engine.service.pool import TuningPool as pool_factory
                self.pool = pool_factory(cfg, on_done=self._on_done, on_failed=self._on_failed,
                                         on_progress=self._on_progress, on_cancelled=self._on_cancelled)
            except Exception as exc:  # serve what needs no tuning; say why the rest cannot be
                self.pool_error = f"tuning is unavailable: {type(exc).__name__}: {exc}"
                logger.error("lift: %s", self.pool_error)

        if self.pool is not None:
            self._docs = {(r.tenant, r.id): r for r in self.records.all()}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Hand every queued or half-tuned document (from before a restart) to the pool; returns how many."""
        count = 0
        if self.pool is None:  # another server (one with tuning workers) owns the pending documents
            return 0
        for tenant, doc_id in self.records.orphan_tombstones():  # deleted; no actor of ours tunes them
            self._forget_work(doc_id)
            self.records.clear_deleted(tenant, doc_id)
        with self._lock:
            pending = [r for r in self._docs.values() if r.state in PENDING]
        for record in sorted(pending, key=lambda r: r.created_at):
            if self.records.is_deleted(record.tenant, record.id):  # the server died inside delete()
                self._drop_deleted(record.tenant, record.id, record.name)
                continue
            text = self.records.text(record.tenant, record.id)
            if text is None or self.pool is None:
                self._fail(record, "its text was lost" if text is None else (self.pool_error or "this server does not tune"))
                continue
            self._submit(record, text)
            count += 1
        return count

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # ------------------------------------------------------------------ queries
    def _tenant_records(self, tenant: str) -> list[DocumentRecord]:
        if self.pool is None:  # a replica without tuning: disk is the truth (see __init__)
            with self._lock:
                mine = {i: r for (t, i), r in self._docs.items() if t == tenant}
            return list({**{r.id: r for r in self.records.tenant(tenant)}, **mine}.values())
        with self._lock:
            return [r for (t, _), r in self._docs.items() if t == tenant]

    def list(self, tenant: str) -> list[DocumentRecord]:
        return sorted(self._tenant_records(tenant), key=lambda r: r.created_at)

    def get(self, tenant: str, doc_id: str) -> DocumentRecord | None:
        """The tenant's own document (another tenant's id is None, like a missing one)."""
        with self._lock:
            record = self._docs.get((tenant, doc_id))
        if record is None and self.pool is None:
            record = self.records.load(tenant, doc_id)
        return record

    def find_by_name(self, tenant: str, name: str) -> DocumentRecord | None:
        for record in self._tenant_records(tenant):
            if record.name == name:
                return record
        return None

    def progress(self, record: DocumentRecord) -> dict | None:
        return self.pool.progress(record.id) if self.pool is not None and record.state == "tuning" else None

    def wait(self, tenant: str, doc_id: str, timeout: float) -> DocumentRecord | None:
        """Block until the document is ready or failed (or `timeout` seconds); the record then."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            record = self.get(tenant, doc_id)
            left = deadline - time.monotonic()
            if record is None or record.state not in PENDING or left <= 0:
                return record
            with self._changed:
                self._changed.wait(timeout=min(left, 1.0))

    # ------------------------------------------------------------------ changes
    def create(self, tenant: str, data: bytes, name: str | None = None) -> DocumentRecord:
        """Accept a document (bytes of UTF-8 text) for `tenant`; DocumentError on bad input."""
        from lift_engine.data.documents import read_document_bytes, tokenize_long
        from lift_engine.inference import context_for_window

        if len(data) > self.cfg.max_document_bytes:
            raise DocumentError(413, f"the document is {len(data)} bytes; the limit is {self.cfg.max_document_bytes}")
        if name is not None:
            try:
                validate_name(name, "document")
            except InvalidName as exc:
                raise DocumentError(400, str(exc)) from None
        try:
            text = read_document_bytes(data, "the document")
        except InputError as exc:
            raise DocumentError(400, str(exc)) from None
        ids = tokenize_long(text, self.tokenizer)
        if not ids:
            raise DocumentError(400, "the document has no tokens")
        hybrid = len(ids) <= self.window
        doc_id = new_id()
        record = DocumentRecord(id=doc_id, tenant=tenant, name=name or doc_id, bytes=len(data), document_tokens=len(ids))
        if hybrid:
            record.mode, record.state, record.context_ids, record.finished_at = "hybrid", "ready", list(ids), time.time()
        else:
            if self.pool is None:
                raise DocumentError(503, f"the document has {len(ids)} tokens, more than the window of {self.window}, "
                                    "and " + (self.pool_error or "this server does not tune documents (--tune-workers 0)"))
            record.context_ids = list(context_for_window(ids, self.window, self.prompts) or [])
        with self._lock:
            self._check_name(tenant, record.name)
            if not hybrid:
                pending = sum(1 for r in self._tenant_records(tenant) if r.state in PENDING)
                if pending >= self.cfg.max_queued_per_tenant:
                    raise DocumentError(429, f"{pending} documents are already waiting to be tuned (the limit is "
                                        f"{self.cfg.max_queued_per_tenant}); try again when some are ready")
                self.records.save_text(record, text)
            self.records.save(record)
            self._docs[(tenant, doc_id)] = record
        if not hybrid:
            self._submit(record, text)
        logger.info("lift: document %s (%s) of tenant %s: %s, %d tokens", doc_id, record.name, tenant, record.mode, len(ids))
        return record

    def _check_name(self, tenant: str, name: str) -> None:
        if name in self.cfg.served_names:
            raise DocumentError(409, f"the name {name!r} is the base model's; choose another")
        if any(r.name == name for r in self._tenant_records(tenant)):
            raise DocumentError(409, f"a document named {name!r} exists already; delete it first or choose another name")
        if self.store.get(tenant, name) is not None:
            raise DocumentError(409, f"an adapter named {name!r} exists already; choose another name")

    def delete(self, tenant: str, doc_id: str) -> DocumentRecord | None:
        """Forget the document, cancel its tuning and remove its adapter from the store;
        the record, or None if unknown.

        Order matters for the race with an actor publishing it: the tombstone is written
        before the record goes and the store is cleaned after, so an actor either sees the
        tombstone after it published (and removes its adapter) or published before the
        tombstone existed (and the cleanup here removes it).
        """
        with self._lock:
            record = self._docs.pop((tenant, doc_id), None)
            if record is None and self.pool is None:
                record = self.records.load(tenant, doc_id)
            if record is None:
                return None
            pending = record.state in PENDING
            if pending:
                self.records.mark_deleted(tenant, doc_id)
            self.records.delete(tenant, doc_id)
            self._changed.notify_all()
        if pending and self.pool is not None:
            self.pool.cancel(doc_id)  # the work dir goes in _on_cancelled, once no actor uses it
        self._remove_adapter(record)
        return record

    def _remove_adapter(self, record: DocumentRecord) -> None:
        remove_document_adapter(self.store, record.tenant, record.name, record.id)

    def _forget_work(self, doc_id: str) -> None:
        """Remove a document's finished-but-unpublished adapter and checkpoints from the work dir."""
        remove_work_dir(self.cfg.work_dir / doc_id)
        remove_work_dir(partial_dir_for(self.cfg.work_dir / doc_id))

    def _drop_deleted(self, tenant: str, doc_id: str, name: str) -> None:
        """Nothing will tune or publish this deleted document any more: clean up after it."""
        with self._lock:
            self._docs.pop((tenant, doc_id), None)
            self.records.delete(tenant, doc_id)
            self._changed.notify_all()
        self._remove_adapter(DocumentRecord(id=doc_id, tenant=tenant, name=name))
        self._forget_work(doc_id)
        self.records.clear_deleted(tenant, doc_id)

    # ------------------------------------------------------------------ pool callbacks
    def _submit(self, record: DocumentRecord, text: str) -> None:
        from lift_engine.service.pool import TuneTask

        path = self.records.root / record.tenant / f"{record.id}.json"
        self.pool.submit(TuneTask(record.id, record.tenant, record.name, text, str(path), attempts=record.attempts,
                                  tombstone=str(self.records.tombstone_path(record.tenant, record.id))))

    def _update(self, tenant: str, doc_id: str, **changes) -> DocumentRecord | None:
        """Change and save the record; None when it is unknown or was deleted (never written back)."""
        with self._lock:
            record = self._docs.get((tenant, doc_id))
            if record is None or self.records.is_deleted(tenant, doc_id):
                return None
            for key, value in changes.items():
                setattr(record, key, value)
            self.records.save(record)
            self._changed.notify_all()
            return record

    def _on_progress(self, doc_id: str, info: dict) -> None:
        with self._lock:
            record = next((r for (_, i), r in self._docs.items() if i == doc_id), None)
        if record is None:
            return
        if self.records.is_deleted(record.tenant, doc_id):  # deleted through another replica
            with self._lock:
                self._docs.pop((record.tenant, doc_id), None)
            self.pool.cancel(doc_id)
        elif record.state == "queued" and info.get("status") == "training":
            self._update(record.tenant, doc_id, state="tuning")

    def _on_done(self, task, result: dict) -> None:
        record = self._update(task.tenant, task.doc_id, state="ready", adapter_version=result.get("version"),
                              resumed_from=int(result.get("resumed_from") or 0), attempts=task.attempts,
                              finished_at=time.time(), worker=f"{result.get('node')}:{result.get('pid')}")
        if record is None:  # deleted while it was tuning: its adapter must not stay behind
            self._drop_deleted(task.tenant, task.doc_id, task.name)
            return
        self.records.drop_text(task.tenant, task.doc_id)
        logger.info("lift: document %s of tenant %s is ready", task.doc_id, task.tenant)

    def _on_failed(self, task, error: str) -> None:
        with self._lock:
            record = self._docs.get((task.tenant, task.doc_id))
        if record is None or self.records.is_deleted(task.tenant, task.doc_id):
            self._drop_deleted(task.tenant, task.doc_id, task.name)
        else:
            self._fail(record, error, attempts=task.attempts)

    def _on_cancelled(self, task) -> None:
        """The pool dropped a deleted document (queued, or taken out of its actor's job)."""
        self._drop_deleted(task.tenant, task.doc_id, task.name)
        logger.info("lift: tuning of deleted document %s of tenant %s was cancelled", task.doc_id, task.tenant)

    def _fail(self, record: DocumentRecord, error: str, **changes) -> None:
        self._update(record.tenant, record.id, state="failed", error=error, finished_at=time.time(), **changes)
        self.records.drop_text(record.tenant, record.id)
        logger.warning("lift: document %s of tenant %s failed: %s", record.id, record.tenant, error)
