"""Multi-adapter LoRA expand (SGMV prefill/training + BGMV decode), with output slices.

Semantics (reference: lift_engine.ops.reference.lora.lora_expand), for one slice:

    for t in range(T):
        n = adapter_idx[t]
        y[t, :] = 0                                              if n == -1
        y[t, o] = scaling[n] · Σ_{r < ranks[n]} h[t, r] · B[n, o, r]

Output slices (fused q/k/v of grouped-query attention, unequal widths): with
output_slices = (o_0, …, o_{S-1}), h is [T, S·R] (slice s reads h[:, s·R:(s+1)·R]),
lora_b is the per-slice banks concatenated on the output axis [N, Σ o_s, R], and slice s
writes y[:, off_s : off_s + o_s] — one launch for all slices.

Shapes: h [T, S·R]; lora_b [N, OUT, R]; scaling [N] float; adapter_idx [T] → y [T, OUT].

Backward: dh_s[t] = scaling[n] · dy_s[t] @ B_s[n] (a shrink with A = B_sᵀ) and
dB_s[n] = scaling[n] · Σ_{t∈n} dy_s[t]ᵀ h_s[t] (segmented outer product);
d scaling[n] = Σ_s ⟨Σ_t dy_s[t]ᵀ h_s[t], B_s[n]⟩ when scaling requires grad.
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
from .lora_shrink import DECODE_MAX_TOKENS


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _slice_columns(pid_n, block_slice_ptr, block_col0_ptr, slice_end_ptr, OUT,
                   NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column block pid_n → (slice s, first column, end column of that slice)."""
    if NUM_SLICES == 1:
        s = 0
        col0 = pid_n * BLOCK_N
        col_end = OUT
    else:
        s = tl.load(block_slice_ptr + pid_n)
        col0 = tl.load(block_col0_ptr + pid_n)
        col_end = tl.load(slice_end_ptr + s)
    return s, col0, col_end


