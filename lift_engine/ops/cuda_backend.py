"""CUDA backend (csrc/cuda, extension lift_engine._C_cuda): multi-adapter LoRA shrink /
expand / delta, forward and backward, and the Gated-Memory epilogue forward (docs/DESIGN.md §5.5).

Importing this module raises ImportError when the extension is not built (it is built only
with nvcc and a CUDA build of torch); `supports("cuda")` says when no GPU is visible.

The kernels (csrc/cuda/*.cu, plain CUDA C++) group tokens by adapter into tiles of 32, one
token per lane, so each weight element read serves a tile (SGMV-style); the grouping is a
"tile plan" built here on the device with torch ops and no host synchronisation:

    bins      b = adapter_idx + 1 (bin 0: no adapter)
    order     tokens sorted by bin (stable)                           int32 [T]
    bin_off   bin b's tokens are order[bin_off[b] : bin_off[b+1]]     int32 [N + 2]
    tile_off  bin b owns tiles tile_off[b] .. tile_off[b+1] − 1       int32 [N + 2]

Kernels run on the current stream. Inputs are float32, float16 or bfloat16 (one dtype per
call; `scaling` is used in float32); accumulation is float32. Other inputs make the
functions raise dispatch.Unsupported, and dispatch runs the reference op (saying so
once). The one host sync per call is the adapter-index range check the reference also
does (IndexError on a bad index).

Gradients: LoRA backward runs on CUDA kernels too (dx, dh: the same tiled kernels with
transposed weight strides; dA, dB: per-tile outer products added atomically in float32).
The Gated-Memory epilogue's backward — training only; serving needs the forward — uses the
exact PyTorch formula of custom_ops.py on the GPU.
"""
from __future__ import annotations

import torch

from lift_engine.ops.native import load
from lift_engine.ops.dispatch import Unsupported

_C = load("cuda")  # ImportError with the reason when not built

TILE = int(_C.tile)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(device_type: str) -> str | None:
    """dispatch.py hook: None when the kernels can run on `device_type`, else the reason."""
    if device_type != "cuda":
        return "the CUDA kernels run on CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_kernel(*tensors: torch.Tensor) -> None:
    """Unsupported unless all tensors are CUDA tensors of one dtype among _DTYPES."""
    if not all(t.is_cuda for t in tensors):
        raise Unsupported("tensors not on a CUDA device")
    found = sorted({_dtype_name(t.dtype) for t in tensors})
    if len(found) > 1:
        raise Unsupported(f"mixed dtypes {', '.join(found)}")
    if tensors[0].dtype not in _DTYPES:
        raise Unsupported(f"{found[0]} inputs (the kernels take {', '.join(map(_dtype_name, _DTYPES))})")


