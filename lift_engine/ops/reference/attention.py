"""Multi-head attention with grouped KV heads, a causal rule and/or a key mask, reference
implementation (docs/DESIGN.md §5).

    out[b, h, i] = Σ_j softmax_j(scale · q[b, h, i] · k[b, h // G, j]) v[b, h // G, j]

over the keys j that query i may see: j ≤ i + (Lk − Lq) when `causal` (bottom-right
aligned, as with a KV cache: the last query sees every key), and mask[b, i, j] when a
mask is given. G = Hq / Hkv query heads share one KV head (GQA). A query that sees no key
gets 0 — torch's sdpa would give NaN there.

Math in fp32 whatever the input dtype; the output has q's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """ValueError unless q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Hkv | Hq, and the
    mask None or bool [B or 1, Lq, Lk]."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention needs q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same B and D, Hq a multiple of Hkv")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, q.shape[0])
                             or mask.shape[1:] != (q.shape[2], k.shape[2])):
        raise ValueError(f"mask must be bool [B or 1, Lq, Lk] = [{q.shape[0]}, {q.shape[2]}, {k.shape[2]}], "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def visible_keys(Lq: int, Lk: int, mask: Optional[torch.Tensor], causal: bool, device) -> torch.Tensor:
    """[B or 1, 1, Lq, Lk] bool: which key each query may see."""
    allowed = torch.ones(1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (torch.arange(Lk, device=device)[None, :]
                             <= torch.arange(Lq, device=device)[:, None] + (Lk - Lq))
    if mask is not None:
        allowed = allowed & mask
    return allowed[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
              scale: float) -> torch.Tensor:
    """q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; mask: bool [B or 1, Lq, Lk] or None; causal;
    scale (usually D ** -0.5) → [B, Hq, Lq, D] in q's dtype."""
    check_attention(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(groups, dim=1)
    values = v.float().repeat_interleave(groups, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    allowed = visible_keys(q.shape[2], k.shape[2], mask, causal, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without a visible key: 0
    return (probs @ values).to(q.dtype)
