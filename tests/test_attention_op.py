"""Attention op (ops.attention): the reference against torch's sdpa, the C++ bf16 AMX kernel
(csrc/cpu/attention_cpu.cpp) against the reference — outputs and q/k/v gradients on odd
shapes, GQA, causal with Lq < Lk, key masks, a query that sees no key, strided inputs —
its errors and fallbacks, and the HF attention function the trainers use in bf16
(precision.training_attention) on a tiny Llama with and without masks.

The kernel cases are skipped when the C++ extension is not built or this CPU cannot run
oneDNN's bf16 brgemm (reason printed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_models import make_tiny_model
from kernel_tolerances import assert_close, check_kernel
from lift_engine.ops import dispatch, reference
from lift_engine.ops.native import status as native_status
from lift_engine.precision import TRAINING_ATTENTION, training_attention

_CPU_STATUS = native_status()["cpu"]
_KERNEL = None
if _CPU_STATUS == "loaded":
    from lift_engine.ops import cpu_backend

    _KERNEL = cpu_backend._ATTENTION_AVAILABLE
needs_kernel = pytest.mark.skipif(
    not _KERNEL, reason=f"C++ CPU extension: {_CPU_STATUS}" if _CPU_STATUS != "loaded"
    else "oneDNN cannot pack bf16 for brgemm on this CPU (no AMX / AVX512-BF16)")


def _qkv(B, Hq, Hkv, Lq, Lk, D, seed, dtype=torch.bfloat16, hf_layout=False):
    g = torch.Generator().manual_seed(seed)
    if hf_layout:  # [B, L, H, D] transposed, as HF's attention modules pass them
        make = lambda H, L: torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        make = lambda H, L: torch.randn(B, H, L, D, generator=g).to(dtype)  # noqa: E731
    return [t.detach().requires_grad_() for t in (make(Hq, Lq), make(Hkv, Lk), make(Hkv, Lk))]


# ------------------------------------------------------------------ the reference
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_sdpa_with_gqa(causal):
    q, k, v = _qkv(2, 6, 2, 9, 9, 8, seed=0, dtype=torch.float32)
    mask = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, :, 0] = True  # every query sees a key, so sdpa has no NaN rows
    out = reference.attention(q, k, v, None if causal else mask, causal, 0.3)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              attn_mask=None if causal else mask[:, None], is_causal=causal,
                                              scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_reference_causal_is_bottom_right_aligned_and_blind_rows_are_zero():
    q, k, v = _qkv(1, 1, 1, 2, 5, 4, seed=2, dtype=torch.float32)
    out = reference.attention(q, k, v, None, True, 1.0)
    # the last query sees all 5 keys, the first 4 of them
    full = F.scaled_dot_product_attention(q[:, :, 1:], k, v, scale=1.0)
    first = F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :4], v[:, :, :4], scale=1.0)
    torch.testing.assert_close(out[:, :, 1:], full)
    torch.testing.assert_close(out[:, :, :1], first)
    blind = torch.ones(1, 2, 5, dtype=torch.bool)
    blind[0, 0] = False
    out = reference.attention(q, k, v, blind, False, 1.0)
    assert torch.equal(out[0, 0, 0], torch.zeros(4)) and torch.isfinite(out).all()


@pytest.mark.parametrize("bad", ["heads", "dim", "mask_dtype", "mask_shape", "rank"])
def test_reference_rejects_shapes_that_do_not_fit(bad):
    q, k, v = (t.detach() for t in _qkv(2, 4, 2, 3, 5, 8, seed=3, dtype=torch.float32))
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    if bad == "heads":
        k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    elif bad == "dim":
        k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    elif bad == "mask_dtype":
        mask = mask.float()
    elif bad == "mask_shape":
        mask = torch.ones(2, 5, 3, dtype=torch.bool)
    else:
        q = q[0]
    with pytest.raises(ValueError):
        reference.attention(q, k, v, mask, False, 1.0)


# ------------------------------------------------------------------ the C++ kernel
def _check_against_reference(q, k, v, mask, causal, scale):
    torch.manual_seed(9)  # the output gradient
    check_kernel(lambda *qkv: cpu_backend.attention(*qkv, mask, causal, scale),
                 lambda *qkv: reference.attention(*qkv, mask, causal, scale), [q, k, v], torch.bfloat16,
                 ["dq", "dk", "dv"])


@needs_kernel
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", [
    (2, 9, 3, 204, 204, 64),   # the default model's heads, a bench-sized sample
    (3, 4, 4, 37, 37, 32),     # no GQA, a q block tail of 37 − 32 … and odd lengths
    (1, 2, 1, 1, 17, 16),      # one query (decoding-like): sees every key
    (2, 2, 2, 33, 33, 48),     # D not a power of two, odd tail rows
    (1, 3, 1, 70, 130, 128),   # Lq < Lk (a cached prefix), head dim 128 = two column blocks
    (1, 2, 1, 129, 129, 64),   # more keys than one 64-wide packed block, 3 q blocks
])
def test_kernel_matches_reference_causal(B, Hq, Hkv, Lq, Lk, D):
    _check_against_reference(*_qkv(B, Hq, Hkv, Lq, Lk, D, seed=Lq + D), None, True, D ** -0.5)


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_matches_reference_with_a_key_mask(causal):
    q, k, v = _qkv(2, 6, 2, 50, 83, 64, seed=5)
    mask = torch.rand(2, 50, 83, generator=torch.Generator().manual_seed(6)) > 0.3
    mask[1, 7] = False  # a query that sees no key: output and gradients 0, not NaN
    _check_against_reference(q, k, v, mask, causal, 0.125)
    assert torch.equal(cpu_backend.attention(q, k, v, mask, causal, 0.125)[1, :, 7].float(), torch.zeros(6, 64))
    assert all(torch.isfinite(t.grad.float()).all() for t in (q, k, v))


@needs_kernel
def test_kernel_takes_a_mask_broadcast_over_the_batch_and_hf_strided_inputs():
    q, k, v = _qkv(3, 4, 2, 21, 21, 16, seed=7, hf_layout=True)
    assert not q.is_contiguous()
    mask = torch.ones(21, 21, dtype=torch.bool).tril()[None]  # [1, Lq, Lk]: a causal pattern as a mask
    _check_against_reference(q, k, v, mask, False, 0.25)
    q2, k2, v2 = (t.detach().contiguous() for t in (q, k, v))
    causal = cpu_backend.attention(q2, k2, v2, None, True, 0.25)
    masked = cpu_backend.attention(q2, k2, v2, mask, False, 0.25)
    assert torch.equal(causal, masked)  # same keys, same arithmetic


@needs_kernel
def test_kernel_errors_are_clear():
    q, k, v = (t.detach() for t in _qkv(2, 4, 2, 3, 5, 16, seed=8))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        cpu_backend.attention(q, torch.randn(2, 3, 5, 16).bfloat16(), torch.randn(2, 3, 5, 16).bfloat16(),
                              None, True, 1.0)
    with pytest.raises(ValueError, match="mask must be bool"):
        cpu_backend.attention(q, k, v, torch.ones(2, 3, 4, dtype=torch.bool), False, 1.0)
    with pytest.raises(RuntimeError, match="lse must"):
        from lift_engine.ops.native import load

        out, _ = load("cpu").attention_fwd(q, k, v, None, True, 1.0)
        load("cpu").attention_bwd(out, q, k, v, out, torch.zeros(2, 4), None, True, 1.0)


@needs_kernel
def test_kernel_falls_back_to_the_reference_where_it_does_not_apply(monkeypatch):
    """The kernel refuses (dispatch.Unsupported); dispatch runs the reference and says so."""
    from lift_engine import ops

    monkeypatch.delenv("LIFT_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    for dtype, D in ((torch.float32, 16), (torch.float16, 16), (torch.bfloat16, 12)):
        q, k, v = (t.detach() for t in _qkv(1, 2, 1, 5, 5, D, seed=10, dtype=dtype))
        with pytest.raises(dispatch.Unsupported):
            cpu_backend.attention(q, k, v, None, True, 0.5)
        with pytest.warns(RuntimeWarning, match="cpu backend does not take these inputs for attention"):
            assert torch.equal(ops.attention(q, k, v, None, True, 0.5), reference.attention(q, k, v, None, True, 0.5))


@needs_kernel
def test_dispatch_and_lift_backend(monkeypatch):
    assert dispatch.resolve("attention", "cpu") == ("cpu", cpu_backend.attention)
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    assert dispatch.resolve("attention", "cpu") == ("reference", reference.attention)


# ------------------------------------------------------------------ the HF attention function
def _logits_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask).logits
    out.float().square().mean().backward()
    return out.detach().float(), model.model.embed_tokens.weight.grad.float().clone()


@needs_kernel
@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_matches_sdpa_on_a_tiny_llama(padded):
    torch.manual_seed(11)
    model = make_tiny_model("llama", attn_implementation="sdpa", dtype=torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(12))
    mask = torch.ones(2, 24, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # a left-padded row: HF builds a bool [B, 1, L, L] mask
    calls = []

    def counting(*args):  # records whether each call got a mask
        calls.append(args[3] is None)
        return cpu_backend.attention(*args)

    base_logits, base_grad = _logits_and_grads(model, ids, mask)
    with training_attention(model) as switched, pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "resolve", lambda op, device: ("cpu", counting))  # what ops.attention runs
        assert switched and model.config._attn_implementation == TRAINING_ATTENTION
        logits, grad = _logits_and_grads(model, ids, mask)
    assert model.config._attn_implementation == "sdpa"
    assert calls and all(unmasked == (not padded) for unmasked in calls)  # the kernel ran, masked when padded
    real = mask.bool()
    assert_close(logits[real], base_logits[real], torch.bfloat16)
    torch.testing.assert_close(grad, base_grad, rtol=0.1, atol=0.1 * base_grad.abs().max().item())


def test_training_attention_leaves_other_implementations_alone():
    eager = make_tiny_model("llama", attn_implementation="eager")
    with training_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"


def test_training_attention_falls_back_to_fp32_sdpa_under_the_reference_backend(monkeypatch):
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    model = make_tiny_model("llama", attn_implementation="sdpa", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits.float()
        with training_attention(model):
            upcast = model(ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(upcast, plain, rtol=3e-2, atol=3e-2 * plain.abs().max())
