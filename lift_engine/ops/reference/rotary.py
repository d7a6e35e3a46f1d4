"""Rotary position embedding (RoPE) of one tensor of heads, reference implementation
(docs/DESIGN.md §5), as transformers' Llama-family `apply_rotary_pos_emb` computes it:

    y = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half(x) = cat(−x[..., D/2:], x[..., :D/2])

with cos and sin [B or 1, L, D] broadcast over the heads (`unsqueeze_dim=1`).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError unless x [B, H, L, D] with D even and cos, sin [B or 1, L, D]."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.dim() != 3 or cos.shape != sin.shape \
            or cos.shape[1:] != x.shape[2:] or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"rotary needs x [B, H, L, D] with D even and cos, sin [B or 1, L, D], got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, D] (D even); cos, sin: [B or 1, L, D] → [B, H, L, D] in x's dtype."""
    check_rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
