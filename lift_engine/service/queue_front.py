"""`lift tune-service`: a queue directory as a front end of the document service's Ray pool.

    QUEUE/incoming/<name>.txt|.md   drop documents here (write under a hidden name, ".x.tmp",
                                    and rename: files starting with "." are never picked up)
    QUEUE/processing/<name>.txt     claimed (atomic rename) and handed to the DocumentService
    QUEUE/done/<name>.txt           tuned: the adapter is in the store as <tenant>/<name>
    QUEUE/failed/<name>.txt + .error   refused or failed, and why
    QUEUE/status.json               every claimed document's record (rewritten atomically)

The documents go through the same DocumentService as `POST /v1/documents` (same checks,
same records beside the store, same tuning pool on Ray), so there is one tuning service:
a restarted front end finds its documents' records and the pool resumes them from their
checkpoints. A document that fits the window needs no tuning (hybrid) and is filed as
done at once; a server answers it in context.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lift_engine.batch.inputs import DOC_SUFFIXES
from lift_engine.fsutil import atomic_write_json, atomic_write_text
from lift_engine.service.documents import DocumentError, DocumentService
from lift_engine.service.records import PENDING


class QueueFrontEnd:
    """Feeds QUEUE/incoming into `service` as documents of `tenant` and files them when settled."""

    def __init__(self, service: DocumentService, queue_dir, tenant: str, log=None) -> None:
        self.service, self.tenant = service, tenant
        self.root = Path(queue_dir)
        self.log = log or (lambda *a: None)
        for sub in ("incoming", "processing", "done", "failed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.claimed: dict[str, tuple[Path, str]] = {}  # name → (file in processing/, document id)
        for path in sorted((self.root / "processing").iterdir()):  # after a restart
            if path.is_file() and not path.name.startswith("."):
                record = service.find_by_name(tenant, path.stem)
                if record is not None:
                    self.claimed[path.stem] = (path, record.id)
                else:  # claimed, then the front end died before the service took it
                    self._hand_over(path)

    def scan(self) -> int:
        """Claim and hand over every complete file in incoming/; returns how many were accepted."""
        count = 0
        for path in sorted((self.root / "incoming").iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            claimed = self.root / "processing" / path.name
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another front end took it
            count += self._hand_over(claimed)
        return count

    def _hand_over(self, path: Path) -> int:
        name = path.stem
        if path.suffix.lower() not in DOC_SUFFIXES:
            self._file(path, "failed", f"not a document (expected one of {', '.join(DOC_SUFFIXES)})")
            return 0
        try:
            record = self.service.create(self.tenant, path.read_bytes(), name=name)
        except (DocumentError, OSError) as exc:
            self._file(path, "failed", str(exc))
            return 0
        self.claimed[name] = (path, record.id)
        self.log(f"queue: {path.name} → document {record.id} ({record.mode})")
        return 1

    def _file(self, path: Path, where: str, error: str | None = None) -> None:
        try:
            os.replace(path, self.root / where / path.name)
        except OSError:
            pass
        if error is not None:
            atomic_write_text(self.root / "failed" / f"{path.stem}.error", error + "\n")
            self.log(f"queue: {path.name} failed: {error}")

    def file_settled(self) -> list[str]:
        """Move settled documents out of processing/ (done: ready; failed: with its .error)."""
        moved = []
        for name, (path, doc_id) in list(self.claimed.items()):
            record = self.service.get(self.tenant, doc_id)
            if record is None:
                self._file(path, "failed", "the document was deleted")
            elif record.state == "ready":
                self._file(path, "done")
            elif record.state == "failed":
                self._file(path, "failed", record.error or "failed")
            else:
                continue
            del self.claimed[name]
            moved.append(name)
        return moved

    def idle(self) -> bool:
        incoming = any(not p.name.startswith(".") for p in (self.root / "incoming").iterdir())
        pending = any(r.state in PENDING for r in self.service.list(self.tenant))
        return not incoming and not pending and not self.claimed

    def write_status(self) -> None:
        docs = {r.name: r.public(self.service.progress(r)) for r in self.service.list(self.tenant)}
        atomic_write_json(self.root / "status.json", {"tenant": self.tenant, "documents": docs})

    def run(self, poll_seconds: float = 1.0, exit_when_idle: bool = False, max_seconds: float | None = None) -> None:
        began = time.monotonic()
        while True:
            self.scan()
            self.file_settled()
            self.write_status()
            if exit_when_idle and self.idle():
                return
            if max_seconds is not None and time.monotonic() - began > max_seconds:
                return
            time.sleep(poll_seconds)