@triton.jit
def _sgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr, scale_ptr, ranks_ptr,
    token_order_ptr, seg_adapter_ptr, seg_start_ptr, seg_len_ptr,
    block_slice_ptr, block_col0_ptr, slice_end_ptr,
    OUT, R, SLICE_RANK,
    stride_ht, stride_hr,
    stride_bn, stride_bo, stride_br,
    stride_ot, stride_oo,
    HAS_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_len, BLOCK_M), column blocks over all slices, segments)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = tl.load(seg_adapter_ptr + pid_s)
    start = tl.load(seg_start_ptr + pid_s)
    length = tl.load(seg_len_ptr + pid_s)
    if pid_m * BLOCK_M >= length:
        return
    s, col0, col_end = _slice_columns(pid_n, block_slice_ptr, block_col0_ptr, slice_end_ptr, OUT,
                                      NUM_SLICES, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col_end
    if HAS_RANKS:
        rank_n = tl.load(ranks_ptr + n)
    b_base = b_ptr + n.to(tl.int64) * stride_bn
    h_base = h_ptr + (s * R) * stride_hr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if HAS_RANKS:
            mask_r = mask_r & ((offs_r % SLICE_RANK) < rank_n)
        ht = tl.load(h_base + tok[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(ht.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n).to(tl.float32)
    out = out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_oo
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr, idx_ptr, scale_ptr, ranks_ptr,
    block_slice_ptr, block_col0_ptr, slice_end_ptr,
    OUT, R, SLICE_RANK,
    stride_ht, stride_hr,
    stride_bn, stride_bo, stride_br,
    stride_ot, stride_oo,
    HAS_SCALE: tl.constexpr, HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Decode: one program per (token, column block); a GEMV against that token's B."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.load(idx_ptr + t)
    if n < 0:
        return
    s, col0, col_end = _slice_columns(pid_n, block_slice_ptr, block_col0_ptr, slice_end_ptr, OUT,
                                      NUM_SLICES, BLOCK_N)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col_end
    if HAS_RANKS:
        rank_n = tl.load(ranks_ptr + n)
    b_base = b_ptr + n.to(tl.int64) * stride_bn
    h_base = h_ptr + t.to(tl.int64) * stride_ht + (s * R) * stride_hr
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if HAS_RANKS:
            mask_r = mask_r & ((offs_r % SLICE_RANK) < rank_n)
        hr = tl.load(h_base + offs_r * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
        bt = tl.load(b_base + offs_n[:, None] * stride_bo + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bt * hr[None, :], axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + n).to(tl.float32)
    out = out_ptr + t.to(tl.int64) * stride_ot + offs_n * stride_oo
    if ACCUMULATE:
        acc += tl.load(out, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


# ---------------------------------------------------------------------------- launcher
_slice_tables: dict = {}


def _slice_table(output_slices: tuple[int, ...], block_n: int, device: torch.device):
    """(block_slice [J], block_col0 [J], slice_end [S], J) for column blocks over slices."""
    key = (output_slices, block_n, str(device))
    if key not in _slice_tables:
        block_slice, block_col0, slice_end, off = [], [], [], 0
        for s, width in enumerate(output_slices):
            for c in range(0, width, block_n):
                block_slice.append(s)
                block_col0.append(off + c)
            off += width
            slice_end.append(off)
        tables = torch.tensor([block_slice, block_col0], dtype=torch.int32).to(device)
        _slice_tables[key] = (tables[0], tables[1], torch.tensor(slice_end, dtype=torch.int32).to(device),
                              len(block_slice))
    return _slice_tables[key]


def _check_slices(output_slices, out_features: int) -> tuple[int, ...]:
    if output_slices is None:
        return (out_features,)
    output_slices = tuple(int(o) for o in output_slices)
    if not output_slices or min(output_slices) <= 0 or sum(output_slices) != out_features:
        raise ValueError(f"output_slices {output_slices} must be positive and sum to OUT={out_features}")
    return output_slices


def expand_launch(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    scaling: torch.Tensor | None = None,
    output_slices: tuple[int, ...] | None = None,
    ranks: torch.Tensor | None = None,
    slice_rank: int | None = None,
    meta: SegmentMeta | None = None,
    decode: bool | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Checks, grid, launch. With `out` and accumulate=True, y is added into out in place
    (tokens with no adapter keep their value); otherwise out is overwritten/zero-filled."""
    device = check_runnable(h, lora_b, adapter_idx)
    if h.dim() != 2 or lora_b.dim() != 3:
        raise ValueError(f"expected h [T, S·R] and lora_b [N, OUT, R], got {tuple(h.shape)}, {tuple(lora_b.shape)}")
    check_float("h", h)
    check_float("lora_b", lora_b, h.dtype)
    num_tokens = h.shape[0]
    num_adapters, out_features, r = lora_b.shape
    output_slices = _check_slices(output_slices, out_features)
    num_slices = len(output_slices)
    if h.shape[1] != num_slices * r:
        raise ValueError(f"h has {h.shape[1]} columns, expected {num_slices} slices × rank {r}")
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
        if accumulate:
            raise ValueError("accumulate=True needs out")
        out = torch.zeros(num_tokens, out_features, device=device, dtype=h.dtype)
    elif out.shape != (num_tokens, out_features):
        raise ValueError(f"out must be [{num_tokens}, {out_features}], got {tuple(out.shape)}")
    elif not accumulate:
        out.zero_()
    if num_tokens == 0 or out_features == 0 or num_adapters == 0:
        return out
    dummy = out
    scale_arg = scaling if scaling is not None else dummy
    ranks_arg = ranks if ranks is not None else dummy
    block_r = block(r, 16, 128 if INTERPRETED else 64)
    use_decode = decode if decode is not None else (meta is None and num_tokens <= DECODE_MAX_TOKENS)
    block_n = block(max(output_slices), 16, 128 if INTERPRETED else (64 if use_decode else 128))
    if num_slices > 1:
        block_slice, block_col0, slice_end, num_col_blocks = _slice_table(output_slices, block_n, device)
    else:
        block_slice = block_col0 = slice_end = dummy
        num_col_blocks = triton.cdiv(out_features, block_n)
    common = (
        out_features, r, slice_rank,
        h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out.stride(0), out.stride(1),
    )
    flags = dict(HAS_SCALE=scaling is not None, HAS_RANKS=ranks is not None, NUM_SLICES=num_slices,
                 ACCUMULATE=accumulate)
    if use_decode:
        _bgmv_expand_kernel[(num_tokens, num_col_blocks)](
            h, lora_b, out, adapter_idx, scale_arg, ranks_arg,
            block_slice, block_col0, slice_end, *common, **flags,
            BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
        )
        return out
    if meta is None:
        meta = build_segments(adapter_idx, num_adapters)
    elif meta.num_tokens != num_tokens or meta.num_adapters != num_adapters:
        raise ValueError("segment metadata was built for another batch or bank size")
    if meta.num_segments == 0:
        return out
    block_m = block(meta.max_len, 16, 64)
    grid = (triton.cdiv(meta.max_len, block_m), num_col_blocks, meta.num_segments)
    _sgmv_expand_kernel[grid](
        h, lora_b, out, scale_arg, ranks_arg,
        meta.token_order, meta.seg_adapter, meta.seg_start, meta.seg_len,
        block_slice, block_col0, slice_end, *common, **flags,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        DOT_DTYPE=dot_dtype(h.dtype), PRECISION=dot_precision(h.dtype),
        num_warps=4 if block_m * block_n <= 64 * 64 else 8, num_stages=2 if INTERPRETED else 3,
    )
    return out


def expand_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor | None,
    adapter_idx: torch.Tensor,
    meta: SegmentMeta,
    output_slices: tuple[int, ...],
    ranks: torch.Tensor | None,
    slice_rank: int | None,
    need_dh: bool,
    need_db: bool,
    need_dscale: bool,
):
    """(dh, dB, dscaling) of expand; shared with lora_linear_delta."""
    from .lora_segment_outer import segment_outer_launch
    from .lora_shrink import shrink_launch

    r = lora_b.shape[2]
    dh = torch.zeros_like(h) if need_dh else None
    db = torch.zeros_like(lora_b) if need_db else None
    db_unscaled = torch.zeros(lora_b.shape, device=lora_b.device, dtype=torch.float32) if need_dscale else None
    off = 0
    for s, width in enumerate(output_slices):
        dy_s = dy[:, off:off + width]
        b_s = lora_b[:, off:off + width, :]
        h_s = h[:, s * r:(s + 1) * r]
        if need_dh:
            shrink_launch(dy_s, b_s.transpose(1, 2), adapter_idx, out=dh[:, s * r:(s + 1) * r], scaling=scaling,
                          ranks=ranks, slice_rank=slice_rank, meta=meta, decode=False)
        if need_db:
            segment_outer_launch(dy_s, h_s, adapter_idx, lora_b.shape[0], meta=meta, scaling=scaling,
                                 ranks=ranks, rank_axis=2, slice_rank=slice_rank, out=db[:, off:off + width, :])
        if need_dscale:
            segment_outer_launch(dy_s, h_s, adapter_idx, lora_b.shape[0], meta=meta, ranks=ranks, rank_axis=2,
                                 slice_rank=slice_rank, out=db_unscaled[:, off:off + width, :])
        off += width
    dscale = (db_unscaled * lora_b.float()).sum((1, 2)) if need_dscale else None
    return dh, db, dscale


# ---------------------------------------------------------------------- autograd.Function
class LoRAExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, lora_b, scaling, adapter_idx, output_slices, ranks, slice_rank, meta, decode):
        output_slices = _check_slices(output_slices, lora_b.shape[1])
        if any(ctx.needs_input_grad[:3]) and meta is None:
            meta = build_segments(adapter_idx, lora_b.shape[0])
        y = expand_launch(h, lora_b, adapter_idx, scaling=scaling, output_slices=output_slices, ranks=ranks,
                          slice_rank=slice_rank, meta=meta, decode=decode)
        ctx.save_for_backward(h, lora_b, scaling, adapter_idx, ranks)
        ctx.meta, ctx.output_slices, ctx.slice_rank = meta, output_slices, slice_rank
        return y

    @staticmethod
    def backward(ctx, dy):
        h, lora_b, scaling, adapter_idx, ranks = ctx.saved_tensors
        need_dh, need_db, need_ds = ctx.needs_input_grad[:3]
        dh, db, ds = expand_backward(dy.contiguous(), h, lora_b, scaling, adapter_idx, ctx.meta, ctx.output_slices,
                                     ranks, ctx.slice_rank, need_dh, need_db, need_ds)
        if ds is not None:
            ds = ds.to(scaling.dtype)
        return dh, db, ds, None, None, None, None, None, None


# ------------------------------------------------------------------------ public function
def lora_expand(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    output_slices: tuple[int, ...] | None = None,
    ranks: torch.Tensor | None = None,
    slice_rank: int | None = None,
    meta: SegmentMeta | None = None,
    decode: bool | None = None,
) -> torch.Tensor:
    """h [T, S·R], lora_b [N, OUT, R], scaling [N], adapter_idx [T] → y [T, OUT].

    Differentiable in h, lora_b and scaling. A list of per-slice banks may be passed as
    lora_b; it is concatenated (pass the concatenated bank to avoid that copy).
    """
    if isinstance(lora_b, (list, tuple)):
        output_slices = tuple(b.shape[1] for b in lora_b)
        lora_b = torch.cat(list(lora_b), dim=1)
    return LoRAExpand.apply(h, lora_b, scaling, adapter_idx, output_slices, ranks, slice_rank, meta, decode)
