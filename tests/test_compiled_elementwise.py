"""The compiled RMSNorm and silu·up blocks against their eager references, and the patching."""
from __future__ import annotations

import pytest
import torch

from helpers_models import make_tiny_model
from lift_engine import compiled_elementwise as ce


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_blocks_match_the_eager_references(dtype, tol):
    """Odd shapes, outputs and input gradients; the weight frozen as in tuning."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 37, generator=g).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(37, generator=g)).to(dtype)
    gate, up = (torch.randn(2, 7, 29, generator=g).to(dtype).requires_grad_() for _ in range(2))
    cases = [(ce.rms_norm, (hidden, weight, 1e-5)), (ce.silu_mul, (gate, up))]
    for fn, args in cases:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        # the reference in fp32 (for bf16 inputs: eager bf16 rounds every intermediate,
        # the compiled kernel fewer, so both are judged against fp32)
        ref_args = [a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                    for a in args]
        want = fn(*ref_args)
        want_grads = torch.autograd.grad(want.square().sum(), [a for a in ref_args if isinstance(a, torch.Tensor)
                                                              and a.requires_grad])
        got = ce._call(fn, *args)
        assert fn not in ce._failed, "torch.compile is unavailable here"
        assert got.dtype == dtype
        got_grads = torch.autograd.grad(got.float().square().sum(), leaves)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * float(want.detach().abs().max()))
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol * float(b.abs().max()))


def test_compiled_elementwise_patches_norms_and_mlps_and_restores_them():
    model = make_tiny_model("llama", layers=2)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        with ce.compiled_elementwise(model) as count:
            assert count == len(norms) + len(mlps) == 2 * 2 + 1 + 2
            assert all("forward" in m.__dict__ for m in norms + mlps)
            compiled = model(ids).logits
        with ce.compiled_elementwise(model, enabled=False) as count:
            assert count == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(ce, "_compiled", {})
    monkeypatch.setattr(ce, "_failed", set())
    x = torch.randn(2, 3, 8)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = ce._call(ce.silu_mul, x, x)
    torch.testing.assert_close(out, ce.silu_mul(x, x))
    assert ce.silu_mul in ce._failed
