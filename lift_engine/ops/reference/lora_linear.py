"""A frozen linear with multi-adapter LoRA, reference implementation (docs/DESIGN.md §3.1, §4).

The pure-PyTorch twin of kernels/lora_linear.py (one fused GEMM there):

    y[t] = x[t] Wᵀ + bias + scaling[n] · (x[t] A[n]ᵀ) B[n]ᵀ,   n = adapter_idx[t]
    (the LoRA term is 0 where n == -1; t runs over all leading positions of x, flattened)

written as exactly what an unfused LoRA layer computes — F.linear(x, W, bias) on x as
given, plus the reference lora_linear_delta (lora.py) on x flattened to [T, in] — so a
layer that calls this op gets, bit for bit, the output *and* the gradients of "base
linear + delta": the autograd graph is the same (x has the same two consumers, so even
the order in which x's gradient contributions are summed is unchanged). Autograd gives
every gradient, dW and dbias too when the base weights require grad (in LIFT they are
frozen).

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


def check_linear(x: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Shapes every backend's lora_linear accepts (the kernels then see x as [T, in])."""
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or lora_b.shape[1] != weight.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)} and lora_b {tuple(lora_b.shape)} "
                         "do not fit: expected x [..., in], weight [out, in], lora_b [N, out, r]")


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

    x: [..., in] (T tokens = the product of the leading dims; usually [T, in] or [B, S, in]),
    weight: [out, in], bias: [out] or None, lora_a: [N, r, in], lora_b: [N, out, r],
    scaling: [N] float, adapter_idx: [T] int64 (-1 = no adapter, token order = x's row-major order)
    → [..., out] = F.linear(x, weight, bias)
                   + lora_linear_delta(x.reshape(T, in), lora_a, lora_b, scaling, adapter_idx).view(..., out)
    """
    check_linear(x, weight, lora_b)
    y = F.linear(x, weight, bias)
    delta = lora_linear_delta(x.reshape(-1, x.shape[-1]), lora_a, lora_b, scaling, adapter_idx)
    return y + delta.view(y.shape)
