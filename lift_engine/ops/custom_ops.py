"""torch.library custom ops for every op of dispatch.OPS (docs/DESIGN.md §5.1): `torch.ops.lift.*`.

Why: torch.compile (and vLLM, which compiles its model) cannot trace into Triton launches,
C++ extensions or data-dependent loops over adapters. Each op is registered as an opaque
custom op with a fake (meta) implementation giving the output shapes, and with an
autograd formula, so a compiled graph calls the op as one node and trains through it.

    lift::lora_shrink(x, lora_a, adapter_idx)                         → h
    lift::lora_expand(h, lora_b, scaling, adapter_idx)                → y
    lift::lora_linear_delta(x, lora_a, lora_b, scaling, adapter_idx)  → y
    lift::lora_linear(x, weight, bias?, lora_a, lora_b, scaling, adapter_idx) → y   (x [..., in])
    lift::gated_memory_blend(attn_out, q, w1, w2, w3, w4, adapter_idx) → out
    lift::gated_memory_attention_fwd(q, k, v, cos, sin, w1..w4, adapter_idx, scale)
                                                                       → (out, attn, lse2)
and one `lift::<op>_backward` per op. Each impl picks its backend through
dispatch.resolve (same device rules, same LIFT_BACKEND), so forward and backward of one
call always use the same backend.

Backward: autograd cannot run inside a custom op's implementation (the dispatcher has
left the autograd layer), so every backward is an explicit formula. A backend may
provide `<op>_backward` (the Triton backend does, with its kernels; attention also
provides `gated_memory_attention_forward`, which returns the attention output and the
base-2 logsumexp the backward needs); for a backend that does not, or that refuses the
inputs (dispatch.Unsupported: then with a warning once), the plain-PyTorch formulas
below are used — they are exact for any backend, since every backend computes the
reference's function. They are tested against autograd of the reference ops.

Eager code does not come here: dispatch calls the backend directly (its own autograd)
and routes to these ops only while torch.compile is tracing.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lift_engine.config import GATE_SCALE
from lift_engine.ops import dispatch
from lift_engine.ops.reference.gated_memory_attention import apply_rope
from lift_engine.ops.reference.gated_memory_blend import gated_memory_blend as _ref_blend
from lift_engine.ops.reference.lora import lora_shrink as _ref_shrink

LN2 = math.log(2.0)


# ===================================================== plain-PyTorch backward formulas
def _groups(adapter_idx: Tensor):
    for n in torch.unique(adapter_idx).tolist():
        if n >= 0:
            yield n, (adapter_idx == n).nonzero(as_tuple=True)[0]


def _acc(t: Tensor) -> Tensor:
    """Accumulate in fp32 at least (float64 stays float64)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _silu_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def ref_lora_shrink_backward(dh, x, lora_a, adapter_idx, needs=(True, True)):
    """h[t] = x[t] A[n]ᵀ → dx[t] = dh[t] A[n]; dA[n] = Σ_t dh[t]ᵀ x[t]."""
    dx = torch.zeros_like(x) if needs[0] else None
    da = torch.zeros_like(lora_a) if needs[1] else None
    for n, rows in _groups(adapter_idx):
        g = dh.index_select(0, rows)
        if dx is not None:
            dx.index_copy_(0, rows, (g @ lora_a[n]).to(x.dtype))
        if da is not None:
            da[n] = (g.t() @ x.index_select(0, rows)).to(lora_a.dtype)
    return dx, da


def ref_lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, needs=(True, True, True)):
    """y[t] = s[n] h[t] B[n]ᵀ → dh[t] = s[n] dy[t] B[n]; dB[n] = s[n] G[n]; ds[n] = ⟨G[n], B[n]⟩,
    G[n] = Σ_t dy[t]ᵀ h[t]."""
    dh = torch.zeros_like(h) if needs[0] else None
    db = torch.zeros_like(lora_b) if needs[1] else None
    ds = torch.zeros_like(scaling) if needs[2] else None
    for n, rows in _groups(adapter_idx):
        g = dy.index_select(0, rows)
        if dh is not None:
            dh.index_copy_(0, rows, ((g @ lora_b[n]) * scaling[n].to(g.dtype)).to(h.dtype))
        if db is not None or ds is not None:
            outer = _acc(g).t() @ _acc(h.index_select(0, rows))
            if db is not None:
                db[n] = (outer * _acc(scaling[n])).to(lora_b.dtype)
            if ds is not None:
                ds[n] = (outer * _acc(lora_b[n])).sum().to(scaling.dtype)
    return dh, db, ds


