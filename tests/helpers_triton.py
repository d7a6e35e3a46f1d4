"""Test set-up for the Triton kernels on a machine without a GPU: the Triton interpreter.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and
triton.language's own helpers (tl.sum, tl.sigmoid, …) are decorated when triton is first
imported. In a test session another module (or torch._dynamo) may import triton before
the kernel tests ask for the interpreter; `ensure_interpreter()` makes the outcome not
depend on that order, by re-wrapping triton.language's helpers as interpreted functions
and reloading the kernel modules. Only tests do this; a program sets TRITON_INTERPRET=1
before it starts.
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
    TRITON_INTERPRET=1 is set; if triton (or one of the kernel modules) was already
    imported in compiled mode, the JIT helpers of triton.language are re-wrapped as
    interpreted functions and the kernel modules are reloaded.
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
