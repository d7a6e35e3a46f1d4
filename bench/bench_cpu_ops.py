"""C++ CPU kernels vs PyTorch eager, side by side in one run (issue 3, item 6).

For every op the C++ path (lift_engine.ops.cpu_backend, extension lift_engine._C_cpu)
runs against two baselines on the same inputs:

  reference  the reference op in PyTorch eager (lift_engine.ops.reference): a loop over the
             adapters present, index_select / index_put per adapter — what runs without
             the extension;
  naive      the obvious loop over all N adapters with boolean masks.

Shapes are the default model's (SmolLM2-135M: hidden 576, 9 query heads, head dim 64) at
T = 2048 tokens, LoRA rank 16, N = 1 / 4 / 16 adapters, and two token mixes:
  segments   each adapter's tokens contiguous (a training batch of whole samples);
  random     adapters interleaved token by token (decode batches, shuffled packing).
Modes: "fwd" under no_grad (serving), "fwd+bwd" (training: forward, then backward of a
fixed random cotangent into every input that has a gradient in training).

Timing: the contenders run interleaved, round after round; a ratio is the median over
rounds of (baseline time / C++ time) from the same round, which cancels most of the noise
of a shared machine. Min and median times are recorded too. No absolute time is a result
on a shared CPU (docs/DESIGN.md §9): read the ratios.

    python -m bench.bench_cpu_ops                 # full run, ~5 min on 2 cores
    python -m bench.bench_cpu_ops --quick         # fewer rounds and cases
    python -m bench.bench_cpu_ops --ops lora_shrink gated_memory_blend --rounds 30

Writes bench/results/bench_cpu_ops.json and a chart of the ratios next to it (.svg,
bench.common.bar_chart); `--plot-only JSON` redraws the chart of a results JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import bar_chart, hardware, hardware_line, paired_ratio, time_interleaved
from lift_engine.fsutil import atomic_write_json
from lift_engine.ops import reference
from lift_engine.ops.native import status as native_status

RESULTS = Path(__file__).resolve().parent / "results"

T, HIDDEN, RANK, OUT = 2048, 576, 16, 576
HEADS, HEAD_DIM, GATE_DIM = 9, 64, 8
LORA_OPS = ("lora_shrink", "lora_expand", "lora_linear_delta")
ALL_OPS = (*LORA_OPS, "gated_memory_blend")


# ------------------------------------------------------------------ naive baselines


def naive_shrink(x, lora_a, idx):
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    for n in range(lora_a.shape[0]):
        mask = idx == n
        out[mask] = x[mask] @ lora_a[n].t()
    return out


def naive_expand(h, lora_b, scaling, idx):
    out = h.new_zeros(h.shape[0], lora_b.shape[1])
    for n in range(lora_b.shape[0]):
        mask = idx == n
        out[mask] = (h[mask] @ lora_b[n].t()) * scaling[n]
    return out


def naive_delta(x, lora_a, lora_b, scaling, idx):
    return naive_expand(naive_shrink(x, lora_a, idx), lora_b, scaling, idx)


def naive_blend(attn, q, w1, w2, w3, w4, idx):
    from lift_engine.ops.reference.gated_memory_blend import memory_and_gate

    out = attn.clone()
    for n in range(w1.shape[0]):
        mask = idx == n
        memory, gate = memory_and_gate(q[mask], w1[n], w2[n], w3[n], w4[n])
        out[mask] = (1.0 - gate) * attn[mask] + gate * memory
    return out


NAIVE = {
    "lora_shrink": naive_shrink,
    "lora_expand": naive_expand,
    "lora_linear_delta": naive_delta,
    "gated_memory_blend": naive_blend,
}


# ------------------------------------------------------------------ inputs


def adapter_idx(n: int, mix: str, gen: torch.Generator) -> torch.Tensor:
    if mix == "segments":
        return torch.arange(T) * n // T
    return torch.randint(0, n, (T,), generator=gen)


def make_inputs(op: str, n: int, mix: str, seed: int = 0):
    """(args, names of the args that train) for `op`; float32."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    idx = adapter_idx(n, mix, gen)
    scaling = torch.full((n,), 2.0)
    if op == "lora_shrink":
        return (rnd(T, HIDDEN), rnd(n, RANK, HIDDEN, scale=0.05), idx), (0, 1)
    if op == "lora_expand":
        return (rnd(T, RANK), rnd(n, OUT, RANK, scale=0.05), scaling, idx), (0, 1)
    if op == "lora_linear_delta":
        return (rnd(T, HIDDEN), rnd(n, RANK, HIDDEN, scale=0.05), rnd(n, OUT, RANK, scale=0.05), scaling, idx), (0, 1, 2)
    if op == "gated_memory_blend":
        d, s = HEAD_DIM, GATE_DIM
        return (
            rnd(T, HEADS, d), rnd(T, HEADS, d),
            rnd(n, HEADS, 2 * d, d, scale=d ** -0.5), rnd(n, HEADS, d, 2 * d, scale=(2 * d) ** -0.5),
            rnd(n, HEADS, s, d, scale=d ** -0.5), rnd(n, HEADS, 1, s, scale=s ** -0.5), idx,
        ), (0, 1, 2, 3, 4, 5)
    raise KeyError(op)


