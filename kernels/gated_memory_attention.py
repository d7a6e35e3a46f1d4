"""Gated-Memory attention: FlashAttention-2-style causal attention with RoPE and GQA, fused
with the memory MLP + gate + blend epilogue, forward and backward.

Semantics (reference: lift_engine.ops.reference.gated_memory_attention):

    q_r, k_r = rope(q), rope(k)                       rotate-half RoPE with cos/sin [B, S, d]
    attn[b,s,h] = Σ_{j ≤ s} softmax_j(q_r[b,h,s]·k_r[b,h//G,j]·scale) v[b,h//G,j]     G = H / Hkv
    out[b,s,h] = gated_memory_blend(attn, q (pre-RoPE), W1..w4, adapter_idx[b,s])

Shapes: q [B, H, S, d]; k, v [B, Hkv, S, d] (any strides); cos, sin [B, S, d];
w1 [N,H,2d,d], w2 [N,H,d,2d], w3 [N,H,s,d], w4 [N,H,1,s]; adapter_idx [B, S] (-1 = none);
→ out [B, S, H, d].

Forward (one program per (query block, b·h)): RoPE is applied to q once and to each K
tile as it is loaded; scores and P@V use the online softmax in base 2; the head dim is
handled as two halves, which makes rotate-half RoPE (and its transpose in the backward)
elementwise. The epilogue normalises, stores the attention output and the base-2
logsumexp (both saved for the backward), then applies the per-token memory MLP and gate
to the pre-RoPE q still in registers and writes the blended output: the attention output
never makes a round trip between attention and blend.

Backward: (1) the epilogue's token kernel gives d_attn = (1 − g)·dout, the memory/gate
part of dq, per-token g and dlogit, and FA2's delta = ⟨d_attn, attn⟩ in one pass;
(2) the epilogue's weight kernel gives dW1..dw4 per adapter (SGMV segments);
(3) a dK/dV kernel per key block and kv head, looping over the G query heads that share it
(no atomics); (4) a dQ kernel per query block, which adds the memory/gate part of dq.
Both recompute P from the saved logsumexp; dq and dk are rotated back (RoPEᵀ).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    block,
    build_segments,
    check_float,
    check_runnable,
    dot_dtype,
    dot_precision,
    gpu_config,
)
from .gated_memory_blend import (
    NO_ADAPTER,
    blend_blocks,
    blend_bwd_launch,
    blend_wgrad_launch,
    check_banks,
    check_idx_range,
    memory_gate_fwd,
)

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rope_tile(ptr_rows, offs_h, mask, HALF, stride_d, cos_rows, sin_rows):
    """Load a [rows, d] tile as two halves and rotate it: returns (x1, x2, xr1, xr2), fp32.
    ptr_rows/cos_rows/sin_rows: [rows, 1] row pointers (cos/sin contiguous in d)."""
    x1 = tl.load(ptr_rows + offs_h[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr_rows + (HALF + offs_h[None, :]) * stride_d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_rows + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_rows + HALF + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_rows + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_rows + HALF + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1, x2, x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_transpose(d1, d2, cos_rows, sin_rows, offs_h, mask, HALF):
    """RoPEᵀ: gradient w.r.t. the pre-RoPE tile from the gradient w.r.t. the rotated tile."""
    c1 = tl.load(cos_rows + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_rows + HALF + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_rows + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_rows + HALF + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    return d1 * c1 + d2 * s2, d2 * c2 - d1 * s1


@triton.jit
def _fwd_inner(
    acc1, acc2, m_i, l_i, qr1, qr2, offs_m,
    k_base, v_base, cs_base, sn_base, lo, hi, S, D, HALF,
    s_ks, s_kd, s_vs, s_vd,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        mk = mask_n[:, None] & mask_h[None, :]
        _, _, kr1, kr2 = _rope_tile(k_base + offs_n[:, None] * s_ks, offs_h, mk, HALF, s_kd,
                                    cs_base + offs_n[:, None] * D, sn_base + offs_n[:, None] * D)
        s = tl.dot(qr1, tl.trans(kr1.to(DOT_DTYPE)), input_precision=PRECISION)
        s = tl.dot(qr2, tl.trans(kr2.to(DOT_DTYPE)), s, input_precision=PRECISION)
        if MASKED:
            s = tl.where((offs_n[None, :] <= offs_m[:, None]) & mask_n[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v1 = tl.load(v_base + offs_n[:, None] * s_vs + offs_h[None, :] * s_vd, mask=mk, other=0.0)
        v2 = tl.load(v_base + offs_n[:, None] * s_vs + (HALF + offs_h[None, :]) * s_vd, mask=mk, other=0.0)
        pd = p.to(DOT_DTYPE)
        acc1 = tl.dot(pd, v1.to(DOT_DTYPE), acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(pd, v2.to(DOT_DTYPE), acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc1, acc2, m_i, l_i


@triton.jit
def _gm_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, idx_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr,
    out_ptr, attn_ptr, lse_ptr,
    H, S, D, HALF, SG, GROUPS, sm_scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B·H). out/attn are contiguous [B, S, H, D]; lse [B, S, H];
    cos/sin contiguous [B, S, D]; idx contiguous [B, S]. BLOCK_N divides BLOCK_M."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < S
    offs_h = tl.arange(0, BLOCK_H)
    mask_q = mask_m[:, None] & (offs_h < HALF)[None, :]
    cs_base = cos_ptr + b64 * S * D
    sn_base = sin_ptr + b64 * S * D
    q_rows = q_ptr + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qs
    _, _, qr1, qr2 = _rope_tile(q_rows, offs_h, mask_q, HALF, s_qd,
                                cs_base + offs_m[:, None] * D, sn_base + offs_m[:, None] * D)
    qr1 = (qr1 * sm_scale).to(DOT_DTYPE)
    qr2 = (qr2 * sm_scale).to(DOT_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    k_base = k_ptr + b64 * s_kb + kvh * s_kh
    v_base = v_ptr + b64 * s_vb + kvh * s_vh
    diag = pid_m * BLOCK_M
    # keys strictly before the block: no mask; then the diagonal block(s): causal mask
    acc1, acc2, m_i, l_i = _fwd_inner(acc1, acc2, m_i, l_i, qr1, qr2, offs_m, k_base, v_base, cs_base, sn_base,
                                      0, diag, S, D, HALF, s_ks, s_kd, s_vs, s_vd,
                                      False, BLOCK_N, BLOCK_H, DOT_DTYPE, PRECISION)
    acc1, acc2, m_i, l_i = _fwd_inner(acc1, acc2, m_i, l_i, qr1, qr2, offs_m, k_base, v_base, cs_base, sn_base,
                                      diag, tl.minimum(diag + BLOCK_M, S), S, D, HALF, s_ks, s_kd, s_vs, s_vd,
                                      True, BLOCK_N, BLOCK_H, DOT_DTYPE, PRECISION)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    # the attention output as stored (rounded to the activation dtype) is what gets blended
    a1 = (acc1 / l_safe[:, None]).to(attn_ptr.dtype.element_ty)
    a2 = (acc2 / l_safe[:, None]).to(attn_ptr.dtype.element_ty)
    row = (b64 * S + offs_m) * H + h  # [B, S, H] index
    tl.store(lse_ptr + row, m_i + tl.log2(l_safe), mask=mask_m)
    rows = row[:, None] * D
    tl.store(attn_ptr + rows + offs_h[None, :], a1, mask=mask_q)
    tl.store(attn_ptr + rows + HALF + offs_h[None, :], a2, mask=mask_q)
    # Gated-Memory epilogue on the pre-RoPE q (reloaded rather than kept live through the
    # KV loop), per distinct adapter in the block; the loop carries only g·mem
    q1 = tl.load(q_rows + offs_h[None, :] * s_qd, mask=mask_q, other=0.0)
    q2 = tl.load(q_rows + (HALF + offs_h[None, :]) * s_qd, mask=mask_q, other=0.0)
    idx = tl.load(idx_ptr + b64 * S + offs_m, mask=mask_m, other=-1).to(tl.int32)
    gm1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    gm2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    g_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    todo = mask_m & (idx >= 0)
    n = tl.min(tl.where(todo, idx, NO_ADAPTER), axis=0)
    while n < NO_ADAPTER:
        mem1, mem2, g = memory_gate_fwd(q1, q2, w1_ptr, w2_ptr, w3_ptr, w4_ptr, n, h, H, D, HALF, SG,
                                        BLOCK_M, BLOCK_H, BLOCK_E, BLOCK_S, DOT_DTYPE, PRECISION)
        sel_row = todo & (idx == n)
        sel = sel_row[:, None]
        gm1 = tl.where(sel, g[:, None] * mem1, gm1)
        gm2 = tl.where(sel, g[:, None] * mem2, gm2)
        g_all = tl.where(sel_row, g, g_all)
        todo = todo & (idx != n)
        n = tl.min(tl.where(todo, idx, NO_ADAPTER), axis=0)
    o1 = (1.0 - g_all[:, None]) * a1.to(tl.float32) + gm1
    o2 = (1.0 - g_all[:, None]) * a2.to(tl.float32) + gm2
    tl.store(out_ptr + rows + offs_h[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask_q)
    tl.store(out_ptr + rows + HALF + offs_h[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask_q)


@triton.jit
def _dkdv_inner(
    dk1, dk2, dv1, dv2, kr1, kr2, v1, v2, offs_n,
    q_base, do_base, lse_base, delta_base, cs_base, sn_base, lo, hi, S, D, HALF, H, sm_scale,
    s_qs, s_qd,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < S
        mq = mask_m[:, None] & mask_h[None, :]
        _, _, qr1, qr2 = _rope_tile(q_base + offs_m[:, None] * s_qs, offs_h, mq, HALF, s_qd,
                                    cs_base + offs_m[:, None] * D, sn_base + offs_m[:, None] * D)
        qr1 = qr1.to(DOT_DTYPE)
        qr2 = qr2.to(DOT_DTYPE)
        do_rows = do_base + (offs_m[:, None] * H) * D  # d_attn: contiguous [B, S, H, D]
        do1 = tl.load(do_rows + offs_h[None, :], mask=mq, other=0.0).to(DOT_DTYPE)
        do2 = tl.load(do_rows + HALF + offs_h[None, :], mask=mq, other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_base + offs_m * H, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + offs_m * H, mask=mask_m, other=0.0)
        qk_t = tl.dot(kr1, tl.trans(qr1), input_precision=PRECISION)
        qk_t = tl.dot(kr2, tl.trans(qr2), qk_t, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(qk_t * sm_scale - lse[None, :])
        keep = mask_m[None, :]
        if MASKED:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, p_t, 0.0)
        pd = p_t.to(DOT_DTYPE)
        dv1 = tl.dot(pd, do1, dv1, input_precision=PRECISION)
        dv2 = tl.dot(pd, do2, dv2, input_precision=PRECISION)
        dp_t = tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
        dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(DOT_DTYPE)
        dk1 = tl.dot(ds_t, qr1, dk1, input_precision=PRECISION)
        dk2 = tl.dot(ds_t, qr2, dk2, input_precision=PRECISION)
    return dk1, dk2, dv1, dv2


@triton.jit
def _gm_attn_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, dattn_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, HKV, S, D, HALF, GROUPS, scale, sm_scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_N), B·Hkv). dk/dv contiguous [B, Hkv, S, D]. BLOCK_M divides BLOCK_N."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // HKV
    kvh = pid_bk % HKV
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < S
    offs_h = tl.arange(0, BLOCK_H)
    mk = mask_n[:, None] & (offs_h < HALF)[None, :]
    cs_base = cos_ptr + b64 * S * D
    sn_base = sin_ptr + b64 * S * D
    k_rows = k_ptr + b64 * s_kb + kvh * s_kh + offs_n[:, None] * s_ks
    _, _, kr1, kr2 = _rope_tile(k_rows, offs_h, mk, HALF, s_kd,
                                cs_base + offs_n[:, None] * D, sn_base + offs_n[:, None] * D)
    kr1 = kr1.to(DOT_DTYPE)
    kr2 = kr2.to(DOT_DTYPE)
    v_rows = v_ptr + b64 * s_vb + kvh * s_vh + offs_n[:, None] * s_vs
    v1 = tl.load(v_rows + offs_h[None, :] * s_vd, mask=mk, other=0.0).to(DOT_DTYPE)
    v2 = tl.load(v_rows + (HALF + offs_h[None, :]) * s_vd, mask=mk, other=0.0).to(DOT_DTYPE)
    dk1 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    dv2 = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    diag_lo = pid_n * BLOCK_N
    diag_hi = tl.minimum(diag_lo + BLOCK_N, S)
    for gi in range(0, GROUPS):
        h = kvh * GROUPS + gi
        q_base = q_ptr + b64 * s_qb + h * s_qh
        do_base = dattn_ptr + (b64 * S * H + h) * D
        lse_base = lse_ptr + b64 * S * H + h
        delta_base = delta_ptr + b64 * S * H + h
        # query rows in the diagonal block see only part of the keys; later rows see all
        dk1, dk2, dv1, dv2 = _dkdv_inner(dk1, dk2, dv1, dv2, kr1, kr2, v1, v2, offs_n,
                                         q_base, do_base, lse_base, delta_base, cs_base, sn_base,
                                         diag_lo, diag_hi, S, D, HALF, H, sm_scale, s_qs, s_qd,
                                         True, BLOCK_M, BLOCK_H, DOT_DTYPE, PRECISION)
        dk1, dk2, dv1, dv2 = _dkdv_inner(dk1, dk2, dv1, dv2, kr1, kr2, v1, v2, offs_n,
                                         q_base, do_base, lse_base, delta_base, cs_base, sn_base,
                                         diag_hi, S, S, D, HALF, H, sm_scale, s_qs, s_qd,
                                         False, BLOCK_M, BLOCK_H, DOT_DTYPE, PRECISION)
    dk1, dk2 = _rope_transpose(dk1 * scale, dk2 * scale, cs_base + offs_n[:, None] * D,
                               sn_base + offs_n[:, None] * D, offs_h, mk, HALF)
    out_rows = ((b64 * HKV + kvh) * S + offs_n[:, None]) * D
    tl.store(dk_ptr + out_rows + offs_h[None, :], dk1.to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(dk_ptr + out_rows + HALF + offs_h[None, :], dk2.to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(dv_ptr + out_rows + offs_h[None, :], dv1.to(dv_ptr.dtype.element_ty), mask=mk)
    tl.store(dv_ptr + out_rows + HALF + offs_h[None, :], dv2.to(dv_ptr.dtype.element_ty), mask=mk)


@triton.jit
def _dq_inner(
    dq1, dq2, qr1, qr2, do1, do2, lse, delta, offs_m,
    k_base, v_base, cs_base, sn_base, lo, hi, S, D, HALF, sm_scale,
    s_ks, s_kd, s_vs, s_vd,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S
        mk = mask_n[:, None] & mask_h[None, :]
        _, _, kr1, kr2 = _rope_tile(k_base + offs_n[:, None] * s_ks, offs_h, mk, HALF, s_kd,
                                    cs_base + offs_n[:, None] * D, sn_base + offs_n[:, None] * D)
        kr1 = kr1.to(DOT_DTYPE)
        kr2 = kr2.to(DOT_DTYPE)
        v1 = tl.load(v_base + offs_n[:, None] * s_vs + offs_h[None, :] * s_vd, mask=mk, other=0.0).to(DOT_DTYPE)
        v2 = tl.load(v_base + offs_n[:, None] * s_vs + (HALF + offs_h[None, :]) * s_vd, mask=mk,
                     other=0.0).to(DOT_DTYPE)
        qk = tl.dot(qr1, tl.trans(kr1), input_precision=PRECISION)
        qk = tl.dot(qr2, tl.trans(kr2), qk, input_precision=PRECISION)
        p = tl.exp2(qk * sm_scale - lse[:, None])
        keep = mask_n[None, :]
        if MASKED:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do1, tl.trans(v1), input_precision=PRECISION)
        dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(DOT_DTYPE)
        dq1 = tl.dot(ds, kr1, dq1, input_precision=PRECISION)
        dq2 = tl.dot(ds, kr2, dq2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def _gm_attn_dq_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, dattn_ptr, lse_ptr, delta_ptr, dqmem_ptr, dq_ptr,
    H, S, D, HALF, GROUPS, scale, sm_scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B·H). dq contiguous [B, H, S, D]; dq_mem fp32 [B, S, H, D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < S
    offs_h = tl.arange(0, BLOCK_H)
    mq = mask_m[:, None] & (offs_h < HALF)[None, :]
    cs_base = cos_ptr + b64 * S * D
    sn_base = sin_ptr + b64 * S * D
    cs_rows = cs_base + offs_m[:, None] * D
    sn_rows = sn_base + offs_m[:, None] * D
    q_rows = q_ptr + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qs
    _, _, qr1, qr2 = _rope_tile(q_rows, offs_h, mq, HALF, s_qd, cs_rows, sn_rows)
    qr1 = qr1.to(DOT_DTYPE)
    qr2 = qr2.to(DOT_DTYPE)
    row = (b64 * S + offs_m) * H + h
    do1 = tl.load(dattn_ptr + row[:, None] * D + offs_h[None, :], mask=mq, other=0.0).to(DOT_DTYPE)
    do2 = tl.load(dattn_ptr + row[:, None] * D + HALF + offs_h[None, :], mask=mq, other=0.0).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + row, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    k_base = k_ptr + b64 * s_kb + kvh * s_kh
    v_base = v_ptr + b64 * s_vb + kvh * s_vh
    diag = pid_m * BLOCK_M
    dq1, dq2 = _dq_inner(dq1, dq2, qr1, qr2, do1, do2, lse, delta, offs_m, k_base, v_base, cs_base, sn_base,
                         0, diag, S, D, HALF, sm_scale, s_ks, s_kd, s_vs, s_vd,
                         False, BLOCK_N, BLOCK_H, DOT_DTYPE, PRECISION)
    dq1, dq2 = _dq_inner(dq1, dq2, qr1, qr2, do1, do2, lse, delta, offs_m, k_base, v_base, cs_base, sn_base,
                         diag, tl.minimum(diag + BLOCK_M, S), S, D, HALF, sm_scale, s_ks, s_kd, s_vs, s_vd,
                         True, BLOCK_N, BLOCK_H, DOT_DTYPE, PRECISION)
    dq1, dq2 = _rope_transpose(dq1 * scale, dq2 * scale, cs_rows, sn_rows, offs_h, mq, HALF)
    dq1 += tl.load(dqmem_ptr + row[:, None] * D + offs_h[None, :], mask=mq, other=0.0)
    dq2 += tl.load(dqmem_ptr + row[:, None] * D + HALF + offs_h[None, :], mask=mq, other=0.0)
    out_rows = ((b64 * H + h) * S + offs_m[:, None]) * D
    tl.store(dq_ptr + out_rows + offs_h[None, :], dq1.to(dq_ptr.dtype.element_ty), mask=mq)
    tl.store(dq_ptr + out_rows + HALF + offs_h[None, :], dq2.to(dq_ptr.dtype.element_ty), mask=mq)


# --------------------------------------------------------------------------- launchers
def _check(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx):
    check_runnable(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be [B, H, S, d] and k, v [B, Hkv, S, d]")
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != (batch, kv_heads, seq, dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, S, d] = "
                         f"[{batch}, Hkv, {seq}, {dim}]")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if cos.shape != (batch, seq, dim) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [B, S, d] = [{batch}, {seq}, {dim}], got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if adapter_idx.shape != (batch, seq):
        raise ValueError(f"adapter_idx must be [B, S]=({batch}, {seq}), got {tuple(adapter_idx.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, q.dtype)
    n, sg, banks = check_banks(q.dtype, heads, dim, w1, w2, w3, w4)
    return batch, heads, kv_heads, seq, dim, n, sg, banks


# Tests set this to force block sizes (e.g. the GPU's unequal BLOCK_M/BLOCK_N) on CPU:
# {"fwd": (BLOCK_M, BLOCK_N), "bwd": (BLOCK_M, BLOCK_N)}.
BLOCK_OVERRIDE: dict | None = None


def _attn_blocks(seq: int, dim: int, backward: bool) -> dict:
    """Forward: BLOCK_N must divide BLOCK_M (keys before the diagonal block are unmasked).
    Backward: BLOCK_M must divide BLOCK_N (dK/dV's diagonal split); the dQ kernel uses the
    same pair swapped."""
    key = "bwd" if backward else "fwd"
    if BLOCK_OVERRIDE and key in BLOCK_OVERRIDE:
        bm, bn = BLOCK_OVERRIDE[key]
    elif INTERPRETED:  # few, large programs: the interpreter's cost is per operation
        bm = bn = block(seq, 16, 64)
    else:
        # bf16 sm_90 ptxas spill bytes: bwd d64 (32, 64) with 8 warps: dK/dV 40 → 0, dQ 160 → 0;
        # bwd d128 (32, 64) → (16, 32): dK/dV 312 → 24, dQ 192 → 40 (tests/test_kernels_triton_compile.py)
        defaults = {"fwd": dict(BLOCK_M=64, BLOCK_N=64 if dim <= 64 else 32),
                    "bwd": dict(BLOCK_M=32, BLOCK_N=64) if dim <= 64 else dict(BLOCK_M=16, BLOCK_N=32)}[key]
        cfg = gpu_config(f"attn_{key}_blocks_d{dim}", gpu_config(f"attn_{key}_blocks", defaults))
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    small, large = (bm, bn) if backward else (bn, bm)
    if large % small:
        raise ValueError(f"attention blocks {key}=({bm}, {bn}): {small} must divide {large}")
    return dict(BLOCK_M=bm, BLOCK_N=bn)


def attention_fwd_launch(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None, validate=True):
    """→ (out [B,S,H,d], attn [B,S,H,d], lse [B,S,H] fp32, base 2)."""
    batch, heads, kv_heads, seq, dim, n, sg, (w1, w2, w3, w4) = _check(q, k, v, cos, sin, w1, w2, w3, w4,
                                                                      adapter_idx)
    if validate:
        check_idx_range(adapter_idx, n)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    cos = cos.to(q.dtype).contiguous()
    sin = sin.to(q.dtype).contiguous()
    idx = adapter_idx.contiguous()
    out = torch.empty(batch, seq, heads, dim, device=q.device, dtype=q.dtype)
    attn = torch.empty_like(out)
    lse = torch.empty(batch, seq, heads, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, attn, lse
    blocks = _attn_blocks(seq, dim, backward=False)
    epi = blend_blocks(dim, sg, "attn_fwd")
    grid = (triton.cdiv(seq, blocks["BLOCK_M"]), batch * heads)
    _gm_attn_fwd_kernel[grid](
        q, k, v, cos, sin, idx, w1, w2, w3, w4, out, attn, lse,
        heads, seq, dim, dim // 2, sg, heads // kv_heads, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        **blocks, BLOCK_H=epi["BLOCK_H"], BLOCK_E=epi["BLOCK_E"], BLOCK_S=epi["BLOCK_S"],
        DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
        num_warps=epi["num_warps"], num_stages=1 if INTERPRETED else 2,
    )
    return out, attn, lse


def attention_bwd_launch(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse, scale=None,
                         needs=(True,) * 7):
    """→ (dq, dk, dv, dw1, dw2, dw3, dw4); `needs` flags (q, k, v, w1..w4)."""
    batch, heads, kv_heads, seq, dim, n, sg, (w1, w2, w3, w4) = _check(q, k, v, cos, sin, w1, w2, w3, w4,
                                                                      adapter_idx)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    cos = cos.to(q.dtype).contiguous()
    sin = sin.to(q.dtype).contiguous()
    idx = adapter_idx.contiguous()
    dout = dout.contiguous()
    num_tokens = batch * seq
    dattn = torch.empty(batch, seq, heads, dim, device=q.device, dtype=q.dtype)
    dq_mem = torch.empty(batch, seq, heads, dim, device=q.device, dtype=torch.float32)
    delta = torch.empty(batch, seq, heads, device=q.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    if num_tokens == 0 or heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), *[torch.zeros_like(w) for w in (w1, w2, w3, w4)]

    def bshd(t):  # (b, s, h, d) strides of a [B, S, H, d] tensor
        return (t.stride(0), t.stride(1), t.stride(2), t.stride(3))

    strides = {"dout": bshd(dout), "attn": bshd(attn), "dattn": bshd(dattn), "dq": bshd(dq_mem),
               "q": (q.stride(0), q.stride(2), q.stride(1), q.stride(3))}
    flat_idx = idx.reshape(-1)
    g, dlogit = blend_bwd_launch(dout, attn, q, w1, w2, w3, w4, flat_idx, seq=seq, num_tokens=num_tokens,
                                 heads=heads, dim=dim, strides=strides, dattn=dattn, dq=dq_mem,
                                 delta=delta.view(num_tokens, heads))
    if any(needs[3:]):
        meta = build_segments(flat_idx, n)
        dws = blend_wgrad_launch(dout, q, g, dlogit, w1, w2, w3, w4, meta, seq=seq, heads=heads, dim=dim,
                                 strides=strides)
    else:
        dws = [None] * 4
    blocks = _attn_blocks(seq, dim, backward=True)
    warps = 4 if INTERPRETED else gpu_config(f"attn_bwd_d{dim}", {"num_warps": 8})["num_warps"]
    common = dict(BLOCK_H=block(dim // 2, 16, 256), DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
                  num_warps=warps, num_stages=1 if INTERPRETED else 2)
    groups = heads // kv_heads
    if needs[1] or needs[2]:
        _gm_attn_dkdv_kernel[(triton.cdiv(seq, blocks["BLOCK_N"]), batch * kv_heads)](
            q, k, v, cos, sin, dattn, lse, delta, dk, dv,
            heads, kv_heads, seq, dim, dim // 2, groups, scale, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(),
            BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], **common,
        )
    if needs[0]:
        # dq: BLOCK_N of this kernel must divide its BLOCK_M (diagonal split)
        bm, bn = blocks["BLOCK_N"], blocks["BLOCK_M"]
        _gm_attn_dq_kernel[(triton.cdiv(seq, bm), batch * heads)](
            q, k, v, cos, sin, dattn, lse, delta, dq_mem, dq,
            heads, seq, dim, dim // 2, groups, scale, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(),
            BLOCK_M=bm, BLOCK_N=bn, **common,
        )
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, *dws)


# ---------------------------------------------------------------------- autograd.Function
class GatedMemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale):
        out, attn, lse = attention_fwd_launch(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)
        ctx.save_for_backward(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 2, 5, 6, 7, 8))
        dq, dk, dv, dw1, dw2, dw3, dw4 = attention_bwd_launch(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx,
                                                              attn, lse, ctx.scale, needs)
        return dq, dk, dv, None, None, dw1, dw2, dw3, dw4, None, None


# ------------------------------------------------------------------------ public function
def gated_memory_attention(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    """q [B,H,S,d]; k, v [B,Hkv,S,d]; cos, sin [B,S,d]; w1..w4 banks [N,H,…]; adapter_idx [B,S]
    → [B, S, H, d]. Differentiable in q, k, v and w1..w4 (cos/sin are constants)."""
    return GatedMemoryAttention.apply(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)
