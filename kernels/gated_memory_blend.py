"""Gated-Memory epilogue: memory MLP + gate + blend, per token with its own adapter.

Semantics (reference: lift_engine.ops.reference.gated_memory_blend), per token t, head h,
with n = adapter_idx[t] and the pre-RoPE query q = q[t, h] (head dim d, gate dim s):

    hid    = SiLU(W1[n,h] q)                     W1 [N, H, 2d, d]
    mem    = W2[n,h] hid                          W2 [N, H, d, 2d]
    logit  = w4[n,h] · SiLU(W3[n,h] q)            W3 [N, H, s, d],  w4 [N, H, 1, s]
    g      = sigmoid(3 (logit − 1))              3 = lift_engine.config.GATE_SCALE
    out    = (1 − g) attn + g mem                 (out = attn where n == -1)

Shapes: attn_out, q [T, H, d] (any strides; the attention op passes [B, S, H, d] and
[B, H, S, d] views through a two-level token index t = b·SEQ + s); adapter_idx [T].

Kernels work on the two halves of the head dim (the layout the fused attention kernel
uses for RoPE) and loop the 2d hidden units in chunks, so no [T, 2d] tensor is stored.
A block of tokens that holds several adapters is processed once per distinct adapter
(a loop over the distinct indices in the block; one pass when a block is one document).

Backward, as two kernels:
  token kernel (per token block, head): recompute, then d_attn = (1 − g) dout,
      dq = W1ᵀ(SiLU'(·) ⊙ W2ᵀ(g dout)) + W3ᵀ(SiLU'(·) ⊙ dlogit w4), and per token g and
      dlogit = 3 g (1 − g) ⟨dout, mem − attn⟩ (and FA2's delta = ⟨d_attn, attn⟩ if asked);
  weight kernel (per adapter segment, head, chunk of hidden units; SGMV metadata):
      dW1 = Σ dpreᵀ q, dW2 = Σ (g dout)ᵀ hid, dW3 = Σ dpre3ᵀ q, dw4 = Σ dlogit SiLU(W3 q).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lift_engine.config import GATE_SCALE

from ._common import (
    INTERPRETED,
    SegmentMeta,
    block,
    build_segments,
    check_float,
    check_runnable,
    dot_dtype,
    dot_precision,
    gpu_config,
    sigmoid_f32,
    silu_and_grad,
)

GATE = tl.constexpr(GATE_SCALE)  # the one constant, as the kernels read it
NO_ADAPTER = tl.constexpr(2 ** 30)  # larger than any adapter index: "nothing left to do" in the block loop


# ----------------------------------------------------------------------------- kernels
@triton.jit
def memory_gate_fwd(
    q1, q2, w1_ptr, w2_ptr, w3_ptr, w4_ptr, n, h, H, D, HALF, SG,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """q halves [BLOCK_M, BLOCK_H] (any float dtype) and adapter n, head h → mem halves (fp32), gate [BLOCK_M].
    Banks are contiguous: W1[n,h,e,c] at ((n·H + h)·2D + e)·D + c, etc."""
    nh = n.to(tl.int64) * H + h
    E = 2 * D
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    qa = q1.to(DOT_DTYPE)
    qb = q2.to(DOT_DTYPE)
    w1_base = w1_ptr + nh * E * D
    w2_base = w2_ptr + nh * D * E
    mem1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    mem2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        m1 = (offs_e < E)[None, :] & mask_h[:, None]
        w1a = tl.load(w1_base + offs_e[None, :] * D + offs_h[:, None], mask=m1, other=0.0)  # W1ᵀ [BH, BE]
        w1b = tl.load(w1_base + offs_e[None, :] * D + HALF + offs_h[:, None], mask=m1, other=0.0)
        pre = tl.dot(qa, w1a.to(DOT_DTYPE), input_precision=PRECISION)
        pre = tl.dot(qb, w1b.to(DOT_DTYPE), pre, input_precision=PRECISION)
        hid, _ = silu_and_grad(pre)
        m2 = (offs_e < E)[:, None] & mask_h[None, :]
        w2a = tl.load(w2_base + offs_h[None, :] * E + offs_e[:, None], mask=m2, other=0.0)  # W2ᵀ [BE, BH]
        w2b = tl.load(w2_base + (HALF + offs_h[None, :]) * E + offs_e[:, None], mask=m2, other=0.0)
        hd = hid.to(DOT_DTYPE)
        mem1 = tl.dot(hd, w2a.to(DOT_DTYPE), mem1, input_precision=PRECISION)
        mem2 = tl.dot(hd, w2b.to(DOT_DTYPE), mem2, input_precision=PRECISION)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < SG
    w3_base = w3_ptr + nh * SG * D
    m3 = mask_s[None, :] & mask_h[:, None]
    w3a = tl.load(w3_base + offs_s[None, :] * D + offs_h[:, None], mask=m3, other=0.0)  # W3ᵀ [BH, BS]
    w3b = tl.load(w3_base + offs_s[None, :] * D + HALF + offs_h[:, None], mask=m3, other=0.0)
    pre3 = tl.dot(qa, w3a.to(DOT_DTYPE), input_precision=PRECISION)
    pre3 = tl.dot(qb, w3b.to(DOT_DTYPE), pre3, input_precision=PRECISION)
    gh, _ = silu_and_grad(pre3)
    w4 = tl.load(w4_ptr + nh * SG + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    logit = tl.sum(gh * w4[None, :], axis=1)
    g = sigmoid_f32((logit - 1.0) * GATE)  # tensor first: the interpreter's constexpr * tensor fails
    return mem1, mem2, g


@triton.jit
def memory_gate_bwd(
    q1, q2, a1, a2, do1, do2, w1_ptr, w2_ptr, w3_ptr, w4_ptr, n, h, H, D, HALF, SG,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute and differentiate one adapter's epilogue for a token block.
    Returns dq halves (memory and gate paths), g and dlogit (= ∂L/∂(w4·SiLU(W3 q)))."""
    nh = n.to(tl.int64) * H + h
    E = 2 * D
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    qa = q1.to(DOT_DTYPE)
    qb = q2.to(DOT_DTYPE)
    # gate forward first: dmem = g · dout is needed inside the hidden-unit loop
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < SG
    w3_base = w3_ptr + nh * SG * D
    m3 = mask_s[None, :] & mask_h[:, None]
    w3a = tl.load(w3_base + offs_s[None, :] * D + offs_h[:, None], mask=m3, other=0.0).to(DOT_DTYPE)
    w3b = tl.load(w3_base + offs_s[None, :] * D + HALF + offs_h[:, None], mask=m3, other=0.0).to(DOT_DTYPE)
    pre3 = tl.dot(qa, w3a, input_precision=PRECISION)
    pre3 = tl.dot(qb, w3b, pre3, input_precision=PRECISION)
    gh, gh_grad = silu_and_grad(pre3)
    w4 = tl.load(w4_ptr + nh * SG + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    g = sigmoid_f32((tl.sum(gh * w4[None, :], axis=1) - 1.0) * GATE)
    dmem1 = (g[:, None] * do1.to(tl.float32)).to(DOT_DTYPE)
    dmem2 = (g[:, None] * do2.to(tl.float32)).to(DOT_DTYPE)
    w1_base = w1_ptr + nh * E * D
    w2_base = w2_ptr + nh * D * E
    mem1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    mem2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        m1 = (offs_e < E)[None, :] & mask_h[:, None]
        w1a = tl.load(w1_base + offs_e[None, :] * D + offs_h[:, None], mask=m1, other=0.0).to(DOT_DTYPE)
        w1b = tl.load(w1_base + offs_e[None, :] * D + HALF + offs_h[:, None], mask=m1, other=0.0).to(DOT_DTYPE)
        pre = tl.dot(qa, w1a, input_precision=PRECISION)
        pre = tl.dot(qb, w1b, pre, input_precision=PRECISION)
        hid, hid_grad = silu_and_grad(pre)
        m2 = (offs_e < E)[:, None] & mask_h[None, :]
        w2a = tl.load(w2_base + offs_h[None, :] * E + offs_e[:, None], mask=m2, other=0.0).to(DOT_DTYPE)
        w2b = tl.load(w2_base + (HALF + offs_h[None, :]) * E + offs_e[:, None], mask=m2, other=0.0).to(DOT_DTYPE)
        hd = hid.to(DOT_DTYPE)
        mem1 = tl.dot(hd, w2a, mem1, input_precision=PRECISION)
        mem2 = tl.dot(hd, w2b, mem2, input_precision=PRECISION)
        dhid = tl.dot(dmem1, tl.trans(w2a), input_precision=PRECISION)
        dhid = tl.dot(dmem2, tl.trans(w2b), dhid, input_precision=PRECISION)
        dpre = (dhid * hid_grad).to(DOT_DTYPE)
        dq1 = tl.dot(dpre, tl.trans(w1a), dq1, input_precision=PRECISION)
        dq2 = tl.dot(dpre, tl.trans(w1b), dq2, input_precision=PRECISION)
    dg = tl.sum(do1.to(tl.float32) * (mem1 - a1.to(tl.float32)) + do2.to(tl.float32) * (mem2 - a2.to(tl.float32)),
                axis=1)
    dlogit = dg * GATE * g * (1.0 - g)
    dpre3 = (dlogit[:, None] * w4[None, :] * gh_grad).to(DOT_DTYPE)
    dq1 = tl.dot(dpre3, tl.trans(w3a), dq1, input_precision=PRECISION)
    dq2 = tl.dot(dpre3, tl.trans(w3b), dq2, input_precision=PRECISION)
    return dq1, dq2, g, dlogit


@triton.jit
def token_rows(offs_m, SEQ, stride_b, stride_s):
    """Two-level token index t = b·SEQ + s → element offset of the row (int64)."""
    t = offs_m.to(tl.int64)
    return (t // SEQ) * stride_b + (t % SEQ) * stride_s


@triton.jit
def _blend_fwd_kernel(
    attn_ptr, q_ptr, out_ptr, idx_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr,
    T, H, D, HALF, SG, SEQ,
    s_ab, s_as, s_ah, s_ad,
    s_qb, s_qs, s_qh, s_qd,
    s_ob, s_os, s_oh, s_od,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), H)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_h = tl.arange(0, BLOCK_H)
    mask = mask_m[:, None] & (offs_h < HALF)[None, :]
    q_rows = q_ptr + token_rows(offs_m, SEQ, s_qb, s_qs)[:, None] + h * s_qh
    a_rows = attn_ptr + token_rows(offs_m, SEQ, s_ab, s_as)[:, None] + h * s_ah
    # tiles stay in the activation dtype (registers); the adapter loop carries only g·mem
    q1 = tl.load(q_rows + offs_h[None, :] * s_qd, mask=mask, other=0.0)
    q2 = tl.load(q_rows + (HALF + offs_h[None, :]) * s_qd, mask=mask, other=0.0)
    idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1).to(tl.int32)
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
    a1 = tl.load(a_rows + offs_h[None, :] * s_ad, mask=mask, other=0.0).to(tl.float32)
    a2 = tl.load(a_rows + (HALF + offs_h[None, :]) * s_ad, mask=mask, other=0.0).to(tl.float32)
    o1 = (1.0 - g_all[:, None]) * a1 + gm1
    o2 = (1.0 - g_all[:, None]) * a2 + gm2
    o_rows = out_ptr + token_rows(offs_m, SEQ, s_ob, s_os)[:, None] + h * s_oh
    tl.store(o_rows + offs_h[None, :] * s_od, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_rows + (HALF + offs_h[None, :]) * s_od, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blend_bwd_kernel(
    dout_ptr, attn_ptr, q_ptr, idx_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr,
    dattn_ptr, dq_ptr, g_ptr, dlogit_ptr, delta_ptr,
    T, H, D, HALF, SG, SEQ,
    s_gb, s_gs, s_gh, s_gd,
    s_ab, s_as, s_ah, s_ad,
    s_qb, s_qs, s_qh, s_qd,
    s_db, s_ds, s_dh, s_dd,
    s_xb, s_xs, s_xh, s_xd,
    s_delta_t, s_delta_h,
    COMPUTE_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), H). Writes d_attn, dq (memory/gate path), g and dlogit
    ([T, H] fp32), and delta = ⟨d_attn, attn⟩ per (token, head) when COMPUTE_DELTA."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_h = tl.arange(0, BLOCK_H)
    mask = mask_m[:, None] & (offs_h < HALF)[None, :]
    q_rows = q_ptr + token_rows(offs_m, SEQ, s_qb, s_qs)[:, None] + h * s_qh
    a_rows = attn_ptr + token_rows(offs_m, SEQ, s_ab, s_as)[:, None] + h * s_ah
    g_rows = dout_ptr + token_rows(offs_m, SEQ, s_gb, s_gs)[:, None] + h * s_gh
    # loaded tiles stay in the activation dtype; fp32 only where computed
    q1 = tl.load(q_rows + offs_h[None, :] * s_qd, mask=mask, other=0.0)
    q2 = tl.load(q_rows + (HALF + offs_h[None, :]) * s_qd, mask=mask, other=0.0)
    a1 = tl.load(a_rows + offs_h[None, :] * s_ad, mask=mask, other=0.0)
    a2 = tl.load(a_rows + (HALF + offs_h[None, :]) * s_ad, mask=mask, other=0.0)
    do1 = tl.load(g_rows + offs_h[None, :] * s_gd, mask=mask, other=0.0)
    do2 = tl.load(g_rows + (HALF + offs_h[None, :]) * s_gd, mask=mask, other=0.0)
    idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1).to(tl.int32)
    dq1 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    g_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dl_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    todo = mask_m & (idx >= 0)
    n = tl.min(tl.where(todo, idx, NO_ADAPTER), axis=0)
    while n < NO_ADAPTER:
        dq1_n, dq2_n, g, dlogit = memory_gate_bwd(q1, q2, a1, a2, do1, do2, w1_ptr, w2_ptr, w3_ptr, w4_ptr,
                                                  n, h, H, D, HALF, SG, BLOCK_M, BLOCK_H, BLOCK_E, BLOCK_S,
                                                  DOT_DTYPE, PRECISION)
        sel_row = todo & (idx == n)
        sel = sel_row[:, None]
        dq1 = tl.where(sel, dq1_n, dq1)
        dq2 = tl.where(sel, dq2_n, dq2)
        g_all = tl.where(sel_row, g, g_all)
        dl_all = tl.where(sel_row, dlogit, dl_all)
        todo = todo & (idx != n)
        n = tl.min(tl.where(todo, idx, NO_ADAPTER), axis=0)
    da1 = (1.0 - g_all[:, None]) * do1.to(tl.float32)  # g = 0 for tokens without an adapter
    da2 = (1.0 - g_all[:, None]) * do2.to(tl.float32)
    d_rows = dattn_ptr + token_rows(offs_m, SEQ, s_db, s_ds)[:, None] + h * s_dh
    da1 = da1.to(dattn_ptr.dtype.element_ty)
    da2 = da2.to(dattn_ptr.dtype.element_ty)
    tl.store(d_rows + offs_h[None, :] * s_dd, da1, mask=mask)
    tl.store(d_rows + (HALF + offs_h[None, :]) * s_dd, da2, mask=mask)
    x_rows = dq_ptr + token_rows(offs_m, SEQ, s_xb, s_xs)[:, None] + h * s_xh
    tl.store(x_rows + offs_h[None, :] * s_xd, dq1.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(x_rows + (HALF + offs_h[None, :]) * s_xd, dq2.to(dq_ptr.dtype.element_ty), mask=mask)
    th = offs_m.to(tl.int64) * H + h
    tl.store(g_ptr + th, g_all, mask=mask_m)
    tl.store(dlogit_ptr + th, dl_all, mask=mask_m)
    if COMPUTE_DELTA:
        delta = tl.sum(da1.to(tl.float32) * a1 + da2.to(tl.float32) * a2, axis=1)
        tl.store(delta_ptr + offs_m.to(tl.int64) * s_delta_t + h * s_delta_h, delta, mask=mask_m)


@triton.jit
def _blend_wgrad_kernel(
    dout_ptr, q_ptr, g_ptr, dlogit_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr,
    dw1_ptr, dw2_ptr, dw3_ptr, dw4_ptr,
    token_order_ptr, seg_adapter_ptr, seg_start_ptr, seg_len_ptr,
    H, D, HALF, SG, SEQ, NUM_E_BLOCKS,
    s_gb, s_gs, s_gh, s_gd,
    s_qb, s_qs, s_qh, s_qd,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (NUM_E_BLOCKS + 1, H, segments). Program e < NUM_E_BLOCKS: rows e·BE… of dW1 and
    columns of dW2; program NUM_E_BLOCKS: dW3 and dw4. Loops over the segment's tokens."""
    pid_e = tl.program_id(0)
    h = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = tl.load(seg_adapter_ptr + pid_s)
    start = tl.load(seg_start_ptr + pid_s)
    length = tl.load(seg_len_ptr + pid_s)
    nh = n.to(tl.int64) * H + h
    E = 2 * D
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    if pid_e < NUM_E_BLOCKS:
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        w1_base = w1_ptr + nh * E * D
        w2_base = w2_ptr + nh * D * E
        m1 = mask_e[None, :] & mask_h[:, None]
        w1a = tl.load(w1_base + offs_e[None, :] * D + offs_h[:, None], mask=m1, other=0.0).to(DOT_DTYPE)
        w1b = tl.load(w1_base + offs_e[None, :] * D + HALF + offs_h[:, None], mask=m1, other=0.0).to(DOT_DTYPE)
        m2 = mask_e[:, None] & mask_h[None, :]
        w2a = tl.load(w2_base + offs_h[None, :] * E + offs_e[:, None], mask=m2, other=0.0).to(DOT_DTYPE)
        w2b = tl.load(w2_base + (HALF + offs_h[None, :]) * E + offs_e[:, None], mask=m2, other=0.0).to(DOT_DTYPE)
        acc_w1a = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)  # dW1[e, :HALF]
        acc_w1b = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
        acc_w2a = tl.zeros((BLOCK_H, BLOCK_E), dtype=tl.float32)  # dW2[:HALF, e]
        acc_w2b = tl.zeros((BLOCK_H, BLOCK_E), dtype=tl.float32)
        for m0 in range(0, length, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < length
            tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0)
            mask = mask_m[:, None] & mask_h[None, :]
            q_rows = q_ptr + token_rows(tok, SEQ, s_qb, s_qs)[:, None] + h * s_qh
            g_rows = dout_ptr + token_rows(tok, SEQ, s_gb, s_gs)[:, None] + h * s_gh
            q1 = tl.load(q_rows + offs_h[None, :] * s_qd, mask=mask, other=0.0).to(DOT_DTYPE)
            q2 = tl.load(q_rows + (HALF + offs_h[None, :]) * s_qd, mask=mask, other=0.0).to(DOT_DTYPE)
            do1 = tl.load(g_rows + offs_h[None, :] * s_gd, mask=mask, other=0.0).to(tl.float32)
            do2 = tl.load(g_rows + (HALF + offs_h[None, :]) * s_gd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + tok.to(tl.int64) * H + h, mask=mask_m, other=0.0)
            pre = tl.dot(q1, w1a, input_precision=PRECISION)
            pre = tl.dot(q2, w1b, pre, input_precision=PRECISION)
            hid, hid_grad = silu_and_grad(pre)
            dmem1 = (g[:, None] * do1).to(DOT_DTYPE)
            dmem2 = (g[:, None] * do2).to(DOT_DTYPE)
            dhid = tl.dot(dmem1, tl.trans(w2a), input_precision=PRECISION)
            dhid = tl.dot(dmem2, tl.trans(w2b), dhid, input_precision=PRECISION)
            dpre = (dhid * hid_grad).to(DOT_DTYPE)
            hd = hid.to(DOT_DTYPE)
            acc_w2a = tl.dot(tl.trans(dmem1), hd, acc_w2a, input_precision=PRECISION)
            acc_w2b = tl.dot(tl.trans(dmem2), hd, acc_w2b, input_precision=PRECISION)
            acc_w1a = tl.dot(tl.trans(dpre), q1, acc_w1a, input_precision=PRECISION)
            acc_w1b = tl.dot(tl.trans(dpre), q2, acc_w1b, input_precision=PRECISION)
        dw1_base = dw1_ptr + nh * E * D
        dw2_base = dw2_ptr + nh * D * E
        st1 = (offs_e < E)[:, None] & mask_h[None, :]
        tl.store(dw1_base + offs_e[:, None] * D + offs_h[None, :], acc_w1a.to(dw1_ptr.dtype.element_ty), mask=st1)
        tl.store(dw1_base + offs_e[:, None] * D + HALF + offs_h[None, :], acc_w1b.to(dw1_ptr.dtype.element_ty),
                 mask=st1)
        st2 = mask_h[:, None] & (offs_e < E)[None, :]
        tl.store(dw2_base + offs_h[:, None] * E + offs_e[None, :], acc_w2a.to(dw2_ptr.dtype.element_ty), mask=st2)
        tl.store(dw2_base + (HALF + offs_h[:, None]) * E + offs_e[None, :], acc_w2b.to(dw2_ptr.dtype.element_ty),
                 mask=st2)
    else:
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < SG
        w3_base = w3_ptr + nh * SG * D
        m3 = mask_s[None, :] & mask_h[:, None]
        w3a = tl.load(w3_base + offs_s[None, :] * D + offs_h[:, None], mask=m3, other=0.0).to(DOT_DTYPE)
        w3b = tl.load(w3_base + offs_s[None, :] * D + HALF + offs_h[:, None], mask=m3, other=0.0).to(DOT_DTYPE)
        w4 = tl.load(w4_ptr + nh * SG + offs_s, mask=mask_s, other=0.0).to(tl.float32)
        acc_w3a = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.float32)
        acc_w3b = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.float32)
        acc_w4 = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for m0 in range(0, length, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < length
            tok = tl.load(token_order_ptr + start + offs_m, mask=mask_m, other=0)
            mask = mask_m[:, None] & mask_h[None, :]
            q_rows = q_ptr + token_rows(tok, SEQ, s_qb, s_qs)[:, None] + h * s_qh
            q1 = tl.load(q_rows + offs_h[None, :] * s_qd, mask=mask, other=0.0).to(DOT_DTYPE)
            q2 = tl.load(q_rows + (HALF + offs_h[None, :]) * s_qd, mask=mask, other=0.0).to(DOT_DTYPE)
            dl = tl.load(dlogit_ptr + tok.to(tl.int64) * H + h, mask=mask_m, other=0.0)
            pre3 = tl.dot(q1, w3a, input_precision=PRECISION)
            pre3 = tl.dot(q2, w3b, pre3, input_precision=PRECISION)
            gh, gh_grad = silu_and_grad(pre3)
            acc_w4 += tl.sum(dl[:, None] * gh, axis=0)
            dpre3 = (dl[:, None] * w4[None, :] * gh_grad).to(DOT_DTYPE)
            acc_w3a = tl.dot(tl.trans(dpre3), q1, acc_w3a, input_precision=PRECISION)
            acc_w3b = tl.dot(tl.trans(dpre3), q2, acc_w3b, input_precision=PRECISION)
        dw3_base = dw3_ptr + nh * SG * D
        st3 = mask_s[:, None] & mask_h[None, :]
        tl.store(dw3_base + offs_s[:, None] * D + offs_h[None, :], acc_w3a.to(dw3_ptr.dtype.element_ty), mask=st3)
        tl.store(dw3_base + offs_s[:, None] * D + HALF + offs_h[None, :], acc_w3b.to(dw3_ptr.dtype.element_ty),
                 mask=st3)
        tl.store(dw4_ptr + nh * SG + offs_s, acc_w4.to(dw4_ptr.dtype.element_ty), mask=mask_s)


# --------------------------------------------------------------------------- launchers
def check_banks(q_dtype: torch.dtype, heads: int, dim: int, w1, w2, w3, w4):
    """Validate the bank shapes; returns (N, s) and contiguous banks."""
    if dim % 2:
        raise ValueError(f"head dim {dim} must be even (RoPE halves)")
    n = w1.shape[0]
    sg = w3.shape[2] if w3.dim() == 4 else -1
    want = {"w1": (n, heads, 2 * dim, dim), "w2": (n, heads, dim, 2 * dim), "w3": (n, heads, sg, dim),
            "w4": (n, heads, 1, sg)}
    for name, w in zip(want, (w1, w2, w3, w4)):
        if tuple(w.shape) != want[name]:
            raise ValueError(f"{name} must be {want[name]} (N, H, …), got {tuple(w.shape)}")
        check_float(name, w, q_dtype)
    if sg < 1:
        raise ValueError("gate dim s must be ≥ 1")
    return n, sg, [w.contiguous() for w in (w1, w2, w3, w4)]


def check_idx_range(adapter_idx: torch.Tensor, num_adapters: int) -> None:
    """One device sync: an out-of-range index would read another tensor's memory."""
    if adapter_idx.dtype.is_floating_point or adapter_idx.dtype == torch.bool:
        raise TypeError(f"adapter_idx must be an integer tensor, got {adapter_idx.dtype}")
    if adapter_idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(adapter_idx))
        if lo < -1 or hi >= num_adapters:
            raise IndexError(f"adapter index out of range [-1, {num_adapters}): min {lo}, max {hi}")


