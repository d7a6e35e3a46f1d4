"""One tolerance table per dtype for every kernel test (Triton, CUDA, C++ CPU).

How kernels are compared: the reference op runs in float32 on the *same* inputs
(low-precision inputs are upcast exactly), and the kernel's output — computed from the
low-precision inputs, rounded to their dtype — must satisfy, elementwise,

    |actual − expected| ≤ atol · max(1, max|expected|) + rtol · |expected|

The atol term is scaled by the tensor's largest magnitude because kernels and references
sum in different orders: a sum of many terms has an absolute error that grows with the
terms, not with the (possibly cancelled) result. Gradients of weights are sums over all
tokens of an adapter, so they use the looser `grad` row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# dtype → {"out": forward outputs, "grad": gradients}.
TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float32: {"out": Tol(atol=2e-5, rtol=2e-5), "grad": Tol(atol=5e-5, rtol=5e-5)},
    torch.float16: {"out": Tol(atol=2e-3, rtol=4e-3), "grad": Tol(atol=4e-3, rtol=8e-3)},
    torch.bfloat16: {"out": Tol(atol=1.6e-2, rtol=3e-2), "grad": Tol(atol=3e-2, rtol=6e-2)},
}


def tolerance(dtype: torch.dtype, kind: str = "out") -> Tol:
    return TOLERANCES[dtype][kind]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "out",
                 name: str = "") -> None:
    """Compare a kernel result with the float32 reference (see module docstring)."""
    tol = tolerance(dtype, kind)
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in the kernel result")
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    bound = tol.atol * scale + tol.rtol * expected.abs()
    err = (actual - expected).abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name} ({dtype}, {kind}): {int(bad.sum())}/{err.numel()} elements out of tolerance; "
            f"max error {float(err.max()):.3g} (scale {scale:.3g}, atol {tol.atol}, rtol {tol.rtol}); "
            f"worst at flat index {worst}: got {float(actual.flatten()[worst]):.6g}, "
            f"expected {float(expected.flatten()[worst]):.6g}"
        )


def check_kernel(kernel, ref_fn, inputs, dtype: torch.dtype, names) -> None:
    """kernel(*inputs) against ref_fn run in fp32 on the same (exactly upcast) values:
    output dtype, shape (that of inputs[0]) and values, and each input's gradient
    (`names` label them) for a random output gradient."""
    y = kernel(*inputs)
    assert y.dtype == dtype and y.shape == inputs[0].shape
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    ref = ref_fn(*leaves)
    ref.backward(dy.float())
    assert_close(y, ref, dtype, name="y")
    if y.numel():
        for name, got, want in zip(names, inputs, leaves):
            assert_close(got.grad, want.grad, dtype, "grad", name=name)
