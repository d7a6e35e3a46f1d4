"""Fused elementwise ops (rms_norm, swiglu, rotary, cross_entropy_with_grad_): the C++ CPU
kernels against the pure-PyTorch references, outputs and gradients, fp32 and bf16
(tolerances: tests/kernel_tolerances.py), odd shapes, errors and fallbacks; and the
dispatch rules for them (torch.compile sees the reference).

The kernel cases are skipped when the C++ extension is not built (reason printed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_tolerances import assert_close, check_kernel
from lift_engine import ops
from lift_engine.ops import dispatch, reference
from lift_engine.ops.native import status as native_status

_CPU_STATUS = native_status()["cpu"]
needs_kernels = pytest.mark.skipif(_CPU_STATUS != "loaded", reason=f"C++ CPU extension: {_CPU_STATUS}")
if _CPU_STATUS == "loaded":
    from lift_engine.ops import cpu_backend
DTYPES = [torch.float32, torch.bfloat16]


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_()


# ------------------------------------------------------------------ references
def test_reference_rms_norm_is_llama_rms_norm_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    for dtype in DTYPES:
        norm = LlamaRMSNorm(37, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(37))
        x = torch.randn(2, 5, 37).to(dtype)
        assert torch.equal(reference.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_reference_cross_entropy_with_grad_is_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    z = torch.randn(6, 13, dtype=torch.float64)
    t = torch.randint(0, 13, (6,))
    leaf = z.clone().requires_grad_()
    expected = F.cross_entropy(leaf, t, reduction="none")
    expected.sum().backward()
    out = z.clone()
    loss = reference.cross_entropy_with_grad_(out, t)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, leaf.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ kernels vs reference
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 576), (0, 8), (129, 7)])
def test_rms_norm_kernel_matches_reference(dtype, shape):
    torch.manual_seed(1)
    x = _leaf(torch.randn(shape) * 3, dtype)
    w = _leaf(1 + 0.2 * torch.randn(shape[-1]), dtype)
    check_kernel(lambda a, b: cpu_backend.rms_norm(a, b, 1e-5), lambda a, b: reference.rms_norm(a, b, 1e-5),
                  (x, w), dtype, ("dx", "dw"))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 7, 1536), (0, 4), (5, 16385)])
def test_swiglu_kernel_matches_reference(dtype, shape):
    torch.manual_seed(2)
    g = _leaf(torch.randn(shape) * 4, dtype)
    u = _leaf(torch.randn(shape), dtype)
    check_kernel(cpu_backend.swiglu, reference.swiglu, (g, u), dtype, ("dgate", "dup"))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 37), (17, 49152), (0, 5)])
def test_cross_entropy_with_grad_kernel_matches_reference(dtype, rows, vocab):
    torch.manual_seed(3)
    z = (torch.randn(rows, vocab) * 5).to(dtype)
    t = torch.randint(0, vocab, (rows,))
    ours, ref = z.clone(), z.float()
    loss = cpu_backend.cross_entropy_with_grad_(ours, t)
    ref_loss = reference.cross_entropy_with_grad_(ref, t)
    assert loss.dtype == torch.float32 and ours.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # fp32 statistics either way
    assert_close(ours, ref, dtype, "grad", name="dlogits")


@needs_kernels
def test_cross_entropy_with_grad_kernel_writes_rows_of_a_strided_view_in_place():
    torch.manual_seed(4)
    big = torch.randn(4, 30)
    view = big[:, 5:25]  # row stride 30, unit column stride
    t = torch.tensor([0, 19, 7, 7])
    expected = view.clone()
    ref_loss = reference.cross_entropy_with_grad_(expected, t)
    loss = cpu_backend.cross_entropy_with_grad_(view, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big[:, 5:25], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(big[:, :5], big[:, :5].clone())  # untouched columns stay


@needs_kernels
def test_cross_entropy_with_grad_rejects_targets_out_of_range():
    for t in (torch.tensor([0, 5]), torch.tensor([-1, 0])):
        with pytest.raises(IndexError, match="out of range"):
            cpu_backend.cross_entropy_with_grad_(torch.randn(2, 5), t)
        with pytest.raises(IndexError, match="out of range"):
            reference.cross_entropy_with_grad_(torch.randn(2, 5), t)


@needs_kernels
def test_fused_ops_reject_mismatched_shapes_with_a_clear_error():
    with pytest.raises(ValueError, match="weight"):
        cpu_backend.rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="one shape"):
        cpu_backend.swiglu(torch.randn(3, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="targets"):
        cpu_backend.cross_entropy_with_grad_(torch.randn(3, 8), torch.zeros(2, dtype=torch.long))


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.delenv("LIFT_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())


@needs_kernels
def test_fused_ops_fall_back_to_the_reference_for_other_dtypes_and_mixed_inputs(fresh_warnings):
    """The kernels refuse (dispatch.Unsupported); dispatch runs the reference and says so."""
    torch.manual_seed(5)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, dtype=torch.float64)
    with pytest.raises(dispatch.Unsupported, match="float64"):
        cpu_backend.rms_norm(x, w, 1e-6)
    with pytest.warns(RuntimeWarning, match="float64"):
        y = ops.rms_norm(x, w, 1e-6)
    assert torch.equal(y, reference.rms_norm(x, w, 1e-6))
    xb, wf = torch.randn(4, 9).bfloat16(), torch.rand(9)  # HF's mix: bf16 activations, fp32 weight
    with pytest.warns(RuntimeWarning, match="mixed dtypes"):
        assert torch.equal(ops.rms_norm(xb, wf, 1e-6), reference.rms_norm(xb, wf, 1e-6))
    g, u = torch.randn(5, dtype=torch.float16), torch.randn(5, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="float16"):
        assert torch.equal(ops.swiglu(g, u), reference.swiglu(g, u))


# ------------------------------------------------------------------ rotary
def _rope_tables(batch, L, D, dtype, seed):
    """cos/sin as HF's rotary embedding builds them: the two halves equal (cat(freqs, freqs))."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 500, (batch, L), generator=g).float()
    freqs = positions[..., None] / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,D,table_batch", [(2, 9, 37, 64, 2), (3, 1, 1, 2, 1), (1, 3, 204, 64, 1),
                                                 (2, 4, 5, 30, 2)])
