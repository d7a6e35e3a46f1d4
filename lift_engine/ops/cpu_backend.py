"""C++ CPU backend (csrc/cpu, extension lift_engine._C_cpu): multi-adapter LoRA and the
Gated-Memory epilogue, forward and backward, grouped by adapter (docs/DESIGN.md §5.3); and the
fused elementwise ops of a training step — RMSNorm, SwiGLU, RoPE, cross entropy with
its gradient — in fp32 or bf16 (see the section "fused elementwise ops" below); and bf16
attention on AMX (section "attention").

Importing this module raises ImportError when the extension is not built; dispatch.py
then falls back to the reference and says so once. Inputs a kernel does not take make
its function raise dispatch.Unsupported (the reason: dtype, device, layout), and
dispatch runs the reference op instead, saying so once; this module never calls the
reference ops itself.

How the kernels work (csrc/cpu/*.cpp): the adapter index is turned once per call into a
plan — tokens sorted by adapter (stable counting sort, -1 dropped) and cut into blocks of
at most BLOCK tokens of one adapter. Each block runs as one task on an OpenMP thread: a
block of consecutive rows is used in place, any other is gathered into a cache-resident
buffer; the per-adapter GEMMs are single-threaded BLAS calls on the block (torch's MKL
`sgemm_`), the elementwise parts (SiLU, gate, blend) vectorised loops in the same task.
Weight gradients go to one private slot per range of blocks and are reduced per adapter,
so no two threads write the same memory. The Gated-Memory backward reuses the forward's
pre-activations (saved only when a gradient is needed).

The LoRA and Gated-Memory kernels are fp32. float16/bfloat16 inputs are refused (so they
run the reference op) unless LIFT_CPU_LOW_PRECISION=1 (or `LOW_PRECISION = True`), which
casts them to fp32 around the kernels (autograd casts the gradients back): measured on
this machine, eager bf16 (oneDNN, AMX) beats that cast path with one adapter, and loses
to it with 16 (see bench/README.md). float64 and non-CPU tensors are always refused.

Which ops are exposed (the names dispatch.py looks up) is decided by measurement: an op
is exposed only where the C++ path beats PyTorch eager on this machine (issue 3 target
≥ 1.5×; see bench/README.md and bench/bench_cpu_ops.py). `IMPLEMENTED` holds every
kernel-backed function, exposed or not, so tests cover all of them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lift_engine.ops.native import load
from lift_engine.ops.dispatch import Unsupported
from lift_engine.ops.reference.attention import check_attention
from lift_engine.ops.reference.cross_entropy_with_grad import check_cross_entropy
from lift_engine.ops.reference.lora_linear import check_linear
from lift_engine.ops.reference.rms_norm import check_rms_norm
from lift_engine.ops.reference.rotary import check_rotary
from lift_engine.ops.reference.swiglu import check_swiglu

_C = load("cpu")  # ImportError with the reason when not built

#: Tokens per block (one task): fits the gathered rows of a block in L2 at these widths.
BLOCK = int(os.environ.get("LIFT_CPU_BLOCK", "128"))

#: Route float16/bfloat16 through the fp32 kernels (see the module docstring).
LOW_PRECISION = os.environ.get("LIFT_CPU_LOW_PRECISION", "0") == "1"
_LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def supports(device_type: str) -> str | None:
    """dispatch.py hook: None when the kernels can run on `device_type`, else the reason."""
    return None if device_type == "cpu" else "the C++ CPU kernels run on CPU tensors only"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_cpu_tensors_of(dtypes, *tensors: torch.Tensor, hint: str = "") -> None:
    """Unsupported unless all tensors are on the CPU, in one dtype, which is one of `dtypes`."""
    if any(t.device.type != "cpu" for t in tensors):
        raise Unsupported("tensors not on the CPU")
    found = sorted({_dtype_name(t.dtype) for t in tensors})
    if len(found) > 1:
        raise Unsupported(f"mixed dtypes {', '.join(found)}")
    if tensors[0].dtype not in dtypes:
        raise Unsupported(f"{found[0]} inputs (the kernels take {', '.join(map(_dtype_name, dtypes))}){hint}")


def _require_kernel(*tensors: torch.Tensor) -> None:
    """The LoRA and Gated-Memory kernels' dtypes: float32, and bf16/fp16 under LOW_PRECISION."""
    hint = "" if LOW_PRECISION else "; LIFT_CPU_LOW_PRECISION=1 runs bfloat16/float16 on float32 copies"
    _require_cpu_tensors_of((torch.float32, *(_LOW_PRECISION_DTYPES if LOW_PRECISION else ())), *tensors, hint=hint)


