"""Pure-PyTorch reference ops: the oracle in tests and the CPU fallback path."""
from lift_engine.ops.reference.lora import lora_expand, lora_linear_delta, lora_shrink
from lift_engine.ops.reference.lora_linear import lora_linear
from lift_engine.ops.reference.gated_memory_blend import gated_memory_blend
from lift_engine.ops.reference.gated_memory_attention import gated_memory_attention, apply_rope
from lift_engine.ops.reference.rms_norm import rms_norm
from lift_engine.ops.reference.swiglu import swiglu
from lift_engine.ops.reference.cross_entropy_with_grad import cross_entropy_with_grad_
from lift_engine.ops.reference.attention import attention
from lift_engine.ops.reference.rotary import rotary

__all__ = [
    "lora_shrink",
    "lora_expand",
    "lora_linear_delta",
    "lora_linear",
    "gated_memory_blend",
    "gated_memory_attention",
    "apply_rope",
    "rms_norm",
    "swiglu",
    "cross_entropy_with_grad_",
    "attention",
    "rotary",
]
