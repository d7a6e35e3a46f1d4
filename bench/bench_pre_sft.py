"""Pre-LIFT SFT (issue 17), measured on held-out documents, side by side in one run.

1. Pre-SFT: the raw base is fine-tuned once (`lift pre-sft`, lift_engine.presft) on
   `--synthetic N` documents of the project's generator (seed `--train-seed`); its time and
   settings are reported.
2. Held-out documents never seen in pre-SFT: the real-prose dev set (`--dev FILE`) and
   fresh synthetic documents (seed `--heldout-seed`, which must differ from the training
   seed; the run checks that no held-out text was in the corpus).
3. Each held-out set is answered by truncated ICL, full ICL and LIFT (`--methods`), each on
   the raw base and on the pre-SFT'd base, through lift_engine.evaluate as `lift eval`
   does; containment accuracy with the number of questions (also over the questions whose
   answer the truncated window shows, "in-window"), the pre-SFT / raw ratio, and
   for ICL the difference against its noise (two binomial standard errors of the
   difference: a pre-SFT that breaks in-context learning is not a win).

Full run (the issue's setting; hours on the 2-core CPU, run it alone):
    .venv/bin/python -m bench.bench_pre_sft --dev ../shared/eval/real_prose_dev.jsonl --synthetic 100
Quick check that it works (minutes; the numbers mean nothing):
    .venv/bin/python -m bench.bench_pre_sft --dev ../shared/eval/real_prose_dev.jsonl --synthetic 2 \\
        --train-paragraphs 3 --heldout-synthetic 1 --heldout-paragraphs 3 --dev-docs 1 --dev-chars 3000 \\
        --questions 2 --lift-extractive 4 --lift-stage2-epochs 1 --window 256 --name pre_sft_quick
Writes bench/results/<name>.json (default pre_sft) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from lift_engine.config import BatchConfig, PreSftConfig, make_config
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord, read_records
from lift_engine.data.synthetic import make_dataset
from lift_engine.evaluate import evaluate
from lift_engine.fsutil import atomic_write_json
from lift_engine.host_memory import keep_freed_memory
from lift_engine.models.loading import load_base_model
from lift_engine.presft.corpus import read_corpus
from lift_engine.presft.run import run_pre_sft

from bench.common import hardware
from bench.bench_quality import scores_by_split, split_of, window_split

RESULTS = Path(__file__).parent / "results"
METHODS = {"icl": "icl", "full-icl": "full-icl", "lift": "lift"}


def heldout_sets(args, corpus_texts: set[str]) -> dict[str, list[EvalRecord]]:
    """{"dev": records, "synthetic": records}: the held-out questions, none on a corpus text."""
    sets = {}
    if args.dev:
        records = read_records(args.dev)
        contexts = list(dict.fromkeys(r.context for r in records))[: args.dev_docs or None]
        keep = set(contexts)
        records = [r for r in records if r.context in keep]
        if args.dev_chars:
            records = [dataclasses.replace(r, context=r.context[: args.dev_chars]) for r in records]
        sets["dev"] = records
    if args.heldout_synthetic:
        rows = make_dataset(args.heldout_synthetic, seed=args.heldout_seed, filler_paragraphs=args.heldout_paragraphs)
        sets["synthetic"] = [EvalRecord(r["_id"], r["context"], r["input"], list(r["answers"]), "lift-synthetic")
                             for r in rows]
    for name, records in sets.items():
        seen = {r.context for r in records} & corpus_texts
        if seen:
            raise SystemExit(f"error: {len(seen)} held-out {name} documents were in the pre-SFT corpus")
        if args.questions:  # the first N questions of every document
            count: dict[str, int] = {}
            kept = []
            for r in records:
                count[r.context] = count.get(r.context, 0) + 1
                if count[r.context] <= args.questions:
                    kept.append(r)
            sets[name] = kept
    return sets


def lift_config(args):
    cfg = make_config("cpu", "lora")
    cfg.train.compute_dtype = args.compute_dtype
    if args.lift_extractive is not None:
        cfg.qa.num_extractive = args.lift_extractive
    if args.lift_stage2_epochs is not None:
        cfg.train.stage2_epochs = args.lift_stage2_epochs
    return cfg


def in_window_cell(row: dict) -> str:
    """"raw → pre-SFT" answers found among the questions whose answer the truncated window shows."""
    parts = [row[base].get("in-window") for base in ("raw", "pre-sft")]
    if not all(parts):
        return "none in window"
    return " → ".join(f"{round(p['contains_answer'] * p['questions'])}/{p['questions']}" for p in parts)


def noise(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two standard errors of the difference of two binomial proportions."""
    return 2 * math.sqrt(p1 * (1 - p1) / max(1, n1) + p2 * (1 - p2) / max(1, n2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", default=None, metavar="FILE", help="the real-prose dev set (LongBench jsonl)")
    parser.add_argument("--dev-docs", type=int, default=0, help="only the first N dev documents (0: all)")
    parser.add_argument("--dev-chars", type=int, default=0, help="cut dev documents to N characters (quick checks only)")
    parser.add_argument("--synthetic", type=int, default=100, help="pre-SFT corpus: synthetic documents")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--train-paragraphs", type=int, default=PreSftConfig.synthetic_paragraphs)
    parser.add_argument("--heldout-synthetic", type=int, default=4, help="fresh synthetic held-out documents")
    parser.add_argument("--heldout-seed", type=int, default=1234)
    parser.add_argument("--heldout-paragraphs", type=int, default=40)
    parser.add_argument("--questions", type=int, default=0, help="at most N questions per document (0: all)")
    parser.add_argument("--methods", default="icl,full-icl,lift")
    parser.add_argument("--epochs", type=int, default=PreSftConfig.epochs)
    parser.add_argument("--rank", type=int, default=PreSftConfig.rank)
    parser.add_argument("--lr", type=float, default=PreSftConfig.lr)
    parser.add_argument("--batch-size", type=int, default=PreSftConfig.batch_size)
    parser.add_argument("--lift-extractive", type=int, default=None, help="LIFT's extractive tasks (default: the preset's)")
    parser.add_argument("--lift-stage2-epochs", type=int, default=None, help="LIFT's stage-2 epochs (default: the preset's)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="tuning dtype (float32: bf16 is very slow on AVX2-only CPUs)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--presft-model", default=None, metavar="DIR",
                        help="use this pre-SFT'd model instead of running pre-SFT (its lift_pre_sft.json is reported)")
    parser.add_argument("--save-model", default=None, metavar="DIR",
                        help="write the pre-SFT'd model here (kept; default: a temporary dir) for a later --presft-model")
    parser.add_argument("--name", default="pre_sft", help="results file name (bench/results/<name>.json)")
    args = parser.parse_args()
    if args.save_model and args.presft_model:
        parser.error("--save-model and --presft-model exclude each other")
    if args.heldout_synthetic and args.synthetic and args.heldout_seed == args.train_seed:
        parser.error("--heldout-seed must differ from --train-seed")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    keep_freed_memory()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    raw = load_base_model(args.model)
    cfg = lift_config(args)
    presft = PreSftConfig(epochs=args.epochs, rank=args.rank, lr=args.lr, batch_size=args.batch_size,
                          synthetic=args.synthetic, synthetic_seed=args.train_seed,
                          synthetic_paragraphs=args.train_paragraphs)
    corpus = read_corpus([], presft) if args.synthetic else []
    with tempfile.TemporaryDirectory(prefix="bench-pre-sft-") as tmp:
        if args.presft_model:
            tuned = load_base_model(args.presft_model)
            info = json.loads((Path(args.presft_model) / "lift_pre_sft.json").read_text())
            presft_seconds = None
        else:
            tuned = load_base_model(args.model)  # becomes the pre-SFT'd model in place
            began = time.monotonic()
            out_dir = Path(args.save_model) if args.save_model else Path(tmp) / "presft-model"
            outcome = run_pre_sft(tuned, corpus, out_dir, cfg, presft, BatchConfig(), log=log)
            presft_seconds = round(time.monotonic() - began, 1)
            info = outcome.info
        log(f"pre-sft: {info['steps']} steps, loss {info['first_loss']} → {info['last_loss']}, {presft_seconds} s")
        sets = heldout_sets(args, {d.text for d in corpus})
        results: dict = {}
        for set_name, records in sets.items():
            split = split_of(records)
            in_window = window_split(records, raw.tokenizer, args.window)
            doc_tokens = {c: len(tokenize_long(c, raw.tokenizer)) for c in {r.context for r in records}}
            results[set_name] = {"documents": len(doc_tokens), "questions": len(records),
                                 "document_tokens": sorted(doc_tokens.values()), "methods": {}}
            for method in methods:
                run_records = records
                if method == "full-icl":
                    limit = raw.model.config.max_position_embeddings - cfg.inference.max_new_tokens - 256
                    run_records = [r for r in records if doc_tokens[r.context] <= limit]
                if not run_records:
                    continue
                row = {}
                for base_name, base in (("raw", raw), ("pre-sft", tuned)):
                    began = time.monotonic()
                    _, predictions = evaluate(run_records, base, cfg, METHODS[method], args.window, BatchConfig(),
                                              progress=False, log=log, force_lift=True)
                    by_part = scores_by_split(predictions, split, in_window)
                    scores = by_part["all"]
                    row[base_name] = {**scores, "in-window": by_part.get("in-window"),
                                      "seconds": round(time.monotonic() - began, 1),
                                      "predictions": [{"id": p.id, "prediction": p.prediction} for p in predictions]}
                    log(f"{set_name} {method} {base_name}: {scores}")
                p_raw, p_sft = row["raw"]["contains_answer"], row["pre-sft"]["contains_answer"]
                n_raw, n_sft = row["raw"]["questions"], row["pre-sft"]["questions"]
                row["ratio"] = round(p_sft / p_raw, 3) if p_raw else None
                row["difference"] = round(p_sft - p_raw, 3)
                row["noise_2se"] = round(noise(p_raw, n_raw, p_sft, n_sft), 3)
                row["within_noise"] = abs(p_sft - p_raw) <= row["noise_2se"]
                results[set_name]["methods"][method] = row
    result = {"hardware": hardware(), "model": raw.model_id, "window": args.window, "compute_dtype": args.compute_dtype,
              "pre_sft": {"seconds": presft_seconds, "settings": info.get("pre_sft"), "steps": info.get("steps"),
                          "first_loss": info.get("first_loss"), "last_loss": info.get("last_loss"),
                          "corpus": info.get("corpus"), "model_fingerprint": tuned.fingerprint},
              "lift_config": cfg.to_dict(), "args": vars(args), "sets": results}
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"{args.name}.json"
    atomic_write_json(out_path, result)
    print(f"\npre-SFT: {info.get('corpus', {}).get('documents')} documents, {info.get('steps')} steps, "
          f"{presft_seconds} s ({args.compute_dtype}); {result['hardware']}\n")
    print("| set | method | raw: contains (n) | pre-SFT: contains (n) | pre-SFT / raw | difference ± 2 SE "
          "| in window, raw → pre-SFT |")
    print("|---|---|---|---|---|---|---|")
    for set_name, res in results.items():
        for method, row in res["methods"].items():
            print(f"| {set_name} | {method} | {row['raw']['contains_answer']:.3f} ({row['raw']['questions']}) | "
                  f"{row['pre-sft']['contains_answer']:.3f} ({row['pre-sft']['questions']}) | {row['ratio']} | "
                  f"{row['difference']:+.3f} ± {row['noise_2se']:.3f} | {in_window_cell(row)} |")
    print(f"\nwritten to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
