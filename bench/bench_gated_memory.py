"""Gated-Memory attention: fused kernel vs SDPA + a separate memory MLP and gate, side by side
(issue 3, item 6).

Contenders (one run, same inputs, interleaved round after round):

  reference  the unfused path = lift_engine.ops.reference.gated_memory_attention:
             RoPE, PyTorch SDPA (causal, GQA by repeating kv heads), then the memory MLP,
             gate and blend as separate PyTorch ops per adapter;
  <backend>  every backend of lift_engine.ops.dispatch.BACKENDS that implements the op and
             can run on the device (triton on a GPU: one FA2-style kernel with RoPE, GQA
             and the epilogue fused; its backward recomputes P from the saved logsumexp);
  sdpa       context only: the same RoPE + SDPA with no memory at all (what the memory costs).

The serving epilogue `gated_memory_blend` (memory + gate + blend on a given attention
output) is benched the same way: reference vs backends (triton, cuda, cpu when built).

Shapes on a GPU: 4k tokens — B=1×S=4096 and B=4×S=1024 (one adapter per sequence) — for
the default model's heads (9 q / 3 kv, d=64) and an 8B-class layer (32 q / 8 kv, d=128);
fwd and fwd+bwd, bf16. On CPU: B=1, S=512, 9/3 heads, d=64, fp32 (reference and sdpa only
unless a CPU backend implements the op).

TFLOP/s count causal attention as 2·B·H·S²·d forward (QKᵀ and PV, half the square) and
2.5× that backward, plus the memory MLP and gate (≈ 8·T·H·d² forward, 2× backward).

    python -m bench.bench_gated_memory [--quick]

Writes bench/results/bench_gated_memory.json (_cpu on CPU) and a chart of the ratios next to
it (.svg, bench.common.bar_chart); `--plot-only JSON` redraws a chart. Timing and ratios as
bench_lora (bench.common.time_interleaved).
Target (issue 3): fused fwd+bwd ≥ 2× the unfused PyTorch reference at 4k tokens (GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# On a shared CPU, OpenMP's default active waiting stalls every parallel region whose other
# thread was descheduled: measured here, the per-adapter loop took 3.65 s instead of 35 ms.
# Passive waiting keeps all contenders' CPU timings stable (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from bench.bench_lora import (  # noqa: E402
    hardware_subtitle,
    kernel_contenders,
    measure,
    plot_ratios,
    print_table,
    summarize,
    write_results,
)
from bench.common import hardware  # noqa: E402
from lift_engine.ops import reference  # noqa: E402
from lift_engine.ops.reference.gated_memory_attention import apply_rope  # noqa: E402


@dataclass
class Case:
    label: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    dim: int
    mode: str  # fwd | fwd+bwd
    op: str = "gated_memory_attention"  # or gated_memory_blend


def sdpa_only(q, k, v, cos, sin, *_ignored, scale=None):
    groups = q.shape[1] // k.shape[1]
    q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = F.scaled_dot_product_attention(q_r, k_r.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True, scale=scale)
    return attn.transpose(1, 2)


def inputs(case: Case, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    b, s, h, hk, d = case.batch, case.seq, case.heads, case.kv_heads, case.dim
    sg = math.isqrt(d)
    n = max(1, b)
    q = torch.randn(b, h, s, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, s, d, device=device, dtype=dtype)
    v = torch.randn(b, hk, s, d, device=device, dtype=dtype)
    ang = torch.arange(s, device=device).float()[:, None] / (10000 ** (torch.arange(0, d, 2, device=device) / d))
    ang = torch.cat([ang, ang], -1)[None].expand(b, s, d)
    cos, sin = ang.cos().to(dtype).contiguous(), ang.sin().to(dtype).contiguous()

    def lin(*shape):
        return ((torch.rand(*shape, device=device) * 2 - 1) * shape[-1] ** -0.5).to(dtype)

    w = [lin(n, h, 2 * d, d), lin(n, h, d, 2 * d), lin(n, h, sg, d), lin(n, h, 1, sg)]
    idx = torch.arange(b, device=device)[:, None].expand(b, s).contiguous()  # one adapter per sequence
    return q, k, v, cos, sin, w, idx


def flops(case: Case) -> float:
    t = case.batch * case.seq
    mem = 8.0 * t * case.heads * case.dim ** 2
    if case.op == "gated_memory_blend":
        return mem * (1 if case.mode == "fwd" else 3)
    attn = 2.0 * case.batch * case.heads * case.seq ** 2 * case.dim
    return attn + mem if case.mode == "fwd" else 3.5 * attn + 3 * mem


def run_case(case: Case, device: str, dtype: torch.dtype, rounds: int) -> dict:
    q, k, v, cos, sin, w, idx = inputs(case, device, dtype)
    kernels, skipped = kernel_contenders(case.op, device)
    if case.op == "gated_memory_attention":
        impls = {"reference": reference.gated_memory_attention, **kernels, "sdpa": sdpa_only}
        args = [q, k, v]
        diff = 3 + 4  # q, k, v and the four banks

        def call(impl, ins):
            return impl(ins[0], ins[1], ins[2], cos, sin, *ins[3:], idx)
    else:
        t = case.batch * case.seq
        attn = torch.randn(t, case.heads, case.dim, device=device, dtype=dtype)
        impls = {"reference": reference.gated_memory_blend, **kernels}
        args = [attn, q.transpose(1, 2).reshape(t, case.heads, case.dim)]
        diff = 2 + 4
        flat_idx = idx.reshape(-1)

        def call(impl, ins):
            return impl(ins[0], ins[1], *ins[2:], flat_idx)
    base_inputs = [*args, *w]
    out_shape = call(reference.gated_memory_blend if case.op != "gated_memory_attention" else sdpa_only,
                     base_inputs).shape
    dout = torch.randn(out_shape, device=device, dtype=dtype)
    fns = {}
    for name, impl in impls.items():
        if case.mode == "fwd":
            def fn(impl=impl):
                with torch.no_grad():
                    return call(impl, base_inputs)
        else:
            leaves = [t.detach().requires_grad_(True) for t in base_inputs[:diff]]

            def fn(impl=impl, leaves=leaves):
                out = call(impl, leaves)
                used = [t for t in leaves if t.requires_grad]
                return torch.autograd.grad(out, used, dout, allow_unused=True)
        fns[name] = fn
    times = measure(fns, device, rounds)
    summary = summarize(times, flops(case), 0.0, ("reference",))
    return {"label": case.label, "case": case.__dict__, "skipped": skipped, **summary}


def cases_for(device: str, quick: bool) -> list[Case]:
    if device != "cuda":
        modes = ("fwd",) if quick else ("fwd", "fwd+bwd")
        out = [Case(f"B1 S512 H9/3 d64 {m}", 1, 512, 9, 3, 64, m) for m in modes]
        out += [Case(f"blend T512 H9 d64 {m}", 1, 512, 9, 3, 64, m, "gated_memory_blend") for m in modes]
        return out
    shapes = [(1, 4096, 9, 3, 64), (4, 1024, 9, 3, 64), (1, 4096, 32, 8, 128)]
    if quick:
        shapes = shapes[:1]
    out = []
    for b, s, h, hk, d in shapes:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(f"B{b} S{s} H{h}/{hk} d{d} {mode}", b, s, h, hk, d, mode))
    for mode in ("fwd", "fwd+bwd"):
        out.append(Case(f"blend T4096 H32 d128 {mode}", 1, 4096, 32, 8, 128, mode, "gated_memory_blend"))
    out.append(Case("blend decode T64 H32 d128 fwd", 64, 1, 32, 8, 128, "fwd", "gated_memory_blend"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"plot: {write_chart(args.plot_only, json.loads(args.plot_only.read_text()))}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rounds = args.rounds or (5 if args.quick else (20 if device == "cuda" else 5))
    hw = hardware(device)
    print(f"bench_gated_memory on {hardware_subtitle(hw, str(dtype))}, triton {hw['triton']}")
    if device != "cuda":
        print("GPU timing pending: no CUDA device in this run — the fused Triton kernel is not timed; "
              "CPU rows show the unfused reference and SDPA alone.")
    cases = []
    for case in cases_for(device, args.quick):
        result = run_case(case, device, dtype, rounds)
        cases.append(result)
        print_table(f"{case.op}: {case.label}", result, "reference")
        for name, why in result["skipped"].items():
            print(f"  [{name} skipped: {why}]")
    payload = {"bench": "gated_memory", "hardware": hw, "dtype": str(dtype), "rounds": rounds,
               "gpu_timing": "measured" if device == "cuda" else "pending (no CUDA device in this run)",
               "target": "fused fwd+bwd ≥ 2× the unfused reference at 4k tokens (GPU)", "cases": cases}
    path = write_results("bench_gated_memory" if device == "cuda" else "bench_gated_memory_cpu", payload)
    print(f"\nresults: {path}")
    print(f"plot: {write_chart(path, payload)}")
    return 0


def write_chart(json_path: Path, payload: dict) -> Path:
    """The .svg of a results payload (this run's, or a JSON read back with --plot-only)."""
    hw = payload["hardware"]
    return plot_ratios(json_path, payload["cases"], "reference",
                       f"Gated-Memory attention: speed-up vs the unfused reference ({hw['device']})",
                       hardware_subtitle(hw, payload.get("dtype", "")))


if __name__ == "__main__":
    raise SystemExit(main())
