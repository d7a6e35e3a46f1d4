"""Tuning throughput: lift_engine batched vs lift_engine one-by-one vs HF Trainer + PEFT.

Side by side in one run, on the same N documents (N = 1, 4, 16 by default), the same
samples (segments + auxiliary tasks, LIFT plan), the same epochs and hyperparameters:

    hf-trainer+peft      the paper's baseline: one document at a time, HF Trainer over a
                         PeftModel (LoRA), full-vocabulary logits at every position
    lift one-by-one      lift_engine.pipeline.tune_document per document (the engine's
                         job of one, no prefix sharing; logits only at loss positions)
    lift batched         lift_engine.batch.BatchTuneJob: all N documents in one job,
                         one forward/backward per step over every document's samples
    lift batched+prefix  the same with prefix sharing (one context split per document
                         per step, computed once)
    … (bf16 base)        the lift methods with train.compute_dtype = "bfloat16": the frozen
                         base's weights cast to bf16 once, adapters and AdamW in fp32
                         (lift_engine/precision.py)
    hf-trainer+peft (bf16 autocast)
                         the baseline with TrainingArguments(bf16=True): torch.autocast,
                         which re-casts the frozen weights at every call

Reported per method and N: seconds, documents/hour, training tokens/s (tokens of the
planned samples, counted the same way for every method), achieved GFLOP/s
(4·P_linear·tokens + 4·V·H·loss tokens: forward + input-gradient backward of the frozen
model's linear layers, plus the output head at loss positions; attention's quadratic
term not counted) against this machine's measured matmul rate in the method's dtype (fp32,
or bf16 for the bf16 methods; square and model-shaped GEMMs): the best short window
(peak) and the best shape's median window (sustained; matmul_rates), and
every method's ratio to the (fp32) HF baseline. The run prints a markdown table and writes
bench/results/bench_tune.json and its chart bench/results/bench_tune.svg
(bench.common.bar_chart); `--plot-only JSON` redraws the chart of a results JSON.

A shared CPU makes absolute times noisy; the ratios from one run are the result.

Usage: .venv/bin/python -m bench.bench_tune [--model DIR] [--ns 1,4,16] [--doc-tokens 256]
       [--methods hf,solo,batched,prefix]   (also: hf-bf16, solo-bf16, batched-bf16, prefix-bf16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lift_engine.batch.job import BatchTuneJob
from lift_engine.batch.planner import default_budget_bytes
from lift_engine.config import BatchConfig, make_config
from lift_engine.data.extractive import extract_tasks
from lift_engine.data.synthetic import make_dataset
from lift_engine.data.tasks import build_qa_items
from lift_engine.fsutil import atomic_write_json
from lift_engine.host_memory import keep_freed_memory
from lift_engine.models.loading import load_base_model, resolve_device
from lift_engine.pipeline import tune_document
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import IGNORE_INDEX, DocumentSamples

from bench.common import bar_chart, hardware, time_call

RESULTS = Path(__file__).parent / "results"
METHODS = {"hf": "hf-trainer+peft", "solo": "lift one-by-one", "batched": "lift batched", "prefix": "lift batched+prefix",
           "hf-bf16": "hf-trainer+peft (bf16 autocast)", "solo-bf16": "lift one-by-one (bf16 base)",
           "batched-bf16": "lift batched (bf16 base)", "prefix-bf16": "lift batched+prefix (bf16 base)"}


def matmul_rates(shapes, windows: int = 5, seconds: float = 0.3, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[float, float]:
    """(peak, sustained) GFLOP/s of [m, k] @ [k, n] over `shapes`.

    Every shape is timed in `windows` windows of ≥ `seconds` each (bench.common.time_call:
    torch.utils.benchmark on CPU, triton.testing.do_bench on CUDA), the shapes interleaved
    round by round.
    peak: the best window of any shape. oneDNN's bf16 (AMX) GEMMs reach their speed only
    on some shapes (here 1024³ ran at ~40% of the model's own shapes), so the shapes include
    the model's. sustained: the best shape's median window. On this shared CPU, GEMMs run
    ~800 GFLOP/s usually and ~2000 in bursts (bench/README.md): peak is a burst, sustained
    what a job lasting minutes can expect.
    """
    device = torch.device(device)
    operands = [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device))
                for m, k, n in shapes]
    for a, b in operands:
        for _ in range(3):
            a @ b
    rates: list[list[float]] = [[] for _ in shapes]
    for _ in range(windows):
        for i, (a, b) in enumerate(operands):
            per_call = time_call(lambda a=a, b=b: a @ b, device.type, seconds)
            rates[i].append(2 * a.shape[0] * a.shape[1] * b.shape[1] / per_call / 1e9)
    return max(max(r) for r in rates), max(statistics.median(r) for r in rates)


def peak_shapes(model, device: torch.device) -> list[tuple[int, int, int]]:
    """Square 1024³ and 2048³ (also 4096³ and 8192³ on a GPU), and the model's MLP/attention
    projections at 4096 tokens."""
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    square = [1024, 2048] + ([4096, 8192] if device.type == "cuda" else [])
    return [(s, s, s) for s in square] + [(4096, hidden, inter), (4096, inter, hidden), (4096, hidden, hidden)]


def random_weights_model(path: str, device: torch.device):
    """The architecture and tokenizer of the model dir `path` with freshly initialised
    weights (seed 0): for timing where the weights cannot travel (a GPU machine that
    cannot download them). Throughput does not depend on the weights' values."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lift_engine.models.loading import LoadedModel, _prepare, model_fingerprint

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _prepare(model, tokenizer)
    model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=f"{path} (random weights)",
                       fingerprint=model_fingerprint(model))


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload's options (documents and the LIFT plan), shared with bench_step_profile.py."""
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--segment", type=int, default=96)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--qa", type=int, default=3)
    parser.add_argument("--epochs1", type=int, default=1)
    parser.add_argument("--epochs2", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)


