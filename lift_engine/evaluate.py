"""`lift eval`: LongBench / LooGLE style evaluation of truncated ICL, LIFT and full ICL.

    icl       truncated context (window W), base model
    lift      truncated context (window W) + the context's tuned adapter
    full-icl  the whole context (up to the model's positions), base model

In lift mode a context that fits the window needs no adapter: it is answered with the whole
context in the prompt (hybrid; `force_lift` tunes it anyway). Every other distinct context
without a cached adapter is admitted to ONE tuning
job (lift_engine.batch.job; at most `max_active` train at once, the next joins as one
finishes), with a progress bar per document and overall. Adapters are cached on disk under
a key of (context, config, base model, engine recipe, prefix sharing), so a rerun tunes
nothing and an adapter tuned before a recipe change is not reused after it. Questions are
then answered in batches across adapters (inference.decode_answers): up to `max_active`
adapters share one bank, and rows of different documents share a batch. With
`inference.route_by_confidence` each adapter question is also decoded by the base alone,
and the answer its own model is surer of is kept (docs/DESIGN.md §2.5); the summary counts how many the base
kept.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lift_engine import metrics
from lift_engine.adapters.io import load_adapters
from lift_engine.batch.job import TRAINER_ID, BatchTuneJob
from lift_engine.batch.progress import JobProgressDisplay
from lift_engine.config import BatchConfig, LiftConfig
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord
from lift_engine.errors import LiftError
from lift_engine.fsutil import atomic_write_bytes
from lift_engine.inference import AnswerRequest, DecodedAnswer, decode_answers
from lift_engine.models.loading import LoadedModel, model_device
from lift_engine.prompts import PromptBuilder

MODES = ("icl", "lift", "full-icl")
MANIFEST = "lift_adapter.json"


def cache_root() -> Path:
    return Path(os.environ.get("LIFT_CACHE_DIR", Path.home() / ".cache" / "lift_engine"))


def adapter_cache_name(context: str, cfg: LiftConfig, base: LoadedModel, prefix_sharing: bool) -> str:
    """Directory name of the cached adapter of `context`: a hash of everything that changes it."""
    key = "\0".join((context, cfg.fingerprint(), base.fingerprint, TRAINER_ID, str(bool(prefix_sharing))))
    return f"{cfg.adapter}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


@dataclass
class Prediction:
    id: str
    question: str
    prediction: str
    answers: list[str]
    scores: dict
    from_adapter: bool = False  # the adapter's answer (False: the base's, in context or by confidence routing)
    # confidence routing: both candidates and their mean log-probs under their own model,
    # {"adapter", "adapter_logprob", "base", "base_logprob"}; None for a question not routed
    routing: dict | None = None


def full_window(base: LoadedModel, max_new_tokens: int) -> int:
    """Largest context that fits the model's positions with room for question and answer."""
    positions = getattr(base.model.config, "max_position_embeddings", 4096)
    return max(16, positions - max_new_tokens - 256)


def cached_adapter_dirs(contexts: list[str], base: LoadedModel, cfg: LiftConfig, settings: BatchConfig) -> list[Path]:
    """Where each context's adapter is cached (tuned already when the dir holds MANIFEST)."""
    prefix = settings.prefix_sharing_on(model_device(base.model).type)
    return [cache_root() / "adapters" / adapter_cache_name(c, cfg, base, prefix) for c in contexts]


def tune_contexts(contexts: list[str], base: LoadedModel, cfg: LiftConfig, settings: BatchConfig,
                  progress: bool = True, log=print) -> list[Path]:
    """The cached adapter dir of every context, tuning the missing ones in one batched job."""
    dirs = cached_adapter_dirs(contexts, base, cfg, settings)
    root = cache_root() / "adapters"
    names = [d.name for d in dirs]
    missing = {name: c for name, c in zip(names, contexts) if not (root / name / MANIFEST).is_file()}
    if missing:
        job = BatchTuneJob(base, cfg, root, settings, log=log, status_file=None,
                           max_active=min(settings.max_active, len(missing)))
        display = JobProgressDisplay(enabled=progress)
        try:
            for n, (name, context) in enumerate(missing.items()):
                log(f"tuning an adapter for context {n + 1}/{len(missing)} ({len(context)} characters) as {name}")
                job.submit(context, name, source=f"context {names.index(name) + 1}")
            job.run(on_step=lambda _: display.update(job.progress()))
        finally:
            display.close()
            job.close()
        failed = {n: i["error"] for n, i in job.progress().items() if i["status"] != "done"}
        if failed:
            name, error = next(iter(failed.items()))
            raise LiftError(f"tuning {len(failed)} context(s) failed, e.g. {name}: {error}")
    return dirs


