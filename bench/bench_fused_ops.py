"""Fused elementwise C++ ops vs PyTorch eager, side by side in one run.

The ops of a training step that models/fused_blocks.py and batch/loss.py put on C++
(lift_engine.ops.cpu_backend): each against its reference in PyTorch eager
(lift_engine.ops.reference: transformers' own formulas), forward + backward, on the
default model's shapes (SmolLM2-135M) at one micro-batch of a 16-document step:

    rms_norm                  x [6528, 576] (32 rows × 204 tokens), weight frozen
    swiglu                    gate, up [6528, 1536]
    cross_entropy_with_grad_  logits [1024, 49152] (one chunk of the loss) against the
                              reference's logsumexp + softmax − onehot (what the loss
                              computed before: forward's logsumexp and backward's softmax)

in float32 and bfloat16. Timing as bench_cpu_ops.py: interleaved rounds, the ratio is the
median over rounds of eager/C++ time in the same round (absolute times on a shared CPU
are noise).

    python bench/bench_fused_ops.py [--rounds 10] [--out bench/results/bench_fused_ops.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cpu_ops import hardware, hardware_line, summarise, time_interleaved  # noqa: E402
from lift_engine.ops import reference  # noqa: E402
from lift_engine.ops._native import status as native_status  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOKENS, HIDDEN, INTERMEDIATE, VOCAB, LOSS_CHUNK = 32 * 204, 576, 1536, 49152, 1024


def runners(op: str, dtype: torch.dtype, cpu_backend) -> dict:
    """{"cpp": run, "reference": run}: zero-argument callables, forward + backward."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    if op == "cross_entropy_with_grad_":
        logits, targets = rnd(LOSS_CHUNK, VOCAB, scale=3.0), torch.randint(0, VOCAB, (LOSS_CHUNK,), generator=gen)
        return {name: (lambda fn=fn: fn(logits.clone(), targets))
                for name, fn in (("cpp", cpu_backend.cross_entropy_with_grad_),
                                 ("reference", reference.cross_entropy_with_grad_))}
    if op == "rms_norm":
        inputs, trained = (rnd(TOKENS, HIDDEN), (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)), (0,)
        call = {"cpp": lambda x, w: cpu_backend.rms_norm(x, w, 1e-5), "reference": lambda x, w: reference.rms_norm(x, w, 1e-5)}
    else:
        inputs, trained = (rnd(TOKENS, INTERMEDIATE, scale=2.0), rnd(TOKENS, INTERMEDIATE)), (0, 1)
        call = {"cpp": cpu_backend.swiglu, "reference": reference.swiglu}
    cotangent = rnd(*inputs[0].shape)
    leaves = [t.clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]

    def make(fn):
        def run():
            for leaf in leaves:
                leaf.grad = None
            fn(*leaves).backward(cotangent)
        return run
    return {name: make(fn) for name, fn in call.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_fused_ops.json")
    args = parser.parse_args(argv)
    native = native_status()
    if native["cpu"] != "loaded":
        print(f"the C++ CPU extension is not available: {native['cpu']}")
        return 1
    from lift_engine.ops import cpu_backend

    hw = hardware()
    print("hardware:", hardware_line(hw))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for op in ("rms_norm", "swiglu", "cross_entropy_with_grad_"):
            summary = summarise(time_interleaved(runners(op, dtype, cpu_backend), args.rounds))
            rows.append({"op": op, "dtype": str(dtype).split(".")[-1], "mode": "fwd+bwd", "rounds": args.rounds, **summary})
            print(f"{op:26s} {rows[-1]['dtype']:9s} cpp {summary['cpp']['median_ms']:8.2f} ms  "
                  f"eager {summary['reference']['median_ms']:8.2f} ms  cpp vs eager {summary['cpp_vs_reference']:5.2f}x",
                  flush=True)
    result = {"bench": "bench_fused_ops", "hardware": hw, "hardware_line": hardware_line(hw),
              "shapes": {"tokens": TOKENS, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "vocab": VOCAB,
                         "loss_chunk": LOSS_CHUNK},
              "timing": "interleaved rounds; ratio = median over rounds of eager/C++ in the same round", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
