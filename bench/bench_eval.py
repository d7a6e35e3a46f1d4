"""`lift eval --mode lift` end to end: one document and one question at a time against the
engine's batched path, side by side in one run, on the same documents and questions.

    one-by-one        each context tuned alone (a job of one, no prefix sharing), then
                      each question decoded alone (greedy_answer, batch of one)
    batched, exact    evaluate(): every context admitted to one job (no prefix sharing, so
                      each adapter equals its one-by-one twin to float tolerance), then
                      questions decoded in batches across adapters
    batched + prefix  the same with prefix sharing (the CPU default of `lift eval`)

Each method tunes into its own empty adapter cache. Reported per method: tuning seconds,
answering seconds, total, the ratios against one-by-one, and how many answers equal the
one-by-one answers. Beside it: time to first answer for one long document (tune + one
question through the batched path).

Usage: .venv/bin/python -m bench.bench_eval [--docs 8] [--questions 8] [--compute-dtype bfloat16]
Writes bench/results/bench_eval.json. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lift_engine.config import BatchConfig, make_config
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord
from lift_engine.data.synthetic import make_dataset
from lift_engine.evaluate import adapter_cache_name, cache_root, evaluate, tune_contexts
from lift_engine.fsutil import atomic_write_json
from lift_engine.host_memory import keep_freed_memory
from lift_engine.inference import greedy_answer
from lift_engine.models.loading import load_base_model
from lift_engine.pipeline import load_tuned, tune_document
from lift_engine.prompts import PromptBuilder

from bench.common import hardware

RESULTS = Path(__file__).parent / "results"


def records_for(n_docs: int, questions: int, filler: int, seed: int) -> list[EvalRecord]:
    rows = make_dataset(n_docs, seed=seed, n_facts=max(questions, 1), filler_paragraphs=filler)
    out, per_doc = [], {}
    for r in rows:
        if per_doc.setdefault(r["context"], 0) < questions:
            per_doc[r["context"]] += 1
            out.append(EvalRecord(r["_id"], r["context"], r["input"], list(r["answers"]), "lift-synthetic"))
    return out


def one_by_one(records, base, cfg) -> tuple[float, float, list[str]]:
    """(tuning s, answering s, answers): the path `lift eval` took before the engine merge."""
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    settings = BatchConfig(prefix_sharing=False, max_active=1)
    contexts = list(dict.fromkeys(r.context for r in records))
    began = time.monotonic()
    dirs = {}
    for c in contexts:
        dirs[c] = cache_root() / "adapters" / adapter_cache_name(c, cfg, base, False)
        tune_document(base, c, dirs[c], cfg, settings, progress=False, log=lambda *a: None)
    tuned = time.monotonic()
    answers = {}
    for c in contexts:
        ids = tokenize_long(c, base.tokenizer)
        handle = load_tuned(base, dirs[c])
        try:
            for i, r in enumerate(records):
                if r.context == c:
                    answers[i] = greedy_answer(base.model, base.tokenizer, prompts, r.question, doc_ids=ids,
                                               window=cfg.inference.window, max_new_tokens=cfg.inference.max_new_tokens,
                                               handle=handle, slot=0)
        finally:
            handle.remove()
    return tuned - began, time.monotonic() - tuned, [answers[i] for i in range(len(records))]


def batched(records, base, cfg, prefix: bool, max_active: int) -> tuple[float, float, list[str]]:
    """(tuning s, answering s, answers) of evaluate() with the engine."""
    settings = BatchConfig(prefix_sharing=prefix, max_active=max_active)
    contexts = list(dict.fromkeys(r.context for r in records))
    began = time.monotonic()
    tune_contexts(contexts, base, cfg, settings, progress=False, log=lambda *a: None)
    tuned = time.monotonic()
    _, predictions = evaluate(records, base, cfg, "lift", cfg.inference.window, settings, progress=False,
                              log=lambda *a: None)
    return tuned - began, time.monotonic() - tuned, [p.prediction for p in predictions]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8, help="questions per document")
    parser.add_argument("--filler", type=int, default=40, help="filler paragraphs per document (40: ~2.5k tokens)")
    parser.add_argument("--long-filler", type=int, default=140, help="filler paragraphs of the long document (~8k tokens)")
    parser.add_argument("--epochs2", type=int, default=None, help="stage-2 epochs (default: the cpu preset's)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    keep_freed_memory()

    cfg = make_config("cpu", "lora")
    cfg.train.compute_dtype = args.compute_dtype
    if args.epochs2 is not None:
        cfg.train.stage2_epochs = args.epochs2
    base = load_base_model(args.model)
    records = records_for(args.docs, args.questions, args.filler, args.seed)
    tokens = [len(tokenize_long(c, base.tokenizer)) for c in dict.fromkeys(r.context for r in records)]
    methods = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("one-by-one", lambda: one_by_one(records, base, cfg)),
                          ("batched, exact", lambda: batched(records, base, cfg, False, args.docs)),
                          ("batched + prefix", lambda: batched(records, base, cfg, True, args.docs))):
            os.environ["LIFT_CACHE_DIR"] = str(Path(tmp) / name.replace(" ", "_").replace(",", "").replace("+", "p"))
            tune_s, answer_s, answers = run()
            methods[name] = {"tuning_s": round(tune_s, 1), "answering_s": round(answer_s, 1),
                             "total_s": round(tune_s + answer_s, 1), "answers": answers}
            print(f"{name}: {tune_s:.1f} s tuning, {answer_s:.1f} s answering", file=sys.stderr, flush=True)
        reference = methods["one-by-one"]
        for m in methods.values():
            m["x_total"] = round(reference["total_s"] / m["total_s"], 2)
            m["x_tuning"] = round(reference["tuning_s"] / m["tuning_s"], 2)
            m["x_answering"] = round(reference["answering_s"] / m["answering_s"], 2)
            m["same_answers"] = sum(a == b for a, b in zip(m["answers"], reference["answers"]))
        long_records = records_for(1, 1, args.long_filler, args.seed + 1)
        os.environ["LIFT_CACHE_DIR"] = str(Path(tmp) / "first-answer")
        began = time.monotonic()
        evaluate(long_records, base, cfg, "lift", cfg.inference.window, BatchConfig(), progress=False, log=lambda *a: None)
        first_answer = {"document_tokens": len(tokenize_long(long_records[0].context, base.tokenizer)),
                        "seconds": round(time.monotonic() - began, 1)}
    result = {"hardware": hardware(), "model": base.model_id, "documents": len(tokens), "document_tokens": tokens,
              "questions": len(records), "compute_dtype": args.compute_dtype, "stage2_epochs": cfg.train.stage2_epochs,
              "methods": methods, "time_to_first_answer": first_answer}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "bench_eval.json", result)
    print(f"\n{len(tokens)} documents ({min(tokens)}-{max(tokens)} tokens), {len(records)} questions, "
          f"{args.compute_dtype}, {result['hardware']}\n")
    print("| method | tuning s | answering s | total s | x total | x tuning | x answering | same answers |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in methods.items():
        print(f"| {name} | {m['tuning_s']} | {m['answering_s']} | {m['total_s']} | {m['x_total']} | {m['x_tuning']} | "
              f"{m['x_answering']} | {m['same_answers']}/{len(records)} |")
    print(f"\ntime to first answer, one {first_answer['document_tokens']}-token document: {first_answer['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