def _check_tokens(x: torch.Tensor, idx: torch.Tensor, n_adapters: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected tokens flattened to [T, features], got shape {tuple(x.shape)}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={x.shape[0]}, got {tuple(idx.shape)}")
    _check_range(idx, n_adapters)


def _check_range(idx: torch.Tensor, n_adapters: int) -> None:
    if idx.numel() and int(idx.max()) >= n_adapters:  # the one host sync, as in the reference
        raise IndexError(f"adapter index {int(idx.max())} out of range for a bank of {n_adapters}")


class Plan:
    """Tile plan of one call (see the module docstring); built on the device, no sync."""

    def __init__(self, adapter_idx: torch.Tensor, n_adapters: int, device: torch.device):
        idx = adapter_idx.to(device=device, dtype=torch.int64)
        bins = idx.clamp(min=-1) + 1
        sorted_bins, order = torch.sort(bins, stable=True)
        edges = torch.arange(n_adapters + 2, device=device, dtype=torch.int64)
        bin_off = torch.searchsorted(sorted_bins, edges)
        tiles = (bin_off[1:] - bin_off[:-1] + TILE - 1) // TILE
        tile_off = torch.zeros(n_adapters + 2, device=device, dtype=torch.int64)
        tile_off[1:] = torch.cumsum(tiles, 0)
        self.order = order.to(torch.int32)
        self.bin_off = bin_off.to(torch.int32)
        self.tile_off = tile_off.to(torch.int32)
        # Upper bound of tiles: every bin adds at most one partial tile.
        self.max_tiles = (idx.shape[0] + TILE - 1) // TILE + n_adapters + 1
        self.device = torch.device(device)

    def launch(self, kernel, *args) -> None:
        """kernel(*args, plan..., stream) on the plan's device and its current stream."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            kernel(*args, self.order, self.bin_off, self.tile_off, self.max_tiles, stream)


# ---------------------------------------------------------------- launchers


def _shrink(x, lora_a, plan, out=None):
    """h [T, r] = x · A[a]ᵀ."""
    n, r, fin = lora_a.shape
    h = out if out is not None else x.new_empty(x.shape[0], r)
    plan.launch(_C.reduce_k, x, lora_a, r * fin, fin, 1, None, h)
    return h


def _expand(h, lora_b, scaling, plan):
    """y [T, out] = s[a] · h · B[a]ᵀ."""
    n, fout, r = lora_b.shape
    y = h.new_empty(h.shape[0], fout)
    plan.launch(_C.wide_out, h, lora_b, fout * r, r, 1, scaling, y)
    return y


def _shrink_dx(dh, lora_a, plan):
    """dx [T, in] = dh · A[a]."""
    n, r, fin = lora_a.shape
    dx = dh.new_empty(dh.shape[0], fin)
    plan.launch(_C.wide_out, dh, lora_a, r * fin, 1, fin, None, dx)
    return dx


def _expand_dh(dy, lora_b, scaling, plan):
    """dh [T, r] = s[a] · dy · B[a]."""
    n, fout, r = lora_b.shape
    dh = dy.new_empty(dy.shape[0], r)
    plan.launch(_C.reduce_k, dy, lora_b, fout * r, 1, r, scaling, dh)
    return dh


def _outer(u, v, n_adapters, plan):
    """float32 [N, P, Q] = Σ_t u[t]ᵀ v[t] per adapter."""
    dw = torch.zeros(n_adapters, u.shape[1], v.shape[1], device=u.device, dtype=torch.float32)
    plan.launch(_C.outer, u, v, dw)
    return dw


def _lora_backward(dy, x, h, lora_a, lora_b, scaling, plan, needs):
    """Gradients of y = s · (x Aᵀ) Bᵀ; h = x Aᵀ may be None (shrink/expand alone pass what they have)."""
    need_dx, need_da, need_db, need_ds = needs
    n = lora_b.shape[0]
    dx = da = db = ds = None
    if need_db or need_ds:
        db_raw_t = _outer(h, dy, n, plan)  # Σ hᵀ dy = (Σ dyᵀ h)ᵀ  [N, r, out]
        db_raw = db_raw_t.transpose(1, 2)
        if need_db:
            db = (db_raw * scaling.view(-1, 1, 1)).to(lora_b.dtype)
        if need_ds:
            ds = (db_raw * lora_b.float()).sum(dim=(1, 2))
    if need_dx or need_da:
        dh = _expand_dh(dy, lora_b, scaling, plan)
        if need_dx:
            dx = _shrink_dx(dh, lora_a, plan)
        if need_da:
            da = _outer(dh, x, n, plan).to(lora_a.dtype)
    return dx, da, db, ds


# ---------------------------------------------------------------- autograd functions


class _LoraShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, adapter_idx):
        plan = Plan(adapter_idx, lora_a.shape[0], x.device)
        ctx.save_for_backward(x, lora_a)
        ctx.plan = plan
        return _shrink(x, lora_a, plan)

    @staticmethod
    def backward(ctx, dh):
        x, lora_a = ctx.saved_tensors
        dh = dh.contiguous()
        dx = _shrink_dx(dh, lora_a, ctx.plan) if ctx.needs_input_grad[0] else None
        da = _outer(dh, x, lora_a.shape[0], ctx.plan).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        return dx, da, None


class _LoraExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, lora_b, scaling, adapter_idx):
        plan = Plan(adapter_idx, lora_b.shape[0], h.device)
        ctx.save_for_backward(h, lora_b, scaling)
        ctx.plan = plan
        return _expand(h, lora_b, scaling, plan)

    @staticmethod
    def backward(ctx, dy):
        h, lora_b, scaling = ctx.saved_tensors
        dy = dy.contiguous()
        need_dh, need_db, need_ds = ctx.needs_input_grad[:3]
        dh = _expand_dh(dy, lora_b, scaling, ctx.plan) if need_dh else None
        _, _, db, ds = _lora_backward(dy, None, h, None, lora_b, scaling, ctx.plan, (False, False, need_db, need_ds))
        return dh, db, ds, None


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, adapter_idx):
        plan = Plan(adapter_idx, lora_a.shape[0], x.device)
        h = _shrink(x, lora_a, plan)
        ctx.save_for_backward(x, h, lora_a, lora_b, scaling)
        ctx.plan = plan
        return _expand(h, lora_b, scaling, plan)

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_a, lora_b, scaling = ctx.saved_tensors
        grads = _lora_backward(dy.contiguous(), x, h, lora_a, lora_b, scaling, ctx.plan, ctx.needs_input_grad[:4])
        return (*grads, None)


class _GatedMemoryBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, q, w1, w2, w3, w4, adapter_idx):
        plan = Plan(adapter_idx, w1.shape[0], q.device)
        out = torch.empty_like(q)
        plan.launch(_C.gated_memory_fwd, attn_out, q, w1, w2, w3, w4, out)
        if any(ctx.needs_input_grad[:6]):
            ctx.save_for_backward(attn_out, q, w1, w2, w3, w4, adapter_idx)
        return out

    @staticmethod
    def backward(ctx, dout):
        from lift_engine.ops.custom_ops import ref_gated_memory_blend_backward

        attn_out, q, w1, w2, w3, w4, adapter_idx = ctx.saved_tensors
        grads = ref_gated_memory_blend_backward(dout, attn_out, q, w1, w2, w3, w4, adapter_idx,
                                                tuple(ctx.needs_input_grad[:6]))
        return (*grads, None)


# ---------------------------------------------------------------- public functions


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _scaling(scaling: torch.Tensor, device) -> torch.Tensor:
    return scaling.to(device=device, dtype=torch.float32).contiguous()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    """x: [T, in], lora_a: [N, r, in], adapter_idx: [T] int64 → [T, r] (0 where adapter_idx < 0)."""
    _require_kernel(x, lora_a)
    _check_tokens(x, adapter_idx, lora_a.shape[0])
    return _LoraShrink.apply(_c(x), _c(lora_a), adapter_idx)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    """h: [T, r], lora_b: [N, out, r], scaling: [N], adapter_idx: [T] → [T, out] = s[a] · h B[a]ᵀ."""
    _require_kernel(h, lora_b)
    _check_tokens(h, adapter_idx, lora_b.shape[0])
    return _LoraExpand.apply(_c(h), _c(lora_b), _scaling(scaling, h.device), adapter_idx)


def lora_linear_delta(x, lora_a, lora_b, scaling, adapter_idx):
    """x: [T, in], lora_a: [N, r, in], lora_b: [N, out, r], scaling: [N], adapter_idx: [T] → [T, out]."""
    _require_kernel(x, lora_a, lora_b)
    _check_tokens(x, adapter_idx, lora_a.shape[0])
    return _LoraDelta.apply(_c(x), _c(lora_a), _c(lora_b), _scaling(scaling, x.device), adapter_idx)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_idx):
    """F.linear(x, weight, bias) (cuBLAS) + the delta above on x as [T, in]: x [..., in],
    weight [out, in], bias [out] | None, lora_a [N, r, in], lora_b [N, out, r], scaling [N],
    adapter_idx [T] → [..., out]."""
    _require_kernel(x, lora_a, lora_b)  # before the base GEMM: what the delta below takes
    y = torch.nn.functional.linear(x, weight, bias)
    return y + lora_linear_delta(x.reshape(-1, x.shape[-1]), lora_a, lora_b, scaling, adapter_idx).view(y.shape)


def gated_memory_blend(attn_out, q, w1, w2, w3, w4, adapter_idx):
    """attn_out, q: [T, H, d]; w1 [N,H,2d,d], w2 [N,H,d,2d], w3 [N,H,s,d], w4 [N,H,1,s]; adapter_idx [T] → [T, H, d]."""
    _require_kernel(attn_out, q, w1, w2, w3, w4)
    if attn_out.shape != q.shape or attn_out.dim() != 3:
        raise ValueError(f"attn_out {tuple(attn_out.shape)} and q {tuple(q.shape)} must both be [T, H, d]")
    if adapter_idx.shape != (q.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={q.shape[0]}, got {tuple(adapter_idx.shape)}")
    _check_range(adapter_idx, w1.shape[0])
    return _GatedMemoryBlend.apply(*[_c(t) for t in (attn_out, q, w1, w2, w3, w4)], adapter_idx)


# ------------------------------------------- backward entry points for custom_ops.py


def lora_shrink_backward(dh, x, lora_a, adapter_idx, needs=(True, True)):
    _require_kernel(x, lora_a)
    plan = Plan(adapter_idx, lora_a.shape[0], x.device)
    dh, x, lora_a = _c(dh.to(x.dtype)), _c(x), _c(lora_a)
    dx = _shrink_dx(dh, lora_a, plan) if needs[0] else None
    da = _outer(dh, x, lora_a.shape[0], plan).to(lora_a.dtype) if needs[1] else None
    return dx, da


def lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, needs=(True, True, True)):
    _require_kernel(h, lora_b)
    plan = Plan(adapter_idx, lora_b.shape[0], h.device)
    dy, h, lora_b, s = _c(dy.to(h.dtype)), _c(h), _c(lora_b), _scaling(scaling, h.device)
    dh = _expand_dh(dy, lora_b, s, plan) if needs[0] else None
    _, _, db, ds = _lora_backward(dy, None, h, None, lora_b, s, plan, (False, False, needs[1], needs[2]))
    return dh, db, ds


def lora_linear_delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, needs=(True,) * 4):
    _require_kernel(x, lora_a, lora_b)
    plan = Plan(adapter_idx, lora_a.shape[0], x.device)
    x, lora_a, lora_b, s = _c(x), _c(lora_a), _c(lora_b), _scaling(scaling, x.device)
    h = _shrink(x, lora_a, plan)
    return _lora_backward(_c(dy.to(x.dtype)), x, h, lora_a, lora_b, s, plan, tuple(needs))


#: Every kernel-backed op (tests use this).
IMPLEMENTED = {
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "lora_linear_delta": lora_linear_delta,
    "gated_memory_blend": gated_memory_blend,
}