def bench_config(args):
    cfg = make_config("cpu", "lora")
    cfg.segment.length = args.segment
    cfg.context.length = args.context
    cfg.qa.num_extractive = args.qa
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = args.epochs1, args.epochs2
    cfg.train.batch_size = args.batch_size
    return cfg


def make_documents(tokenizer, n: int, doc_tokens: int, seed: int) -> list[str]:
    contexts = list(dict.fromkeys(row["context"] for row in make_dataset(n, seed=seed)))  # one record per question
    assert len(contexts) == n, (len(contexts), n)
    docs = []
    for i, context in enumerate(contexts):
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        # documents of different lengths: 60%..140% of doc_tokens
        length = int(doc_tokens * (0.6 + 0.8 * ((i * 7919) % 11) / 10))
        docs.append(tokenizer.decode(ids[:length]))
    return docs


def plan_tokens(base, cfg, texts) -> tuple[int, int, list[list]]:
    """(sample tokens, loss tokens, per-document built samples) of the LIFT plan."""
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    total = loss = 0
    built = []
    for text in texts:
        ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        samples = DocumentSamples(ids, build_qa_items(text, cfg, base, False), cfg, prompts)
        doc = [samples.build(r) for r in samples.full_plan()]
        built.append(doc)
        total += sum(len(s.input_ids) for s in doc)
        loss += sum(sum(1 for lab in s.labels[1:] if lab != IGNORE_INDEX) for s in doc)
    return total, loss, built


def run_hf(base, cfg, built, workdir: Path, bf16: bool = False) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    pad = base.tokenizer.pad_token_id

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class InOrder(Trainer):  # the LIFT plan's order (stage 1 then stage 2), as the engine uses
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    for i, doc in enumerate(built):
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.targets), lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        model = get_peft_model(base.model, lora)
        targs = TrainingArguments(
            output_dir=str(workdir / f"hf-{i}"), per_device_train_batch_size=cfg.train.batch_size, num_train_epochs=1,
            learning_rate=cfg.train.lr_lora, adam_beta1=cfg.train.betas[0], adam_beta2=cfg.train.betas[1],
            weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip, lr_scheduler_type="constant",
            warmup_steps=0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.train.seed, bf16=bf16,
        )
        data = [{"input_ids": s.input_ids, "labels": s.labels} for s in doc]
        InOrder(model=model, args=targs, train_dataset=data, data_collator=collate).train()
        model.save_pretrained(str(workdir / f"hf-{i}" / "adapter"))
        model.unload()
        base.model.eval()


