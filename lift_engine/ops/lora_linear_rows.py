"""A frozen linear with one LoRA adapter per sequence, as two batched GEMMs (docs/DESIGN.md §3.1, §4.8).

Training batches give every row (sample) one adapter: `AdapterContext` indices [B]. Then
the multi-adapter LoRA term needs no per-token gather at all:

    y[b, s] = x[b, s] Wᵀ + bias + scaling[n] · (x[b, s] A[n]ᵀ) B[n]ᵀ,   n = row_idx[b]
    (the LoRA term is 0 for rows with n == -1)

    = baddbmm(F.linear(x, W, bias), scaling[row_idx] · bmm(x, A[row_idx]ᵀ), B[row_idx]ᵀ)

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


class _LoraLinearRows(torch.autograd.Function):
    """Forward as in the module docstring; the backward by hand, so that the per-row
    adapter gradients are summed per adapter with one index_add_ each (autograd's
    gather-backward is a zero-filled scatter_add_ over the bank, per weight and call) and
    the LoRA part of dx is accumulated into the base part in place (one baddbmm_)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, row_idx):
        present = row_idx >= 0
        safe = row_idx.clamp(min=0)
        scale = torch.where(present, scaling.index_select(0, safe).float(), 0.0)  # [B]; 0: no adapter
        a = lora_a.index_select(0, safe).to(x.dtype)  # [B, r, in]
        b = lora_b.index_select(0, safe).to(x.dtype)  # [B, out, r]
        h = torch.bmm(x, a.transpose(1, 2))  # [B, S, r]
        y = F.linear(x, weight, bias)
        y.baddbmm_(h * scale.view(-1, 1, 1).to(x.dtype), b.transpose(1, 2))
        ctx.save_for_backward(x, weight, a, b, h, scale, safe, present)
        ctx.bank_shapes = (lora_a.shape, lora_a.dtype, lora_b.shape, lora_b.dtype, scaling.shape, scaling.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h, scale, safe, present = ctx.saved_tensors
        a_shape, a_dtype, b_shape, b_dtype, s_shape, s_dtype = ctx.bank_shapes
        need_x, need_w, need_bias, need_a, need_b, need_s = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        scale_rows = scale.view(-1, 1, 1)
        dh = torch.bmm(dy, b) * scale_rows.to(dy.dtype)  # [B, S, r]
        dx = dw = dbias = da = db = ds = None
        if need_x:
            dx = torch.matmul(dy, weight)
            dx.baddbmm_(dh, a)
        if need_w:
            dw = (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if need_bias:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
        if need_a:
            da_rows = torch.bmm(dh.transpose(1, 2), x)  # [B, r, in]
            da = torch.zeros(a_shape, dtype=a_dtype, device=x.device).index_add_(0, safe, da_rows.to(a_dtype))
        if need_b or need_s:
            db_raw = torch.bmm(dy.transpose(1, 2), h).float()  # [B, out, r], unscaled
            if need_b:
                db = torch.zeros(b_shape, dtype=b_dtype, device=x.device).index_add_(
                    0, safe, (db_raw * scale_rows).to(b_dtype))
            if need_s:
                ds_rows = torch.where(present, (db_raw * b.float()).sum(dim=(1, 2)), 0.0)
                ds = torch.zeros(s_shape, dtype=torch.float32, device=x.device).index_add_(0, safe, ds_rows).to(s_dtype)
        return dx, dw, dbias, da, db, ds, None


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
    return _LoraLinearRows.apply(x, weight, bias, lora_a, lora_b, scaling, row_idx)
