"""Triton kernels, one op per file; installed as lift_engine.kernels.

Files (each: kernel → launcher with shape/dtype checks and grid → autograd.Function →
public function):

    _common.py                 shared launch helpers and the SGMV segment metadata
    lora_shrink.py             h = x @ A[idx]ᵀ                 (SGMV + decode BGMV)
    lora_expand.py             y = s[idx] · h @ B[idx]ᵀ          (SGMV + decode BGMV, q/k/v slices)
    lora_segment_outer.py      G[n] = Σ_{t: idx=t} a[t]ᵀ b[t]   (dA, dB of the two above)
    lora_linear_delta.py       expand(shrink(x)) with one shared metadata, trainable
    lora_linear.py             x Wᵀ + bias + LoRA delta fused in one GEMM kernel (projections)
    gated_memory_blend.py      memory MLP + gate + blend epilogue, forward and backward
    gated_memory_attention.py  FA2 causal attention + RoPE + GQA fused with the epilogue

This top-level directory is the package `lift_engine.kernels` (setup.py maps it with
`package_dir`); import it by that name. Importing it imports nothing; each kernel module
imports torch and triton.

Triton decides once whether these kernels compile for a GPU or run in its numpy
interpreter (on CPU tensors; correct, slow, for tests): TRITON_INTERPRET=1 must be set
before *triton* is first imported, because triton.language's own helpers are decorated
then. `interpreted()` says which way they were built. (Test set-up that must set the
variable after something imported triton does more: tests/helpers_triton.py.)
"""
from __future__ import annotations


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (they then take CPU tensors):
    both their own @triton.jit and triton.language's helpers (tl.sigmoid, …) were built
    interpreted. False when they compile for a CUDA device — or when TRITON_INTERPRET=1
    came after triton's import, which leaves the helpers compiled. Imports triton."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from . import _common

    return _common.INTERPRETED and isinstance(tl.standard.sigmoid, InterpretedFunction)


def build_segments(adapter_idx, num_adapters: int, include_none: bool = False):
    """The SGMV segment metadata the LoRA kernels take as `meta=` (a SegmentMeta): the
    tokens of `adapter_idx` ([T] integer, -1 = no adapter) grouped by adapter, for a bank
    of `num_adapters`; include_none also groups the -1 tokens. Cached on the index tensor,
    so the kernels of one step share one build."""
    from ._common import build_segments as build

    return build(adapter_idx, num_adapters, include_none)
