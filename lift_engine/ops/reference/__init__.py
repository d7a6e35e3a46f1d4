"""Pure-PyTorch reference ops: the oracle in tests and the CPU fallback path."""
from lift_engine.ops.reference.lora import lora_expand, lora_linear_delta, lora_shrink
from lift_engine.ops.reference.lora_linear import lora_linear
from lift_engine.ops.reference.gated_memory_blend import gated_memory_blend
from lift_engine.ops.reference.gated_memory_attention import gated_memory_attention, apply_rope

__all__ = [
    "lora_shrink",
    "lora_expand",
    "lora_linear_delta",
    "lora_linear",
    "gated_memory_blend",
    "gated_memory_attention",
    "apply_rope",
]
