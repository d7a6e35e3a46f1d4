"""Gated-Memory attention, reference implementation (docs/DESIGN.md §3.2, §5.4).

Causal attention with grouped-query heads and RoPE, fused with the memory MLP, the gate
and the blend — the op the Triton kernel implements in one pass:

    q_r, k_r = rope(q, cos, sin), rope(k, cos, sin)
    attn     = softmax(q_r k_rᵀ · scale + causal) v          (query head h reads kv head h // (H/Hkv))
    out      = gated_memory_blend(attn, q, W1..w4, adapter_idx)   # memory reads the pre-RoPE q

Shapes: q [B, H, S, d]; k, v [B, Hkv, S, d]; cos, sin [B, S, d] (HF layout, rotate-half);
w1..w4 banks [N, H, …]; adapter_idx [B, S] int64 (-1 = no adapter). Returns [B, S, H, d].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lift_engine.ops.reference.gated_memory_blend import gated_memory_blend


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, d]; cos, sin: [B, S, d] → [B, heads, S, d]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def gated_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    w4: torch.Tensor,
    adapter_idx: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if adapter_idx.shape != (batch, seq):
        raise ValueError(f"adapter_idx must be [B, S]=({batch}, {seq}), got {tuple(adapter_idx.shape)}")
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = heads // kv_heads
    k_rot = k_rot.repeat_interleave(groups, dim=1)
    v_rep = v.repeat_interleave(groups, dim=1)
    attn = F.scaled_dot_product_attention(q_rot, k_rot, v_rep, is_causal=True, scale=scale)
    attn_tokens = attn.transpose(1, 2).reshape(batch * seq, heads, dim)
    q_tokens = q.transpose(1, 2).reshape(batch * seq, heads, dim)
    out = gated_memory_blend(attn_tokens, q_tokens, w1, w2, w3, w4, adapter_idx.reshape(-1))
    return out.reshape(batch, seq, heads, dim)
