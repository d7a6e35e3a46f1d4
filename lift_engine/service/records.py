"""Durable document records: one JSON file per document beside the store.

A record is rewritten atomically on every change of state, so a restarted server (or a
crash at any point) finds each document queued, tuning, ready or failed, and the text of
the ones still to tune. States:

    queued   accepted, waiting for (or handed to) a tuning actor
    tuning   an actor has admitted it (progress: step / steps, in memory only)
    ready    answerable: hybrid (fits the window, no adapter) or its adapter is in the store
    failed   not answerable; `error` says why

Deleting a document that is queued or tuning leaves a tombstone, `<id>.deleted`, before its
record goes. A tuning actor checks for it (or for the record's absence) before it
publishes and again right after: whichever of the delete and the publish comes last, the
adapter ends up absent (see pool.TuneWorker.tune). A server tuning a document that
another replica deleted sees the tombstone and never writes the record back.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lift_engine.fsutil import atomic_write_json, atomic_write_text
from lift_engine.store import AdapterStore, InvalidName, validate_name

STATES = ("queued", "tuning", "ready", "failed")
PENDING = ("queued", "tuning")


def new_id() -> str:
    """A fresh document id: "doc-" + 16 hex digits (a valid store/job name, unguessable)."""
    return "doc-" + secrets.token_hex(8)


@dataclass
class DocumentRecord:
    """One document of one tenant. name: the adapter/model name it is answered by."""

    id: str
    tenant: str
    name: str
    state: str = "queued"
    mode: str = "adapter"  # "adapter" (tuned) or "hybrid" (fits the window: in context only)
    document_tokens: int = 0
    bytes: int = 0
    context_ids: list[int] = field(default_factory=list)  # the window's tokens, prepended when answering
    error: str | None = None
    attempts: int = 0  # actors it was handed to (an actor death adds one)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    adapter_version: str | None = None
    resumed_from: int = 0  # the step its last actor resumed at (0: from scratch)
    worker: str | None = None  # "<ray node id>:<pid>" of the actor that finished it

    def public(self, progress: dict | None = None) -> dict:
        """What the API shows the tenant (no context ids, no internal paths)."""
        out = {"id": self.id, "object": "document", "name": self.name, "state": self.state, "mode": self.mode,
               "document_tokens": self.document_tokens, "bytes": self.bytes, "created_at": int(self.created_at),
               "status_url": f"/v1/documents/{self.id}"}
        if self.state == "failed":
            out["error"] = self.error
        if self.finished_at is not None:
            out["finished_at"] = int(self.finished_at)
        if self.state == "tuning" and progress:
            out["progress"] = {"step": progress.get("step", 0), "steps": progress.get("steps", 0)}
        return out


class RecordStore:
    """records/<tenant>/<id>.json (+ <id>.txt while the text is needed). Thread-safe by atomic files."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, tenant: str, doc_id: str, suffix: str) -> Path:
        return self.root / validate_name(tenant, "tenant") / (validate_name(doc_id, "document id") + suffix)

    def save(self, record: DocumentRecord) -> None:
        atomic_write_json(self._path(record.tenant, record.id, ".json"), asdict(record), indent=None)

    def save_text(self, record: DocumentRecord, text: str) -> None:
        atomic_write_text(self._path(record.tenant, record.id, ".txt"), text)

    def text(self, tenant: str, doc_id: str) -> str | None:
        try:
            return self._path(tenant, doc_id, ".txt").read_text(encoding="utf-8")
        except (OSError, InvalidName):
            return None

    def drop_text(self, tenant: str, doc_id: str) -> None:
        try:
            self._path(tenant, doc_id, ".txt").unlink()
        except (OSError, InvalidName):
            pass

    def tombstone_path(self, tenant: str, doc_id: str) -> Path:
        return self._path(tenant, doc_id, ".deleted")

    def mark_deleted(self, tenant: str, doc_id: str) -> None:
        """Leave the tombstone of a document deleted while it may still be tuning."""
        atomic_write_text(self.tombstone_path(tenant, doc_id), "")

    def is_deleted(self, tenant: str, doc_id: str) -> bool:
        try:
            return self.tombstone_path(tenant, doc_id).exists()
        except InvalidName:
            return False

    def clear_deleted(self, tenant: str, doc_id: str) -> None:
        """Drop the tombstone once nothing can publish the document any more."""
        try:
            self.tombstone_path(tenant, doc_id).unlink()
        except (OSError, InvalidName):
            pass

    def orphan_tombstones(self) -> list[tuple[str, str]]:
        """(tenant, id) of every tombstone whose record is gone."""
        return [(p.parent.name, p.stem) for p in sorted(self.root.glob("*/*.deleted"))
                if not p.with_suffix(".json").exists()]

    def exists(self, tenant: str, doc_id: str) -> bool:
        try:
            return self._path(tenant, doc_id, ".json").is_file()
        except InvalidName:
            return False

    def load(self, tenant: str, doc_id: str) -> DocumentRecord | None:
        try:
            data = json.loads(self._path(tenant, doc_id, ".json").read_text())
            return DocumentRecord(**data)
        except (OSError, ValueError, TypeError, InvalidName):
            return None

    def delete(self, tenant: str, doc_id: str) -> None:
        for suffix in (".json", ".txt"):
            try:
                self._path(tenant, doc_id, suffix).unlink()
            except (OSError, InvalidName):
                pass

    def tenant(self, tenant: str) -> list[DocumentRecord]:
        """The tenant's readable records."""
        try:
            paths = sorted((self.root / validate_name(tenant, "tenant")).glob("*.json"))
        except InvalidName:
            return []
        records = (self.load(tenant, p.stem) for p in paths if not p.name.startswith("."))
        return [r for r in records if r is not None and r.tenant == tenant]

    def all(self) -> list[DocumentRecord]:
        """Every readable record (unreadable or foreign files are skipped)."""
        out = []
        for path in sorted(self.root.glob("*/*.json")):
            if path.name.startswith("."):
                continue
            record = self.load(path.parent.name, path.stem)
            if record is not None and record.tenant == path.parent.name and record.id == path.stem:
                out.append(record)
        return out


def remove_document_adapter(store: AdapterStore, tenant: str, name: str, doc_id: str) -> bool:
    """Remove `tenant`/`name` from the store when it is this document's adapter (its manifest's
    `source` is the document id); an adapter of another document under the same name stays."""
    info = store.get(tenant, name)
    if info is None or (info.manifest().get("extra") or {}).get("source") != doc_id:
        return False
    return store.remove(tenant, name)
