"""A watched queue directory around a BatchTuneJob: the service-facing job API.

    QUEUE/incoming/<name>.txt|.md   drop documents here. Write them under a hidden name
                                    (".x.tmp") in the same directory and rename: files
                                    starting with "." are never picked up half-written.
    QUEUE/processing/               claimed documents (moved here by an atomic rename)
    QUEUE/adapters/<name>/          the tuned adapter, published atomically when done
    QUEUE/done/<name>.txt           the document once its adapter is written
    QUEUE/failed/<name>.txt + <name>.error   a document that could not be tuned, and why
    QUEUE/status.json               every document's progress (rewritten atomically)

A service restarted after a crash re-submits everything still in processing/: each
document resumes from its checkpoint (lift_engine.batch.job).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lift_engine.batch.job import BatchTuneJob
from lift_engine.errors import InputError
from lift_engine.fsutil import atomic_write_json, atomic_write_text
from lift_engine.names import validate_name

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")


class QueueService:
    """Feeds files from QUEUE/incoming into `job` and files them away when done.

    The job must write adapters to QUEUE/adapters (see `for_queue`).
    """

    def __init__(self, job: BatchTuneJob, queue_dir, log=None):
        self.job = job
        self.root = Path(queue_dir)
        self.log = log or (lambda *a: None)
        for sub in ("incoming", "processing", "done", "failed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}  # document name → its file in processing/
        self._filed: set[str] = set()
        for path in sorted((self.root / "processing").iterdir()):  # recovery after a crash
            if path.is_file() and not path.name.startswith("."):
                self._submit(path)

    @staticmethod
    def adapters_dir(queue_dir) -> Path:
        return Path(queue_dir) / "adapters"

    @classmethod
    def for_queue(cls, base, cfg, queue_dir, log=None, **job_kwargs) -> "QueueService":
        job = BatchTuneJob(base, cfg, cls.adapters_dir(queue_dir), log=log, **job_kwargs)
        return cls(job, queue_dir, log=log)

    # ------------------------------------------------------------ files
    def scan(self) -> int:
        """Claim every complete document in incoming/; returns how many were submitted."""
        count = 0
        for path in sorted((self.root / "incoming").iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            claimed = self.root / "processing" / path.name
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another service claimed it
            if self._submit(claimed):
                count += 1
        return count

    def _submit(self, path: Path) -> bool:
        from lift_engine.data.documents import read_document

        name = path.stem
        try:
            validate_name(name, "document")
            if path.suffix.lower() not in DOC_SUFFIXES:
                raise InputError(f"{path.name}: not a document (expected one of {', '.join(DOC_SUFFIXES)})")
            text = read_document(path)
            self.files[name] = path
            self.job.submit(text, name, source=str(path))
            return True
        except Exception as exc:
            self._fail(path, name, f"{type(exc).__name__}: {exc}")
            return False

    def _fail(self, path: Path, name: str, error: str) -> None:
        dst = self.root / "failed" / path.name
        try:
            os.replace(path, dst)
        except OSError:
            pass
        atomic_write_text(self.root / "failed" / f"{name}.error", error + "\n")
        self.log(f"queue: {path.name} failed: {error}")

    def file_finished(self) -> list[str]:
        """Move documents whose job entry is done/failed out of processing/."""
        moved = []
        for name, info in self.job.progress().items():
            if name in self._filed or name not in self.files:
                continue
            if info["status"] == "done":
                os.replace(self.files[name], self.root / "done" / self.files[name].name)
            elif info["status"] == "failed":
                self._fail(self.files[name], name, info["error"] or "failed")
            else:
                continue
            self._filed.add(name)
            moved.append(name)
        return moved

    def write_status(self) -> None:
        atomic_write_json(self.root / "status.json", {"global_step": self.job.global_step, "documents": self.job.progress()})

    # ------------------------------------------------------------ loop
    def poll_once(self) -> bool:
        """Claim new files, run one job step, file finished documents. True if a step ran."""
        self.scan()
        report = self.job.step()
        self.file_finished()
        self.write_status()
        return report is not None

    def run(self, poll_seconds: float = 1.0, exit_when_idle: bool = False, max_seconds: float | None = None) -> None:
        began = time.monotonic()
        while True:
            worked = self.poll_once()
            if max_seconds is not None and time.monotonic() - began > max_seconds:
                return
            if not worked:
                if exit_when_idle and self.job.idle() and not any(
                        not p.name.startswith(".") for p in (self.root / "incoming").iterdir()):
                    return
                time.sleep(poll_seconds)