def blend_blocks(dim: int, sg: int, kernel: str = "blend_fwd") -> dict:
    """Blocks and warps for kernel blend_fwd | blend_bwd | blend_wgrad (also used by the fused
    attention's epilogue: attn_fwd). GPU defaults were chosen from ptxas register/spill
    reports for sm_90 (tests/test_kernels_triton_compile.py); GPU timing is pending."""
    fixed = dict(BLOCK_H=block(dim // 2, 16, 256), BLOCK_S=block(sg, 16, 256))
    if INTERPRETED:  # few, large programs
        return dict(fixed, BLOCK_M=64, BLOCK_E=block(2 * dim, 16, 128), num_warps=4)
    # bf16 sm_90 ptxas reports (registers / spill bytes) behind these choices:
    #   blend_fwd   BLOCK_M 32 → 16: 312 → 0 B (d64), 448 → 0 B (d128)
    #   blend_bwd   BLOCK_M 32 → 16: 1440 → 0 B (d64); d128 best found 224 B (BLOCK_E 16, 8 warps)
    #   attn_fwd    BLOCK_E 16, 8 warps: 504 → 0 B (d64), 264 → 136 B (d128)
    defaults = {
        "blend_fwd": dict(BLOCK_M=16, BLOCK_E=32, num_warps=4 if dim <= 64 else 8),
        "blend_bwd": dict(BLOCK_M=16, BLOCK_E=32, num_warps=4) if dim <= 64 else
        dict(BLOCK_M=16, BLOCK_E=16, num_warps=8),
        "blend_wgrad": dict(BLOCK_M=32, BLOCK_E=64 if dim <= 64 else 32, num_warps=4 if dim <= 64 else 8),
        "attn_fwd": dict(BLOCK_E=16, num_warps=8),
    }[kernel]
    return dict(fixed, **gpu_config(f"{kernel}_d{dim}", gpu_config(kernel, defaults)))


def _strides4(t: torch.Tensor, token_major: bool) -> tuple[int, int, int, int]:
    """(b, s, h, d) strides of a [T, H, d] tensor (b stride unused: SEQ = T)."""
    assert token_major and t.dim() == 3
    return (0, t.stride(0), t.stride(1), t.stride(2))


def blend_fwd_launch(attn_out, q, w1, w2, w3, w4, adapter_idx, *, validate: bool = True) -> torch.Tensor:
    check_runnable(attn_out, q, w1, w2, w3, w4, adapter_idx)
    if attn_out.shape != q.shape or q.dim() != 3:
        raise ValueError(f"attn_out {tuple(attn_out.shape)} and q {tuple(q.shape)} must both be [T, H, d]")
    check_float("q", q)
    check_float("attn_out", attn_out)
    num_tokens, heads, dim = q.shape
    if adapter_idx.shape != (num_tokens,):
        raise ValueError(f"adapter_idx must be [T]={num_tokens}, got {tuple(adapter_idx.shape)}")
    n, sg, (w1, w2, w3, w4) = check_banks(q.dtype, heads, dim, w1, w2, w3, w4)
    if validate:
        check_idx_range(adapter_idx, n)
    out = torch.empty(attn_out.shape, device=q.device, dtype=attn_out.dtype)
    if num_tokens == 0:
        return out
    blocks = blend_blocks(dim, sg, "blend_fwd")
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_M"]), heads)
    _blend_fwd_kernel[grid](
        attn_out, q, out, adapter_idx, w1, w2, w3, w4,
        num_tokens, heads, dim, dim // 2, sg, max(1, num_tokens),
        *_strides4(attn_out, True), *_strides4(q, True), *_strides4(out, True),
        **blocks, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
    )
    return out


def blend_bwd_launch(
    dout, attn, q, w1, w2, w3, w4, adapter_idx, *, seq: int, num_tokens: int, heads: int, dim: int,
    strides: dict, dattn: torch.Tensor, dq: torch.Tensor, delta: torch.Tensor | None = None,
):
    """Token kernel. `strides` maps 'dout', 'attn', 'q', 'dattn', 'dq' to (b, s, h, d) strides of
    two-level token views; returns (g, dlogit) as [T, H] fp32."""
    sg = w3.shape[2]
    g = torch.empty(num_tokens, heads, device=q.device, dtype=torch.float32)
    dlogit = torch.empty_like(g)
    blocks = blend_blocks(dim, sg, "blend_bwd")
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_M"]), heads)
    _blend_bwd_kernel[grid](
        dout, attn, q, adapter_idx, w1, w2, w3, w4,
        dattn, dq, g, dlogit, delta if delta is not None else g,
        num_tokens, heads, dim, dim // 2, sg, seq,
        *strides["dout"], *strides["attn"], *strides["q"], *strides["dattn"], *strides["dq"],
        *((delta.stride(0), delta.stride(1)) if delta is not None else (0, 0)),
        COMPUTE_DELTA=delta is not None,
        **blocks, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
    )
    return g, dlogit


def blend_wgrad_launch(
    dout, q, g, dlogit, w1, w2, w3, w4, meta: SegmentMeta, *, seq: int, heads: int, dim: int, strides: dict,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
):
    """Weight kernel → (dW1, dW2, dW3, dw4) in the banks' dtype (zero for absent adapters)."""
    sg = w3.shape[2]
    dws = [torch.zeros_like(w) for w in (w1, w2, w3, w4)]
    if meta.num_segments == 0 or not any(needs):
        return dws
    blocks = blend_blocks(dim, sg, "blend_wgrad")
    num_e_blocks = triton.cdiv(2 * dim, blocks["BLOCK_E"])
    grid = (num_e_blocks + 1, heads, meta.num_segments)
    _blend_wgrad_kernel[grid](
        dout, q, g, dlogit, w1, w2, w3, w4, *dws,
        meta.token_order, meta.seg_adapter, meta.seg_start, meta.seg_len,
        heads, dim, dim // 2, sg, seq, num_e_blocks,
        *strides["dout"], *strides["q"],
        **blocks, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
    )
    return dws


# ---------------------------------------------------------------------- autograd.Function
class GatedMemoryBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, q, w1, w2, w3, w4, adapter_idx):
        out = blend_fwd_launch(attn_out, q, w1, w2, w3, w4, adapter_idx)
        ctx.save_for_backward(attn_out, q, w1, w2, w3, w4, adapter_idx)
        return out

    @staticmethod
    def backward(ctx, dout):
        attn, q, w1, w2, w3, w4, adapter_idx = ctx.saved_tensors
        return (*blend_backward(dout, attn, q, w1, w2, w3, w4, adapter_idx, ctx.needs_input_grad[:6]), None)


def blend_backward(dout, attn, q, w1, w2, w3, w4, adapter_idx, needs=(True,) * 6):
    """(d_attn, dq, dW1, dW2, dW3, dw4) of the epilogue; weight grads not in `needs` are None
    (d_attn and dq come out of one kernel and are always computed)."""
    num_tokens, heads, dim = q.shape
    _, _, (w1, w2, w3, w4) = check_banks(q.dtype, heads, dim, w1, w2, w3, w4)
    dattn = torch.empty(attn.shape, device=q.device, dtype=attn.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    strides = {name: _strides4(t, True) for name, t in
               (("dout", dout), ("attn", attn), ("q", q), ("dattn", dattn), ("dq", dq))}
    seq = max(1, num_tokens)
    if num_tokens == 0:
        return dattn, dq, *[torch.zeros_like(w) if need else None for w, need in zip((w1, w2, w3, w4), needs[2:])]
    g, dlogit = blend_bwd_launch(dout, attn, q, w1, w2, w3, w4, adapter_idx, seq=seq, num_tokens=num_tokens,
                                 heads=heads, dim=dim, strides=strides, dattn=dattn, dq=dq)
    dws = [None] * 4
    if any(needs[2:6]):
        meta = build_segments(adapter_idx, w1.shape[0])
        dws = blend_wgrad_launch(dout, q, g, dlogit, w1, w2, w3, w4, meta, seq=seq, heads=heads, dim=dim,
                                 strides=strides)
        dws = [dw if need else None for dw, need in zip(dws, needs[2:6])]
    return dattn, dq, *dws


# ------------------------------------------------------------------------ public function
def gated_memory_blend(attn_out, q, w1, w2, w3, w4, adapter_idx):
    """attn_out, q [T, H, d]; w1 [N,H,2d,d]; w2 [N,H,d,2d]; w3 [N,H,s,d]; w4 [N,H,1,s];
    adapter_idx [T] (-1 = none) → [T, H, d]. Differentiable in attn_out, q and w1..w4."""
    return GatedMemoryBlend.apply(attn_out, q, w1, w2, w3, w4, adapter_idx)
