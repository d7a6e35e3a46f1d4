"""Quality of LIFT on the project's synthetic long-document QA set (invented facts).

Side by side in one run, on the same documents and questions:

    truncated ICL             base model, context middle-truncated to the window
    LIFT (LoRA) + trunc. ICL  the document's LoRA adapter + the same truncated context
    LIFT (Gated Memory) + …   the document's Gated Memory adapter + the same context
    full-context ICL          base model, the whole document (it fits the default model)

Usage: .venv/bin/python bench/bench_quality.py [--docs 2] [--model M] [--preset cpu]
Writes bench/results/quality.json and quality.svg and prints a markdown table for the README.
Tuned adapters are cached by (context, config, model) like `lift eval`, so an interrupted
run resumes with the documents it has already tuned.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lift_engine.config import make_config
from lift_engine.data.records import EvalRecord
from lift_engine.data.synthetic import make_dataset
from lift_engine.evaluate import evaluate
from lift_engine.fsutil import atomic_write_json
from lift_engine.models.loading import load_base_model

from bench_common import hardware, svg_bar_chart  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--adapters", default="lora,gated-memory")
    args = parser.parse_args()

    rows = make_dataset(args.docs, seed=args.seed)
    records = [EvalRecord(r["_id"], r["context"], r["input"], list(r["answers"]), "lift-synthetic") for r in rows]
    base = load_base_model(args.model)
    runs = [("truncated ICL", "icl", "lora"), ("full-context ICL", "full-icl", "lora")]
    runs += [(f"LIFT ({kind}) + truncated ICL", "lift", kind) for kind in args.adapters.split(",") if kind]
    table = {}
    began = time.monotonic()
    for name, mode, kind in runs:
        cfg = make_config(args.preset, kind)
        start = time.monotonic()
        summary, _ = evaluate(records, base, cfg, mode, cfg.inference.window, log=lambda *a: print(*a, file=sys.stderr))
        summary["seconds"] = round(time.monotonic() - start, 1)
        table[name] = summary
        print(f"{name}: {json.dumps(summary)}", file=sys.stderr)
    result = {"hardware": hardware(), "model": base.model_id, "documents": args.docs, "questions": len(records),
              "preset": args.preset, "seconds": round(time.monotonic() - began, 1), "results": table}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "quality.json", result)
    svg_bar_chart(RESULTS / "quality.svg", f"LIFT quality: {len(records)} questions, {args.docs} synthetic documents",
                  list(table), {key: [s.get(key, 0.0) for s in table.values()] for key in ("contains_answer", "qa_f1")},
                  ylabel="score (higher is better)", subtitle=f"{base.model_id}; preset {args.preset}; window "
                  f"{make_config(args.preset).inference.window}; {result['hardware']['cpu']}", log=False, value_format="{:.2f}")
    print(f"\n{len(records)} questions over {args.docs} synthetic documents; {result['hardware']}\n")
    print("| method | contains answer | qa-F1 | ROUGE-L | EM |")
    print("|---|---|---|---|---|")
    for name, s in table.items():
        print(f"| {name} | {s.get('contains_answer', 0):.3f} | {s.get('qa_f1', 0):.3f} | {s.get('rouge_l', 0):.3f} | "
              f"{s.get('exact_match', 0):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
