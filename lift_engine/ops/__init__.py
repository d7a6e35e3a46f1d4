"""Ops layer: every adapter computation of the trainer and the serving path goes
through these functions, which dispatch to a backend (see dispatch.py)."""
from lift_engine.ops.dispatch import (
    BackendUnavailable,
    Unsupported,
    attention,
    cross_entropy_with_grad_,
    gated_memory_attention,
    gated_memory_blend,
    lora_expand,
    lora_bank_linear,
    lora_bank_path,
    lora_linear,
    lora_linear_delta,
    lora_shrink,
    resolve,
    rms_norm,
    rotary,
    swiglu,
)

__all__ = [
    "BackendUnavailable",
    "Unsupported",
    "attention",
    "cross_entropy_with_grad_",
    "gated_memory_attention",
    "gated_memory_blend",
    "lora_expand",
    "lora_bank_linear",
    "lora_bank_path",
    "lora_linear",
    "lora_linear_delta",
    "lora_shrink",
    "resolve",
    "rms_norm",
    "rotary",
    "swiglu",
]