def _require_cpu(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise Unsupported(f"{name} not on the CPU")


def _check_tokens(x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected tokens flattened to [T, features], got shape {tuple(x.shape)}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={x.shape[0]}, got {tuple(idx.shape)}")


def token_plan(adapter_idx: torch.Tensor, n_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' plan for an adapter index [T] (-1: no adapter): (order [n_valid],
    blocks [n_blocks, 3]). IndexError for an index >= n_adapters. Built by every op below
    per call; a caller running many layers over one batch builds it once (lora_delta_planned)."""
    return _C.plan(adapter_idx.detach().cpu(), n_adapters, BLOCK)


#: This build of the extension has what lora_delta_planned needs (an older one may not).
HAS_PLANNED_DELTA = all(hasattr(_C, f) for f in ("plan", "delta_fwd", "shrink_fwd", "expand_fwd"))


def lora_delta_planned(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                       plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forward only (no autograd), fp32, with a prebuilt token_plan:
    y[t] = scaling[n] · (x[t] @ lora_a[n]ᵀ) @ lora_b[n]ᵀ for the adapter n of token t, 0 for
    tokens without one. x [T, in], lora_a [N, r, in], lora_b [N, out, r], scaling [N] → [T, out]."""
    order, blocks = plan
    y, _ = _C.delta_fwd(x, lora_a, lora_b, scaling, order, blocks)
    return y


def lora_shrink_planned(x: torch.Tensor, lora_a: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forward only, fp32, with a prebuilt token_plan: h[t] = x[t] @ lora_a[n]ᵀ for the
    adapter n of token t, 0 for tokens without one. x [T, in], lora_a [N, r, in] → [T, r]."""
    order, blocks = plan
    return _C.shrink_fwd(x, lora_a, order, blocks)


def lora_expand_planned(h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                        plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forward only, fp32, with a prebuilt token_plan: y[t] = scaling[n] · h[t] @ lora_b[n]ᵀ
    for the adapter n of token t, 0 for tokens without one. h [T, r], lora_b [N, out, r],
    scaling [N] → [T, out]."""
    order, blocks = plan
    return _C.expand_fwd(h, lora_b, scaling, order, blocks)


def _scaling_grads(d_b_raw: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, need_ds: bool):
    """dB = s · Σ dyᵀh and d s = Σ (Σ dyᵀh) ⊙ B, from the kernel's unscaled sum."""
    d_b = d_b_raw * scaling.view(-1, 1, 1)
    d_s = (d_b_raw * lora_b).sum(dim=(1, 2)) if need_ds else None
    return d_b, d_s


# ---------------------------------------------------------------- autograd functions


class _LoraShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, adapter_idx):
        order, blocks = token_plan(adapter_idx, lora_a.shape[0])
        ctx.save_for_backward(x, lora_a, order, blocks)
        return _C.shrink_fwd(x, lora_a, order, blocks)

    @staticmethod
    def backward(ctx, dh):
        x, lora_a, order, blocks = ctx.saved_tensors
        need_dx, need_da = ctx.needs_input_grad[:2]
        dx, da = _C.shrink_bwd(dh, x, lora_a, order, blocks, need_dx, need_da)
        return dx, da, None


class _LoraExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, lora_b, scaling, adapter_idx):
        order, blocks = token_plan(adapter_idx, lora_b.shape[0])
        ctx.save_for_backward(h, lora_b, scaling, order, blocks)
        return _C.expand_fwd(h, lora_b, scaling, order, blocks)

    @staticmethod
    def backward(ctx, dy):
        h, lora_b, scaling, order, blocks = ctx.saved_tensors
        need_dh, need_db, need_ds = ctx.needs_input_grad[:3]
        dh, d_b_raw = _C.expand_bwd(dy, h, lora_b, scaling, order, blocks, need_dh, need_db or need_ds)
        d_b = d_s = None
        if d_b_raw is not None:
            d_b, d_s = _scaling_grads(d_b_raw, lora_b, scaling, need_ds)
        return dh, (d_b if need_db else None), d_s, None


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, adapter_idx):
        order, blocks = token_plan(adapter_idx, lora_a.shape[0])
        y, h = _C.delta_fwd(x, lora_a, lora_b, scaling, order, blocks)
        ctx.save_for_backward(x, h, lora_a, lora_b, scaling, order, blocks)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_a, lora_b, scaling, order, blocks = ctx.saved_tensors
        need_dx, need_da, need_db, need_ds = ctx.needs_input_grad[:4]
        dx, da, d_b_raw = _C.delta_bwd(dy, x, h, lora_a, lora_b, scaling, order, blocks,
                                       need_dx, need_da, need_db or need_ds)
        d_b = d_s = None
        if d_b_raw is not None:
            d_b, d_s = _scaling_grads(d_b_raw, lora_b, scaling, need_ds)
        return dx, da, (d_b if need_db else None), d_s, None


