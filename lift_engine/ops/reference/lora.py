"""Multi-adapter LoRA, reference implementation (docs/DESIGN.md §3.1, §4).

A bank holds N adapters stacked on a leading axis; each token carries the index of its
adapter (-1 = no adapter). Ranks may differ per adapter: a bank is padded to the largest
rank with zero rows of A / zero columns of B, which contributes exactly nothing.

    shrink:  h[t]  = x[t] @ A[idx[t]].T                    (0 where idx[t] == -1)
    expand:  y[t]  = scaling[idx[t]] * h[t] @ B[idx[t]].T   (0 where idx[t] == -1)
    delta:   expand(shrink(x))

The reference loops over the distinct adapters present (what SGMV does with one
segment per adapter); autograd gives dx, dA, dB.
"""
from __future__ import annotations

import torch


def _check(x: torch.Tensor, idx: torch.Tensor, n_adapters: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected tokens flattened to [T, features], got shape {tuple(x.shape)}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={x.shape[0]}, got {tuple(idx.shape)}")
    if idx.numel() and int(idx.max()) >= n_adapters:
        raise IndexError(f"adapter index {int(idx.max())} out of range for a bank of {n_adapters}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    """x: [T, in], lora_a: [N, r, in], adapter_idx: [T] int64 → [T, r]."""
    _check(x, adapter_idx, lora_a.shape[0])
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    for n in torch.unique(adapter_idx).tolist():
        if n < 0:
            continue
        rows = (adapter_idx == n).nonzero(as_tuple=True)[0]
        out = out.index_put((rows,), x.index_select(0, rows) @ lora_a[n].t())
    return out


def lora_expand(
    h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, adapter_idx: torch.Tensor
) -> torch.Tensor:
    """h: [T, r], lora_b: [N, out, r], scaling: [N] float, adapter_idx: [T] → [T, out]."""
    _check(h, adapter_idx, lora_b.shape[0])
    out = h.new_zeros(h.shape[0], lora_b.shape[1])
    for n in torch.unique(adapter_idx).tolist():
        if n < 0:
            continue
        rows = (adapter_idx == n).nonzero(as_tuple=True)[0]
        out = out.index_put((rows,), (h.index_select(0, rows) @ lora_b[n].t()) * scaling[n].to(h.dtype))
    return out


def lora_linear_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """The LoRA term added to a frozen linear's output.

    x: [T, in], lora_a: [N, r, in], lora_b: [N, out, r], scaling: [N], adapter_idx: [T] → [T, out].
    """
    return lora_expand(lora_shrink(x, lora_a, adapter_idx), lora_b, scaling, adapter_idx)
