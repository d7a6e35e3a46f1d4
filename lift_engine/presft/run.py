"""One pre-LIFT SFT run: the corpus through the tuning engine into one shared adapter,
merged into the base and written as a model directory (docs/DESIGN.md §2.7).

    outcome = run_pre_sft(base, documents, "models/presft", lift_cfg, PreSftConfig())

The whole corpus is ONE entry of a BatchTuneJob (batch/job.PreparedSource) in a one-slot
bank: the engine's steps (mixed batches: each step the next `batch_size` samples of the
corpus plan, presft/samples.py), loss, SlotAdamW, memory plan, progress bars, per-step
checkpoints and resume — no second trainer. Its work dir is MODEL_DIR.work beside the
output: the job key there is (corpus hash, config, base fingerprint, engine), so a run
killed with kill -9 and started again with the same corpus and options resumes from its
last checkpoint, and one with other content starts over. The finished adapter is kept
there (MODEL_DIR.work/shared-adapter/) until the model directory is written, so a run
that dies while merging or writing redoes only that. The work dir is removed at the end.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lift_engine.batch.job import BatchTuneJob, PreparedSource
from lift_engine.batch.progress import JobProgressDisplay
from lift_engine.batch.teacher import stored_teacher_answers
from lift_engine.config import BatchConfig, LiftConfig, PreSftConfig
from lift_engine.data.documents import tokenize_long
from lift_engine.data.tasks import stored_qa_items
from lift_engine.errors import InputError, LiftError
from lift_engine.fsutil import atomic_dir, atomic_write_json
from lift_engine.models.loading import model_fingerprint
from lift_engine.presft.corpus import CorpusDocument, corpus_sha256
from lift_engine.presft.merge import INFO_FILE, adapter_sha256, mark_pre_sft, merge_lora, write_model_dir
from lift_engine.presft.samples import CorpusSamples
from lift_engine.samples import DocumentSamples

ADAPTER_NAME = "shared-adapter"
INFO_FORMAT = 1


@dataclass
class PreSftOutcome:
    """output: the model dir (merge) or adapter dir written; fingerprint: the written
    model's (None for an adapter); steps, resumed_from, losses (per step), seconds (this
    process), info: what lift_pre_sft.json holds."""

    output: Path
    merged: bool
    fingerprint: str | None
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def work_dir_for(out_dir: str | os.PathLike) -> Path:
    """The run's work dir: MODEL_DIR.work beside the output."""
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}.work"


