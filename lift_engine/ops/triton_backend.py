"""Triton backend (kernels/, installed as lift_engine.kernels): every op of dispatch.OPS with
the reference's signature, differentiable through the kernels' autograd.Functions.

When it loads (docs/DESIGN.md §5.4):
  * triton must import;
  * on a machine without a CUDA device it loads only under TRITON_INTERPRET=1 (the
    numpy interpreter: correct, slow, meant for tests) — otherwise importing raises
    ImportError, so LIFT_BACKEND=triton fails with BackendUnavailable and says why;
  * `supports(device)` tells dispatch, per call, whether tensors on that device can run:
    CUDA tensors when compiled, CPU tensors only when interpreted. The automatic choice
    (dispatch.AUTO_ORDER) tries Triton only for CUDA tensors.

Inputs the kernels do not take (float64, mixed dtypes, non-CUDA/CPU devices) make the
functions below raise dispatch.Unsupported; dispatch then runs the reference op and says
so once (this module never calls the reference ops itself).
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - triton ships with torch here
    raise ImportError(f"triton does not import: {exc}") from exc

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
if not _INTERPRET and not torch.cuda.is_available():
    raise ImportError(
        "the Triton backend needs a CUDA device; on CPU it runs only under the Triton "
        "interpreter (set TRITON_INTERPRET=1 before anything imports triton; slow, for tests)"
    )

from lift_engine.kernels import build_segments, interpreted  # noqa: E402

if _INTERPRET and not interpreted():
    raise ImportError(
        "TRITON_INTERPRET=1 was set after triton was imported, so the kernels were built for a "
        "GPU; set it before anything imports triton (torch._dynamo does), e.g. in the environment"
    )

from lift_engine.kernels.gated_memory_attention import gated_memory_attention as _k_attention  # noqa: E402
from lift_engine.kernels.gated_memory_blend import gated_memory_blend as _k_blend  # noqa: E402
from lift_engine.kernels.lora_expand import lora_expand as _k_expand  # noqa: E402
from lift_engine.kernels.lora_linear import MAX_FUSED_RANK, lora_linear as _k_linear  # noqa: E402
from lift_engine.kernels.lora_linear_delta import lora_linear_delta as _k_delta  # noqa: E402
from lift_engine.kernels.lora_shrink import lora_shrink as _k_shrink  # noqa: E402
from lift_engine.ops.dispatch import Unsupported  # noqa: E402
from lift_engine.ops.reference.lora_linear import check_linear  # noqa: E402

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(device: torch.device | str) -> str | None:
    """None if tensors on `device` can run here, else the reason they cannot."""
    kind = torch.device(device).type
    if kind == "cuda":
        if interpreted():
            return None  # the interpreter copies through host memory: correct, slow
        return None if torch.cuda.is_available() else "no CUDA device"
    if kind == "cpu":
        if interpreted():
            return None
        return ("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported "
                "(the interpreter is for tests; use LIFT_BACKEND=cpu or reference for CPU work)")
    return f"Triton kernels do not run on {kind} tensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_kernel(*tensors: torch.Tensor) -> None:
    """Unsupported unless the kernels take these tensors: one dtype among _KERNEL_DTYPES, on
    CUDA (or CPU, interpreted; supports() has checked the device kind)."""
    found = sorted({_dtype_name(t.dtype) for t in tensors})
    if len(found) > 1:
        raise Unsupported(f"mixed dtypes {', '.join(found)}")
    if tensors[0].dtype not in _KERNEL_DTYPES:
        raise Unsupported(f"{found[0]} inputs (the kernels take {', '.join(map(_dtype_name, _KERNEL_DTYPES))})")
    if tensors[0].device.type not in ("cuda", "cpu"):
        raise Unsupported(f"{tensors[0].device.type} tensors")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    _require_kernel(x, lora_a)
    return _k_shrink(x, lora_a, adapter_idx)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
    _require_kernel(h, lora_b)
    return _k_expand(h, lora_b, scaling, adapter_idx)


def lora_linear_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, adapter_idx: torch.Tensor
) -> torch.Tensor:
    _require_kernel(x, lora_a, lora_b)
    return _k_delta(x, lora_a, lora_b, scaling, adapter_idx)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_idx):
    """x Wᵀ + bias + LoRA delta in one fused GEMM (kernels/lora_linear.py) on x flattened to
    [T, in]; ranks above the fused kernel's limit take the base linear + the delta kernel."""
    _require_kernel(x, weight, lora_a, lora_b)
    if bias is not None and bias.device != x.device:
        raise Unsupported("a bias on another device than x")
    check_linear(x, weight, lora_b)
    flat = x.reshape(-1, x.shape[-1])
    if lora_b.shape[-1] > MAX_FUSED_RANK:
        y = torch.nn.functional.linear(flat, weight, bias) + _k_delta(flat, lora_a, lora_b, scaling, adapter_idx)
    else:
        y = _k_linear(flat, weight, bias, lora_a, lora_b, scaling, adapter_idx)
    return y.view(*x.shape[:-1], weight.shape[0])


