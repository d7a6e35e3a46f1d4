"""Multi-adapter LoRA shrink (SGMV prefill/training + BGMV decode), forward and backward.

Semantics (reference: lift_engine.ops.reference.lora.lora_shrink):

    for t in range(T):
        n = adapter_idx[t]
        h[t, :] = 0                                   if n == -1
        h[t, r] = s[n] · Σ_k x[t, k] · A[n, r, k]     for r <  ranks[n]   (s = 1 unless given)
        h[t, r] = 0                                   for r >= ranks[n]

Shapes: x [T, in]; lora_a [N, R, in] (R = largest rank; per-adapter ranks via `ranks` [N]
or a zero-padded bank); adapter_idx [T] int (-1 = no adapter); → h [T, R] in x.dtype.
`slice_rank` (fused q/k/v with one A bank stacked on the rank axis, R = S·slice_rank):
the rank mask applies inside each slice, r % slice_rank < ranks[n].

Backward: dx[t] = dh[t] @ A[n] (an expand with B = Aᵀ, see lora_expand.py) and
dA[n] = Σ_{t∈n} dh[t]ᵀ x[t] (segmented outer product, see lora_segment_outer.py).
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
    check_adapter_idx,
    check_float,
    check_ranks,
    check_runnable,
    dot_dtype,
    dot_precision,
)

# Below this many tokens (and without precomputed metadata) the decode kernel is used:
# one program per token, no sort, no device→host sync (CUDA-graph friendly).
DECODE_MAX_TOKENS = 64


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, scale_ptr, ranks_ptr,
    token_order_ptr, seg_adapter_ptr, seg_start_ptr, seg_len_ptr,
    K, R, SLICE_RANK,
    stride_xt, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_os, stride_ot, stride_or,
    K_PER_SPLIT,
    HAS_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_len, BLOCK_M), cdiv(R, BLOCK_R) · SPLIT_K, segments)."""
    pid_m = tl.program_id(0)
    pid_rk = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_r_blocks = tl.cdiv(R, BLOCK_R)
    pid_r = pid_rk % num_r_blocks
    pid_k = pid_rk // num_r_blocks
    n = tl.load(seg_adapter_ptr + pid_s)
    start = tl.load(seg_start_ptr + pid_s)
    length = tl.load(seg_len_ptr + pid_s)
    if pid_m * BLOCK_M >= length:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if HAS_RANKS:
        mask_r = mask_r & ((offs_r % SLICE_RANK) < tl.load(ranks_ptr + n))
    a_base = a_ptr + n.to(tl.int64) * stride_an
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n).to(tl.float32)
    out = out_ptr + pid_k * stride_os + tok[:, None] * stride_ot + offs_r[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, idx_ptr, scale_ptr, ranks_ptr,
    K, R, SLICE_RANK,
    stride_xt, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_ot, stride_or,
    HAS_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode: one program per (token, rank block); a GEMV against that token's A."""
    t = tl.program_id(0)
    pid_r = tl.program_id(1)
    n = tl.load(idx_ptr + t)
    if n < 0:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if HAS_RANKS:
        mask_r = mask_r & ((offs_r % SLICE_RANK) < tl.load(ranks_ptr + n))
    a_base = a_ptr + n.to(tl.int64) * stride_an
    x_base = x_ptr + t.to(tl.int64) * stride_xt
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_base + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        at = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(at * xk[None, :], axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_r * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_r)


# ---------------------------------------------------------------------------- launcher
def _use_decode(num_tokens: int, meta: SegmentMeta | None, decode: bool | None) -> bool:
    if decode is not None:
        return decode
    return meta is None and num_tokens <= DECODE_MAX_TOKENS


def shrink_launch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scaling: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
    slice_rank: int | None = None,
    meta: SegmentMeta | None = None,
    decode: bool | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Checks, grid, launch. `out` (if given) must be [T, R] and zero where idx == -1;
    it is written, not accumulated. lora_a may be any strided view (e.g. Bᵀ)."""
    device = check_runnable(x, lora_a, adapter_idx)
    if x.dim() != 2 or lora_a.dim() != 3:
        raise ValueError(f"expected x [T, in] and lora_a [N, R, in], got {tuple(x.shape)}, {tuple(lora_a.shape)}")
    check_float("x", x)
    check_float("lora_a", lora_a, x.dtype)
    num_tokens, k = x.shape
    num_adapters, r, k2 = lora_a.shape
    if k2 != k:
        raise ValueError(f"lora_a in-features {k2} != x features {k}")
    check_adapter_idx(adapter_idx, num_tokens, num_adapters)
    slice_rank = r if slice_rank is None else int(slice_rank)
    if slice_rank <= 0 or r % slice_rank:
        raise ValueError(f"slice_rank {slice_rank} must divide R={r}")
    ranks = check_ranks(ranks, num_adapters, slice_rank, device)
    if scaling is not None:
        if scaling.shape != (num_adapters,):
            raise ValueError(f"scaling must be [N]={num_adapters}, got {tuple(scaling.shape)}")
        scaling = scaling.to(device=device, dtype=torch.float32)
    if out is None:
        out = torch.zeros(num_tokens, r, device=device, dtype=x.dtype)
    elif out.shape != (num_tokens, r):
        raise ValueError(f"out must be [{num_tokens}, {r}], got {tuple(out.shape)}")
    if num_tokens == 0 or r == 0 or num_adapters == 0:
        return out
    dummy = out  # any pointer for absent optional arguments (never read: constexpr-gated)
    scale_arg = scaling if scaling is not None else dummy
    ranks_arg = ranks if ranks is not None else dummy
    if _use_decode(num_tokens, meta, decode):
        # The decode path checks no index range: that would cost a device sync.
        block_r = block(r, 16, 64)
        block_k = block(k, 16, 128 if INTERPRETED else 64)
        _bgmv_shrink_kernel[(num_tokens, triton.cdiv(r, block_r))](
            x, lora_a, out, adapter_idx, scale_arg, ranks_arg,
            k, r, slice_rank,
            x.stride(0), x.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            out.stride(0), out.stride(1),
            HAS_SCALE=scaling is not None, HAS_RANKS=ranks is not None,
            BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=4,
        )
        return out
    if meta is None:
        meta = build_segments(adapter_idx, num_adapters)
    elif meta.num_tokens != num_tokens or meta.num_adapters != num_adapters:
        raise ValueError("segment metadata was built for another batch or bank size")
    if meta.num_segments == 0:
        return out
    block_m = block(meta.max_len, 16, 64)
    block_r = block(r, 16, 64 if not INTERPRETED else 128)
    block_k = block(k, 16, 128 if INTERPRETED else 64)
    num_r_blocks = triton.cdiv(r, block_r)
    grid_mn = triton.cdiv(meta.max_len, block_m) * num_r_blocks * meta.num_segments
    if split_k is None:
        # GPU: split the reduction when the grid alone would leave SMs idle.
        split_k = 1 if INTERPRETED else max(1, min(triton.cdiv(k, 256), 512 // max(1, grid_mn)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    target = out if split_k == 1 else torch.zeros(split_k, num_tokens, r, device=device, dtype=torch.float32)
    stride_os = 0 if split_k == 1 else target.stride(0)
    stride_ot, stride_or = (out.stride(0), out.stride(1)) if split_k == 1 else (target.stride(1), target.stride(2))
    grid = (triton.cdiv(meta.max_len, block_m), num_r_blocks * split_k, meta.num_segments)
    _sgmv_shrink_kernel[grid](
        x, lora_a, target, scale_arg, ranks_arg,
        meta.token_order, meta.seg_adapter, meta.seg_start, meta.seg_len,
        k, r, slice_rank,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        stride_os, stride_ot, stride_or,
        k_per_split,
        HAS_SCALE=scaling is not None, HAS_RANKS=ranks is not None,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        num_warps=4, num_stages=2 if INTERPRETED else 3,
    )
    if split_k > 1:
        out.copy_(target.sum(0))
    return out


# ---------------------------------------------------------------------- autograd.Function
class LoRAShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, adapter_idx, ranks, slice_rank, meta, decode):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if needs_grad and meta is None:
            meta = build_segments(adapter_idx, lora_a.shape[0])  # shared with the backward
        h = shrink_launch(x, lora_a, adapter_idx, ranks=ranks, slice_rank=slice_rank, meta=meta, decode=decode)
        ctx.save_for_backward(x, lora_a, adapter_idx, ranks)
        ctx.meta, ctx.slice_rank = meta, slice_rank
        return h

    @staticmethod
    def backward(ctx, dh):
        from .lora_expand import expand_launch
        from .lora_segment_outer import segment_outer_launch

        x, lora_a, adapter_idx, ranks = ctx.saved_tensors
        dh = dh.contiguous()
        dx = da = None
        if ctx.needs_input_grad[0]:
            # dx[t] = dh[t] @ A[n]: an expand with B = Aᵀ ([N, in, R] as a strided view).
            dx = expand_launch(dh, lora_a.transpose(1, 2), adapter_idx, ranks=ranks,
                               slice_rank=ctx.slice_rank, meta=ctx.meta)
        if ctx.needs_input_grad[1]:
            da = segment_outer_launch(dh, x, adapter_idx, lora_a.shape[0], meta=ctx.meta,
                                      ranks=ranks, rank_axis=1, slice_rank=ctx.slice_rank,
                                      out_dtype=lora_a.dtype)
        return dx, da, None, None, None, None, None


# ------------------------------------------------------------------------ public function
def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    slice_rank: int | None = None,
    meta: SegmentMeta | None = None,
    decode: bool | None = None,
) -> torch.Tensor:
    """x [T, in], lora_a [N, R, in], adapter_idx [T] → h [T, R] (see module docstring).

    Differentiable in x and lora_a. `meta` (from build_segments) can be shared by every
    layer of a step; `decode` forces (True) or forbids (False) the one-token-per-program
    path, which by default serves small batches without metadata.
    """
    return LoRAShrink.apply(x, lora_a, adapter_idx, ranks, slice_rank, meta, decode)
