"""Multi-adapter LoRA: kernels vs the reference vs a loop over adapters, side by side (issue 3, item 6).

Contenders (one run, same inputs, interleaved round after round):

  loop       the obvious baseline: for each of the N adapters, gather its tokens, two
             matmuls, scatter back (one set of launches per adapter, like N separate
             PEFT adapters);
  reference  lift_engine.ops.reference (the same algorithm over the adapters present;
             what runs when no kernel backend loads);
  <backend>  every backend of lift_engine.ops.dispatch.BACKENDS that loads and can run on
             the device (triton and cuda on a GPU; the C++ `cpu` backend on CPU when it is
             built) — so other backends join this table without changes here;
  base       context only: the frozen base linear x @ Wᵀ of the same layer.

Workloads: N = 16 adapters; "segments" = each adapter's tokens contiguous (training
batches of whole samples), "random" = adapters interleaved per token (decode batches);
"decode" = one token per sequence. Modes: fwd (no grad) and fwd+bwd (training: dx, dA,
dB). Shapes on a GPU: T = 4096 tokens, 4096 → 4096, rank 16 and 64; on CPU the default
model's 576 → 576 at T = 2048, rank 16 (the kernels there are C++, if built).

Timing: bench.common.time_interleaved (torch.utils.benchmark on CPU, triton.testing.do_bench
on a GPU), each sample ≥ ~20 ms of calls. A ratio is the median over rounds of (other time /
contender time) from the same round, which cancels most of the noise of a shared machine. TFLOP/s and GB/s are per contender
from the median time. No absolute CPU time is a result on a shared machine (docs/DESIGN.md §9).

    python -m bench.bench_lora            # GPU if present, else CPU (Triton rows skipped)
    python -m bench.bench_lora --quick

Writes bench/results/bench_lora.json (bench_lora_cpu.json on CPU) and a chart of the ratios
next to it (.svg, bench.common.bar_chart); `--plot-only JSON` redraws a chart.
Target (issue 3): multi-adapter LoRA ≥ 3× the per-adapter loop at 16 adapters on GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# On a shared CPU, OpenMP's default active waiting stalls every parallel region whose other
# thread was descheduled: measured here, the per-adapter loop took 3.65 s instead of 35 ms.
# Passive waiting keeps all contenders' CPU timings stable (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from typing import Callable

import torch

from bench.common import bar_chart, hardware, hardware_line, paired_ratio, time_interleaved  # noqa: E402
from lift_engine.fsutil import atomic_write_json  # noqa: E402
from lift_engine.ops import dispatch, reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ============================================================ helpers shared with bench_gated_memory
def kernel_contenders(op: str, device: str) -> tuple[dict[str, Callable], dict[str, str]]:
    """Backends (besides the reference) that implement `op` and can run on `device`."""
    found, skipped = {}, {}
    for name in dispatch.BACKENDS:
        if name == "reference":
            continue
        module = dispatch.load_backend(name)
        if isinstance(module, Exception):
            skipped[name] = f"does not load: {module}"
            continue
        supports = getattr(module, "supports", None)
        reason = supports(device) if supports is not None else None
        if reason is None and name == "triton" and device == "cpu":
            reason = "interpreted Triton on CPU is a correctness tool, not timed"
        fn = getattr(module, op, None)
        if reason is not None:
            skipped[name] = reason
        elif fn is None:
            skipped[name] = f"has no {op}"
        else:
            found[name] = fn
    return found, skipped


def measure(fns: dict[str, Callable], device: str, rounds: int) -> dict[str, list[float]]:
    """Interleaved timing (bench.common.time_interleaved), each sample ≥ ~20 ms of calls."""
    return time_interleaved(fns, rounds, device=device, min_sample_s=0.02, max_calls=50)


def summarize(times: dict[str, list[float]], flops: float, bytes_moved: float, baselines: tuple[str, ...]) -> dict:
    out = {"median_ms": {}, "min_ms": {}, "tflops": {}, "gbps": {}, "ratios": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        out["median_ms"][name] = med * 1e3
        out["min_ms"][name] = min(ts) * 1e3
        out["tflops"][name] = flops / med / 1e12 if flops else None
        out["gbps"][name] = bytes_moved / med / 1e9 if bytes_moved else None
    for base in baselines:
        if base not in times:
            continue
        out["ratios"][f"vs_{base}"] = {name: paired_ratio(times, base, name) for name in times if name != base}
    return out


def print_table(title: str, summary: dict, baseline: str) -> None:
    ratios = summary["ratios"].get(f"vs_{baseline}", {})
    print(f"\n{title}")
    print(f"  {'contender':<16}{'median ms':>12}{'TFLOP/s':>10}{'GB/s':>9}{'× ' + baseline:>12}")
    for name, ms in summary["median_ms"].items():
        tf = summary["tflops"][name]
        gb = summary["gbps"][name]
        r = "1.00" if name == baseline else (f"{ratios[name]:.2f}" if name in ratios else "-")
        print(f"  {name:<16}{ms:>12.3f}{(f'{tf:.3f}' if tf is not None else '-'):>10}"
              f"{(f'{gb:.1f}' if gb is not None else '-'):>9}{r:>12}")


def write_results(name: str, payload: dict) -> Path:
    """bench/results/<name>.json, written atomically."""
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, payload)
    return path


def hardware_subtitle(hw: dict, dtype: str = "") -> str:
    """One line for a chart: where the numbers come from."""
    return hardware_line(hw, dtype.replace("torch.", ""))


def plot_ratios(json_path: Path, cases: list[dict], baselines: str | tuple[str, ...], title: str,
                subtitle: str = "") -> Path:
    """Speed-ups as grouped bars (bench.common.bar_chart), written next to the JSON as .svg.

    One group per case, one bar per contender: median paired ratio (baseline time / its
    time) against the first of `baselines` the case has ratios for (bench_lora's projection
    rows use "base+loop"; their contenders "base+X" are drawn as series X)."""
    baselines = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    labels, per_case = [], []
    for c in cases:
        base = next((b for b in baselines if f"vs_{b}" in c.get("ratios", {})), None)
        ratios = c["ratios"][f"vs_{base}"] if base else {}
        labels.append(c["label"])
        per_case.append({name.removeprefix("base+") if base and base.startswith("base+") else name: v
                         for name, v in ratios.items()})
    names = list(dict.fromkeys(n for r in per_case for n in r))
    shown = {"base": "base GEMM alone (context)", "sdpa": "SDPA alone, no memory (context)"}
    series = {shown.get(n, n): [r.get(n) for r in per_case] for n in names}
    return bar_chart(Path(json_path).with_suffix(".svg"), title, labels, series,
                     ylabel=f"speed-up vs {' / '.join(baselines)} (×)", subtitle=subtitle,
                     hlines=[(1.0, "1× = " + " / ".join(baselines))])


# ===================================================================== LoRA bench
def loop_lora_delta(x, lora_a, lora_b, scaling, adapter_idx):
    """The obvious per-adapter loop over all N adapters (one gather/matmul/scatter each)."""
    y = x.new_zeros(x.shape[0], lora_b.shape[1])
    for n in range(lora_a.shape[0]):
        rows = (adapter_idx == n).nonzero(as_tuple=True)[0]
        if rows.numel():
            y = y.index_add(0, rows, (x.index_select(0, rows) @ lora_a[n].t() @ lora_b[n].t()) * scaling[n].to(x.dtype))
    return y


@dataclass
class Case:
    label: str
    tokens: int
    d_in: int
    d_out: int
    rank: int
    adapters: int
    mix: str  # segments | random
    mode: str  # fwd | fwd+bwd
    meta: dict = field(default_factory=dict)


def make_idx(case: Case, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if case.mix == "segments":
        bounds = torch.sort(torch.randint(0, case.tokens, (case.adapters - 1,), generator=g)).values
        idx = torch.zeros(case.tokens, dtype=torch.long)
        for b in bounds.tolist():
            idx[b:] += 1
    else:
        idx = torch.randint(0, case.adapters, (case.tokens,), generator=g)
    return idx.to(device)


def case_inputs(case: Case, device: str, dtype: torch.dtype):
    """Seeded inputs of a case: x [T, in], A [N, r, in], B [N, out, r], scaling [N],
    base weight W [out, in], adapter_idx [T] and an output gradient dy [T, out]."""
    torch.manual_seed(0)
    x = torch.randn(case.tokens, case.d_in, device=device, dtype=dtype)
    a = torch.randn(case.adapters, case.rank, case.d_in, device=device, dtype=dtype) / case.d_in ** 0.5
    b = torch.randn(case.adapters, case.d_out, case.rank, device=device, dtype=dtype) / case.rank ** 0.5
    s = torch.full((case.adapters,), 2.0, device=device)
    w = torch.randn(case.d_out, case.d_in, device=device, dtype=dtype) / case.d_in ** 0.5
    idx = make_idx(case, device)
    dy = torch.randn(case.tokens, case.d_out, device=device, dtype=dtype)
    return x, a, b, s, w, idx, dy


def run_case(case: Case, device: str, dtype: torch.dtype, rounds: int) -> dict:
    x, a, b, s, w, idx, dy = case_inputs(case, device, dtype)
    kernels, skipped = kernel_contenders("lora_linear_delta", device)
    impls = {"loop": loop_lora_delta, "reference": reference.lora_linear_delta, **kernels}
    fns: dict[str, Callable] = {}
    for name, impl in impls.items():
        if case.mode == "fwd":
            def fn(impl=impl):
                with torch.no_grad():
                    return impl(x, a, b, s, idx)
        else:
            xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, a, b))

            def fn(impl=impl, xs=xs, As=As, Bs=Bs):
                return torch.autograd.grad(impl(xs, As, Bs, s, idx), (xs, As, Bs), dy)
        fns[name] = fn
    if case.mode == "fwd":
        def base():
            with torch.no_grad():
                return x @ w.t()
    else:
        xs_b, ws_b = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

        def base():
            return torch.autograd.grad(xs_b @ ws_b.t(), (xs_b, ws_b), dy)
    fns["base"] = base
    times = measure(fns, device, rounds)
    factor = 1 if case.mode == "fwd" else 3  # backward: dx, dA (shrink side), dh, dB (expand side)
    flops = factor * 2.0 * case.tokens * case.rank * (case.d_in + case.d_out)
    elem = torch.finfo(dtype).bits // 8
    bytes_moved = factor * elem * (case.tokens * (case.d_in + case.d_out)
                                   + case.adapters * case.rank * (case.d_in + case.d_out))
    summary = summarize(times, flops, bytes_moved, ("loop", "reference"))
    summary["tflops"]["base"] = factor * 2.0 * case.tokens * case.d_in * case.d_out / (summary["median_ms"]["base"] / 1e3) / 1e12
    summary["gbps"]["base"] = None
    return {"label": case.label, "case": case.__dict__, "skipped": skipped, **summary}


def run_projection_case(case: Case, device: str, dtype: torch.dtype, rounds: int) -> dict:
    """A whole LoRA projection y = x Wᵀ + delta: base GEMM + separate delta op (each
    backend) vs the fused Triton kernel (kernels/lora_linear.py), which needs CUDA."""
    x, a, b, s, w, idx, dy = case_inputs(case, device, dtype)
    kernels, skipped = kernel_contenders("lora_linear_delta", device)
    impls = {f"base+{name}": (lambda x_, w_, a_, b_, impl=impl: x_ @ w_.t() + impl(x_, a_, b_, s, idx))
             for name, impl in {"loop": loop_lora_delta, "reference": reference.lora_linear_delta, **kernels}.items()}
    if device == "cuda":
        from lift_engine.kernels.lora_linear import lora_linear

        impls["fused"] = lambda x_, w_, a_, b_: lora_linear(x_, w_, None, a_, b_, s, idx)
    else:
        skipped["fused"] = "Triton kernel: needs a CUDA device (GPU timing pending)"
    fns = {}
    for name, impl in impls.items():
        if case.mode == "fwd":
            def fn(impl=impl):
                with torch.no_grad():
                    return impl(x, w, a, b)
        else:
            xs, As, Bs = (t.detach().requires_grad_(True) for t in (x, a, b))

            def fn(impl=impl, xs=xs, As=As, Bs=Bs):
                return torch.autograd.grad(impl(xs, w, As, Bs), (xs, As, Bs), dy)
        fns[name] = fn
    times = measure(fns, device, rounds)
    factor = 1 if case.mode == "fwd" else 2  # frozen W: backward adds dx only, plus the LoRA grads
    flops = factor * 2.0 * case.tokens * case.d_in * case.d_out + (1 if case.mode == "fwd" else 3) * 2.0 \
        * case.tokens * case.rank * (case.d_in + case.d_out)
    summary = summarize(times, flops, 0.0, ("base+loop",))
    return {"label": case.label, "case": case.__dict__, "skipped": skipped, "group": "projection", **summary}


def cases_for(device: str, quick: bool) -> list[Case]:
    out = []
    if device == "cuda":
        for rank in ((16,) if quick else (16, 64)):
            for mix in ("segments", "random"):
                for mode in ("fwd", "fwd+bwd"):
                    out.append(Case(f"T4096 r{rank} {mix} {mode}", 4096, 4096, 4096, rank, 16, mix, mode))
        out.append(Case("decode T64 r16 random fwd", 64, 4096, 4096, 16, 16, "random", "fwd"))
        out.append(Case("decode T256 r16 random fwd", 256, 4096, 4096, 16, 16, "random", "fwd"))
    else:
        modes = ("fwd",) if quick else ("fwd", "fwd+bwd")
        for mix in ("segments", "random"):
            for mode in modes:
                out.append(Case(f"T2048 r16 {mix} {mode}", 2048, 576, 576, 16, 16, mix, mode))
        out.append(Case("decode T16 r16 random fwd", 16, 576, 576, 16, 16, "random", "fwd"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"plot: {write_chart(args.plot_only, json.loads(args.plot_only.read_text()))}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rounds = args.rounds or (5 if args.quick else (20 if device == "cuda" else 7))
    hw = hardware(device)
    print(f"bench_lora on {hardware_line(hw, str(dtype))}, triton {hw['triton']}")
    if device != "cuda":
        print("GPU timing pending: no CUDA device in this run — Triton/CUDA rows are skipped; "
              "CPU rows compare the loop, the reference and the C++ backend when it is built.")
    cases = []
    for case in cases_for(device, args.quick):
        result = run_case(case, device, dtype, rounds)
        cases.append(result)
        print_table(f"{case.label}  (T={case.tokens}, {case.d_in}→{case.d_out}, N={case.adapters})", result, "loop")
    proj = ([Case("proj T4096 r16 segments fwd", 4096, 4096, 4096, 16, 16, "segments", "fwd"),
             Case("proj T4096 r16 segments fwd+bwd", 4096, 4096, 4096, 16, 16, "segments", "fwd+bwd"),
             Case("proj decode T64 r16 random fwd", 64, 4096, 4096, 16, 16, "random", "fwd")]
            if device == "cuda" else [Case("proj T2048 r16 segments fwd", 2048, 576, 576, 16, 16, "segments", "fwd")])
    for case in proj[:1] if args.quick else proj:
        result = run_projection_case(case, device, dtype, rounds)
        cases.append(result)
        print_table(f"projection {case.label}", result, "base+loop")
        if "fused" in result["skipped"]:
            print(f"  [fused skipped: {result['skipped']['fused']}]")
    skipped = cases[0]["skipped"] if cases else {}
    for name, why in skipped.items():
        print(f"  [{name} skipped: {why}]")
    payload = {"bench": "lora_linear_delta", "hardware": hw, "dtype": str(dtype), "rounds": rounds,
               "gpu_timing": "measured" if device == "cuda" else "pending (no CUDA device in this run)",
               "target": "≥ 3× the per-adapter loop at 16 adapters (GPU)", "cases": cases}
    path = write_results("bench_lora" if device == "cuda" else "bench_lora_cpu", payload)
    print(f"\nresults: {path}")
    print(f"plot: {write_chart(path, payload)}")
    return 0


def write_chart(json_path: Path, payload: dict) -> Path:
    """The .svg of a results payload (this run's, or a JSON read back with --plot-only)."""
    hw = payload["hardware"]
    return plot_ratios(json_path, payload["cases"], ("loop", "base+loop"),
                       f"Multi-adapter LoRA: speed-up vs the per-adapter loop ({hw['device']})",
                       hardware_subtitle(hw, payload.get("dtype", "")) + " · proj rows: base GEMM + each delta")


if __name__ == "__main__":
    raise SystemExit(main())
