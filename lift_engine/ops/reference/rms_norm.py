"""RMSNorm, reference implementation (docs/DESIGN.md §5.3, fused ops).

    y = weight ⊙ (x · rsqrt(mean(x², -1) + eps))

exactly as transformers' LlamaRMSNorm computes it (the norm of Llama, SmolLM2, Qwen2,
Mistral …): the statistics in float32, the normalised x cast back to x's dtype, then the
weight multiply in the promoted dtype. Patching a model's norms with this op therefore
changes nothing, bit for bit (tests/test_fused_blocks.py checks it).
"""
from __future__ import annotations

import torch


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Shapes every backend's rms_norm accepts."""
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm needs x [..., H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H]; weight: [H]; eps > 0 → [..., H] in the promoted dtype of x and weight."""
    check_rms_norm(x, weight)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
