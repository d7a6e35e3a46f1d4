"""A document's auxiliary tasks (docs/DESIGN.md §2.3): built once per tuning job, stored in its
work dir, so that a resumed job trains on the same tasks without asking the generator again.

    items = build_qa_items(text, cfg, base, progress)          extractive (+ generated)
    items = stored_qa_items(work_dir, text, cfg, base, progress)   the same, kept on disk
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lift_engine.config import LiftConfig
from lift_engine.data.extractive import QAItem, extract_tasks
from lift_engine.fsutil import atomic_write_bytes

QA_FILE = "qa_items.json"


def build_qa_items(text: str, cfg: LiftConfig, base, progress: bool) -> list[QAItem]:
    """Extractive tasks from the document, plus generated triples when the config asks.

    base: the LoadedModel that writes triples when no endpoint is configured (None is
    fine when the config uses no generator)."""
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


def stored_qa_items(work_dir: Path, text: str, cfg: LiftConfig, base, progress: bool) -> list[QAItem]:
    """The tasks stored in `work_dir`, or new ones (`build_qa_items`) written there atomically.
    A damaged task file is rebuilt, never trusted."""
    path = Path(work_dir) / QA_FILE
    if path.is_file():
        try:
            return [QAItem(**row) for row in json.loads(path.read_text())]
        except (ValueError, TypeError):
            pass
    items = build_qa_items(text, cfg, base, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps([asdict(i) for i in items]).encode())
    return items
