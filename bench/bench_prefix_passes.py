"""Prefix sharing with one prefix per document against `prefix_passes` (clusters by what
sharing saves), on real steps of the default model, side by side.

For the cpu and cpu-prose presets, the first stage-2 steps of the first real-prose dev
document (segments, QA, distillation and anchor samples as the preset plans them; the
teacher's answers are made up at 30 tokens each — their number and chunks are the
recipe's, their values do not change the cost) run forward + backward, LoRA, fp32, both
ways interleaved (ABBA over two repetitions). `prefix.shared_pass` on a whole step is
exactly the computation before the clusters existed. Reported: seconds of each and the
ratio, with the hardware.

Usage: .venv/bin/python -m bench.bench_prefix_passes [--steps 6]
Writes bench/results/bench_prefix_passes.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lift_engine.adapters.patching import attach_adapters
from lift_engine.batch import prefix
from lift_engine.config import make_config
from lift_engine.data.documents import tokenize_long
from lift_engine.data.extractive import extract_tasks
from lift_engine.fsutil import atomic_write_json
from lift_engine.models.loading import load_base_model
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import DocumentSamples, TeacherAnswer

from bench.bench_quality import DEV_SET
from bench.common import hardware

RESULTS = Path(__file__).parent / "results"
METHODS = {"one prefix per document": prefix.shared_pass, "prefix_passes": prefix.prefix_shared_token_loss}


def step_samples(base, preset: str, text: str, steps: int) -> tuple[list[list], object]:
    """(the first `steps` stage-2 steps' samples, the attached adapter handle)."""
    cfg = make_config(preset, "lora")
    handle = attach_adapters(base.model, "lora", cfg, num_adapters=1, seed=0)
    samples = DocumentSamples(tokenize_long(text, base.tokenizer), extract_tasks(text, cfg.qa.num_extractive, seed=0),
                              cfg, PromptBuilder(base.tokenizer))
    if cfg.distill.enabled:
        g = torch.Generator().manual_seed(0)
        samples.teacher_answers = [
            TeacherAnswer(f"What does part {i} say about it?", list(range(100, 130)),
                          torch.randint(0, 1000, (30, 20), generator=g),
                          torch.log_softmax(torch.randn(30, 20, generator=g), -1), i % len(samples.chunks))
            for i in range(8 * len(samples.chunks))]
    refs = samples.epoch_plan(2, 0)
    batch = cfg.train.batch_size
    return [[samples.build(r) for r in prefix.shared_context_refs(refs[i : i + batch])]
            for i in range(0, batch * steps, batch)], handle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--file", default=str(DEV_SET))
    args = parser.parse_args()
    text = json.loads(Path(args.file).read_text().splitlines()[0])["context"]
    base = load_base_model()
    pad = base.tokenizer.pad_token_id
    out = {"hardware": hardware(), "model": base.model_id, "steps_timed_per_method": 2 * args.steps, "presets": {}}
    for preset in ("cpu", "cpu-prose"):
        steps, handle = step_samples(base, preset, text, args.steps)
        seconds = dict.fromkeys(METHODS, 0.0)
        base.model.train()
        for rep in range(2):
            for step in steps:
                for name in (list(METHODS) if rep == 0 else list(reversed(METHODS))):
                    for p in handle.trainable_parameters():
                        p.grad = None
                    began = time.perf_counter()
                    loss, _, _ = METHODS[name](base.model, handle, step, pad, 1024)
                    loss.sum().backward()
                    seconds[name] += time.perf_counter() - began
        handle.set_indices(None)
        handle.remove()
        row = {name: round(s, 1) for name, s in seconds.items()}
        row["speedup"] = round(seconds["one prefix per document"] / seconds["prefix_passes"], 3)
        out["presets"][preset] = row
        print(f"{preset}: {row}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "bench_prefix_passes.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
