"""Gated Memory epilogue, reference implementation (docs/DESIGN.md §3.2).

Applied to the output of ordinary attention, per query head h, with the pre-RoPE query q:

    m_h(q) = W2_h · SiLU(W1_h · q)                      W1: [N, H, 2d, d]   W2: [N, H, d, 2d]
    g_h(q) = sigmoid(3 · (w4_h · SiLU(W3_h · q) − 1))   W3: [N, H, s, d]    w4: [N, H, 1, s]
    o_h    = (1 − g_h) · attn_h + g_h · m_h(q)

Each token t uses adapter adapter_idx[t]; tokens with -1 pass attention through unchanged.
This is the piece serving needs (it runs after paged attention) and the piece the
Hugging Face path uses after its own attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lift_engine.config import GATE_SCALE


def memory_and_gate(
    q: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, w4: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter. q: [t, H, d]; w1: [H, 2d, d]; w2: [H, d, 2d]; w3: [H, s, d]; w4: [H, 1, s].

    Returns memory [t, H, d] and gate [t, H, 1].
    """
    hidden = F.silu(torch.einsum("thd,hed->the", q, w1))
    memory = torch.einsum("the,hde->thd", hidden, w2)
    gate_hidden = F.silu(torch.einsum("thd,hsd->ths", q, w3))
    gate = torch.sigmoid(GATE_SCALE * (torch.einsum("ths,hos->tho", gate_hidden, w4) - 1.0))
    return memory, gate


def gated_memory_blend(
    attn_out: torch.Tensor,
    q: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    w4: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """attn_out, q: [T, H, d]; w1..w4: banks [N, H, …]; adapter_idx: [T] int64 → [T, H, d]."""
    if attn_out.shape != q.shape or attn_out.dim() != 3:
        raise ValueError(f"attn_out {tuple(attn_out.shape)} and q {tuple(q.shape)} must both be [T, H, d]")
    if adapter_idx.shape != (q.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={q.shape[0]}, got {tuple(adapter_idx.shape)}")
    if adapter_idx.numel() and int(adapter_idx.max()) >= w1.shape[0]:
        raise IndexError(f"adapter index {int(adapter_idx.max())} out of range for a bank of {w1.shape[0]}")
    out = attn_out
    for n in torch.unique(adapter_idx).tolist():
        if n < 0:
            continue
        rows = (adapter_idx == n).nonzero(as_tuple=True)[0]
        memory, gate = memory_and_gate(q.index_select(0, rows), w1[n], w2[n], w3[n], w4[n])
        attn_rows = attn_out.index_select(0, rows)
        out = out.index_put((rows,), (1.0 - gate) * attn_rows + gate * memory.to(attn_rows.dtype))
    return out
