"""A frozen linear with multi-adapter LoRA, reference implementation (DESIGN.md §3–4).

The pure-PyTorch twin of kernels/lora_linear.py (one fused GEMM there):

    y[t] = x[t] Wᵀ + bias + scaling[n] · (x[t] A[n]ᵀ) B[n]ᵀ,   n = adapter_idx[t]
    (the LoRA term is 0 where n == -1)

written as exactly what an unfused LoRA layer computes: F.linear(x, W, bias) plus the
reference lora_linear_delta (lora.py), so on the reference path a layer that calls this
op gives bit for bit what "base linear + delta" gave. Autograd gives every gradient,
including dW and dbias when the base weights require grad (in LIFT they are frozen).

The kernel's keyword-only extras have no argument here, as for lora_linear_delta:
fused q/k/v slices (`output_slices`) are the concatenation of one lora_linear per slice
(its rows of W and bias, its A rows, its B rows), and per-adapter ranks (`ranks`) are a
bank zero-padded past each adapter's rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lift_engine.ops.reference.lora import lora_linear_delta


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """Base linear + multi-adapter LoRA term.

    x: [T, in], weight: [out, in], bias: [out] or None, lora_a: [N, r, in],
    lora_b: [N, out, r], scaling: [N] float, adapter_idx: [T] int64 (-1 = no adapter)
    → [T, out] = F.linear(x, weight, bias) + lora_linear_delta(x, lora_a, lora_b, scaling, adapter_idx).
    """
    if x.dim() != 2:
        raise ValueError(f"expected tokens flattened to [T, features], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or lora_b.shape[1] != weight.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and lora_b {tuple(lora_b.shape)} "
                         "do not fit: expected x [T, in], weight [out, in], lora_b [N, out, r]")
    return F.linear(x, weight, bias) + lora_linear_delta(x, lora_a, lora_b, scaling, adapter_idx)
