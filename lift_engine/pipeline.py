"""LIFT for one document, end to end: text → tasks → tuned adapter on disk (docs/DESIGN.md §2).

    tune_document(base, text, out_dir, cfg)   writes an adapter dir atomically, resumable
    load_tuned(base, adapter_dir)             attaches a saved adapter to the base model

One document is a tuning job of one (lift_engine.batch.job.BatchTuneJob): the same
samples, step, optimizer, checkpoints and resume as any batched job.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from lift_engine.adapters.io import load_adapter
from lift_engine.adapters.patching import AdapterHandle
from lift_engine.batch.job import BatchTuneJob
from lift_engine.batch.progress import JobProgressDisplay
from lift_engine.config import BatchConfig, LiftConfig
from lift_engine.errors import LiftError
from lift_engine.models.loading import LoadedModel


@dataclass
class TuneReport:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass
class TuneOutcome:
    adapter_dir: Path
    report: TuneReport
    qa_items: int


def tune_document(
    base: LoadedModel,
    text: str,
    out_dir: str | Path,
    cfg: LiftConfig,
    settings: BatchConfig | None = None,
    progress: bool = True,
    source: str = "",
    log=print,
) -> TuneOutcome:
    """Tune an adapter of kind cfg.adapter on `text` and write it to `out_dir`.

    settings: the engine's BatchConfig (default: BatchConfig(); its max_active is 1 here).
    A checkpoint of the same job beside `out_dir` is resumed from; an adapter already
    there for the same document, config, model and recipe is kept. Raises what made the
    document fail (e.g. InputError for an empty one).
    """
    out_dir = Path(out_dir)
    settings = dataclasses.replace(settings or BatchConfig(), max_active=1)
    job = BatchTuneJob(base, cfg, out_dir.parent, settings, log=log, status_file=None)  # nothing beside out_dir
    display = JobProgressDisplay(enabled=progress)
    began = time.monotonic()
    try:
        job.submit(text, out_dir.name, source=source)
        job.run(on_step=lambda _: display.update(job.progress()))
    finally:
        display.close()
        job.close()
    doc = job.docs[out_dir.name]
    if doc.status != "done":
        if doc.exception is not None:
            raise doc.exception
        raise LiftError(f"tuning {source or out_dir.name} failed: {doc.error}")
    report = TuneReport(steps=len(doc.steps), resumed_from=doc.resumed_from,
                        first_loss=doc.losses[0] if doc.losses else None,
                        last_loss=doc.losses[-1] if doc.losses else None,
                        seconds=time.monotonic() - began, losses=list(doc.losses))
    return TuneOutcome(doc.out_dir, report, doc.qa_items)


def load_tuned(base: LoadedModel, adapter_dir: str | Path) -> AdapterHandle:
    """Attach the adapter saved in `adapter_dir` to the base model (slot 0)."""
    return load_adapter(adapter_dir, base)
