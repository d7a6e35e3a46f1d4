"""Where one batched tuning step spends its time, and the %-of-peak ceiling that implies.

One process: the matmul rate of this machine in the step's dtype (bench.bench_tune.matmul_rates:
peak and sustained), then a BatchTuneJob on bench_tune's workload (N documents, same
segments, QA and batch size), two warm-up steps (`--warmup`), and one step under torch.profiler with
the shapes of every GEMM recorded. Printed, and written to
bench/results/bench_step_profile.json with a chart (.svg, bench.common.bar_chart) of seconds
per op group (`--plot-only JSON` redraws it from a results JSON):

    frozen GEMMs   aten::mm / addmm: the frozen base's linears and output head
    LoRA           aten::bmm / baddbmm and the LoRA ops (lora_linear_rows in bf16, the C++
                   kernels in fp32), with what runs inside them (gathers, index_add_)
    attention      the attention op (C++ brgemm kernel in bf16, sdpa in fp32), Gated Memory
    norm/SwiGLU/RoPE, loss (softmax pass), optimizer (SlotAdamW.step), other
An op that names no group (a copy, an add) counts in its nearest enclosing op's group.

For each group: seconds (profiler self time), share of the step, and for GEMM groups the
FLOPs they executed and their rate. Then the **ceiling**: the step's counted FLOPs
(bench_tune.model_flops on the tokens that went through the model) divided by the
frozen GEMMs' own time: the % of the sustained rate the step would reach if everything
that is not a frozen-base GEMM took no time at all. The profiler adds overhead to small
ops; the step time printed is the profiled one.

Usage: .venv/bin/python -m bench.bench_step_profile [--model DIR] [--n 16] [--dtype bfloat16]
       [--no-prefix]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import bar_chart, hardware
from lift_engine.batch.job import BatchTuneJob
from lift_engine.fsutil import atomic_write_json
from lift_engine.host_memory import keep_freed_memory
from lift_engine.models.loading import load_base_model

from bench.bench_tune import RESULTS, add_workload_args, bench_config, make_documents, matmul_rates, model_flops, peak_shapes, with_dtype

GROUPS = ("frozen GEMMs", "LoRA", "attention", "norm/SwiGLU/RoPE", "loss", "optimizer", "other")
FROZEN_GEMMS = {"aten::mm", "aten::addmm"}
LORA_OPS = {"aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
OPTIMIZER_RANGE = "lift::optimizer_step"  # a record_function around SlotAdamW.step (profile_step)


def op_group(name: str) -> str:
    """The group (GROUPS) a profiler event's name belongs to; "other" when it names none."""
    if name == OPTIMIZER_RANGE:
        return "optimizer"
    if name in FROZEN_GEMMS:
        return "frozen GEMMs"
    if name in LORA_OPS or "lora" in name.lower():
        return "LoRA"
    if any(k in name for k in ("Attention", "GatedMemory", "scaled_dot_product", "flash")):
        return "attention"
    if any(k in name for k in ("RMSNorm", "SwiGLU", "Rotary")):
        return "norm/SwiGLU/RoPE"
    if "TokenLoss" in name or "cross_entropy" in name:
        return "loss"
    return "other"


