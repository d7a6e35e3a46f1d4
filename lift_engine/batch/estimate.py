"""What a document's tuning plan costs, shown before it trains (counts and a rough time)."""
from __future__ import annotations

import math

import torch

from lift_engine.samples import DocumentSamples

# Measured on the 2-core development machine (docs/DESIGN.md §8), quiet: the cpu preset's
# demo plan (~68k planned tokens) tuned the 135M default model in 352 s, ~194 tok/s in
# fp32, i.e. about 6·135e6·194 ≈ 1.6e11 FLOP/s. Other jobs on the cores slow it 2–10×.
ASSUMED_TRAIN_FLOPS = 1.6e11
# train.compute_dtype = "bfloat16" (precision.py) on the same machine: the same demo plan
# tuned in 101 s instead of 336 s (with the bf16 AMX attention kernel and fused RoPE).
ASSUMED_SPEEDUP = {"float32": 1.0, "bfloat16": 336 / 101}


def estimate_seconds(model: torch.nn.Module, total_tokens: int, compute_dtype: str = "float32") -> float:
    """Rough time of `total_tokens` of forward+backward (6·params FLOP per token) when tuning
    in `compute_dtype`."""
    params = sum(p.numel() for p in model.parameters())
    return 6.0 * params * total_tokens / ASSUMED_TRAIN_FLOPS / ASSUMED_SPEEDUP.get(compute_dtype, 1.0)


def plan_summary(samples: DocumentSamples, model: torch.nn.Module) -> dict:
    """Counts and a rough time estimate of a document's plan: segments, qa_items, samples,
    train_tokens, estimated_seconds."""
    plan = samples.full_plan()
    tokens = sum(samples.approx_length(ref) for ref in plan)
    return {
        "segments": len(samples.spans),
        "qa_items": len(samples.qa_items),
        "samples": len(plan),
        "train_tokens": tokens,
        "estimated_seconds": estimate_seconds(model, tokens, samples.cfg.train.compute_dtype),
    }


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s; "unknown" for inf/nan."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