class _GatedMemoryBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, q, w1, w2, w3, w4, adapter_idx):
        order, blocks = token_plan(adapter_idx, w1.shape[0])
        save = any(ctx.needs_input_grad[:6])
        out, pre1, mem, p3, gate = _C.gm_fwd(attn_out, q, w1, w2, w3, w4, order, blocks, save)
        if save:
            ctx.save_for_backward(attn_out, q, w1, w2, w3, w4, pre1, mem, p3, gate, order, blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        attn_out, q, w1, w2, w3, w4, pre1, mem, p3, gate, order, blocks = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_attn, dq, dw1, dw2, dw3, dw4 = _C.gm_bwd(dout, attn_out, q, w1, w2, w3, w4, pre1, mem, p3, gate,
                                                   order, blocks, needs[1], any(needs[2:6]))
        grads = [d_attn, dq, dw1, dw2, dw3, dw4]
        return (*[g if need else None for g, need in zip(grads, needs[:6])], None)


# ---------------------------------------------------------------- public functions


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    """x: [T, in], lora_a: [N, r, in], adapter_idx: [T] int64 → [T, r].

    h[t] = x[t] @ lora_a[adapter_idx[t]].T, 0 where adapter_idx[t] < 0.
    """
    _require_kernel(x, lora_a)
    _check_tokens(x, adapter_idx)
    return _LoraShrink.apply(_f32(x), _f32(lora_a), adapter_idx).to(x.dtype)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    """h: [T, r], lora_b: [N, out, r], scaling: [N] float, adapter_idx: [T] → [T, out].

    y[t] = scaling[a] · h[t] @ lora_b[a].T with a = adapter_idx[t]; 0 where a < 0.
    """
    _require_kernel(h, lora_b)
    _require_cpu(scaling, "scaling")
    _check_tokens(h, adapter_idx)
    return _LoraExpand.apply(_f32(h), _f32(lora_b), _f32(scaling), adapter_idx).to(h.dtype)


def lora_linear_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """expand(shrink(x)) in one pass over the blocks (h never leaves the block's cache).

    x: [T, in], lora_a: [N, r, in], lora_b: [N, out, r], scaling: [N], adapter_idx: [T] → [T, out].
    """
    _require_kernel(x, lora_a, lora_b)
    _require_cpu(scaling, "scaling")
    _check_tokens(x, adapter_idx)
    return _LoraDelta.apply(_f32(x), _f32(lora_a), _f32(lora_b), _f32(scaling), adapter_idx).to(x.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """F.linear(x, weight, bias) + lora_linear_delta(x as [T, in], …): torch's GEMM for the
    frozen base (nothing to gain there) and the C++ delta above for the LoRA term — the same
    two calls, on the same tensors, that an unfused LoRA layer makes on this backend, so
    output and gradients are bit for bit that (see reference/lora_linear.py).

    x: [..., in] (T tokens), weight: [out, in], bias: [out] | None, lora_a: [N, r, in],
    lora_b: [N, out, r], scaling: [N], adapter_idx: [T] → [..., out].
    """
    check_linear(x, weight, lora_b)
    _require_kernel(x, lora_a, lora_b)  # before the base GEMM: what the delta below takes
    _require_cpu(scaling, "scaling")
    y = F.linear(x, weight, bias)
    return y + lora_linear_delta(x.reshape(-1, x.shape[-1]), lora_a, lora_b, scaling, adapter_idx).view(y.shape)


def gated_memory_blend(
    attn_out: torch.Tensor,
    q: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    w4: torch.Tensor,
    adapter_idx: torch.Tensor,
) -> torch.Tensor:
    """attn_out, q: [T, H, d]; w1 [N,H,2d,d], w2 [N,H,d,2d], w3 [N,H,s,d], w4 [N,H,1,s]; adapter_idx [T] → [T, H, d].

    out = (1 − g) · attn + g · W2 silu(W1 q), g = σ(3 (w4 · silu(W3 q) − 1)), per token's adapter;
    tokens with adapter_idx < 0 pass attn_out through.
    """
    _require_kernel(attn_out, q, w1, w2, w3, w4)
    if attn_out.shape != q.shape or attn_out.dim() != 3:
        raise ValueError(f"attn_out {tuple(attn_out.shape)} and q {tuple(q.shape)} must both be [T, H, d]")
    if adapter_idx.shape != (q.shape[0],):
        raise ValueError(f"adapter_idx must be [T]={q.shape[0]}, got {tuple(adapter_idx.shape)}")
    out = _GatedMemoryBlend.apply(_f32(attn_out), _f32(q), _f32(w1), _f32(w2), _f32(w3), _f32(w4), adapter_idx)
    return out.to(attn_out.dtype)


# ------------------------------------------------ fused elementwise ops (fp32 or bf16)
# Float32 or bfloat16 storage, float32 math, one rounding per output (the references round
# twice in bf16: within ~1 bf16 ulp of them). Anything else is refused (Unsupported).
_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _require_fused(*tensors: torch.Tensor) -> None:
    _require_cpu_tensors_of(_FUSED_DTYPES, *tensors)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])
        y, rstd = _C.rms_norm_fwd(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = _C.rms_norm_bwd(dy.reshape(rows.shape), rows, weight, rstd, need_dw)
        return (dx.view(dy.shape) if need_dx else None), (dw.to(weight.dtype) if need_dw else None), None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _C.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate, d_up = _C.swiglu_bwd(dy, gate, up)
        return d_gate, d_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H]; weight: [H]; eps → weight ⊙ x · rsqrt(mean(x²) + eps), [..., H] (one C++ pass each way)."""
    check_rms_norm(x, weight)
    if x.shape[-1] == 0:
        raise Unsupported("a last dim of size 0")
    _require_fused(x, weight)
    return _RMSNorm.apply(x, weight, float(eps))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I] → silu(gate) ⊙ up (one C++ pass each way; σ recomputed in backward)."""
    check_swiglu(gate, up)
    _require_fused(gate, up)
    return _SwiGLU.apply(gate, up)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _C.rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _C.rotary(dy, cos, sin, True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, D]; cos, sin: [B or 1, L, D] → x ⊙ cos + rotate_half(x) ⊙ sin, [B, H, L, D]
    contiguous (one C++ pass each way; no gradient for the tables)."""
    check_rotary(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise Unsupported("cos/sin tables that require a gradient (the kernel gives none)")
    _require_fused(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


def cross_entropy_with_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] (overwritten with softmax − onehot); targets: [R] int64 → loss [R] float32."""
    check_cross_entropy(logits, targets)
    if logits.stride(-1) != 1:
        raise Unsupported("logits whose last dim is not contiguous")
    _require_fused(logits)
    if targets.dtype != torch.int64:
        raise Unsupported(f"{_dtype_name(targets.dtype)} targets (the kernel takes int64)")
    _require_cpu(targets, "targets")
    with torch.no_grad():
        return _C.cross_entropy_with_grad_(logits, targets)