def check_output(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, resolved; InputError if it exists (a directory only with overwrite)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory")
        if not overwrite:
            raise InputError(f"{out_dir}: already exists (choose another -o or pass --overwrite to replace it)")
    return out


def run_pre_sft(base, documents: list[CorpusDocument], out_dir: str | os.PathLike, cfg: LiftConfig,
                presft: PreSftConfig, settings: BatchConfig | None = None, *, overwrite: bool = False,
                progress: bool = True, log=print, on_step=None) -> PreSftOutcome:
    """Pre-SFT `base` on `documents` and write the result to `out_dir`.

    cfg: the per-document sample recipe (presft.lift_config applies the run's LoRA rank,
    lr, batch size and task count to it). settings: the engine's BatchConfig (memory
    budget, prefix sharing, checkpoint frequency; its bank holds one slot here).
    presft.merge: merge the adapter into base.model — which is changed in place: `base`
    IS the pre-SFT'd model afterwards (its fingerprint and model_id updated) — and write a
    model dir; else write the adapter dir (PEFT layout, tuned on the raw base).
    on_step(report): after every step (tests interrupt with it). Raises InputError for an
    existing `out_dir` without overwrite or an empty document, before anything is written.
    """
    presft.validate()
    out = check_output(out_dir, overwrite)
    if not documents:
        raise InputError("the corpus is empty")
    cfg = presft.lift_config(cfg)
    key = corpus_sha256(documents, presft)
    ids = [tokenize_long(doc.text, base.tokenizer) for doc in documents]
    for doc, doc_ids in zip(documents, ids):
        if not doc_ids:
            raise InputError(f"{doc.source or doc.name}: the document has no tokens")
    raw = {"id": base.model_id, "fingerprint": base.fingerprint}
    settings = dataclasses.replace(settings or BatchConfig(), max_active=1)
    job = BatchTuneJob(base, cfg, work_dir_for(out), settings, log=log)

    def build(work_dir: Path) -> CorpusSamples:
        per_doc = []
        for i, (doc, doc_ids) in enumerate(zip(documents, ids)):
            doc_dir = work_dir / "corpus" / f"{i:05d}"  # its tasks, kept for a resumed run
            extractive = stored_qa_items(doc_dir, doc.text, cfg, base, False)
            teacher = (stored_teacher_answers(doc_dir, lambda: job.teacher_targets(doc.name, doc_ids, extractive))
                       if cfg.distill.enabled else [])
            per_doc.append(DocumentSamples(doc_ids, extractive + doc.gold, cfg, job.prompts, doc=i,
                                           teacher_answers=teacher))
        return CorpusSamples(per_doc, presft.epochs, cfg.train.seed)

    tokens = sum(len(x) for x in ids)
    log(f"pre-sft: {len(documents)} documents, {tokens} tokens, "
        f"{sum(len(d.gold) for d in documents)} gold questions; work dir {work_dir_for(out)}")
    display = JobProgressDisplay(enabled=progress)
    began = time.monotonic()

    def after_step(report) -> None:
        display.update(job.progress())
        if on_step is not None:
            on_step(report)

    try:
        job.submit_prepared(ADAPTER_NAME, PreparedSource(key, build, tokens), source=f"{len(documents)} documents")
        job.run(on_step=after_step)
    finally:
        display.close()
        job.close()
    state = job.docs[ADAPTER_NAME]
    if state.status != "done":
        if state.exception is not None:
            raise state.exception
        raise LiftError(f"pre-sft failed: {state.error}")
    adapter_dir = state.out_dir
    info = {
        "format_version": INFO_FORMAT,
        "base_model": raw,
        "corpus": {"sha256": key, "documents": len(documents), "tokens": tokens,
                   "gold_questions": sum(len(d.gold) for d in documents),
                   "sources": sorted({d.source.rsplit(":", 1)[0] if ".jsonl:" in d.source else d.source
                                      for d in documents})[:50]},
        "pre_sft": dataclasses.asdict(presft),
        "lift_config": cfg.to_dict(),
        "steps": len(state.steps),
        "first_loss": state.losses[0] if state.losses else None,
        "last_loss": state.losses[-1] if state.losses else None,
        "adapter_sha256": adapter_sha256(adapter_dir),
        "merged": presft.merge,
    }
    fingerprint = None
    if presft.merge:
        merge_lora(base, adapter_dir)
        mark_pre_sft(base.model, {"base_fingerprint": raw["fingerprint"], "corpus_sha256": key,
                                  "adapter_sha256": info["adapter_sha256"]})
        fingerprint = base.fingerprint = model_fingerprint(base.model)
        info["model_fingerprint"] = fingerprint
        write_model_dir(base, out, info, replace=overwrite)
        base.model_id = str(out)
    else:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists")
        with atomic_dir(out, replace=overwrite) as tmp:
            for entry in adapter_dir.iterdir():
                shutil.copy2(entry, tmp / entry.name)
            atomic_write_json(tmp / INFO_FILE, info)
    shutil.rmtree(work_dir_for(out), ignore_errors=True)
    log(f"pre-sft: wrote {out}")
    return PreSftOutcome(output=out, merged=presft.merge, fingerprint=fingerprint, steps=len(state.steps),
                         resumed_from=state.resumed_from, losses=list(state.losses),
                         seconds=time.monotonic() - began, info=info)
