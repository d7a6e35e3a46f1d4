"""The LoRA term of a frozen linear, for many adapters at once, trainable.

Semantics (reference: lift_engine.ops.reference.lora.lora_linear_delta):

    delta = lora_expand(lora_shrink(x, A, idx), B, scaling, idx)
    i.e. delta[t] = scaling[n] · (x[t] @ A[n]ᵀ) @ B[n]ᵀ,  n = idx[t]  (0 where n == -1)

Shapes: x [T, in]; lora_a [N, S·R, in]; lora_b [N, Σ o_s, R]; scaling [N];
adapter_idx [T] → [T, Σ o_s]. With output_slices (fused q/k/v) the A banks of the slices
are stacked on the rank axis and the B banks concatenated on the output axis; slice s
uses A rows [s·R, (s+1)·R) and writes output columns [off_s, off_s + o_s).

One segment metadata serves shrink, expand and the whole backward; h = shrink(x) is the
only saved activation ([T, S·R], small). Backward:

    dh = expand_backward(dy)           (shrink-like, per slice, × scaling)
    dB = scaling · Σ dyᵀ h             (segmented outer product)
    dx = dh @ A[n]                     (expand-like with B = Aᵀ)
    dA = Σ dhᵀ x                       (segmented outer product)
"""
from __future__ import annotations

import torch

from ._common import SegmentMeta, build_segments
from .lora_expand import _check_slices, expand_backward, expand_launch
from .lora_segment_outer import segment_outer_launch
from .lora_shrink import shrink_launch


def _check_banks(lora_a: torch.Tensor, lora_b: torch.Tensor, output_slices) -> tuple[tuple[int, ...], int]:
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"expected lora_a [N, S·R, in] and lora_b [N, OUT, R], got "
                         f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    slices = _check_slices(output_slices, lora_b.shape[1])
    r = lora_b.shape[2]
    if lora_a.shape[1] != len(slices) * r:
        raise ValueError(f"lora_a has {lora_a.shape[1]} rank rows, expected {len(slices)} slices × {r}")
    return slices, r


# ---------------------------------------------------------------------- autograd.Function
class LoRALinearDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, adapter_idx, output_slices, ranks, meta, decode):
        slices, r = _check_banks(lora_a, lora_b, output_slices)
        training = any(ctx.needs_input_grad[:4])
        if meta is None and (training or decode is False):
            meta = build_segments(adapter_idx, lora_a.shape[0])
        h = shrink_launch(x, lora_a, adapter_idx, ranks=ranks, slice_rank=r, meta=meta, decode=decode)
        y = expand_launch(h, lora_b, adapter_idx, scaling=scaling, output_slices=slices, ranks=ranks,
                          slice_rank=r, meta=meta, decode=decode)
        ctx.save_for_backward(x, h, lora_a, lora_b, scaling, adapter_idx, ranks)
        ctx.meta, ctx.slices, ctx.r = meta, slices, r
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_a, lora_b, scaling, adapter_idx, ranks = ctx.saved_tensors
        return (*delta_backward(dy, x, h, lora_a, lora_b, scaling, adapter_idx, ctx.meta, ctx.slices, ranks,
                                ctx.needs_input_grad[:4]), None, None, None, None, None)


def delta_backward(dy, x, h, lora_a, lora_b, scaling, adapter_idx, meta, slices, ranks, needs):
    """(dx, dA, dB, dscaling) given the saved h = shrink(x); entries not in `needs` are None."""
    need_dx, need_da, need_db, need_ds = needs
    r = lora_b.shape[2]
    if meta is None:
        meta = build_segments(adapter_idx, lora_a.shape[0])
    dh, db, ds = expand_backward(dy.contiguous(), h, lora_b, scaling, adapter_idx, meta, slices, ranks, r,
                                 need_dx or need_da, need_db, need_ds)
    dx = da = None
    if need_dx:
        dx = expand_launch(dh, lora_a.transpose(1, 2), adapter_idx, ranks=ranks, slice_rank=r, meta=meta)
    if need_da:
        da = segment_outer_launch(dh, x, adapter_idx, lora_a.shape[0], meta=meta, ranks=ranks, rank_axis=1,
                                  slice_rank=r, out_dtype=lora_a.dtype)
    if ds is not None:
        ds = ds.to(scaling.dtype)
    return dx, da, db, ds


# ------------------------------------------------------------------------ public function
def lora_linear_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    output_slices: tuple[int, ...] | None = None,
    ranks: torch.Tensor | None = None,
    meta: SegmentMeta | None = None,
    decode: bool | None = None,
) -> torch.Tensor:
    """x [T, in], lora_a [N, S·R, in], lora_b [N, OUT, R], scaling [N], adapter_idx [T] → [T, OUT].

    Differentiable in x, lora_a, lora_b and scaling (see module docstring).
    """
    return LoRALinearDelta.apply(x, lora_a, lora_b, scaling, adapter_idx, output_slices, ranks, meta, decode)
