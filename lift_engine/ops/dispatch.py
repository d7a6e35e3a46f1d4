"""The one place where a backend is chosen for every op (DESIGN.md §5).

Backends: "reference" (pure PyTorch, always there), "triton", "cuda", "cpu" (C++).
`LIFT_BACKEND` forces one: a backend asked for explicitly that cannot load raises
BackendUnavailable. Without it the choice is automatic by device, falling back to the
reference and saying so once (a warning per op and backend).

A backend is a module exposing some of the op names in OPS with the reference's
signature; ops it lacks fall back to the reference. A backend may also define
`supports(device) -> None | str`: a reason string means its kernels cannot run on that
device (e.g. Triton on CPU without TRITON_INTERPRET=1) — a forced backend then raises
BackendUnavailable with that reason, the automatic choice falls back with a warning.

Under torch.compile the public functions below call the `torch.ops.lift.*` custom ops
(custom_ops.py: fake implementations for tracing, explicit backward formulas), which
resolve their backend here with the same rules; eager calls go straight to the backend.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable

import torch

OPS = ("lora_shrink", "lora_expand", "lora_linear_delta", "lora_linear", "gated_memory_blend",
       "gated_memory_attention")
# Fused ops of a training step: elementwise ones (fused_blocks.py patches a model with
# them) and attention (precision.training_attention routes HF attention to it). Same
# backend rules in eager mode; under torch.compile they are the reference, which the
# compiler fuses itself, so they need no custom op.
FUSED_OPS = ("rms_norm", "swiglu", "rotary", "cross_entropy_with_grad_", "attention")
BACKENDS = ("reference", "triton", "cuda", "cpu")

# Module that implements each backend; imported lazily, only when chosen.
BACKEND_MODULES = {
    "reference": "lift_engine.ops.reference",
    "triton": "lift_engine.ops.triton_backend",
    "cuda": "lift_engine.ops.cuda_backend",
    "cpu": "lift_engine.ops.cpu_backend",
}

# Automatic preference per device type, best first. On CUDA, Triton comes first: its
# kernels run in CI under TRITON_INTERPRET=1, the CUDA ones have only been compiled.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot be loaded here."""


_loaded: dict[str, ModuleType | Exception] = {}
_warned: set[tuple[str, str]] = set()


def _load(name: str) -> ModuleType | Exception:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name])
        except Exception as exc:  # ImportError, missing compiler, missing GPU …
            _loaded[name] = exc
    return _loaded[name]


def requested_backend() -> str | None:
    name = os.environ.get("LIFT_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"LIFT_BACKEND={name!r} is not one of {list(BACKENDS)}")
    return name


def resolve(op: str, device: torch.device | str = "cpu") -> tuple[str, Callable]:
    """Return (backend name, function) for `op` on `device`."""
    if op not in OPS and op not in FUSED_OPS:
        raise KeyError(f"unknown op {op!r}")
    device_type = torch.device(device).type
    forced = requested_backend()
    if forced is not None:
        module = _load(forced)
        if isinstance(module, Exception):
            raise BackendUnavailable(f"LIFT_BACKEND={forced} cannot load: {module}") from module
        reason = _unsupported(module, device_type)
        if reason is not None:
            raise BackendUnavailable(f"LIFT_BACKEND={forced} cannot run on {device_type} tensors: {reason}")
        fn = getattr(module, op, None)
        if fn is None:
            fn = getattr(_load("reference"), op)
            _warn_once(op, forced, f"backend {forced!r} has no {op}; using the reference op")
            return "reference", fn
        return forced, fn
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        module = _load(name)
        if isinstance(module, Exception):
            if name != "reference":
                _warn_once(op, name, f"{name} backend unavailable ({module}); falling back")
            continue
        reason = _unsupported(module, device_type)
        if reason is not None:
            _warn_once(op, name, f"{name} backend cannot run on {device_type} ({reason}); falling back")
            continue
        fn = getattr(module, op, None)
        if fn is not None:
            return name, fn
    raise BackendUnavailable(f"no backend implements {op}")  # unreachable: reference has all


def _unsupported(module: ModuleType, device_type: str) -> str | None:
    supports = getattr(module, "supports", None)
    return None if supports is None else supports(device_type)


def _warn_once(op: str, backend: str, message: str) -> None:
    key = (op, backend)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lift_engine: {message}", RuntimeWarning, stacklevel=3)


def _dispatching(op: str) -> Callable:
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            if op in FUSED_OPS:  # plain PyTorch: the compiler fuses it itself
                return getattr(_load("reference"), op)(*args, **kwargs)
            from lift_engine.ops import custom_ops  # one opaque node with a fake impl and a backward

            return custom_ops.call(op, *args, **kwargs)
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        _, fn = resolve(op, tensor.device)
        return fn(*args, **kwargs)

    call.__name__ = op
    call.__doc__ = getattr(_load("reference"), op).__doc__
    return call


lora_shrink = _dispatching("lora_shrink")
lora_expand = _dispatching("lora_expand")
lora_linear_delta = _dispatching("lora_linear_delta")
lora_linear = _dispatching("lora_linear")
gated_memory_blend = _dispatching("gated_memory_blend")
gated_memory_attention = _dispatching("gated_memory_attention")
rms_norm = _dispatching("rms_norm")
swiglu = _dispatching("swiglu")
rotary = _dispatching("rotary")
cross_entropy_with_grad_ = _dispatching("cross_entropy_with_grad_")
attention = _dispatching("attention")


# Register torch.ops.lift.* now (vLLM and compiled graphs look them up by name).
from lift_engine.ops import custom_ops as _custom_ops  # noqa: E402,F401