# ------------------------------------------- attention (bf16 on AMX)
# csrc/cpu/attention_cpu.cpp: causal/masked GQA attention with oneDNN's brgemm micro-kernels,
# forward and backward, for bf16 q/k/v with a head dim that is a multiple of 16 on a CPU
# where oneDNN packs bf16 (AMX / AVX512-BF16); other inputs are refused (Unsupported), and on
# a CPU without those the op is not exposed at all. The trainers route only bf16 attention
# here (precision.training_attention): fp32 keeps torch's sdpa, whose fp32 flash kernels
# beat the reference's plain math.
_ATTENTION_AVAILABLE = bool(_C.attention_available())


def _require_attention_kernel(q, k, v, mask) -> None:
    """Unsupported unless the kernel takes these inputs (which passed check_attention)."""
    _require_cpu_tensors_of((torch.bfloat16,), q, k, v)
    if q.shape[-1] % 16:
        raise Unsupported("a head dim that is not a multiple of 16")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise Unsupported("empty sequences")
    if mask is not None:
        _require_cpu(mask, "mask")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = _C.attention_fwd(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _C.attention_bwd(dout.contiguous(), q, k, v, out, lse, mask, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, scale: float) -> torch.Tensor:
    """q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; mask: bool [B or 1, Lq, Lk] or None → [B, Hq, Lq, D]
    (the C++ AMX kernel; bf16 only)."""
    check_attention(q, k, v, mask)
    _require_attention_kernel(q, k, v, mask)
    return _Attention.apply(q, k, v, mask, bool(causal), float(scale))


if not _ATTENTION_AVAILABLE:  # not exposed: dispatch falls back, and the trainers keep fp32 sdpa
    del attention


# ------------------------------------------- backward entry points for custom_ops.py
# Under torch.compile, lift_engine.ops.custom_ops calls `<op>_backward(..., needs)` of the
# backend that ran the forward (no autograd inside a custom op). They recompute the plan
# (and what the forward saved) and return the gradients in the reference formulas' order;
# inputs the forward refuses they refuse too (custom_ops then uses the plain formulas).


def _needs(needs, n):
    return tuple(bool(x) for x in needs)[:n]


def lora_shrink_backward(dh, x, lora_a, adapter_idx, needs=(True, True)):
    _require_kernel(x, lora_a)
    need_dx, need_da = _needs(needs, 2)
    order, blocks = token_plan(adapter_idx, lora_a.shape[0])
    dx, da = _C.shrink_bwd(_f32(dh), _f32(x), _f32(lora_a), order, blocks, need_dx, need_da)
    return dx, da


def lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, needs=(True, True, True)):
    _require_kernel(h, lora_b)
    _require_cpu(scaling, "scaling")
    need_dh, need_db, need_ds = _needs(needs, 3)
    order, blocks = token_plan(adapter_idx, lora_b.shape[0])
    b32, s32 = _f32(lora_b), _f32(scaling)
    dh, d_b_raw = _C.expand_bwd(_f32(dy), _f32(h), b32, s32, order, blocks, need_dh, need_db or need_ds)
    d_b = d_s = None
    if d_b_raw is not None:
        d_b, d_s = _scaling_grads(d_b_raw, b32, s32, need_ds)
    return dh, (d_b if need_db else None), d_s