def make_runner(fn, args, trained, mode: str):
    """A zero-argument callable running one forward (and backward) of fn."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*args)
        return run
    leaves = [a.clone().requires_grad_(i in trained) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for i, a in enumerate(args)]
    with torch.no_grad():
        cot = torch.randn_like(fn(*args))

    def run():
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                leaf.grad = None
        fn(*leaves).backward(cot)
    return run


# ------------------------------------------------------------------ timing


def summarise(times: dict[str, list[float]]) -> dict:
    """Per contender min and median ms; cpp_vs_<baseline>: the median paired ratio (and the
    ratio of the minima) of each baseline ("reference", "naive") over "cpp"."""
    out = {name: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for name, v in times.items()}
    for base in ("reference", "naive"):
        if base in times and "cpp" in times:
            out[f"cpp_vs_{base}"] = paired_ratio(times, base, "cpp")
            out[f"cpp_vs_{base}_min"] = min(times[base]) / min(times["cpp"])
    return out


# ------------------------------------------------------------------ main


def run(ops, adapters, mixes, modes, rounds, dtype) -> list[dict]:
    from lift_engine.ops import cpu_backend

    if dtype != torch.float32:  # measure the cast-to-fp32 kernel path (off by default)
        cpu_backend.LOW_PRECISION = True
    rows = []
    for op in ops:
        for n in adapters:
            for mix in mixes:
                args, trained = make_inputs(op, n, mix)
                if dtype != torch.float32:
                    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 1 else a
                                 for a in args)
                for mode in modes:
                    contenders = {"cpp": cpu_backend.IMPLEMENTED[op], "reference": getattr(reference, op), "naive": NAIVE[op]}
                    runners = {name: make_runner(fn, args, trained, mode) for name, fn in contenders.items()}
                    r = rounds if op != "gated_memory_blend" else max(3, rounds // 2)
                    summary = summarise(time_interleaved(runners, r))
                    row = {"op": op, "n_adapters": n, "mix": mix, "mode": mode, "dtype": str(dtype).split(".")[-1],
                           "rounds": r, **summary}
                    rows.append(row)
                    print(f"{op:20s} N={n:<2d} {mix:8s} {mode:7s} "
                          f"cpp {summary['cpp']['median_ms']:8.2f} ms  ref {summary['reference']['median_ms']:8.2f} ms  "
                          f"naive {summary['naive']['median_ms']:8.2f} ms   "
                          f"cpp vs ref {summary['cpp_vs_reference']:5.2f}x  vs naive {summary['cpp_vs_naive']:5.2f}x",
                          flush=True)
    return rows


def plot(rows: list[dict], path: Path, hardware_line: str = "") -> Path:
    """C++ speed-up over both baselines, one group per row (bench.common.bar_chart, log scale)."""
    dtypes = sorted({r.get("dtype", "") for r in rows})
    labels = [f"{r['op'].replace('gated_memory_', 'gm_')} N={r['n_adapters']} {r['mix'][:3]} {r['mode']}" for r in rows]
    series = {"C++ vs reference (eager)": [r["cpp_vs_reference"] for r in rows],
              "C++ vs naive adapter loop": [r["cpp_vs_naive"] for r in rows]}
    out = bar_chart(path, f"C++ CPU kernels: speed-up vs PyTorch eager ({', '.join(dtypes)})", labels, series,
                    ylabel="speed-up (×, median paired ratio)", subtitle=hardware_line, log=True,
                    hlines=[(1.0, "1× = parity"), (1.5, "target 1.5×")])
    print(f"plot: {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(ALL_OPS), choices=ALL_OPS)
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--mixes", nargs="+", default=["segments", "random"], choices=["segments", "random"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="8 rounds, N = 1 and 16")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cpu_ops.json")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        plot(data["rows"], args.plot_only.with_suffix(".svg"), data.get("hardware_line", ""))
        return 0
    if args.quick:
        args.rounds, args.adapters = 8, [1, 16]
    if args.threads:
        torch.set_num_threads(args.threads)

    native = native_status()
    if native["cpu"] != "loaded":
        print(f"the C++ CPU extension is not available: {native['cpu']}")
        return 1
    from lift_engine.ops import native

    hw = hardware()
    hw["gemm_backend"] = native.load("cpu").gemm_backend
    print("hardware:", hardware_line(hw), "| GEMM:", hw["gemm_backend"])
    started = time.time()
    rows = run(args.ops, args.adapters, args.mixes, args.modes, args.rounds, getattr(torch, args.dtype))
    result = {
        "bench": "bench_cpu_ops",
        "hardware": hw,
        "hardware_line": hardware_line(hw),
        "shapes": {"T": T, "in": HIDDEN, "rank": RANK, "out": OUT, "heads": HEADS, "head_dim": HEAD_DIM,
                   "gate_dim": GATE_DIM},
        "timing": "interleaved rounds; ratio = median over rounds of baseline/C++ in the same round",
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    atomic_write_json(args.out, result, indent=1)
    print(f"results: {args.out}")
    plot(rows, args.out.with_suffix(".svg"), result["hardware_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
