"""LIFT for one document, end to end: text → tasks → tuned adapter on disk (DESIGN.md §2).

    tune_document(base, text, out_dir, cfg)   writes an adapter dir atomically, resumable
    load_tuned(base, adapter_dir)             attaches a saved adapter to the base model

The auxiliary tasks of a job are stored in its work dir, so a resumed job trains on the
same tasks without asking the generator again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lift_engine.adapters.io import load_adapter, save_adapter
from lift_engine.adapters.patching import AdapterHandle, attach_adapters
from lift_engine.checkpoint import partial_dir_for, remove_work_dir
from lift_engine.config import LiftConfig
from lift_engine.data.documents import tokenize_long
from lift_engine.data.extractive import QAItem, extract_tasks
from lift_engine.errors import InputError
from lift_engine.fsutil import atomic_write_bytes
from lift_engine.models.loading import LoadedModel
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import DocumentSamples
from lift_engine.trainer import DocumentTuner, TuneReport, format_duration, plan_summary

QA_FILE = "qa_items.json"


@dataclass
class TuneOutcome:
    adapter_dir: Path
    report: TuneReport
    plan: dict
    qa_items: list[QAItem]


def document_sha256(ids: list[int]) -> str:
    digest = hashlib.sha256()
    digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def build_qa_items(text: str, cfg: LiftConfig, base: LoadedModel | None, progress: bool) -> list[QAItem]:
    """Extractive tasks from the document, plus generated triples when the config asks."""
    items = extract_tasks(text, cfg.qa.num_extractive, seed=cfg.train.seed) if cfg.qa.num_extractive > 0 else []
    if cfg.qa.use_generator and cfg.qa.num_generated > 0:
        from lift_engine.data.qa_synthesis import HFGenerator, OpenAIGenerator, synthesize_qa

        if cfg.qa.qa_endpoint:
            generator = OpenAIGenerator(cfg.qa.qa_endpoint, cfg.qa.qa_model or "default")
        else:
            generator = HFGenerator(base.model, base.tokenizer)
        items += synthesize_qa(
            text, generator, cfg.qa.num_generated, tries_per_item=cfg.qa.generator_tries_per_item,
            chunk_sentences=cfg.qa.chunk_sentences, seed=cfg.train.seed, progress=progress,
        )
    return items


def _load_or_make_qa(work_dir: Path, text: str, cfg: LiftConfig, base: LoadedModel, progress: bool) -> list[QAItem]:
    path = work_dir / QA_FILE
    if path.is_file():
        try:
            return [QAItem(**row) for row in json.loads(path.read_text())]
        except (ValueError, TypeError):
            pass  # a damaged task file is rebuilt, never trusted
    items = build_qa_items(text, cfg, base, progress)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps([asdict(i) for i in items]).encode())
    return items


def tune_document(
    base: LoadedModel,
    text: str,
    out_dir: str | Path,
    cfg: LiftConfig,
    progress: bool = True,
    source: str = "",
    log=print,
) -> TuneOutcome:
    """Tune an adapter of kind cfg.adapter on `text` and write it to `out_dir`."""
    out_dir = Path(out_dir)
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    doc_ids = tokenize_long(text, base.tokenizer, progress=progress)
    if not doc_ids:
        raise InputError(f"document {source or ''} has no tokens".replace("  ", " "))
    doc_hash = document_sha256(doc_ids)
    work_dir = partial_dir_for(out_dir)
    key = {"document": doc_hash, "config": cfg.fingerprint(), "model": base.fingerprint, "kind": cfg.adapter}
    _reset_stale_work_dir(work_dir, key)
    qa_items = _load_or_make_qa(work_dir, text, cfg, base, progress)
    samples = DocumentSamples(doc_ids, qa_items, cfg, prompts)
    plan = plan_summary(samples, base.model)
    log(
        f"document: {len(doc_ids)} tokens, {plan['segments']} segments, {plan['qa_items']} auxiliary tasks, "
        f"{plan['samples']} samples (~{plan['train_tokens']} tokens); "
        f"expected time ~{format_duration(plan['estimated_seconds'])} (rough estimate)"
    )
    handle = attach_adapters(base.model, cfg.adapter, cfg, num_adapters=1, seed=cfg.train.seed)
    try:
        tuner = DocumentTuner(base.model, handle, cfg, pad_id=_pad_id(base.tokenizer))
        report = tuner.tune(samples, out_dir, key, progress=progress)
        save_adapter(
            handle, 0, out_dir, base=base, lift_config=cfg,
            extra={"document_sha256": doc_hash, "document_tokens": len(doc_ids), "source": source,
                   "qa_items": len(qa_items), "first_loss": report.first_loss, "last_loss": report.last_loss},
        )
        DocumentTuner.finish(out_dir)
    finally:
        handle.remove()
    return TuneOutcome(out_dir, report, plan, qa_items)


def _reset_stale_work_dir(work_dir: Path, key: dict) -> None:
    """A work dir left by a different job (other document/config/model) is discarded."""
    key_file = work_dir / "job.json"
    if work_dir.exists():
        try:
            same = json.loads(key_file.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:
            remove_work_dir(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_file, json.dumps(key).encode())


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def load_tuned(base: LoadedModel, adapter_dir: str | Path) -> AdapterHandle:
    """Attach the adapter saved in `adapter_dir` to the base model (slot 0)."""
    return load_adapter(adapter_dir, base)