def with_dtype(cfg, dtype: str):
    """A copy of cfg with train.compute_dtype = dtype."""
    from lift_engine.config import LiftConfig

    out = LiftConfig.from_dict(cfg.to_dict())
    out.train.compute_dtype = dtype
    return out


def run_solo(base, cfg, texts, workdir: Path) -> None:
    for i, text in enumerate(texts):
        tune_document(base, text, workdir / f"solo-{i}", cfg, BatchConfig(prefix_sharing=False, checkpoint_every=10**9),
                      progress=False, log=lambda *a: None)


def run_batched(base, cfg, texts, workdir: Path, prefix: bool, memory_budget: int) -> dict:
    job = BatchTuneJob(base, cfg, workdir / ("prefix" if prefix else "batched"), max_active=len(texts),
                       prefix_sharing=prefix, checkpoint_every=10**9, memory_budget=memory_budget)
    try:
        for i, text in enumerate(texts):
            job.submit(text, f"doc{i}")
        job.run()
    finally:
        job.close()
    bad = {k: v["error"] for k, v in job.progress().items() if v["status"] != "done"}
    if bad:
        raise RuntimeError(f"batched job failed: {bad}")
    return {"steps": job.global_step, "passes": sum(r.passes for r in job.history),
            "model_tokens": sum(r.tokens for r in job.history)}


def model_flops(model, tokens: int, loss_tokens: int) -> float:
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    head = model.get_output_embeddings().weight.numel()
    return 4.0 * linear * tokens + 4.0 * head * loss_tokens


COLORS = {"hf-trainer+peft": "#9e9e9e", "lift one-by-one": "#64b5f6", "lift batched": "#1565c0",
          "lift batched+prefix": "#2e7d32", "hf-trainer+peft (bf16 autocast)": "#616161",
          "lift one-by-one (bf16 base)": "#90caf9", "lift batched (bf16 base)": "#7e57c2",
          "lift batched+prefix (bf16 base)": "#81c784"}


