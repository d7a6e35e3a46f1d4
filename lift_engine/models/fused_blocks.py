"""Fused RMSNorm, SwiGLU and RoPE in a Llama-style model while it trains (docs/DESIGN.md §4.8).

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

RoPE (six passes per tensor forward, as many backward) is a module-level function that
the attention classes below call by name, `apply_rotary_pos_emb` of their modeling
module; inside the block that name is bound to a version running `ops.rotary` on q and k
(same formula, one pass each way). That binding is process-wide while any block is open
(counted, restored when the last one exits): another model of the family running in
the meantime gets the fused formula too, equal to HF's up to rounding.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

import torch
from torch import nn

from lift_engine import ops

#: Norm and MLP classes whose forward is exactly Llama's (y = w · x · rsqrt(mean x² + eps);
#: down(act(gate(x)) · up(x))).
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
#: Attention classes that apply RoPE with their module's Llama-style apply_rotary_pos_emb.
ROPE_ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
ROPE_FUNCTION = "apply_rotary_pos_emb"


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


def _fused_rope(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1:
            return original(q, k, cos, sin, unsqueeze_dim)
        return ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
    apply_rotary_pos_emb.lift_original = original
    return apply_rotary_pos_emb


_rope_lock = threading.Lock()
_rope_users: dict[str, int] = {}  # modeling module name → open blocks that bound its fused RoPE


def rope_modules(model: nn.Module) -> list[str]:
    """Names of the modeling modules whose apply_rotary_pos_emb the model's attention uses."""
    names = {type(m).__module__ for m in model.modules() if type(m).__name__ in ROPE_ATTENTION_CLASSES}
    return sorted(n for n in names if callable(getattr(sys.modules.get(n), ROPE_FUNCTION, None)))


def _bind_rope(name: str) -> None:
    with _rope_lock:
        module = sys.modules[name]
        if _rope_users.get(name, 0) == 0:
            setattr(module, ROPE_FUNCTION, _fused_rope(getattr(module, ROPE_FUNCTION)))
        _rope_users[name] = _rope_users.get(name, 0) + 1


def _unbind_rope(name: str) -> None:
    with _rope_lock:
        _rope_users[name] -= 1
        if _rope_users[name] == 0:
            module = sys.modules[name]
            setattr(module, ROPE_FUNCTION, getattr(module, ROPE_FUNCTION).lift_original)


@contextlib.contextmanager
def fused_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, the model's Llama-style norms, SwiGLU MLPs and RoPE run the fused
    ops. Yields how many modules were patched (0 when disabled or none is known)."""
    patched: list[nn.Module] = []
    bound: list[str] = []
    try:
        if enabled:
            for module, kind in fusable_modules(model):
                if "forward" in module.__dict__:  # already patched (nested use) or hooked: leave it
                    continue
                module.forward = _norm_forward(module) if kind == "norm" else _mlp_forward(module)
                patched.append(module)
            for name in rope_modules(model):
                _bind_rope(name)
                bound.append(name)
        yield len(patched) + len(bound)
    finally:
        for module in patched:
            del module.forward
        for name in bound:
            _unbind_rope(name)