def evaluate(
    records: list[EvalRecord], base: LoadedModel, cfg: LiftConfig, mode: str, window: int,
    settings: BatchConfig | None = None, progress: bool = True, log=print, answer_batch: int = 16,
    force_lift: bool = False,
) -> tuple[dict, list[Prediction]]:
    """Answer every record in `mode`; returns (aggregate metrics, per-question predictions
    in record order). settings: the tuning engine's BatchConfig (lift mode); answer_batch:
    questions decoded together. In lift mode a context that fits the window is answered
    with all of it in the prompt and no adapter (hybrid, docs/DESIGN.md §2.5), unless force_lift."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    settings = settings or BatchConfig()
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    contexts = list(dict.fromkeys(r.context for r in records))
    doc_ids = {c: tokenize_long(c, base.tokenizer) for c in contexts}
    if mode == "full-icl":
        window = full_window(base, cfg.inference.max_new_tokens)
    in_context = set()
    if mode == "lift" and not force_lift:
        in_context = {c for c in contexts if len(doc_ids[c]) <= window}
        for c in in_context:
            log(f"context {contexts.index(c) + 1}: {len(doc_ids[c])} tokens fit the {window}-token window: "
                "answered in context, no adapter")
    tuned = [c for c in contexts if c not in in_context] if mode == "lift" else []
    adapter_dirs = dict(zip(tuned, tune_contexts(tuned, base, cfg, settings, progress, log))) if tuned else {}
    # Each group shares one bank of adapters (max_active at a time); one group without adapters.
    groups = [tuned[i : i + settings.max_active] for i in range(0, len(tuned), settings.max_active)]
    groups.append([c for c in contexts if c not in adapter_dirs])
    answers: dict[int, DecodedAnswer] = {}
    bar = tqdm(total=len(records), desc=f"answering ({mode})", unit="q", disable=not progress, dynamic_ncols=True)
    try:
        for group in groups:
            if not group:
                continue
            with_adapters = group[0] in adapter_dirs
            slot_of = {c: i for i, c in enumerate(group)}
            handle = load_adapters([adapter_dirs[c] for c in group], base) if with_adapters else None
            try:
                indices = [i for i, r in enumerate(records) if r.context in slot_of]
                requests = [AnswerRequest(records[i].question, doc_ids[records[i].context],
                                          None if records[i].context in in_context else window,
                                          slot_of[records[i].context] if with_adapters else None)
                            for i in indices]
                decoded = decode_answers(base.model, base.tokenizer, prompts, requests, handle=handle,
                                         max_new_tokens=cfg.inference.max_new_tokens, batch_size=answer_batch,
                                         progress=bar.update,
                                         route_by_confidence=with_adapters and cfg.inference.route_by_confidence)
                answers.update(zip(indices, decoded))
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        bar.close()
    text = lambda a: base.tokenizer.decode(a.ids, skip_special_tokens=True).strip()  # noqa: E731
    texts = {i: text(a) for i, a in answers.items()}
    predictions = [Prediction(r.id, r.question, texts[i], r.answers, metrics.score(texts[i], r.answers),
                              answers[i].from_adapter, routing_candidates(answers[i], text))
                   for i, r in enumerate(records)]
    routed = sum(1 for i, r in enumerate(records) if r.context in adapter_dirs and not answers[i].from_adapter)
    if routed:
        log(f"confidence routing: the base model's answer was kept for {routed} of "
            f"{sum(1 for r in records if r.context in adapter_dirs)} adapter questions")
    summary = metrics.aggregate([p.scores for p in predictions])
    summary.update({"mode": mode, "window": window, "questions": len(predictions), "contexts": len(contexts),
                    "adapter": cfg.adapter if mode == "lift" else None,
                    "contexts_answered_in_context": len(in_context),
                    "answered_by_base_after_routing": routed})
    return summary, predictions


def routing_candidates(answer: DecodedAnswer, text: Callable[[DecodedAnswer], str]) -> dict | None:
    """Both answers confidence routing chose between (Prediction.routing), or None if it did not route."""
    if answer.passed_over is None:
        return None
    adapters, bases = (answer, answer.passed_over) if answer.from_adapter else (answer.passed_over, answer)
    confidence = lambda a: round(a.mean_logprob, 4) if math.isfinite(a.mean_logprob) else None  # noqa: E731
    return {"adapter": text(adapters), "adapter_logprob": confidence(adapters),
            "base": text(bases), "base_logprob": confidence(bases)}


def write_predictions(predictions: list[Prediction], path: str | Path) -> None:
    """One JSON line per question: _id, question, prediction, answers, scores, and with
    confidence routing both candidates ("routing", Prediction.routing) (atomic write)."""
    lines = [
        json.dumps({"_id": p.id, "question": p.question, "prediction": p.prediction, "answers": p.answers,
                    "scores": p.scores} | ({"routing": p.routing} if p.routing else {}), ensure_ascii=False)
        for p in predictions
    ]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())
