"""Quality of LIFT on real prose (the development set) and on the synthetic set, side by side.

Methods, on the same documents and questions, in one run (`--methods` picks some; results
accumulate in the JSON, so a long comparison can be run in parts):

    icl             truncated ICL: base model, context middle-truncated to the window
    full-icl        full-context ICL, where the document fits the model's positions
    oracle          oracle-passage ICL: the ~500 tokens around the answer's first occurrence
                    in the prompt (the ceiling a perfect memory would reach with this model)
    lift-old        LIFT + truncated ICL, the cpu preset's recipe (segments + extractive QA)
    lift-distill    LIFT + truncated ICL, the cpu preset plus context distillation (the candidate)
    lift-anchor     the cpu-prose preset: the cpu preset plus context distillation on
                    extractive and template queries (no generated queries: the 135M generator
                    is slow and writes poor ones) and anchor samples (distill.anchor_fraction
                    = 0.5: the student also learns with the passage in view, to keep
                    in-context answers)
    lift-anchor-ctx the same with distill.teacher_context: the teacher (and the anchors) also
                    read the document's head/tail context around the chunk (docs/DESIGN.md §2.6)
    … for LoRA and Gated Memory (`--adapters`); a LIFT row answers with the preset's
    confidence routing (docs/DESIGN.md §2.5: LoRA routed, named "… routed"; Gated Memory
    not), or as `--no-routing` / `--routing` say

Question sets (`--set`): `dev`, the real-prose development set (../shared/eval, 26
questions on 2 documents); `dev-plus`, the same plus the questions this project added to
the same two documents (bench/data/dev_questions_added.json, 72 more and 2 retired: with
26, one question moves a score by 4 points); `synthetic`, the invented-facts documents.

Questions are split in two by position within their document: "choice" (even) — the part
recipes were chosen on — and "held-out" (odd), reported apart; again by whether an
answer is inside the truncated window ("in-window") or not ("outside"), the rows that say
whether LIFT keeps what the window shows; and, in `dev-plus`, into the "given" questions
and the "added" ones. Tuning time is reported per 1k tokens of document. Adapters are
cached like `lift eval`'s, so a rerun tunes nothing.

Usage: .venv/bin/python -m bench.bench_quality --set dev [--methods icl,lift-distill] [--window 1024]
       .venv/bin/python -m bench.bench_quality --set dev-plus --methods icl,oracle,lift-anchor --adapters lora
       .venv/bin/python -m bench.bench_quality --set synthetic --docs 2
Writes bench/results/quality_dev.json (quality_dev_plus.json, quality_synthetic_<N>docs.json)
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

from lift_engine.config import BatchConfig, LiftConfig, make_config
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord, read_records
from lift_engine.data.synthetic import make_dataset
from lift_engine.data.truncation import middle_truncate
from lift_engine import metrics
from lift_engine.evaluate import MANIFEST, Prediction, cached_adapter_dirs, evaluate
from lift_engine.fsutil import atomic_write_json
from lift_engine.host_memory import keep_freed_memory
from lift_engine.models.loading import load_base_model

from bench.common import hardware

RESULTS = Path(__file__).parent / "results"
DEV_SET = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "real_prose_dev.jsonl"
ADDED_QUESTIONS = Path(__file__).parent / "data" / "dev_questions_added.json"
ORACLE_TOKENS = 500


def with_distillation(cfg: LiftConfig) -> LiftConfig:
    """The config plus context distillation (docs/DESIGN.md §2.6) at its default settings."""
    out = LiftConfig.from_dict(cfg.to_dict())
    out.distill.enabled = True
    return out


def split_of(records: list[EvalRecord]) -> dict[str, str]:
    """record id → "choice" (even position within its document) or "held-out" (odd)."""
    seen: dict[str, int] = {}
    out = {}
    for r in records:
        k = seen.get(r.context, 0)
        seen[r.context] = k + 1
        out[r.id] = "choice" if k % 2 == 0 else "held-out"
    return out


def added_records(records: list[EvalRecord], path: Path) -> list[EvalRecord]:
    """The questions of `path` ({"questions": {dataset: [[question, [answers…]], …]}}) as
    records on the documents of `records` whose source is that dataset, ids
    "<dataset>-added-q<i>" (i: the position in the file's list). An entry with a third
    element (why) is retired: skipped, so that a flawed question found later leaves the
    other ids, and the predictions stored under them, as they were. Raises ValueError
    naming the question when a dataset is not in `records`, none of a question's answers
    occurs in its document, or one occurs in the question itself (echoing the question
    would score)."""
    documents = {r.source: r.context for r in records}
    out = []
    for dataset, questions in json.loads(Path(path).read_text())["questions"].items():
        if dataset not in documents:
            raise ValueError(f"{path}: no document of dataset {dataset!r} in the dev set ({sorted(documents)})")
        for i, (question, answers, *retired) in enumerate(questions):
            if retired:
                continue
            if not any(metrics.contains_answer(documents[dataset], a) for a in answers):
                raise ValueError(f"{path}: no answer of {question!r} occurs in {dataset!r}")
            if any(metrics.contains_answer(question, a) for a in answers):
                raise ValueError(f"{path}: an answer of {question!r} occurs in the question")
            out.append(EvalRecord(f"{dataset}-added-q{i}", documents[dataset], question, list(answers), dataset))
    return out


def question_set(name: str, file: str | Path = DEV_SET, added: str | Path = ADDED_QUESTIONS, docs: int = 2,
                 seed: int = 1234) -> tuple[list[EvalRecord], tuple[dict[str, str], ...]]:
    """The records of `--set name` ("dev", "dev-plus", "synthetic": `docs` documents made
    with `seed`) and its extra splits (dev-plus: id → "given" / "added"; none otherwise).
    A bad added-questions file exits with a message."""
    if name == "synthetic":
        rows = make_dataset(docs, seed=seed)
        return [EvalRecord(r["_id"], r["context"], r["input"], list(r["answers"]), "lift-synthetic") for r in rows], ()
    records = read_records(file)
    if name != "dev-plus":
        return records, ()
    try:
        more = added_records(records, Path(added))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"bench_quality: bad --added file: {e}") from None
    return records + more, ({r.id: "given" for r in records} | {r.id: "added" for r in more},)


def answer_pattern(answer: str) -> re.Pattern:
    """The answer's words in order, case-insensitive, across any run of spaces, line breaks
    and the punctuation around them: "config-failed and installed" finds a document's
    "‘config-failed’ and ‘installed’" and "package\ninstallation" finds "package installation"."""
    return re.compile(r"\W*\s+\W*".join(re.escape(word) for word in answer.split()), re.IGNORECASE)


def oracle_records(records: list[EvalRecord], tokenizer) -> tuple[list[EvalRecord], int]:
    """Each record with its context cut to ~ORACLE_TOKENS tokens centred on the first
    occurrence of an answer (answer_pattern); (records, how many answers were found).

    The passage is ORACLE_TOKENS // 2 tokens before the answer's first character and the
    rest from there on (fewer before it near the document's start), so it always holds the
    answer when one was found."""
    out, found = [], 0
    for r in records:
        hits = [m.start() for m in (answer_pattern(a).search(r.context) for a in r.answers if a.strip()) if m]
        if hits:
            found += 1
            at = min(hits)
            # 8 characters per token is more than any tokenizer here needs: both sides are long enough
            before = tokenize_long(r.context[max(0, at - 8 * ORACLE_TOKENS) : at], tokenizer)
            before = before[len(before) - min(len(before), ORACLE_TOKENS // 2):]
            after = tokenize_long(r.context[at : at + 8 * ORACLE_TOKENS], tokenizer)
            piece = tokenizer.decode(before + after[: ORACLE_TOKENS - len(before)])
        else:
            piece = ""
        out.append(dataclasses.replace(r, context=piece or " "))
    return out, found


def window_split(records: list[EvalRecord], tokenizer, window: int) -> dict[str, str]:
    """record id → "in-window" when an answer occurs (answer_pattern) in the context as
    middle-truncated to `window` tokens, else "outside"."""
    sep = tokenizer("\n...\n", add_special_tokens=False)["input_ids"]
    shown: dict[str, str] = {}
    out = {}
    for r in records:
        if r.context not in shown:
            ids = tokenize_long(r.context, tokenizer)
            shown[r.context] = tokenizer.decode(middle_truncate(ids, window, sep))
        shows_answer = any(answer_pattern(a).search(shown[r.context]) for a in r.answers if a.strip())
        out[r.id] = "in-window" if shows_answer else "outside"
    return out


def scores_by_split(predictions, *splits: dict[str, str]) -> dict:
    """Containment and qa-F1 over all predictions and over each part of each split, and the
    share of distinct answers (normalised): 1.0 when every question gets its own answer, low
    when a few memorised spans answer many questions."""
    out = {}
    parts = [(part, split) for split in splits for part in sorted(set(split.values()))] + [("all", None)]
    for part, split in parts:
        rows = [p for p in predictions if split is None or split[p.id] == part]
        out[part] = {"questions": len(rows),
                     "contains_answer": round(sum(p.scores["contains_answer"] for p in rows) / max(1, len(rows)), 3),
                     "qa_f1": round(sum(p.scores["qa_f1"] for p in rows) / max(1, len(rows)), 3),
                     "distinct_answers": round(len({metrics.normalize_answer(p.prediction) for p in rows})
                                               / max(1, len(rows)), 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("dev", "dev-plus", "synthetic"), default="dev")
    parser.add_argument("--file", default=str(DEV_SET), help="the dev set (LongBench jsonl)")
    parser.add_argument("--added", default=str(ADDED_QUESTIONS), help="dev-plus: the added questions (JSON)")
    parser.add_argument("--docs", type=int, default=2, help="synthetic documents")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--window", type=int, default=None, help="default: 1024 (dev), the preset's (synthetic)")
    parser.add_argument("--methods", default="icl,full-icl,oracle,lift-old,lift-distill")
    parser.add_argument("--adapters", default="lora,gated-memory")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the base model's dtype while tuning (bfloat16 pays only on CPUs with AMX and on GPUs)")
    routing = parser.add_mutually_exclusive_group()
    routing.add_argument("--no-routing", action="store_true",
                         help="LIFT rows answer with the adapter only (default: the preset's confidence routing, "
                              "docs/DESIGN.md §2.5 — LoRA routed, Gated Memory not; routed rows are named '… routed')")
    routing.add_argument("--routing", action="store_true", help="LIFT rows use confidence routing for every adapter kind")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="recompute every stored row's split scores from its stored predictions; tune and answer nothing")
    args = parser.parse_args()
    keep_freed_memory()

    records, extra_splits = question_set(args.set, args.file, args.added, args.docs, args.seed)
    base = load_base_model(args.model)
    split = split_of(records)
    contexts = list(dict.fromkeys(r.context for r in records))
    doc_tokens = {c: len(tokenize_long(c, base.tokenizer)) for c in contexts}
    # one file per question set: rows of different sets never mix
    out_path = RESULTS / (f"quality_{args.set.replace('-', '_')}.json" if args.set != "synthetic"
                          else f"quality_synthetic_{args.docs}docs.json")
    result = json.loads(out_path.read_text()) if out_path.is_file() else {"results": {}}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    def save(result: dict) -> None:
        result.update({"model": base.model_id, "set": args.set, "questions": len(records),
                       "documents": len(contexts), "document_tokens": list(doc_tokens.values()),
                       "compute_dtype": args.compute_dtype})
        if not args.rescore or "hardware" not in result:  # a rescore measures nothing: the runs' machine stays
            result["hardware"] = hardware()
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(out_path, result)
    if args.rescore:
        by_id = {r.id: r for r in records}
        for row in result["results"].values():
            # a question retired from the set since (see added_records) keeps its stored prediction, unscored
            preds = [Prediction(p["id"], "", p["prediction"], p["answers"], metrics.score(p["prediction"], p["answers"]))
                     for p in row["predictions"] if p["id"] in by_id]
            shown = [by_id[p.id] for p in preds]
            row.update(scores_by_split(preds, {p.id: split[p.id] for p in preds},
                                       window_split(shown, base.tokenizer, row["window"]),
                                       *({p.id: g[p.id] for p in preds} for g in extra_splits)))
    for method in [m for m in args.methods.split(",") if m and not args.rescore]:
        for kind in (args.adapters.split(",") if method.startswith("lift") else ["lora"]):
            cfg = make_config("cpu-prose" if method.startswith("lift-anchor") else "cpu", kind)
            cfg.train.compute_dtype = args.compute_dtype
            if args.no_routing or args.routing:
                cfg.inference.route_by_confidence = args.routing
            window = args.window or (1024 if args.set != "synthetic" else cfg.inference.window)
            cfg.inference.window = window
            name, mode, run_records, note = method, method, records, {}
            if method == "lift-old":
                mode = "lift"
            elif method == "lift-distill":
                cfg, mode = with_distillation(cfg), "lift"
            elif method in ("lift-anchor", "lift-anchor-ctx"):
                cfg.distill.teacher_context = method == "lift-anchor-ctx"
                mode = "lift"
            elif method == "full-icl":
                limit = base.model.config.max_position_embeddings - cfg.inference.max_new_tokens - 256
                run_records = [r for r in records if doc_tokens[r.context] <= limit]
                note = {"documents_that_fit": len({r.context for r in run_records})}
            elif method == "oracle":
                run_records, found = oracle_records(records, base.tokenizer)
                mode, note = "full-icl", {"answers_found_in_document": found}
            if mode == "lift":
                name = f"{method} ({kind}, routed)" if cfg.inference.route_by_confidence else f"{method} ({kind})"
            if not run_records:
                continue
            # a row whose adapters were all tuned before times answering only: no tuning cost then
            cached = mode == "lift" and all((d / MANIFEST).is_file() for d in cached_adapter_dirs(
                list({r.context for r in run_records}), base, cfg, BatchConfig()))
            began = time.monotonic()
            summary, predictions = evaluate(run_records, base, cfg, mode, window, BatchConfig(), progress=False, log=log,
                                            force_lift=True)
            seconds = time.monotonic() - began
            row = {"mode": mode, "adapter": kind if mode == "lift" else None, "window": window,
                   "seconds": round(seconds, 1), "hardware": hardware(), **note,
                   **scores_by_split(predictions, split, window_split(records, base.tokenizer, window),
                                     *({p.id: g[p.id] for p in predictions} for g in extra_splits)),
                   "predictions": [{"id": p.id, "prediction": p.prediction, "answers": p.answers}
                                   | ({"from_adapter": p.from_adapter} if mode == "lift" else {})
                                   | ({"routing": p.routing} if p.routing else {}) for p in predictions]}
            if mode == "lift":
                row["route_by_confidence"] = cfg.inference.route_by_confidence
                row["answered_by_base_after_routing"] = summary["answered_by_base_after_routing"]
                row["adapters_cached"] = cached
                tuned_tokens = sum(doc_tokens[c] for c in {r.context for r in run_records})
                if not cached:
                    row["seconds_per_1k_document_tokens"] = round(seconds / (tuned_tokens / 1000), 2)
            result["results"][name] = row
            log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'predictions'})}")
            save(result)  # after every row: a long comparison killed half-way keeps what it measured
    save(result)
    print(f"\n{args.set}: {len(records)} questions over {len(contexts)} documents "
          f"({', '.join(map(str, doc_tokens.values()))} tokens); {result['hardware']}\n")
    parts = ("choice", "held-out", "in-window", "outside") + (("given", "added") if extra_splits else ()) + ("all",)
    print("| method | " + " | ".join(f"contains answer: {p}" for p in parts)
          + " | qa-F1 all | distinct answers | s per 1k doc tokens |")
    print("|---" * (len(parts) + 4) + "|")
    for name, s in result["results"].items():
        cells = [f"{s[p]['contains_answer']:.3f} ({s[p]['questions']})" if p in s else "" for p in parts]
        print(f"| {name} | " + " | ".join(cells) + f" | {s['all']['qa_f1']:.3f} | {s['all'].get('distinct_answers', '')} "
              f"| {s.get('seconds_per_1k_document_tokens', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