def lora_linear_delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, needs=(True,) * 4):
    _require_kernel(x, lora_a, lora_b)
    _require_cpu(scaling, "scaling")
    need_dx, need_da, need_db, need_ds = _needs(needs, 4)
    order, blocks = token_plan(adapter_idx, lora_a.shape[0])
    x32, a32, b32, s32 = _f32(x), _f32(lora_a), _f32(lora_b), _f32(scaling)
    h = _C.shrink_fwd(x32, a32, order, blocks)
    dx, da, d_b_raw = _C.delta_bwd(_f32(dy), x32, h, a32, b32, s32, order, blocks, need_dx, need_da,
                                   need_db or need_ds)
    d_b = d_s = None
    if d_b_raw is not None:
        d_b, d_s = _scaling_grads(d_b_raw, b32, s32, need_ds)
    return dx, da, (d_b if need_db else None), d_s


def gated_memory_blend_backward(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, needs=(True,) * 6):
    _require_kernel(attn_out, q, w1, w2, w3, w4)
    needs = _needs(needs, 6)
    order, blocks = token_plan(adapter_idx, w1.shape[0])
    args = [_f32(t) for t in (attn_out, q, w1, w2, w3, w4)]
    _, pre1, mem, p3, gate = _C.gm_fwd(*args, order, blocks, True)  # recompute what forward saved
    grads = _C.gm_bwd(_f32(dout), *args, pre1, mem, p3, gate, order, blocks, needs[1], any(needs[2:6]))
    return tuple(g if need else None for g, need in zip(grads, needs))


#: Every kernel-backed op, exposed or not (tests and the benchmark use this).
IMPLEMENTED = {
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "lora_linear_delta": lora_linear_delta,
    "gated_memory_blend": gated_memory_blend,
    "rms_norm": rms_norm,
    "swiglu": swiglu,
    "rotary": rotary,
    "cross_entropy_with_grad_": cross_entropy_with_grad_,
}
if _ATTENTION_AVAILABLE:
    IMPLEMENTED["attention"] = attention
BACKWARD = {
    "lora_shrink": lora_shrink_backward,
    "lora_expand": lora_expand_backward,
    "lora_linear_delta": lora_linear_delta_backward,
    "gated_memory_blend": gated_memory_blend_backward,
}
