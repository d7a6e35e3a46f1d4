"""`lift eval`: LongBench / LooGLE style evaluation of truncated ICL, LIFT and full ICL.

    icl       truncated context (window W), base model
    lift      truncated context (window W) + the context's tuned adapter
    full-icl  the whole context (up to the model's positions), base model

One adapter is tuned per distinct context and reused for all its questions; adapters are
cached on disk under a key of (context, config, base model), so a rerun tunes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lift_engine import metrics
from lift_engine.config import LiftConfig
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord
from lift_engine.fsutil import atomic_write_bytes
from lift_engine.inference import greedy_answer
from lift_engine.models.loading import LoadedModel
from lift_engine.pipeline import load_tuned, tune_document
from lift_engine.prompts import PromptBuilder

MODES = ("icl", "lift", "full-icl")


def cache_root() -> Path:
    return Path(os.environ.get("LIFT_CACHE_DIR", Path.home() / ".cache" / "lift_engine"))


def adapter_cache_dir(context: str, cfg: LiftConfig, base: LoadedModel) -> Path:
    key = hashlib.sha256(f"{context}\0{cfg.fingerprint()}\0{base.fingerprint}".encode()).hexdigest()[:24]
    return cache_root() / "adapters" / f"{cfg.adapter}-{key}"


@dataclass
class Prediction:
    id: str
    question: str
    prediction: str
    answers: list[str]
    scores: dict


def full_window(base: LoadedModel, prompts: PromptBuilder, max_new_tokens: int) -> int:
    """Largest context that fits the model's positions with room for question and answer."""
    positions = getattr(base.model.config, "max_position_embeddings", 4096)
    return max(16, positions - max_new_tokens - 256)


def evaluate(
    records: list[EvalRecord], base: LoadedModel, cfg: LiftConfig, mode: str, window: int,
    progress: bool = True, log=print,
) -> tuple[dict, list[Prediction]]:
    """Answer every record in `mode`; returns (aggregate metrics, per-question predictions)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    by_context: dict[str, list[EvalRecord]] = {}
    for record in records:
        by_context.setdefault(record.context, []).append(record)
    predictions: list[Prediction] = []
    if mode == "full-icl":
        window = full_window(base, prompts, cfg.inference.max_new_tokens)
    bar = tqdm(total=len(records), desc=f"eval {mode}", unit="q", disable=not progress, dynamic_ncols=True)
    try:
        for n, (context, group) in enumerate(by_context.items()):
            doc_ids = tokenize_long(context, base.tokenizer)
            handle = None
            if mode == "lift":
                adapter_dir = adapter_cache_dir(context, cfg, base)
                if not (adapter_dir / "lift_adapter.json").is_file():
                    log(f"tuning an adapter for context {n + 1}/{len(by_context)} ({len(doc_ids)} tokens)")
                    tune_document(base, context, adapter_dir, cfg, progress=progress, source=group[0].id, log=log)
                handle = load_tuned(base, adapter_dir)
            try:
                for record in group:
                    answer = greedy_answer(
                        base.model, base.tokenizer, prompts, record.question, doc_ids=doc_ids, window=window,
                        max_new_tokens=cfg.inference.max_new_tokens, handle=handle, slot=0 if handle else None,
                    )
                    predictions.append(Prediction(record.id, record.question, answer, record.answers,
                                                  metrics.score(answer, record.answers)))
                    bar.update(1)
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        bar.close()
    summary = metrics.aggregate([p.scores for p in predictions])
    summary.update({"mode": mode, "window": window, "questions": len(predictions), "contexts": len(by_context),
                    "adapter": cfg.adapter if mode == "lift" else None})
    return summary, predictions


def write_predictions(predictions: list[Prediction], path: str | Path) -> None:
    """One JSON line per question: _id, question, prediction, answers (atomic write)."""
    lines = [
        json.dumps({"_id": p.id, "question": p.question, "prediction": p.prediction, "answers": p.answers,
                    "scores": p.scores}, ensure_ascii=False)
        for p in predictions
    ]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())