def ref_lora_linear_delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, needs=(True,) * 4):
    h = _ref_shrink(x, lora_a, adapter_idx)
    need_dh = needs[0] or needs[1]
    dh, db, ds = ref_lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, (need_dh, needs[2], needs[3]))
    dx = da = None
    if need_dh:
        dx, da = ref_lora_shrink_backward(dh, x, lora_a, adapter_idx, needs[:2])
    return dx, da, db, ds


def ref_lora_linear_backward(dy, x, weight, bias, lora_a, lora_b, scaling, adapter_idx, needs=(True,) * 6,
                             delta_backward=None):
    """y = x Wᵀ + bias + delta(x) → dx = dy W + (delta's dx); dW = dyᵀ x; dbias = Σ_t dy[t];
    dA, dB, dscaling are the delta's. `delta_backward` computes the LoRA part (default: the
    formula above; custom ops pass the chosen backend's lora_linear_delta_backward)."""
    delta_backward = delta_backward or ref_lora_linear_delta_backward
    need_x, need_w, need_bias, need_a, need_b, need_s = (bool(n) for n in needs)
    shape = x.shape
    x, dy = x.reshape(-1, shape[-1]), dy.reshape(-1, weight.shape[0])  # x may be [..., in]
    dx = da = db = ds = None
    if need_x or need_a or need_b or need_s:
        dx, da, db, ds = delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, (need_x, need_a, need_b, need_s))
    if need_x:
        base = dy.to(weight.dtype) @ weight
        dx = (base if dx is None else dx + base).view(shape)
    dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype) if need_w else None
    dbias = dy.sum(0).to(bias.dtype) if need_bias and bias is not None else None
    return dx, dw, dbias, da, db, ds


def ref_gated_memory_blend_backward(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, needs=(True,) * 6):
    """Chain rule of docs/DESIGN.md §3.2 per adapter group, in fp32 (see gated_memory_blend.py for
    the forward): d_attn = (1−g) dout; dq, dW1..dw4 through the memory MLP and the gate."""
    d_attn = dout.clone().to(attn_out.dtype)
    dq = torch.zeros_like(q)
    dws = [torch.zeros_like(w) if need else None for w, need in zip((w1, w2, w3, w4), needs[2:])]
    for n, rows in _groups(adapter_idx):
        qf = _acc(q.index_select(0, rows))
        a = _acc(attn_out.index_select(0, rows))
        do = _acc(dout.index_select(0, rows))
        W1, W2, W3, w4n = (_acc(w[n]) for w in (w1, w2, w3, w4))
        pre1 = torch.einsum("thd,hed->the", qf, W1)
        hid = F.silu(pre1)
        mem = torch.einsum("the,hde->thd", hid, W2)
        pre3 = torch.einsum("thd,hsd->ths", qf, W3)
        gh = F.silu(pre3)
        g = torch.sigmoid(GATE_SCALE * (torch.einsum("ths,hos->tho", gh, w4n) - 1.0))  # [t, H, 1]
        d_attn.index_copy_(0, rows, ((1 - g) * do).to(attn_out.dtype))
        dmem = g * do
        dlogit = (do * (mem - a)).sum(-1, keepdim=True) * GATE_SCALE * g * (1 - g)  # [t, H, 1]
        dpre1 = torch.einsum("thd,hde->the", dmem, W2) * _silu_grad(pre1)
        dpre3 = dlogit * w4n.transpose(1, 2).reshape(1, w4n.shape[0], -1) * _silu_grad(pre3)
        dq_rows = torch.einsum("the,hed->thd", dpre1, W1) + torch.einsum("ths,hsd->thd", dpre3, W3)
        dq.index_copy_(0, rows, dq_rows.to(q.dtype))
        grads = (torch.einsum("the,thd->hed", dpre1, qf), torch.einsum("thd,the->hde", dmem, hid),
                 torch.einsum("ths,thd->hsd", dpre3, qf), torch.einsum("tho,ths->hos", dlogit, gh))
        for dw, gw in zip(dws, grads):
            if dw is not None:
                dw[n] = gw.to(dw.dtype)
    return (d_attn, dq, *dws)


