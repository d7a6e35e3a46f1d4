"""Shared launch helpers and the SGMV segment metadata (not an op of its own).

Segment metadata (as in Punica/vLLM SGMV): the tokens of a batch are sorted by adapter
with a stable sort, so the tokens of adapter n form one contiguous run of `token_order`:

    token_order[seg_start[i] : seg_start[i] + seg_len[i]]  = the tokens with idx == seg_adapter[i]

Only adapters that occur get a segment, and tokens with idx == -1 get none (they
contribute nothing). Kernels gather rows through `token_order`, so x is never permuted
in memory. Building it costs one device→host copy of N+1 counts; the result is cached on
the adapter_idx tensor (invalidated when the tensor is modified in place), so every LoRA
layer of a step, forward and backward, shares one build.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)  # decided when this module was imported

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FLOAT_DTYPES = tuple(_TL_DTYPES)


def check_runnable(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device can run these kernels."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "lift_engine Triton kernels got CPU tensors but were not built for the Triton "
            "interpreter: set TRITON_INTERPRET=1 before triton is imported "
            "(or call lift_engine.kernels.ensure_interpreter() first)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on cuda (or cpu interpreted), not {device.type}")
    return device


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (like the activations)")


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot. The interpreter's dot multiplies bf16 bit patterns as
    integers (triton 3.9 create_dot runs np.matmul on the uint16 storage), so interpreted
    runs upcast dot operands to fp32 — exact for bf16/fp16 values, fp32 accumulation as
    on tensor cores."""
    return tl.float32 if INTERPRETED else _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 products (torch's default matmul), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block(n: int, lo: int = 16, hi: int = 128) -> int:
    """Power-of-two block covering n, clamped to [lo, hi] (tl.dot needs ≥ 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


_OVERRIDES: dict | None = None


def gpu_config(name: str, defaults: dict) -> dict:
    """Launch configuration `name` for compiled (GPU) runs: `defaults`, updated from the
    JSON object LIFT_TRITON_CONFIG (e.g. '{"blend_bwd": {"BLOCK_E": 16, "num_warps": 8}}')
    — for tuning on a GPU without editing code. Interpreted runs ignore it."""
    global _OVERRIDES
    if _OVERRIDES is None:
        import json
        import os

        _OVERRIDES = json.loads(os.environ.get("LIFT_TRITON_CONFIG", "") or "{}")
    return {**defaults, **_OVERRIDES.get(name, {})}


@dataclass(frozen=True)
class SegmentMeta:
    """SGMV metadata for one adapter_idx (see module docstring). Device tensors are int32."""

    token_order: torch.Tensor  # [T]
    seg_adapter: torch.Tensor  # [A]
    seg_start: torch.Tensor  # [A]
    seg_len: torch.Tensor  # [A]
    num_segments: int  # A (host)
    max_len: int  # longest segment (host)
    num_tokens: int  # T
    num_adapters: int  # N, size of the bank it was checked against
    num_assigned: int  # tokens with an adapter
    includes_none: bool = False  # tokens with -1 form a segment too (seg_adapter = -1)


_META_ATTR = "_lift_sgmv_meta"


def build_segments(adapter_idx: torch.Tensor, num_adapters: int, include_none: bool = False) -> SegmentMeta:
    """Segments of `adapter_idx` ([T] integer, -1 = no adapter) for a bank of `num_adapters`.
    include_none: tokens with -1 also form a segment (seg_adapter = -1), for kernels that
    must visit every token (the fused base + LoRA projection)."""
    if adapter_idx.dim() != 1:
        raise ValueError(f"adapter_idx must be [T], got shape {tuple(adapter_idx.shape)}")
    if adapter_idx.dtype.is_floating_point or adapter_idx.dtype == torch.bool:
        raise TypeError(f"adapter_idx must be an integer tensor, got {adapter_idx.dtype}")
    cached = getattr(adapter_idx, _META_ATTR + ("_all" if include_none else ""), None)
    key = (adapter_idx._version, num_adapters, include_none)
    if cached is not None and cached[0] == key:
        return cached[1]
    device = adapter_idx.device
    idx = adapter_idx.to(torch.int64)
    num_tokens = idx.numel()
    if num_tokens:
        lo, hi = torch.aminmax(idx)
        counts = torch.bincount((idx + 1).clamp(min=0), minlength=num_adapters + 1)
        host = torch.cat([torch.stack([lo, hi]), counts]).cpu()  # the one device→host sync
        lo, hi, counts_host = int(host[0]), int(host[1]), host[2:]
        if lo < -1:
            raise IndexError(f"adapter index {lo} is invalid (-1 means no adapter)")
        if hi >= num_adapters:
            raise IndexError(f"adapter index {hi} out of range for a bank of {num_adapters}")
        order = torch.sort(idx, stable=True).indices.to(torch.int32)
    else:
        counts_host = torch.zeros(num_adapters + 1, dtype=torch.int64)
        order = torch.zeros(0, dtype=torch.int32, device=device)
    starts = torch.cumsum(counts_host, 0) - counts_host
    first = 0 if include_none else 1
    active = torch.nonzero(counts_host[first:]).flatten() + first  # positions in counts (adapter + 1)
    seg = torch.stack([active - 1, starts[active], counts_host[active]]).to(torch.int32)
    seg = seg.to(device)
    meta = SegmentMeta(
        token_order=order,
        seg_adapter=seg[0],
        seg_start=seg[1],
        seg_len=seg[2],
        num_segments=int(active.numel()),
        max_len=int(counts_host[first:].max()) if counts_host[first:].numel() else 0,
        num_tokens=num_tokens,
        num_adapters=num_adapters,
        num_assigned=int(counts_host[1:].sum()),
        includes_none=include_none,
    )
    try:
        setattr(adapter_idx, _META_ATTR + ("_all" if include_none else ""), (key, meta))
    except (AttributeError, RuntimeError):  # e.g. tensor subclasses that refuse attributes
        pass
    return meta


def check_adapter_idx(adapter_idx: torch.Tensor, num_tokens: int, num_adapters: int) -> None:
    """Cheap checks without a device sync (the decode path): shape and dtype only."""
    if adapter_idx.shape != (num_tokens,):
        raise ValueError(f"adapter_idx must be [T]={num_tokens}, got {tuple(adapter_idx.shape)}")
    if adapter_idx.dtype.is_floating_point or adapter_idx.dtype == torch.bool:
        raise TypeError(f"adapter_idx must be an integer tensor, got {adapter_idx.dtype}")


def check_ranks(ranks: torch.Tensor | None, num_adapters: int, max_rank: int, device) -> torch.Tensor | None:
    """Optional per-adapter ranks [N] (1..R): rows/columns at or past ranks[n] are ignored."""
    if ranks is None:
        return None
    if ranks.shape != (num_adapters,):
        raise ValueError(f"ranks must be [N]={num_adapters}, got {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point:
        raise TypeError("ranks must be an integer tensor")
    ranks = ranks.to(device=device, dtype=torch.int32)
    return ranks


@triton.jit
def silu_and_grad(x):
    """x fp32 → (silu(x), silu'(x))."""
    s = 1.0 / (1.0 + tl.exp(-x))
    return x * s, s * (1.0 + x * (1.0 - s))


@triton.jit
def sigmoid_f32(x):
    return 1.0 / (1.0 + tl.exp(-x))