def gemm_flops(name: str, shapes: list) -> float:
    """2·b·m·k·n of an mm / addmm / bmm / baddbmm event from its recorded input shapes (0 if unknown)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
        if name in ("aten::baddbmm", "aten::baddbmm_"):
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2.0 * b * m * k * n
    except (TypeError, ValueError, IndexError):
        pass
    return 0.0


def event_group(event) -> str:
    """op_group of the event's own name; an event that names no group (a copy, a gather, an
    add) takes the group of its nearest ancestor that does (e.g. the LoRA op's gathers)."""
    node = event
    while node is not None:
        group = op_group(node.name)
        if group != "other":
            return group
        node = node.cpu_parent
    return "other"


def profile_step(job: BatchTuneJob):
    """(StepReport, {group: [seconds, flops]}) of one job step under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    optimizer_step = job.optimizer.step

    def labelled_step(slots):
        with torch.profiler.record_function(OPTIMIZER_RANGE):
            return optimizer_step(slots)

    job.optimizer.step = labelled_step
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            report = job.step()
    finally:
        del job.optimizer.step  # back to the class's method
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        group = groups[event_group(event)]
        group[0] += event.self_cpu_time_total / 1e6
        group[1] += gemm_flops(event.name, event.input_shapes)
    return report, groups


def write_chart(json_path: Path, result: dict) -> Path:
    """The chart of a results payload (this run's, or a JSON read back with --plot-only): seconds
    per op group, written next to the JSON as .svg."""
    rows = {r["group"]: r["seconds"] for r in result["groups"]}
    return bar_chart(Path(json_path).with_suffix(".svg"), "One batched tuning step: seconds per op group", list(rows),
                     {"seconds": list(rows.values())}, ylabel="seconds (profiler self time)",
                     subtitle=f"N={result['n']} · {result['dtype']} · prefix sharing "
                              f"{'on' if result['prefix_sharing'] else 'off'} · {result['hardware'].get('cpu')}",
                     log=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the default SmolLM2-135M)")
    parser.add_argument("--n", type=int, default=16, help="documents in the job")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="train.compute_dtype")
    parser.add_argument("--no-prefix", action="store_true", help="without prefix sharing")
    add_workload_args(parser)
    parser.add_argument("--warmup", type=int, default=2,
                        help="unprofiled steps first (the first steps of a process page-fault their memory in)")
    parser.add_argument("--out", default=str(RESULTS / "bench_step_profile.json"))
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"chart: {write_chart(args.plot_only, json.loads(args.plot_only.read_text()))}")
        return 0
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be at least 1 and --warmup at least 0")

    keep_freed_memory()  # as `lift tune` does
    base = load_base_model(args.model, progress=False)
    dtype = getattr(torch, args.dtype)
    peak, sustained = matmul_rates(peak_shapes(base.model, torch.device("cpu")), dtype=dtype)
    print(f"hardware: {hardware()}; {args.dtype} matmul peak {peak:.0f}, sustained {sustained:.0f} GFLOP/s",
          file=sys.stderr)
    cfg = with_dtype(bench_config(args), args.dtype)
    texts = make_documents(base.tokenizer, args.n, args.doc_tokens, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        job = BatchTuneJob(base, cfg, Path(tmp) / "job", max_active=args.n, prefix_sharing=not args.no_prefix,
                           checkpoint_every=10**9)
        try:
            for i, text in enumerate(texts):
                job.submit(text, f"doc{i}")
            warm = []
            for _ in range(args.warmup):
                began = time.perf_counter()
                job.step()
                warm.append(time.perf_counter() - began)
            report, groups = profile_step(job)
        finally:
            job.close()
    if report is None:
        print(f"error: the job has no step left after {args.warmup} warm-up steps; use fewer or longer documents",
              file=sys.stderr)
        return 1
    counted = model_flops(base.model, report.tokens, report.loss_tokens)
    gemm_seconds = groups["frozen GEMMs"][0]
    rows = [{"group": g, "seconds": groups[g][0], "share": groups[g][0] / report.seconds, "gflop": groups[g][1] / 1e9,
             "gflops": groups[g][1] / groups[g][0] / 1e9 if groups[g][1] and groups[g][0] else None} for g in GROUPS]
    result = {
        "hardware": hardware(), "model": {"id": base.model_id}, "dtype": args.dtype, "prefix_sharing": not args.no_prefix,
        "n": args.n, "matmul_peak_gflops": peak, "matmul_sustained_gflops": sustained,
        "warmup_steps_seconds": warm, "step_seconds": report.seconds, "tokens": report.tokens,
        "loss_tokens": report.loss_tokens, "samples": report.samples, "counted_gflop": counted / 1e9,
        "step_gflops": counted / report.seconds / 1e9, "groups": rows,
        "ceiling_fraction_of_sustained": counted / gemm_seconds / 1e9 / sustained if gemm_seconds else None,
    }
    print(f"\nstep (profiled): {report.seconds:.2f} s, {report.samples} samples, {report.tokens} tokens through the model, "
          f"{report.loss_tokens} loss tokens; counted {counted / 1e9:.0f} GFLOP → {result['step_gflops']:.0f} GFLOP/s = "
          f"{100 * result['step_gflops'] / sustained:.1f}% of sustained ({100 * result['step_gflops'] / peak:.1f}% of peak)\n")
    print("| op group | s | % of step | GFLOP executed | GFLOP/s | % of sustained |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['gflops']:.0f} | {100 * r['gflops'] / sustained:.0f}" if r["gflops"] else "– | –"
        print(f"| {r['group']} | {r['seconds']:.2f} | {100 * r['share']:.1f} | {r['gflop']:.0f} | {rate} |")
    if gemm_seconds:
        print(f"\nceiling: counted FLOPs / frozen-GEMM seconds = {counted / gemm_seconds / 1e9:.0f} GFLOP/s = "
              f"{100 * result['ceiling_fraction_of_sustained']:.1f}% of sustained: the step's % if nothing but its "
              "frozen GEMMs took time")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    chart = write_chart(out, result)
    print(f"\nresults: {out}\nchart: {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
