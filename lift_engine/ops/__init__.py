"""Ops layer: every adapter computation of the trainer and the serving path goes
through these functions, which dispatch to a backend (see dispatch.py)."""
from lift_engine.ops.dispatch import (
    BackendUnavailable,
    gated_memory_attention,
    gated_memory_blend,
    lora_expand,
    lora_linear,
    lora_linear_delta,
    lora_shrink,
    resolve,
)

__all__ = [
    "BackendUnavailable",
    "gated_memory_attention",
    "gated_memory_blend",
    "lora_expand",
    "lora_linear",
    "lora_linear_delta",
    "lora_shrink",
    "resolve",
]
