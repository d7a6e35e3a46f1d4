"""SwiGLU, the gated activation of Llama-style MLPs, reference implementation (docs/DESIGN.md §5).

    y = silu(gate) ⊙ up,   silu(g) = g · σ(g)

as transformers' LlamaMLP computes it between its projections
(`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with act_fn = SiLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_swiglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Shapes every backend's swiglu accepts."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I], same shape and dtype → [..., I]."""
    check_swiglu(gate, up)
    return F.silu(gate) * up
