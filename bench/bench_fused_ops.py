"""Fused C++ ops of a training step vs PyTorch eager, side by side in one run.

The ops of a training step that models/fused_blocks.py, batch/loss.py and
precision.training_attention put on C++ (lift_engine.ops.cpu_backend): each against its
reference in PyTorch eager (lift_engine.ops.reference: transformers' own formulas),
forward + backward, on the default model's shapes (SmolLM2-135M) at one micro-batch of
a 16-document step:

    rms_norm                  x [6528, 576] (32 rows × 204 tokens), weight frozen
    swiglu                    gate, up [6528, 1536]
    rotary                    q [32, 9, 204, 64] as HF passes it (a transposed view)
    cross_entropy_with_grad_  logits [1024, 49152] (one chunk of the loss) against the
                              reference's logsumexp + softmax − onehot (what the loss
                              computed before: forward's logsumexp and backward's softmax)

in float32 and bfloat16; and, bf16 only, causal GQA attention q [32, 9, 204, 64], k/v
[32, 3, 204, 64] on the AMX kernel against what bf16 tuning ran before (torch's sdpa on
fp32 copies, its flash kernel with enable_gqa) and against torch's sdpa in bf16.

Timing as bench_cpu_ops (bench.common.time_interleaved): interleaved rounds, the ratio is the median over rounds of
eager/C++ time in the same round (absolute times on a shared CPU are noise).

    python -m bench.bench_fused_ops [--rounds 10] [--out bench/results/bench_fused_ops.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.bench_cpu_ops import summarise
from bench.common import hardware, hardware_line, paired_ratio, time_interleaved
from lift_engine.fsutil import atomic_write_json
from lift_engine.ops import reference
from lift_engine.ops.native import status as native_status

RESULTS = Path(__file__).resolve().parent / "results"
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
    def fresh(fn, *leaves):  # forward + backward from zeroed gradients
        def run():
            for leaf in leaves:
                leaf.grad = None
            fn()
        return run

    if op == "attention":
        q, k, v = (rnd(32, 204, heads, 64).transpose(1, 2).requires_grad_() for heads in (9, 3, 3))
        dout = rnd(32, 9, 204, 64)

        def sdpa(cast):
            return lambda: torch.nn.functional.scaled_dot_product_attention(
                cast(q), cast(k), cast(v), is_causal=True, enable_gqa=True).to(dtype).backward(dout)
        return {"cpp": fresh(lambda: cpu_backend.attention(q, k, v, None, True, 0.125).backward(dout), q, k, v),
                "sdpa_fp32": fresh(sdpa(lambda t: t.float()), q, k, v), "sdpa_bf16": fresh(sdpa(lambda t: t), q, k, v)}
    if op == "rotary":
        x = rnd(32, 204, 9, 64).transpose(1, 2).requires_grad_()
        freqs = torch.rand(32, 204, 32, generator=gen) * 200
        cos, sin = (torch.cat((f, f), -1).to(dtype) for f in (freqs.cos(), freqs.sin()))
        dout = rnd(32, 9, 204, 64)
        return {"cpp": fresh(lambda: cpu_backend.rotary(x, cos, sin).backward(dout), x),
                "reference": fresh(lambda: reference.rotary(x, cos, sin).backward(dout), x)}
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
    cases = [(dtype, op) for dtype in (torch.float32, torch.bfloat16)
             for op in ("rms_norm", "swiglu", "rotary", "cross_entropy_with_grad_")]
    if "attention" in cpu_backend.IMPLEMENTED:  # bf16 on AMX only
        cases.append((torch.bfloat16, "attention"))
    for dtype, op in cases:
        times = time_interleaved(runners(op, dtype, cpu_backend), args.rounds)
        summary = summarise(times)
        for base in (name for name in times if name.startswith("sdpa")):
            summary[f"cpp_vs_{base}"] = paired_ratio(times, base, "cpp")
        rows.append({"op": op, "dtype": str(dtype).split(".")[-1], "mode": "fwd+bwd", "rounds": args.rounds, **summary})
        against = ", ".join(f"{name} {summary[name]['median_ms']:8.2f} ms ({summary[f'cpp_vs_{name}']:5.2f}x)"
                            for name in times if name != "cpp")
        print(f"{op:26s} {rows[-1]['dtype']:9s} cpp {summary['cpp']['median_ms']:8.2f} ms  vs {against}", flush=True)
    result = {"bench": "bench_fused_ops", "hardware": hw, "hardware_line": hardware_line(hw),
              "shapes": {"tokens": TOKENS, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "vocab": VOCAB,
                         "loss_chunk": LOSS_CHUNK},
              "timing": "interleaved rounds; ratio = median over rounds of eager/C++ in the same round", "rows": rows}
    atomic_write_json(args.out, result, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
