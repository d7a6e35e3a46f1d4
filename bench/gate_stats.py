"""Where a tuned Gated Memory adapter opens its gate (docs/DESIGN.md §3.2).

For each question of a LongBench-layout jsonl, the prompt `lift ask` would build (the
document middle-truncated to --window, then the question) runs through base + adapter;
every layer's gate g = sigmoid(GATE_SCALE · (w4 · SiLU(W3 q) − 1)) is read at every
(token, query head). Prints, per layer: the mean gate, the share of (token, head) pairs
with g > 0.5 (memory outweighs attention there), and the gate at the last prompt token
(the one that writes the first answer token). Init is ≈ 0.05 everywhere.

Usage: .venv/bin/python -m bench.gate_stats ADAPTER_DIR --records FILE.jsonl [--window 1024] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from lift_engine.adapters.gated_memory import GatedMemoryBank
from lift_engine.adapters.io import load_adapters
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import read_records
from lift_engine.data.truncation import middle_truncate
from lift_engine.fsutil import atomic_write_json
from lift_engine.models.loading import load_base_model
from lift_engine.ops.reference.gated_memory_blend import memory_and_gate
from lift_engine.prompts import PromptBuilder


def gate_values(bank: GatedMemoryBank, q: torch.Tensor, slot: int) -> torch.Tensor:
    """q [T, H, d] → the slot's gate [T, H] (the reference epilogue's own formula)."""
    weights = (bank.w1[slot], bank.w2[slot], bank.w3[slot], bank.w4[slot])
    _, gate = memory_and_gate(q.float(), *(w.float() for w in weights))
    return gate[..., 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter")
    parser.add_argument("--records", required=True)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    base = load_base_model(args.model)
    handle = load_adapters([args.adapter], base)
    prompts = PromptBuilder(base.tokenizer)
    banks = [m for m in base.model.modules() if isinstance(m, GatedMemoryBank)]
    if not banks:
        print(f"{args.adapter} is not a Gated Memory adapter", file=sys.stderr)
        return 2
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, out: seen.append(gate_values(mod, a[1], 0))) for b in banks]
    windows: dict[str, list[int]] = {}
    mean, opened, last = ([[] for _ in banks] for _ in range(3))
    for record in read_records(args.records):
        if record.context not in windows:
            windows[record.context] = middle_truncate(tokenize_long(record.context, base.tokenizer), args.window,
                                                      prompts.separator_ids)
        ids = torch.tensor([prompts.question_prompt(windows[record.context], record.question)])
        seen.clear()
        with torch.no_grad(), handle.use(torch.tensor([0])):
            base.model(ids)
        for layer, g in enumerate(seen):
            mean[layer].append(g.mean().item())
            opened[layer].append((g > 0.5).float().mean().item())
            last[layer].append(g[-1].mean().item())
    for h in hooks:
        h.remove()
    result = {name: [round(statistics.mean(v), 3) for v in values]
              for name, values in (("mean_gate", mean), ("share_open", opened), ("gate_last_token", last))}
    result.update(adapter=args.adapter, window=args.window, questions=len(mean[0]))
    for name in ("mean_gate", "share_open", "gate_last_token"):
        print(f"{name:16s}", " ".join(f"{x:.2f}" for x in result[name]))
    print(f"overall mean gate {statistics.mean(result['mean_gate']):.3f}, "
          f"share open {statistics.mean(result['share_open']):.3f} over {result['questions']} questions")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