def svg_chart(report: dict, path: Path) -> Path:
    """Grouped bars: documents/hour per method for each N (bench.common.bar_chart)."""
    results = report["results"]
    ns = sorted({r["n"] for r in results})
    methods = [m for m in METHODS.values() if any(r["method"] == m for r in results)]
    series = {m: [next((r["docs_per_hour"] for r in results if r["n"] == n and r["method"] == m), None) for n in ns]
              for m in methods}
    hw, model = report.get("hardware", {}), report.get("model", {})
    on_gpu = str(report.get("device", "cpu")).startswith("cuda")
    where = (hw.get("gpu"),) if on_gpu else (hw.get("cpu"), f"{hw.get('torch_threads')} threads")
    subtitle = " · ".join(str(p) for p in (model.get("id"), *where,
                                           f"torch {hw.get('torch')}", f"{report.get('doc_tokens')}-token documents")
                          if p)
    return bar_chart(path, "Tuning throughput: documents/hour by N (higher is better)", [f"N={n}" for n in ns],
                     series, ylabel="documents/hour", subtitle=subtitle, log=False, value_format="{:.0f}",
                     colors=COLORS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the default SmolLM2-135M)")
    parser.add_argument("--ns", default="1,4,16")
    parser.add_argument("--methods", default="hf,solo,batched,prefix")
    add_workload_args(parser)
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="memory budget of every batched job (default: 80%% of what is free at the start, "
                             "measured once, so that methods run later do not get less)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda: where every method trains")
    parser.add_argument("--random-weights", action="store_true",
                        help="--model DIR holds config.json and the tokenizer only: initialise the weights randomly")
    parser.add_argument("--out", default=str(RESULTS / "bench_tune.json"))
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the .svg of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"plot: {svg_chart(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix('.svg'))}")
        return 0

    keep_freed_memory()  # as `lift tune` does; every method runs in this process, so all get it
    device = resolve_device(args.device)
    if args.random_weights:
        if not args.model:
            parser.error("--random-weights needs --model DIR (its config.json and tokenizer)")
        base = random_weights_model(args.model, device)
    else:
        base = load_base_model(args.model, device=device)
    cfg = bench_config(args)
    ns = [int(x) for x in args.ns.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else default_budget_bytes(device)
    shapes = peak_shapes(base.model, device)
    dtypes = {"float32": torch.float32}
    if any(m.endswith("-bf16") for m in methods):
        dtypes["bfloat16"] = torch.bfloat16
    rates = {name: matmul_rates(shapes, dtype=dt, device=device) for name, dt in dtypes.items()}
    peaks = {name: r[0] for name, r in rates.items()}
    sustained = {name: r[1] for name, r in rates.items()}
    print(f"hardware: {hardware()}; matmul peak (sustained) " + ", ".join(f"{k} {v:.1f} ({sustained[k]:.1f})"
                                                                         for k, v in peaks.items()) + " GFLOP/s",
          file=sys.stderr)
    all_texts = make_documents(base.tokenizer, max(ns), args.doc_tokens, args.seed)
    results = []
    for n in ns:
        texts = all_texts[:n]
        tokens, loss_tokens, built = plan_tokens(base, cfg, texts)
        flops = model_flops(base.model, tokens, loss_tokens)
        for m in methods:
            dtype = "bfloat16" if m.endswith("-bf16") else "float32"
            kind = m.removesuffix("-bf16")
            with tempfile.TemporaryDirectory() as tmp:
                began = time.perf_counter()
                extra = {}
                if kind == "hf":
                    run_hf(base, cfg, built, Path(tmp), bf16=dtype == "bfloat16")
                elif kind == "solo":
                    run_solo(base, with_dtype(cfg, dtype), texts, Path(tmp))
                else:
                    extra = run_batched(base, with_dtype(cfg, dtype), texts, Path(tmp), prefix=(kind == "prefix"),
                                        memory_budget=budget)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - began
            row = {"n": n, "method": METHODS[m], "dtype": dtype, "seconds": seconds, "docs_per_hour": n * 3600 / seconds,
                   "tokens_per_s": tokens / seconds, "train_tokens": tokens, "loss_tokens": loss_tokens,
                   "gflops": flops / seconds / 1e9, "peak_gflops": peaks[dtype],
                   "fraction_of_peak": flops / seconds / 1e9 / peaks[dtype],
                   "sustained_gflops": sustained[dtype],
                   "fraction_of_sustained": flops / seconds / 1e9 / sustained[dtype], **extra}
            results.append(row)
            print(f"N={n:<3} {row['method']:<34} {seconds:8.1f}s {row['docs_per_hour']:9.1f} docs/h "
                  f"{row['tokens_per_s']:8.1f} tok/s {row['gflops']:6.2f} GFLOP/s", file=sys.stderr, flush=True)
    base_name = METHODS["hf"] if "hf" in methods else METHODS[methods[0]]
    for row in results:
        ref = next(r for r in results if r["n"] == row["n"] and r["method"] == base_name)
        row["speedup_vs_" + base_name.replace(" ", "_")] = row["docs_per_hour"] / ref["docs_per_hour"]
    model_desc = {"id": base.model_id, "params": sum(p.numel() for p in base.model.parameters())}
    report = {"hardware": hardware(), "device": str(device), "matmul_peak_gflops": peaks["float32"], "matmul_peaks_gflops": peaks,
              "matmul_sustained_gflops": sustained,
              "model": model_desc, "config": cfg.to_dict(), "memory_budget_bytes": budget,
              "doc_tokens": args.doc_tokens, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    svg_chart(report, out.with_suffix(".svg"))
    key = "speedup_vs_" + base_name.replace(" ", "_")
    where = (report["hardware"].get("gpu") if device.type == "cuda"
             else f"{report['hardware']['cpu']}, {report['hardware']['torch_threads']} threads")
    print(f"\nmodel {base.model_id} ({model_desc['params'] / 1e6:.1f}M params); {where}; matmul peak (sustained) "
          + ", ".join(f"{k} {v:.1f} ({sustained[k]:.1f})" for k, v in peaks.items()) + " GFLOP/s\n")
    print(f"| N | method | s | docs/h | tokens/s | GFLOP/s | % of peak (dtype) | % of sustained | × {base_name} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']} | {r['method']} | {r['seconds']:.1f} | {r['docs_per_hour']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['gflops']:.2f} | {100 * r['fraction_of_peak']:.1f} ({'bf16' if r['dtype'] == 'bfloat16' else 'fp32'}) | "
              f"{100 * r['fraction_of_sustained']:.1f} | {r[key]:.2f} |")
    print(f"\nwrote {out} and {out.with_suffix('.svg')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