def _scores(q, k, cos, sin, scale):
    heads, kv_heads, seq, dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q_r = apply_rope(_acc(q), _acc(cos), _acc(sin))
    k_r = apply_rope(_acc(k), _acc(cos), _acc(sin)).repeat_interleave(heads // kv_heads, 1)
    s = (q_r @ k_r.transpose(-1, -2)) * scale
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(causal, float("-inf")), q_r, k_r, scale


def ref_gated_memory_attention_forward(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    """→ (out [B,S,H,d], attn [B,S,H,d], lse2 [B,S,H] base-2 logsumexp), materialising scores."""
    batch, heads, seq, dim = q.shape
    s, _, _, _ = _scores(q, k, cos, sin, scale)
    lse = torch.logsumexp(s, -1)  # [B, H, S]
    v_rep = _acc(v).repeat_interleave(heads // k.shape[1], 1)
    attn = (torch.exp(s - lse[..., None]) @ v_rep).to(q.dtype).transpose(1, 2).contiguous()  # [B, S, H, d]
    q_tok = q.transpose(1, 2).reshape(batch * seq, heads, dim)
    out = _ref_blend(attn.reshape(batch * seq, heads, dim), q_tok, w1, w2, w3, w4, adapter_idx.reshape(-1))
    return out.reshape(batch, seq, heads, dim).clone(), attn, (lse / LN2).transpose(1, 2).contiguous()


def _rope_transpose(d: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x_r = x cos + rot(x) sin, rot(x) = [−x2, x1] → dx = d cos + rotᵀ(d sin), rotᵀ(y) = [y2, −y1]."""
    y = d * sin.unsqueeze(1)
    half = d.shape[-1] // 2
    return d * cos.unsqueeze(1) + torch.cat((y[..., half:], -y[..., :half]), -1)


def ref_gated_memory_attention_backward(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2,
                                        scale=None, needs=(True,) * 7):
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    tokens = batch * seq
    d_attn, dq_mem, *dws = ref_gated_memory_blend_backward(
        dout.reshape(tokens, heads, dim), attn.reshape(tokens, heads, dim),
        q.transpose(1, 2).reshape(tokens, heads, dim), w1, w2, w3, w4, adapter_idx.reshape(-1),
        (True, True, *needs[3:]))
    s, q_r, k_r, scale = _scores(q, k, cos, sin, scale)
    p = torch.exp(s - (_acc(lse2) * LN2).transpose(1, 2)[..., None])  # [B, H, S, S]
    da = _acc(d_attn).reshape(batch, seq, heads, dim).transpose(1, 2)  # [B, H, S, d]
    o = _acc(attn).transpose(1, 2)
    v_rep = _acc(v).repeat_interleave(groups, 1)
    dp = da @ v_rep.transpose(-1, -2)
    ds = p * (dp - (da * o).sum(-1, keepdim=True))
    dq = dk = dv = None
    if needs[0]:
        dq = _rope_transpose((ds @ k_r) * scale, _acc(cos), _acc(sin))
        dq = (dq + _acc(dq_mem).reshape(batch, seq, heads, dim).transpose(1, 2)).to(q.dtype)
    if needs[1]:
        dk_r = ((ds.transpose(-1, -2) @ q_r) * scale).reshape(batch, kv_heads, groups, seq, dim).sum(2)
        dk = _rope_transpose(dk_r, _acc(cos), _acc(sin)).to(k.dtype)
    if needs[2]:
        dv = (p.transpose(-1, -2) @ da).reshape(batch, kv_heads, groups, seq, dim).sum(2).to(v.dtype)
    return (dq, dk, dv, *dws)


# ============================================================== backend selection
def _impl(op: str, name: str, device: torch.device, fallback):
    """The function `name` of the backend dispatch picks for `op` on `device` (`fallback`
    where that backend has none), called through dispatch.call_backend: inputs the backend
    refuses (Unsupported) go to `fallback` instead — for the op itself the reference op —
    with a warning once."""
    backend, fn = dispatch.resolve(op, device)
    if name == op:
        fallback = getattr(dispatch.load_backend("reference"), op)
    else:
        module = dispatch.load_backend(backend)
        fn = None if isinstance(module, Exception) else getattr(module, name, None)
        if fn is None:
            return fallback
    if backend == "reference":
        return fn
    return functools.partial(dispatch.call_backend, name, backend, fn, fallback)


def _fresh(out: Tensor, *inputs) -> Tensor:
    """A custom op may not return (a view of) an input: the reference returns attn_out
    itself when no token has an adapter."""
    ptr = out.untyped_storage().data_ptr()
    for t in inputs:
        if isinstance(t, Tensor) and t.numel() and t.untyped_storage().data_ptr() == ptr:
            return out.clone()
    return out


def _grads_out(grads: Sequence[Optional[Tensor]], inputs: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor]:
    """Tensor[] return: an empty tensor stands for 'not needed' (needs is fixed at trace time)."""
    out = []
    for g, t, need in zip(grads, inputs, needs):
        if not need:
            out.append(t.new_empty(0))
        elif g is None:
            out.append(torch.zeros_like(t))
        else:
            out.append(g.contiguous() if g.dtype == t.dtype else g.to(t.dtype).contiguous())
    return out


def _grads_in(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    return [g if need else None for g, need in zip(grads, needs)]


def _fake_grads(inputs: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor]:
    return [torch.empty_like(t) if need else t.new_empty(0) for t, need in zip(inputs, needs)]


# =================================================================== custom ops
# --- lora_shrink
@torch.library.custom_op("lift::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, lora_a: Tensor, adapter_idx: Tensor) -> Tensor:
    with torch.no_grad():
        return _fresh(_impl("lora_shrink", "lora_shrink", x.device, None)(x, lora_a, adapter_idx), x)


@lora_shrink.register_fake
def _(x, lora_a, adapter_idx):
    return x.new_empty(x.shape[0], lora_a.shape[1])


@torch.library.custom_op("lift::lora_shrink_backward", mutates_args=())
def lora_shrink_backward(dh: Tensor, x: Tensor, lora_a: Tensor, adapter_idx: Tensor, needs: list[bool]) -> list[Tensor]:
    fn = _impl("lora_shrink", "lora_shrink_backward", x.device, ref_lora_shrink_backward)
    with torch.no_grad():
        return _grads_out(fn(dh, x, lora_a, adapter_idx, tuple(needs)), (x, lora_a), needs)


@lora_shrink_backward.register_fake
def _(dh, x, lora_a, adapter_idx, needs):
    return _fake_grads((x, lora_a), needs)


def _shrink_setup(ctx, inputs, output):
    x, lora_a, adapter_idx = inputs
    ctx.save_for_backward(x, lora_a, adapter_idx)


def _shrink_bwd(ctx, dh):
    x, lora_a, adapter_idx = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    grads = torch.ops.lift.lora_shrink_backward(dh, x, lora_a, adapter_idx, needs)
    return (*_grads_in(grads, needs), None)


lora_shrink.register_autograd(_shrink_bwd, setup_context=_shrink_setup)


# --- lora_expand
@torch.library.custom_op("lift::lora_expand", mutates_args=())
def lora_expand(h: Tensor, lora_b: Tensor, scaling: Tensor, adapter_idx: Tensor) -> Tensor:
    with torch.no_grad():
        return _fresh(_impl("lora_expand", "lora_expand", h.device, None)(h, lora_b, scaling, adapter_idx), h)


@lora_expand.register_fake
def _(h, lora_b, scaling, adapter_idx):
    return h.new_empty(h.shape[0], lora_b.shape[1])


@torch.library.custom_op("lift::lora_expand_backward", mutates_args=())
def lora_expand_backward(dy: Tensor, h: Tensor, lora_b: Tensor, scaling: Tensor, adapter_idx: Tensor,
                         needs: list[bool]) -> list[Tensor]:
    fn = _impl("lora_expand", "lora_expand_backward", h.device, ref_lora_expand_backward)
    with torch.no_grad():
        return _grads_out(fn(dy, h, lora_b, scaling, adapter_idx, tuple(needs)), (h, lora_b, scaling), needs)


@lora_expand_backward.register_fake
def _(dy, h, lora_b, scaling, adapter_idx, needs):
    return _fake_grads((h, lora_b, scaling), needs)


def _expand_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expand_bwd(ctx, dy):
    h, lora_b, scaling, adapter_idx = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.lift.lora_expand_backward(dy, h, lora_b, scaling, adapter_idx, needs)
    return (*_grads_in(grads, needs), None)


lora_expand.register_autograd(_expand_bwd, setup_context=_expand_setup)


# --- lora_linear_delta
@torch.library.custom_op("lift::lora_linear_delta", mutates_args=())
def lora_linear_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, adapter_idx: Tensor) -> Tensor:
    fn = _impl("lora_linear_delta", "lora_linear_delta", x.device, None)
    with torch.no_grad():
        return _fresh(fn(x, lora_a, lora_b, scaling, adapter_idx), x)


@lora_linear_delta.register_fake
def _(x, lora_a, lora_b, scaling, adapter_idx):
    return x.new_empty(x.shape[0], lora_b.shape[1])


@torch.library.custom_op("lift::lora_linear_delta_backward", mutates_args=())
def lora_linear_delta_backward(dy: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor,
                               adapter_idx: Tensor, needs: list[bool]) -> list[Tensor]:
    fn = _impl("lora_linear_delta", "lora_linear_delta_backward", x.device, ref_lora_linear_delta_backward)
    with torch.no_grad():
        grads = fn(dy, x, lora_a, lora_b, scaling, adapter_idx, tuple(needs))
        return _grads_out(grads, (x, lora_a, lora_b, scaling), needs)


@lora_linear_delta_backward.register_fake
def _(dy, x, lora_a, lora_b, scaling, adapter_idx, needs):
    return _fake_grads((x, lora_a, lora_b, scaling), needs)


def _delta_bwd(ctx, dy):
    x, lora_a, lora_b, scaling, adapter_idx = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    grads = torch.ops.lift.lora_linear_delta_backward(dy, x, lora_a, lora_b, scaling, adapter_idx, needs)
    return (*_grads_in(grads, needs), None)


lora_linear_delta.register_autograd(_delta_bwd, setup_context=_expand_setup)


# --- lora_linear (frozen linear + LoRA in one op; bias may be None)
@torch.library.custom_op("lift::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: Tensor,
                adapter_idx: Tensor) -> Tensor:
    fn = _impl("lora_linear", "lora_linear", x.device, None)
    with torch.no_grad():
        return _fresh(fn(x, weight, bias, lora_a, lora_b, scaling, adapter_idx), x, weight, bias)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, adapter_idx):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _bias_slot(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    """Stand-in for an absent bias in the gradient list (its gradient is never needed)."""
    return bias if bias is not None else weight.new_empty(0)


@torch.library.custom_op("lift::lora_linear_backward", mutates_args=())
def lora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                         lora_b: Tensor, scaling: Tensor, adapter_idx: Tensor, needs: list[bool]) -> list[Tensor]:
    # Base part in plain PyTorch, LoRA part by the backend's delta backward, unless the
    # backend has a lora_linear_backward of its own.
    delta_backward = _impl("lora_linear", "lora_linear_delta_backward", x.device, ref_lora_linear_delta_backward)

    def composed(*args):
        return ref_lora_linear_backward(*args, delta_backward=delta_backward)

    fn = _impl("lora_linear", "lora_linear_backward", x.device, composed)
    with torch.no_grad():
        grads = fn(dy, x, weight, bias, lora_a, lora_b, scaling, adapter_idx, tuple(needs))
        return _grads_out(grads, (x, weight, _bias_slot(bias, weight), lora_a, lora_b, scaling), needs)


@lora_linear_backward.register_fake
def _(dy, x, weight, bias, lora_a, lora_b, scaling, adapter_idx, needs):
    return _fake_grads((x, weight, _bias_slot(bias, weight), lora_a, lora_b, scaling), needs)


def _linear_bwd(ctx, dy):
    x, weight, bias, lora_a, lora_b, scaling, adapter_idx = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.lift.lora_linear_backward(dy, x, weight, bias, lora_a, lora_b, scaling, adapter_idx, needs)
    return (*_grads_in(grads, needs), None)


lora_linear.register_autograd(_linear_bwd, setup_context=_expand_setup)


# --- gated_memory_blend
@torch.library.custom_op("lift::gated_memory_blend", mutates_args=())
def gated_memory_blend(attn_out: Tensor, q: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w4: Tensor,
                       adapter_idx: Tensor) -> Tensor:
    fn = _impl("gated_memory_blend", "gated_memory_blend", q.device, None)
    with torch.no_grad():
        return _fresh(fn(attn_out, q, w1, w2, w3, w4, adapter_idx), attn_out, q)


@gated_memory_blend.register_fake
def _(attn_out, q, w1, w2, w3, w4, adapter_idx):
    return torch.empty_like(attn_out)


@torch.library.custom_op("lift::gated_memory_blend_backward", mutates_args=())
def gated_memory_blend_backward(dout: Tensor, attn_out: Tensor, q: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                                w4: Tensor, adapter_idx: Tensor, needs: list[bool]) -> list[Tensor]:
    fn = _impl("gated_memory_blend", "gated_memory_blend_backward", q.device, ref_gated_memory_blend_backward)
    with torch.no_grad():
        grads = fn(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, tuple(needs))
        return _grads_out(grads, (attn_out, q, w1, w2, w3, w4), needs)


@gated_memory_blend_backward.register_fake
def _(dout, attn_out, q, w1, w2, w3, w4, adapter_idx, needs):
    return _fake_grads((attn_out, q, w1, w2, w3, w4), needs)


def _blend_bwd(ctx, dout):
    saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.lift.gated_memory_blend_backward(dout, *saved, needs)
    return (*_grads_in(grads, needs), None)


gated_memory_blend.register_autograd(_blend_bwd, setup_context=_expand_setup)


# --- gated_memory_attention (forward returns the state its backward needs)
@torch.library.custom_op("lift::gated_memory_attention_fwd", mutates_args=())
def gated_memory_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, w1: Tensor, w2: Tensor,
                               w3: Tensor, w4: Tensor, adapter_idx: Tensor,
                               scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    fn = _impl("gated_memory_attention", "gated_memory_attention_forward", q.device,
               ref_gated_memory_attention_forward)
    with torch.no_grad():
        out, attn, lse2 = fn(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)
    return out, attn, lse2


@gated_memory_attention_fwd.register_fake
def _(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    batch, heads, seq, dim = q.shape
    return (q.new_empty(batch, seq, heads, dim), q.new_empty(batch, seq, heads, dim),
            q.new_empty(batch, seq, heads, dtype=torch.float32))


@torch.library.custom_op("lift::gated_memory_attention_backward", mutates_args=())
def gated_memory_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                                    w1: Tensor, w2: Tensor, w3: Tensor, w4: Tensor, adapter_idx: Tensor,
                                    attn: Tensor, lse2: Tensor, scale: Optional[float],
                                    needs: list[bool]) -> list[Tensor]:
    fn = _impl("gated_memory_attention", "gated_memory_attention_backward", q.device,
               ref_gated_memory_attention_backward)
    with torch.no_grad():
        grads = fn(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2, scale, tuple(needs))
        return _grads_out(grads, (q, k, v, w1, w2, w3, w4), needs)


@gated_memory_attention_backward.register_fake
def _(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2, scale, needs):
    return _fake_grads((q, k, v, w1, w2, w3, w4), needs)


def _attn_setup(ctx, inputs, output):
    q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale = inputs
    _, attn, lse2 = output
    ctx.save_for_backward(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2)
    ctx.scale = scale
    ctx.mark_non_differentiable(attn, lse2)


def _attn_bwd(ctx, dout, _d_attn, _d_lse):
    q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, attn, lse2 = ctx.saved_tensors
    flags = ctx.needs_input_grad
    needs = [flags[0], flags[1], flags[2], flags[5], flags[6], flags[7], flags[8]]
    grads = torch.ops.lift.gated_memory_attention_backward(dout, q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx,
                                                           attn, lse2, ctx.scale, needs)
    dq, dk, dv, dw1, dw2, dw3, dw4 = _grads_in(grads, needs)
    return dq, dk, dv, None, None, dw1, dw2, dw3, dw4, None, None


gated_memory_attention_fwd.register_autograd(_attn_bwd, setup_context=_attn_setup)


def gated_memory_attention(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale=None):
    return torch.ops.lift.gated_memory_attention_fwd(q, k, v, cos, sin, w1, w2, w3, w4, adapter_idx, scale)[0]


# ============================================================ entry from dispatch
_CALLS = {
    "lora_shrink": lambda *a, **k: torch.ops.lift.lora_shrink(*a, **k),
    "lora_expand": lambda *a, **k: torch.ops.lift.lora_expand(*a, **k),
    "lora_linear_delta": lambda *a, **k: torch.ops.lift.lora_linear_delta(*a, **k),
    "lora_linear": lambda *a, **k: torch.ops.lift.lora_linear(*a, **k),
    "gated_memory_blend": lambda *a, **k: torch.ops.lift.gated_memory_blend(*a, **k),
    "gated_memory_attention": gated_memory_attention,
}


def call(op: str, *args, **kwargs):
    """The custom-op form of dispatch op `op` (what dispatch uses under torch.compile)."""
    return _CALLS[op](*args, **kwargs)