def gated_memory_blend(attn_out, q, w1, w2, w3, w4, adapter_idx):
    _require_kernel(attn_out, q, w1, w2, w3, w4)
    return _k_blend(attn_out, q, w1, w2, w3, w4, adapter_idx)


def gated_memory_attention(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    _require_kernel(q, k, v, w1, w2, w3, w4)
    return _k_attention(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)


# ----------------------------------------------------------- backward entry points
# Used by the custom ops (custom_ops.py) under torch.compile, where a backward must be an
# explicit function. Each takes the op's inputs plus `needs` (which gradients to return),
# and refuses (Unsupported) what the forward refuses: custom_ops then uses its formulas.
def lora_shrink_backward(dh, x, lora_a, adapter_idx, needs=(True, True)):
    _require_kernel(x, lora_a, dh)
    from lift_engine.kernels.lora_expand import expand_launch
    from lift_engine.kernels.lora_segment_outer import segment_outer_launch

    meta = build_segments(adapter_idx, lora_a.shape[0])
    dh = dh.contiguous()
    dx = expand_launch(dh, lora_a.transpose(1, 2), adapter_idx, meta=meta) if needs[0] else None
    da = (segment_outer_launch(dh, x, adapter_idx, lora_a.shape[0], meta=meta, out_dtype=lora_a.dtype)
          if needs[1] else None)
    return dx, da


def lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, needs=(True, True, True)):
    _require_kernel(h, lora_b, dy)
    from lift_engine.kernels.lora_expand import expand_backward

    meta = build_segments(adapter_idx, lora_b.shape[0])
    dh, db, ds = expand_backward(dy.contiguous(), h, lora_b, scaling, adapter_idx, meta, (lora_b.shape[1],), None,
                                 None, *needs)
    return dh, db, (ds.to(scaling.dtype) if ds is not None else None)


def lora_linear_delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, needs=(True,) * 4):
    _require_kernel(x, lora_a, lora_b, dy)
    from lift_engine.kernels.lora_linear_delta import delta_backward
    from lift_engine.kernels.lora_shrink import shrink_launch

    meta = build_segments(adapter_idx, lora_a.shape[0])
    h = shrink_launch(x, lora_a, adapter_idx, meta=meta)  # recomputed: [T, R], cheap
    return delta_backward(dy, x, h, lora_a, lora_b, scaling, adapter_idx, meta, (lora_b.shape[1],), None, needs)


def gated_memory_blend_backward(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, needs=(True,) * 6):
    _require_kernel(attn_out, q, w1, w2, w3, w4, dout)
    from lift_engine.kernels.gated_memory_blend import blend_backward

    return blend_backward(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, needs)


def gated_memory_attention_forward(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    """→ (out [B,S,H,d], attn [B,S,H,d], lse2 [B,S,H] fp32, base-2 logsumexp)."""
    _require_kernel(q, k, v, w1, w2, w3, w4)
    from lift_engine.kernels.gated_memory_attention import attention_fwd_launch

    return attention_fwd_launch(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)


def gated_memory_attention_backward(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2, scale=None,
                                    needs=(True,) * 7):
    _require_kernel(q, k, v, w1, w2, w3, w4, dout)
    from lift_engine.kernels.gated_memory_attention import attention_bwd_launch

    return attention_bwd_launch(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2, scale, needs)
