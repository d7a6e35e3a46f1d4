"""A frozen linear with multi-adapter LoRA fused into its GEMM (q/k/v/o/gate/up/down).

Semantics (reference: lift_engine.ops.reference.lora_linear; dispatch op ops.lora_linear,
which LoRABankLinear calls for every patched projection):

    y[t] = x[t] Wᵀ + bias + scaling[n] · (x[t] A[n]ᵀ) B[n]ᵀ,   n = adapter_idx[t]
    (the LoRA term is 0 where n == -1; per-adapter ranks and q/k/v output slices as in
    lora_linear_delta.py: A [N, S·R, in] stacked per slice, B [N, Σ o_s, R] concatenated)

Shapes: x [T, in]; weight [OUT, in]; bias [OUT] or None; lora_a [N, S·R, in];
lora_b [N, OUT, R] (R ≤ 128); scaling [N]; adapter_idx [T] → y [T, OUT].

What the fusion removes (as LoRAFusion does for training): unfused, a LoRA layer is
base GEMM (writes y) → shrink (reads x again, writes h) → expand (reads h, reads and
rewrites y). Here one kernel, over SGMV segments that include the tokens without an
adapter, computes the base tile and — in the same K loop, from the x tile already in
registers — the shrink h = x A[n]ᵀ of its slice, then adds s·h B[n]ᵀ to the tile before
its one store. The column blocks of a row block each recompute that small shrink
(R/BLOCK_N extra MACs per output, with A tiles coming from L2); the first column block of
each slice also stores h, the only activation the backward needs.

Backward: dx = dy W + (LoRA dx), dW = dyᵀ x and dbias = Σ dy only if they require grad
(the base is frozen in LIFT), and dA, dB, dscaling through the LoRA kernels
(lora_linear_delta.delta_backward) from the saved h.
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
from .lora_expand import _slice_columns, _slice_table
from .lora_linear_delta import _check_banks, delta_backward

MAX_FUSED_RANK = 128


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _fused_lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, ranks_ptr, out_ptr, h_ptr,
    token_order_ptr, seg_adapter_ptr, seg_start_ptr, seg_len_ptr,
    block_slice_ptr, block_col0_ptr, slice_end_ptr, block_first_ptr,
    K, OUT, R,
    stride_xt, stride_xk,
    stride_wo, stride_wk,
    stride_an, stride_ar, stride_ak,
    stride_bn, stride_bo, stride_br,
    stride_ot, stride_oo,
    stride_ht, stride_hr,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, WRITE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(max_len, BLOCK_M), column blocks over all slices, segments incl. n = -1)."""
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
    has_lora = n >= 0
    n64 = tl.maximum(n, 0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col_end
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < tl.where(has_lora, R, 0)  # no LoRA rows for the no-adapter segment
    if HAS_RANKS:
        mask_r = mask_r & (offs_r < tl.load(ranks_ptr + n64))  # n64 = max(n, 0): always a valid row
    a_base = a_ptr + n64 * stride_an + (s * R) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wk,
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0).to(DOT_DTYPE)
        hacc = tl.dot(xt, at, hacc, input_precision=PRECISION)
    if has_lora:
        # h is rounded to the activation dtype, as the unfused shrink → expand path stores it
        h = hacc.to(h_ptr.dtype.element_ty)
        bt = tl.load(b_ptr + n64 * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        delta = tl.dot(h.to(DOT_DTYPE), bt, input_precision=PRECISION)
        acc += delta * tl.load(scale_ptr + n64).to(tl.float32)
        if WRITE_H:
            if NUM_SLICES > 1:
                first = tl.load(block_first_ptr + pid_n) != 0
            else:
                first = pid_n == 0
            if first:
                tl.store(h_ptr + tok[:, None] * stride_ht + (s * R + offs_r[None, :]) * stride_hr, h,
                         mask=mask_m[:, None] & (offs_r < R)[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_oo, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------- launcher
_first_tables: dict = {}


def _block_first(output_slices: tuple[int, ...], block_n: int, device) -> torch.Tensor:
    key = (output_slices, block_n, str(device))
    if key not in _first_tables:
        flags = []
        for width in output_slices:
            flags += [1] + [0] * (triton.cdiv(width, block_n) - 1)
        _first_tables[key] = torch.tensor(flags, dtype=torch.int32).to(device)
    return _first_tables[key]


def lora_linear_launch(x, weight, bias, lora_a, lora_b, scaling, adapter_idx, *, output_slices=None, ranks=None,
                       meta: SegmentMeta | None = None, save_h: bool = True):
    """→ (y [T, OUT], h [T, S·R] or None). `meta` must include the no-adapter segment
    (build_segments(..., include_none=True))."""
    device = check_runnable(x, weight, lora_a, lora_b, adapter_idx)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"expected x [T, in] and weight [OUT, in], got {tuple(x.shape)}, {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_float(name, t, x.dtype)
    slices, r = _check_banks(lora_a, lora_b, output_slices)
    num_tokens, k = x.shape
    out_features = weight.shape[0]
    if lora_b.shape[1] != out_features or lora_a.shape[2] != k:
        raise ValueError("lora_a/lora_b do not match the weight's in/out features")
    if r > MAX_FUSED_RANK:
        raise ValueError(f"fused LoRA linear supports rank ≤ {MAX_FUSED_RANK}, got {r}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    num_adapters = lora_a.shape[0]
    check_adapter_idx(adapter_idx, num_tokens, num_adapters)
    ranks = check_ranks(ranks, num_adapters, r, device)
    scaling = scaling.to(device=device, dtype=torch.float32)
    if meta is None:
        meta = build_segments(adapter_idx, num_adapters, include_none=True)
    elif meta.num_tokens != num_tokens or meta.num_adapters != num_adapters:
        raise ValueError("segment metadata was built for another batch or bank size")
    y = torch.empty(num_tokens, out_features, device=device, dtype=x.dtype)
    h = torch.zeros(num_tokens, len(slices) * r, device=device, dtype=x.dtype) if save_h else None
    if num_tokens == 0 or out_features == 0:
        return y, h
    if not meta.includes_none and meta.num_assigned < num_tokens:
        raise ValueError("fused LoRA linear needs metadata built with include_none=True")
    block_m = block(meta.max_len, 16, 64)
    block_n = block(max(slices), 16, 128 if INTERPRETED else 64)
    block_k = block(k, 16, 128 if INTERPRETED else 64)
    block_r = block(r, 16, MAX_FUSED_RANK)
    dummy = y
    if len(slices) > 1:
        block_slice, block_col0, slice_end, num_col_blocks = _slice_table(slices, block_n, device)
        block_first = _block_first(slices, block_n, device)
    else:
        block_slice = block_col0 = slice_end = block_first = dummy
        num_col_blocks = triton.cdiv(out_features, block_n)
    hs = h if h is not None else dummy
    grid = (triton.cdiv(meta.max_len, block_m), num_col_blocks, meta.num_segments)
    _fused_lora_linear_kernel[grid](
        x, weight, bias if bias is not None else dummy, lora_a, lora_b, scaling, ranks if ranks is not None else dummy,
        y, hs,
        meta.token_order, meta.seg_adapter, meta.seg_start, meta.seg_len,
        block_slice, block_col0, slice_end, block_first,
        k, out_features, r,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        hs.stride(0), hs.stride(1),
        HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None, NUM_SLICES=len(slices), WRITE_H=h is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        num_warps=4 if block_m * block_n <= 64 * 64 else 8, num_stages=2 if INTERPRETED else 3,
    )
    return y, h


# ---------------------------------------------------------------------- autograd.Function
class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, adapter_idx, output_slices, ranks):
        slices, _ = _check_banks(lora_a, lora_b, output_slices)
        training = any(ctx.needs_input_grad[:6])
        meta_all = build_segments(adapter_idx, lora_a.shape[0], include_none=True)
        y, h = lora_linear_launch(x, weight, bias, lora_a, lora_b, scaling, adapter_idx, output_slices=slices,
                                  ranks=ranks, meta=meta_all, save_h=training)
        ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, adapter_idx, ranks, h)
        ctx.slices = slices
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, scaling, adapter_idx, ranks, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_s = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        meta = build_segments(adapter_idx, lora_a.shape[0])  # LoRA kernels: assigned tokens only
        dx, da, db, ds = delta_backward(dy, x, h, lora_a, lora_b, scaling, adapter_idx, meta, ctx.slices, ranks,
                                        (need_x, need_a, need_b, need_s))
        if need_x:
            dx = dx + dy @ weight
        dw = dy.t() @ x if need_w else None
        dbias = dy.sum(0) if need_bias else None
        return dx, dw, dbias, da, db, ds, None, None, None


# ------------------------------------------------------------------------ public function
def lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_idx, *, output_slices=None, ranks=None):
    """y = x Wᵀ + bias + multi-adapter LoRA delta, in one kernel (see module docstring).
    x [T, in]; weight [OUT, in]; bias [OUT] | None; lora_a [N, S·R, in]; lora_b [N, OUT, R];
    scaling [N]; adapter_idx [T] → [T, OUT]. Differentiable in every tensor argument."""
    return LoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling, adapter_idx, output_slices, ranks)
