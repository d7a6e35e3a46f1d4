"""Segmented outer product: the weight gradients of multi-adapter LoRA.

Semantics:

    G[n] = scaling[n] · Σ_{t : adapter_idx[t] == n} a[t]ᵀ b[t]        (G[n] = 0 if n is absent)

with an optional rank mask on one axis (rank_axis=1: rows p with p % slice_rank ≥
ranks[n] are 0; rank_axis=2: the same on columns q).

Shapes: a [T, P]; b [T, Q]; adapter_idx [T] (-1 = none); → G [N, P, Q].
dA of shrink is G(dh, x) [N, R, in]; dB of expand is G(dy, h)·s [N, out, R].

On a GPU the reduction over a long segment is split into chunks written to an fp32
workspace and summed afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    SegmentMeta,
    block,
    build_segments,
    check_float,
    check_ranks,
    check_runnable,
    dot_dtype,
    dot_precision,
)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _segment_outer_kernel(
    a_ptr, b_ptr, out_ptr, scale_ptr, ranks_ptr,
    token_order_ptr, seg_adapter_ptr, seg_start_ptr, seg_len_ptr,
    P, Q, SLICE_RANK, SPLITS,
    stride_at, stride_ap,
    stride_bt, stride_bq,
    stride_ow, stride_on, stride_op, stride_oq,
    HAS_SCALE: tl.constexpr, RANK_AXIS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q), segments · SPLITS)."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_sw = tl.program_id(2)
    pid_s = pid_sw // SPLITS
    split = pid_sw % SPLITS
    n = tl.load(seg_adapter_ptr + pid_s)
    start = tl.load(seg_start_ptr + pid_s)
    length = tl.load(seg_len_ptr + pid_s)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_M) * BLOCK_M
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    if RANK_AXIS == 1:
        mask_p = mask_p & ((offs_p % SLICE_RANK) < tl.load(ranks_ptr + n))
    if RANK_AXIS == 2:
        mask_q = mask_q & ((offs_q % SLICE_RANK) < tl.load(ranks_ptr + n))
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < hi
        tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        at = tl.load(a_ptr + tok[None, :] * stride_at + offs_p[:, None] * stride_ap,
                     mask=mask_m[None, :] & mask_p[:, None], other=0.0)  # [BLOCK_P, BLOCK_M] = aᵀ
        bt = tl.load(b_ptr + tok[:, None] * stride_bt + offs_q[None, :] * stride_bq,
                     mask=mask_m[:, None] & mask_q[None, :], other=0.0)  # [BLOCK_M, BLOCK_Q]
        acc = tl.dot(at.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n).to(tl.float32)
    out = (out_ptr + split * stride_ow + n.to(tl.int64) * stride_on
           + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq)
    # Masked-out rank rows/columns are written as 0 (the output is not pre-zeroed there).
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_p < P)[:, None] & (offs_q < Q)[None, :])


# ---------------------------------------------------------------------------- launcher
def segment_outer_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    adapter_idx: torch.Tensor,
    num_adapters: int,
    *,
    meta: SegmentMeta | None = None,
    scaling: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
    rank_axis: int = 0,
    slice_rank: int | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Checks, grid, launch → G [N, P, Q]. `out` (any strided [N, P, Q] view) is overwritten
    for adapters present in the batch and left as is for the others (pass zeros)."""
    device = check_runnable(a, b, adapter_idx)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected a [T, P] and b [T, Q], got {tuple(a.shape)}, {tuple(b.shape)}")
    check_float("a", a)
    check_float("b", b, a.dtype)
    num_tokens, p = a.shape
    q = b.shape[1]
    if rank_axis not in (0, 1, 2):
        raise ValueError("rank_axis must be 0 (none), 1 (P) or 2 (Q)")
    rank_len = {0: 1, 1: p, 2: q}[rank_axis]
    slice_rank = rank_len if slice_rank is None else int(slice_rank)
    if ranks is not None and rank_axis == 0:
        raise ValueError("ranks given without a rank_axis")
    ranks = check_ranks(ranks, num_adapters, slice_rank, device)
    if scaling is not None:
        scaling = scaling.to(device=device, dtype=torch.float32)
    if out is None:
        out = torch.zeros(num_adapters, p, q, device=device, dtype=out_dtype or a.dtype)
    elif out.shape != (num_adapters, p, q):
        raise ValueError(f"out must be [{num_adapters}, {p}, {q}], got {tuple(out.shape)}")
    if meta is None:
        meta = build_segments(adapter_idx, num_adapters)
    elif meta.num_tokens != num_tokens or meta.num_adapters != num_adapters:
        raise ValueError("segment metadata was built for another batch or bank size")
    if meta.num_segments == 0 or p == 0 or q == 0:
        return out
    block_m = block(meta.max_len, 16, 64 if INTERPRETED else 32)
    block_p = block(p, 16, 128 if INTERPRETED else 64)
    block_q = block(q, 16, 128 if INTERPRETED else 64)
    tiles = triton.cdiv(p, block_p) * triton.cdiv(q, block_q) * meta.num_segments
    if splits is None:
        splits = 1 if INTERPRETED else max(1, min(triton.cdiv(meta.max_len, 512), 1024 // tiles))
    target = out if splits == 1 else torch.zeros(splits, *out.shape, device=device, dtype=torch.float32)
    strides = (0, *out.stride()) if splits == 1 else target.stride()
    dummy = out
    grid = (triton.cdiv(p, block_p), triton.cdiv(q, block_q), meta.num_segments * splits)
    _segment_outer_kernel[grid](
        a, b, target, scaling if scaling is not None else dummy, ranks if ranks is not None else dummy,
        meta.token_order, meta.seg_adapter, meta.seg_start, meta.seg_len,
        p, q, slice_rank, splits,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        *strides,
        HAS_SCALE=scaling is not None, RANK_AXIS=rank_axis if ranks is not None else 0,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q,
        DOT_DTYPE=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
        num_warps=4 if block_p * block_q <= 64 * 64 else 8, num_stages=2 if INTERPRETED else 3,
    )
    if splits > 1:
        active = meta.seg_adapter.long()
        out[active] = target.sum(0)[active].to(out.dtype)
    return out


# ---------------------------------------------------------------------- autograd.Function
class SegmentOuter(torch.autograd.Function):
    """G = segment_outer(a, b); dG flows back as da[t] = dG[n] b[t]ᵀ-style products:
    da[t] = s[n]·b[t] @ dG[n]ᵀ (an expand) and db[t] = s[n]·a[t] @ dG[n] (an expand)."""

    @staticmethod
    def forward(ctx, a, b, adapter_idx, num_adapters, scaling, meta):
        if meta is None:
            meta = build_segments(adapter_idx, num_adapters)
        g = segment_outer_launch(a, b, adapter_idx, num_adapters, meta=meta, scaling=scaling)
        ctx.save_for_backward(a, b, adapter_idx, scaling)
        ctx.meta = meta
        return g

    @staticmethod
    def backward(ctx, dg):
        from .lora_expand import expand_launch

        a, b, adapter_idx, scaling = ctx.saved_tensors
        dg = dg.to(a.dtype)
        da = db = None
        if ctx.needs_input_grad[0]:  # da[t, p] = s Σ_q dG[n, p, q] b[t, q]  → B = dG  [N, P, Q]
            da = expand_launch(b, dg, adapter_idx, scaling=scaling, meta=ctx.meta)
        if ctx.needs_input_grad[1]:  # db[t, q] = s Σ_p dG[n, p, q] a[t, p]  → B = dGᵀ [N, Q, P]
            db = expand_launch(a, dg.transpose(1, 2), adapter_idx, scaling=scaling, meta=ctx.meta)
        return da, db, None, None, None, None


# ------------------------------------------------------------------------ public function
def lora_segment_outer(
    a: torch.Tensor,
    b: torch.Tensor,
    adapter_idx: torch.Tensor,
    num_adapters: int,
    scaling: torch.Tensor | None = None,
    *,
    meta: SegmentMeta | None = None,
) -> torch.Tensor:
    """a [T, P], b [T, Q], adapter_idx [T] → G [N, P, Q], G[n] = s[n] Σ_{t∈n} a[t]ᵀ b[t]."""
    return SegmentOuter.apply(a, b, adapter_idx, num_adapters, scaling, meta)
