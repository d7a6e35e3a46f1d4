"""The one place where a backend is chosen for every op (docs/DESIGN.md §5.1).

Backends: "reference" (pure PyTorch, always there), "triton", "cuda", "cpu" (C++).
`LIFT_BACKEND` forces one: a backend asked for explicitly that cannot load raises
BackendUnavailable. Without it the choice is automatic by device, falling back to the
reference and saying so once (a warning per op, backend and reason).

A backend is a module exposing some of the op names in OPS with the reference's
signature; ops it lacks fall back to the reference. A backend may also define
`supports(device) -> None | str`: a reason string means its kernels cannot run on that
device (e.g. Triton on CPU without TRITON_INTERPRET=1) — a forced backend then raises
BackendUnavailable with that reason, the automatic choice falls back with a warning.

Inputs a backend's kernels do not take (a dtype, a layout, a device they do not run on):
the backend's function raises `Unsupported` before computing anything, and dispatch runs
the reference op instead, with a warning once per (op, backend, reason) — forced or
automatic alike. A backend never calls the reference op itself. The same holds for the
`<op>_backward` entry points the custom ops use (custom_ops.py, through `call_backend`).

Which op a multi-adapter LoRA layer runs (the fused `lora_linear`, the per-row
`lora_linear_rows`, or base + `lora_linear_delta`) is decided here too: `lora_bank_linear`.

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

from lift_engine.ops.lora_linear_rows import lora_linear_rows

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

# Automatic preference per device type, best first. On CUDA, Triton comes first and
# implements every op the CUDA backend does, so CUDA is reached only when Triton cannot
# load: its kernels measured slower (docs/DESIGN.md §5.5, bench/README.md "Multi-adapter LoRA").
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot be loaded here."""


class Unsupported(Exception):
    """Raised by a backend's op, before it computes anything, when its kernels cannot take
    these inputs; the message is the reason. Dispatch then runs the reference op and warns
    once per (op, backend, reason), so a reason names dtypes or properties, never shapes or
    values."""


_loaded: dict[str, ModuleType | Exception] = {}
_warned: set[tuple[str, str, str]] = set()


def load_backend(name: str) -> ModuleType | Exception:
    """The module of backend `name` (one of BACKENDS), imported once; the exception instead
    when it cannot load here (no compiler, no GPU, …), so callers can say why."""
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
        module = load_backend(forced)
        if isinstance(module, Exception):
            raise BackendUnavailable(f"LIFT_BACKEND={forced} cannot load: {module}") from module
        reason = _unsupported(module, device_type)
        if reason is not None:
            raise BackendUnavailable(f"LIFT_BACKEND={forced} cannot run on {device_type} tensors: {reason}")
        fn = getattr(module, op, None)
        if fn is None:
            fn = getattr(load_backend("reference"), op)
            _warn_once(op, forced, f"backend {forced!r} has no {op}; using the reference op")
            return "reference", fn
        return forced, fn
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        module = load_backend(name)
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


def _warn_once(op: str, backend: str, message: str, stacklevel: int = 3) -> None:
    key = (op, backend, message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lift_engine: {message}", RuntimeWarning, stacklevel=stacklevel)


def call_backend(op: str, backend: str, fn: Callable, fallback: Callable, *args, **kwargs):
    """fn(*args, **kwargs), the function `op` of `backend`; where the backend raises
    Unsupported, fallback(*args, **kwargs) (the reference) after a warning, once per
    (op, backend, reason)."""
    try:
        return fn(*args, **kwargs)
    except Unsupported as exc:
        _warn_once(op, backend, f"the {backend} backend does not take these inputs for {op} ({exc}); "
                                "using the reference", stacklevel=4)
        return fallback(*args, **kwargs)


def _dispatching(op: str) -> Callable:
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            if op in FUSED_OPS:  # plain PyTorch: the compiler fuses it itself
                return getattr(load_backend("reference"), op)(*args, **kwargs)
            from lift_engine.ops import custom_ops  # one opaque node with a fake impl and a backward

            return custom_ops.call(op, *args, **kwargs)
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        backend, fn = resolve(op, tensor.device)
        if backend == "reference":
            return fn(*args, **kwargs)
        return call_backend(op, backend, fn, getattr(load_backend("reference"), op), *args, **kwargs)

    call.__name__ = op
    call.__doc__ = getattr(load_backend("reference"), op).__doc__
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


# ------------------------------------------------ a LoRA bank on a frozen linear: which op
def lora_bank_path(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor | None, *,
                   plain_base: bool = True, fused: bool = True) -> str:
    """The op `lora_bank_linear` runs for these inputs:

    "rows"              lora_linear_rows: one adapter per sequence (indices [B] for x
                        [B, S, in]) and either a bank in another dtype than x (fp32 master
                        weights under a bf16 base) or low precision on CPU, where the C++
                        kernels are fp32 only and the reference's per-token gather is slow;
    "lora_linear"       ops.lora_linear, base + LoRA in one op: x, W and the bank in one
                        dtype (no casts);
    "lora_linear_delta" base(x) + ops.lora_linear_delta on x cast to the bank's dtype: a
                        base that is not a plain linear, x in another dtype than W, or
                        fused=False.

    The first two compute F.linear(x, W, bias) themselves, so they need `plain_base`.
    """
    if fused and plain_base and x.dtype == weight.dtype:
        if (indices is not None and indices.dim() == 1 and x.dim() == 3 and indices.shape[0] == x.shape[0]
                and (x.dtype != lora_a.dtype or (x.device.type == "cpu" and x.dtype != torch.float32))):
            return "rows"
        if x.dtype == lora_a.dtype:
            return "lora_linear"
    return "lora_linear_delta"


def lora_bank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: torch.Tensor, context, *,
                     base: Callable[[torch.Tensor], torch.Tensor], plain_base: bool, fused: bool = True) -> torch.Tensor:
    """A frozen linear plus a bank of LoRA adapters selected per token (adapters/lora.py).

    x: [..., in] (leading dims [B, S] or [B]); weight [out, in], bias [out] | None: the base's;
    lora_a [N, r, in], lora_b [N, out, r], scaling [N]; context: the AdapterContext (its
    `indices` as set, and `token_indices`, which caches the flat index per batch shape);
    base: the base layer's forward; plain_base: base(x) is exactly F.linear(x, weight, bias)
    (an nn.Linear without hooks); fused: False keeps base(x) + lora_linear_delta
    → [..., out]. The op is chosen by `lora_bank_path`; each then picks its backend here.
    """
    if not context.active:
        return base(x)
    indices = context.indices
    path = lora_bank_path(x, weight, lora_a, indices, plain_base=plain_base, fused=fused)
    if path == "rows":
        return lora_linear_rows(x, weight, bias, lora_a, lora_b, scaling, indices.to(x.device))
    in_features = lora_a.shape[2]
    batch = x.shape[0] if x.dim() > 1 else 1
    seq = x.numel() // in_features // batch
    idx = context.token_indices(batch, seq, device=x.device)
    if path == "lora_linear":  # on the reference/C++ backends the same graph as below (reference/lora_linear.py)
        return lora_linear(x, weight, bias, lora_a, lora_b, scaling, idx)
    y = base(x)
    flat = x.reshape(-1, in_features)
    delta = lora_linear_delta(flat.to(lora_a.dtype), lora_a, lora_b, scaling, idx)
    return y + delta.to(y.dtype).view(*x.shape[:-1], lora_b.shape[1])

# Register torch.ops.lift.* now (vLLM and compiled graphs look them up by name).
from lift_engine.ops import custom_ops as _custom_ops  # noqa: E402,F401
