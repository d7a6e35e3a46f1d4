"""Cross entropy of logit rows together with its gradient, reference (docs/DESIGN.md §5).

    loss[r] = logsumexp(z[r]) − z[r, t[r]]          (float32)
    z[r]   ← softmax(z[r]) − onehot(t[r])           (in place: d loss[r] / d z[r])

The building block of a fused linear cross entropy (Liger-Kernel's idea): when the
gradient of the logits is known in the forward pass, the hidden state's gradient costs
one GEMM there, and the logits are never recomputed or kept. Statistics in float32 from
z as stored (fp32 or bf16); the gradient is rounded once into z's dtype.
"""
from __future__ import annotations

import torch


def check_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes every backend's cross_entropy_with_grad_ accepts (the range of targets is checked by each)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy_with_grad_ needs logits [R, V>0] and targets [R], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")


def cross_entropy_with_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] float (overwritten with the gradient); targets: [R] int64 in [0, V) → loss [R] float32."""
    check_cross_entropy(logits, targets)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise IndexError(f"targets out of range for {logits.shape[1]} classes")
    z = logits.to(torch.float32)
    rows = torch.arange(z.shape[0], device=z.device)
    loss = torch.logsumexp(z, dim=-1) - z[rows, targets]
    grad = torch.softmax(z, dim=-1)
    grad[rows, targets] -= 1.0
    logits.copy_(grad)
    return loss
