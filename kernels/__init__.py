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

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and
triton.language's own helpers (tl.sum, tl.sigmoid, …) are decorated when triton is first
imported. Kernels therefore run on CPU only if TRITON_INTERPRET=1 was set before
*triton* was imported. `ensure_interpreter()` makes that robust for tests.
"""
from __future__ import annotations

import importlib
import os
import sys

KERNEL_MODULES = (
    "lift_engine.kernels._common",
    "lift_engine.kernels.lora_shrink",
    "lift_engine.kernels.lora_expand",
    "lift_engine.kernels.lora_segment_outer",
    "lift_engine.kernels.lora_linear_delta",
    "lift_engine.kernels.lora_linear",
    "lift_engine.kernels.gated_memory_blend",
    "lift_engine.kernels.gated_memory_attention",
)


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def ensure_interpreter() -> bool:
    """Make the kernels runnable on this machine; returns True when they run interpreted.

    With a CUDA device nothing changes (kernels compile for the GPU). Without one,
    TRITON_INTERPRET=1 is set; if triton (or one of these kernel modules) was already
    imported in compiled mode — e.g. because torch._dynamo imported triton first — the
    JIT helpers of triton.language are re-wrapped as interpreted functions and the kernel
    modules are reloaded, so the outcome does not depend on import order. Meant for tests
    and CPU tools; a library user sets TRITON_INTERPRET=1 before importing anything.
    """
    import torch

    if torch.cuda.is_available() and not interpreter_requested():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import triton.language as tl

    for module in {tl, tl.core, tl.standard, tl.math, tl.random}:
        for name, member in list(vars(module).items()):
            if isinstance(member, JITFunction):
                setattr(module, name, InterpretedFunction(member.fn))
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "INTERPRETED", True):
            importlib.reload(module)
    return True
