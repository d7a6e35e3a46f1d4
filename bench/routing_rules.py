"""A routed bench_quality row scored again under other routing margins, from its stored candidates.

A LIFT row answered with confidence routing (docs/DESIGN.md §2.5) stores, for each
question, both candidates and their mean log-probabilities under their own model
(`routing`: adapter, adapter_logprob, base, base_logprob). This replays the choice
without decoding anything:

    keep the base's answer  iff  lp_base > lp_adapter + margin

margin 0 is the engine's rule; "adapter" (margin +inf) is the row without routing and
"base" (−inf) is truncated ICL, both as decoded beside each other in the routed run.
Scores are split as bench_quality's (choice / held-out, in-window / outside), so that a
margin picked on the choice half is read on the held-out half.

    .venv/bin/python -m bench.routing_rules --set dev-plus --row "lift-old (gated-memory, routed)"
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from lift_engine import metrics
from lift_engine.models.loading import load_base_model

from bench.bench_quality import ADDED_QUESTIONS, DEV_SET, RESULTS, question_set, split_of, window_split

PARTS = ("choice", "held-out", "in-window", "outside", "all")
MARGINS = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)


def keeps_base(candidates: dict, margin: float) -> bool:
    """Whether the base's answer is kept at `margin`: its mean log-prob exceeds the adapter's
    by more than margin (a candidate without a real token, logprob None, never wins)."""
    lp_adapter = candidates["adapter_logprob"] if candidates["adapter_logprob"] is not None else -math.inf
    lp_base = candidates["base_logprob"] if candidates["base_logprob"] is not None else -math.inf
    return lp_base > lp_adapter + margin


def contains(prediction: str, answers: list[str]) -> bool:
    return any(metrics.contains_answer(prediction, a) for a in answers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("dev", "dev-plus", "synthetic"), default="dev-plus")
    parser.add_argument("--row", required=True, help="the results row, e.g. 'lift-old (gated-memory, routed)'")
    parser.add_argument("--file", default=str(DEV_SET))
    parser.add_argument("--added", default=str(ADDED_QUESTIONS))
    parser.add_argument("--docs", type=int, default=1, help="synthetic: the documents of the results file")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--margins", default=",".join(map(str, MARGINS)))
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    path = RESULTS / (f"quality_{args.set.replace('-', '_')}.json" if args.set != "synthetic"
                      else f"quality_synthetic_{args.docs}docs.json")
    try:
        row = json.loads(path.read_text())["results"][args.row]
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
    except (OSError, ValueError, KeyError) as e:
        print(f"routing_rules: cannot read row {args.row!r} of {path}: {e!r}", file=sys.stderr)
        return 2
    stored = [p for p in row["predictions"] if p.get("routing")]
    if not stored:
        print(f"routing_rules: row {args.row!r} stores no routing candidates (answer it with --routing)",
              file=sys.stderr)
        return 2
    records, _ = question_set(args.set, args.file, args.added, args.docs, args.seed)
    shown = [r for r in records if r.id in {p["id"] for p in stored}]
    parts = split_of(records)
    where = window_split(shown, load_base_model(args.model).tokenizer, row["window"])
    rules = [("adapter", math.inf)] + [(f"margin {m:+g}", m) for m in margins] + [("base", -math.inf)]
    print(f"{args.row}: {len(stored)} routed questions ({path.name})\n")
    print("| rule | " + " | ".join(PARTS) + " | base kept |")
    print("|---" * (len(PARTS) + 2) + "|")
    for name, margin in rules:
        right = {part: [0, 0] for part in PARTS}
        kept_base = 0
        for p in stored:
            from_base = keeps_base(p["routing"], margin)
            answer = p["routing"]["base" if from_base else "adapter"]
            kept_base += from_base
            for part in (parts[p["id"]], where[p["id"]], "all"):
                right[part][0] += contains(answer, p["answers"])
                right[part][1] += 1
        print(f"| {name} | " + " | ".join(f"{a}/{n}" for a, n in right.values()) + f" | {kept_base} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
