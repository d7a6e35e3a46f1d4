"""Fused RMSNorm and SwiGLU in a Llama-style model while it trains (DESIGN.md §5).

transformers' LlamaRMSNorm and LlamaMLP are chains of eager elementwise ops: a norm
casts to fp32, squares, averages, scales, casts back and multiplies (seven passes over
the activations forward, more backward), and the MLP's silu(gate) · up is three. In a
LIFT step those passes cost about as much as the frozen GEMMs (bench/README.md, profile).
Inside `fused_blocks(model)` every such module runs `ops.rms_norm` / `ops.swiglu`
instead: one pass each way (C++ on CPU, through dispatch; the reference op elsewhere,
which is HF's formula itself).

Patched: modules whose class is one of the known Llama-family classes below (their
formulas are Llama's; Gemma's norm, with its 1 + weight, is not among them) and, for the
MLP, whose act_fn is SiLU. The patch is an instance attribute `forward`, removed on
exit (also on error), so inference and serving keep the model's own code.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from lift_engine import ops

#: Norm and MLP classes whose forward is exactly Llama's (y = w · x · rsqrt(mean x² + eps);
#: down(act(gate(x)) · up(x))).
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _norm_forward(module: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(ops.swiglu(module.gate_proj(x), module.up_proj(x)))
    return forward


def fusable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "norm" | "mlp") for every module `fused_blocks` patches."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORM_CLASSES and isinstance(getattr(module, "variance_epsilon", None), float):
            found.append((module, "norm"))
        elif name in MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            found.append((module, "mlp"))
    return found


@contextlib.contextmanager
def fused_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, the model's Llama-style norms and SwiGLU MLPs run the fused ops.
    Yields how many modules were patched (0 when disabled or none is known)."""
    patched: list[nn.Module] = []
    try:
        if enabled:
            for module, kind in fusable_modules(model):
                if "forward" in module.__dict__:  # already patched (nested use) or hooked: leave it
                    continue
                module.forward = _norm_forward(module) if kind == "norm" else _mlp_forward(module)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
