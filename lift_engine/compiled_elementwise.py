"""Compiled elementwise blocks for tuning: RMSNorm and SwiGLU's silu(gate) · up.

Liger-Kernel's observation (DESIGN.md §9) holds on CPU too: once the GEMMs run at bf16
speed, unfused elementwise ops dominate. HF's RMSNorm is six eager ops (upcast, square,
mean, rsqrt, multiply, downcast, weight) and as many in backward, each a full pass over
memory: on [32, 204, 576] bf16 its forward+backward took 23 ms here, the same function
through torch.compile (inductor's fused C++ loops) 3.6 ms.

    rms_norm(hidden [..., H], weight [H], eps) → [..., H]      HF LlamaRMSNorm's formula
    silu_mul(gate [..., I], up [..., I]) → [..., I]            F.silu(gate) * up

The functions here are the references (exactly HF's eager formulas); `compiled_elementwise`
patches a model's RMSNorm and gated-MLP modules to call their torch.compile'd versions
(dynamic shapes: compiled once per process, ~10 s per function, then reused for every
batch shape) inside the block, and removes the patches on exit. If compiling fails (no
C++ compiler, an unsupported platform) it warns once and the eager references run.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: weight · (h / sqrt(mean(h², -1) + eps)), computed in fp32, rounded to h's dtype."""
    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    return weight * (h32 * torch.rsqrt(variance + eps)).to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) · up."""
    return F.silu(gate) * up


_compiled: dict[tuple, Callable] = {}
_failed: set[Callable] = set()


def _signature(args) -> tuple:
    """What a compiled graph is specialised on: each tensor's dtype, device, rank, last dim, grad flag."""
    return tuple((a.dtype, a.device.type, a.dim(), a.shape[-1], a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _small_like(a):
    """A small stand-in for a call argument: same dtype, device, rank, last dim, grad flag."""
    if not isinstance(a, torch.Tensor):
        return a
    if a.dim() <= 1:
        return a.detach().clone().requires_grad_(a.requires_grad)
    shape = (3,) * (a.dim() - 1) + (a.shape[-1],)
    return torch.randn(shape, dtype=a.dtype, device=a.device).requires_grad_(a.requires_grad)


def _warm_up(compiled: Callable, args) -> None:
    """Forward and backward once on small stand-ins for `args`, so that a compile error (of
    the forward or the backward graph) shows here, where it is caught, not in a training step."""
    out = compiled(*[_small_like(a) for a in args])
    if out.requires_grad:
        out.float().sum().backward()


def _call(fn: Callable, *args):
    """fn's torch.compile'd version (built and warmed up on first use), or fn itself once
    compiling failed."""
    if fn in _failed:
        return fn(*args)
    key = (fn, _signature(args))
    compiled = _compiled.get(key)
    if compiled is None:
        try:
            compiled = torch.compile(fn, dynamic=True)
            _warm_up(compiled, args)
        except Exception as exc:  # no compiler, unsupported backend …: fall back for good
            _failed.add(fn)
            first = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn(f"lift_engine: torch.compile of {fn.__name__} failed ({type(exc).__name__}: {first}); "
                          "using the eager version", RuntimeWarning)
            return fn(*args)
        _compiled[key] = compiled
    return compiled(*args)


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


@contextlib.contextmanager
def compiled_elementwise(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, the model's RMSNorm and silu-gated MLP modules run `rms_norm` and
    `silu_mul` compiled. Yields how many modules were patched (0 when disabled)."""
    patched: list[nn.Module] = []
    try:
        if enabled:
            for module in model.modules():
                if "forward" in module.__dict__:
                    continue  # someone else patched it: leave it alone
                if _is_rms_norm(module):
                    module.forward = _norm_forward(module)
                elif _is_gated_silu_mlp(module):
                    module.forward = _mlp_forward(module)
                else:
                    continue
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def _norm_forward(module: nn.Module) -> Callable:
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return _call(rms_norm, hidden, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module: nn.Module) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(_call(silu_mul, module.gate_proj(x), module.up_proj(x)))
    return forward