def test_rotary_kernel_matches_reference(dtype, B, H, L, D, table_batch):
    torch.manual_seed(B + L)
    cos, sin = _rope_tables(table_batch, L, D, dtype, seed=L)
    x = _leaf(torch.randn(B, L, H, D).transpose(1, 2), dtype)  # HF's transposed [B, H, L, D] view
    assert not x.is_contiguous() or H == 1 or L == 1
    check_kernel(lambda t: cpu_backend.rotary(t, cos, sin), lambda t: reference.rotary(t, cos.float(), sin.float()),
                  [x], dtype, ["x"])


@needs_kernels
def test_rotary_kernel_backward_uses_each_half_of_the_tables():
    # general tables (halves differ): the backward must take sin[h:] for dx[:h] and sin[:h] for dx[h:]
    torch.manual_seed(3)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    x = _leaf(torch.randn(2, 3, 7, 8), torch.float32)
    check_kernel(lambda t: cpu_backend.rotary(t, cos, sin), lambda t: reference.rotary(t, cos, sin),
                  [x], torch.float32, ["x"])


@needs_kernels
def test_rotary_errors_and_fallbacks(fresh_warnings):
    x, (cos, sin) = torch.randn(2, 3, 7, 8), _rope_tables(2, 7, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="rotary needs"):
        cpu_backend.rotary(x, cos[:, :5], sin[:, :5])
    with pytest.raises(ValueError, match="rotary needs"):
        cpu_backend.rotary(torch.randn(2, 3, 7, 7), torch.randn(2, 7, 7), torch.randn(2, 7, 7))
    xh = x.half()  # fp16, and tables that want a gradient, go to the reference (through dispatch)
    with pytest.raises(dispatch.Unsupported):
        cpu_backend.rotary(xh, cos.half(), sin.half())
    with pytest.warns(RuntimeWarning, match="float16"):
        assert torch.equal(ops.rotary(xh, cos.half(), sin.half()), reference.rotary(xh, cos.half(), sin.half()))
    grad_cos = cos.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="require a gradient"):
        ops.rotary(x, grad_cos, sin).sum().backward()
    assert grad_cos.grad is not None


@needs_kernels
def test_rms_norm_kernel_takes_non_contiguous_inputs():
    torch.manual_seed(6)
    x = torch.randn(8, 6, 16).transpose(0, 1)  # [6, 8, 16], not contiguous
    w = torch.rand(16)
    torch.testing.assert_close(cpu_backend.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ dispatch
@needs_kernels
def test_dispatch_sends_fused_ops_to_the_cpu_kernels_and_lift_backend_forces_the_reference(monkeypatch):
    for op in dispatch.FUSED_OPS:
        if op not in cpu_backend.IMPLEMENTED:  # attention, on a CPU oneDNN cannot run bf16 brgemm on
            assert dispatch.resolve(op, "cpu") == ("reference", getattr(reference, op))
            continue
        name, fn = dispatch.resolve(op, "cpu")
        assert name == "cpu" and fn is getattr(cpu_backend, op)
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    for op in dispatch.FUSED_OPS:
        assert dispatch.resolve(op, "cpu") == ("reference", getattr(reference, op))


def test_fused_ops_compile_to_their_reference_formula():
    torch.manual_seed(7)
    x, w = torch.randn(3, 5, 16), torch.rand(16)
    g, u = torch.randn(3, 32), torch.randn(3, 32)
    compiled = torch.compile(lambda a, b, c, d: (ops.rms_norm(a, b, 1e-6), ops.swiglu(c, d)), backend="eager",
                             fullgraph=True)
    y, s = compiled(x, w, g, u)
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6))
    torch.testing.assert_close(s, reference.swiglu(g, u))
