"""A frozen linear with one LoRA adapter per sequence, as two batched GEMMs (DESIGN.md §3–4).

Training batches give every row (sample) one adapter: `AdapterContext` indices [B]. Then
the multi-adapter LoRA term needs no per-token gather at all:

    y[b, s] = x[b, s] Wᵀ + bias + scaling[n] · (x[b, s] A[n]ᵀ) B[n]ᵀ,   n = row_idx[b]
    (the LoRA term is 0 for rows with n == -1)

    = baddbmm(F.linear(x, W, bias), bmm(x, A[row_idx]ᵀ), (scaling[row_idx] · B[row_idx])ᵀ)

The adapters of the batch's rows are gathered ([B, r, in] and [B, out, r], small) and cast
to x's dtype, so the bank may stay fp32 (master weights) while x and W are bf16: the
GEMMs then run at bf16 speed (oneDNN/AMX on CPU, tensor cores on GPU) and the gradients
of the bank land in its own dtype through the cast and the gather's backward.

This op is composite pure PyTorch, so it has no backend kernels and is not in
dispatch.OPS. Its reference is `ops.reference.lora_linear` with the row index expanded to
every token (`row_idx[:, None].expand(B, S).reshape(-1)`); tests/test_lora_linear_rows.py
compares outputs and gradients against it. `LoRABankLinear` uses it when the indices
are per row and the one-op `ops.lora_linear` path cannot take the inputs (dtypes differ,
or low precision on CPU, where the C++ kernels are fp32 only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lift_engine.ops.reference.lora_linear import check_linear


def lora_linear_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    row_idx: torch.Tensor,
) -> torch.Tensor:
    """Base linear + one LoRA adapter per row.

    x: [B, S, in]; weight: [out, in] and bias: [out] or None, in x's dtype;
    lora_a: [N, r, in], lora_b: [N, out, r] (any float dtype, e.g. fp32 master weights);
    scaling: [N] float; row_idx: [B] int64 in [-1, N) (-1 = no adapter for that row)
    → [B, S, out] in x's dtype.
    """
    if x.dim() != 3 or row_idx.dim() != 1 or row_idx.shape[0] != x.shape[0]:
        raise ValueError(f"lora_linear_rows needs x [B, S, in] and row_idx [B], got {tuple(x.shape)} and "
                         f"{tuple(row_idx.shape)}")
    check_linear(x, weight, lora_b)  # the reference op's check of x, W and B
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[-1] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not fit x "
                         f"{tuple(x.shape)}: expected lora_a [N, r, in], lora_b [N, out, r]")
    y = F.linear(x, weight, bias)
    present = row_idx >= 0
    safe = row_idx.clamp(min=0)
    scale = torch.where(present, scaling.index_select(0, safe).float(), 0.0)  # [B]; 0 for rows without an adapter
    a = lora_a.index_select(0, safe).to(x.dtype)  # [B, r, in]
    b = (lora_b.index_select(0, safe) * scale.view(-1, 1, 1).to(lora_b.dtype)).to(x.dtype)  # [B, out, r]
    return torch.baddbmm(y, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
