"""C++ CPU kernels (lift_engine._C_cpu via lift_engine.ops.cpu_backend) against the
reference ops: outputs and gradients, fp32 and bf16 (tolerances: tests/kernel_tolerances.py),
odd shapes (T = 0, 1, 13, a block boundary; rank 1 and 128; widths not multiples of 8;
head dims 16/64/128), adapter mixes (one adapter, all distinct, skewed, segments, tokens
with none, no token with an adapter), errors, fallbacks, and the backward entry points
custom_ops.py uses under torch.compile.

Skipped as a whole when the extension is not built (the reason is printed).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernel_tolerances import assert_close
from lift_engine.ops import reference
from lift_engine.ops.native import status as native_status

_CPU_STATUS = native_status()["cpu"]
pytestmark = pytest.mark.skipif(_CPU_STATUS != "loaded", reason=f"C++ CPU extension: {_CPU_STATUS}")

if _CPU_STATUS == "loaded":
    from lift_engine.ops import cpu_backend
    BLOCK = cpu_backend.BLOCK
else:  # pragma: no cover - skipped
    cpu_backend = None
    BLOCK = 128

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def low_precision_via_kernels(monkeypatch):
    """bf16/fp16 run the fp32 kernels in these tests (by default they go to the reference)."""
    if cpu_backend is not None:
        monkeypatch.setattr(cpu_backend, "LOW_PRECISION", True)


# ------------------------------------------------------------------ inputs


def make_idx(mix: str, T: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if mix == "one":  # a single adapter, not the first of the bank
        return torch.full((T,), N - 1, dtype=torch.long)
    if mix == "distinct":  # every token its own adapter (needs N >= T)
        return torch.randperm(T, generator=gen) % N
    if mix == "skewed":  # ~85% on one adapter, a few tokens on the others
        idx = torch.randint(0, N, (T,), generator=gen)
        return torch.where(torch.rand(T, generator=gen) < 0.85, torch.zeros_like(idx), idx)
    if mix == "segments":  # contiguous runs, as whole samples in a training batch
        return torch.arange(T) * N // max(T, 1)
    if mix == "none":  # about a third of the tokens have no adapter
        return torch.randint(-1, N, (T,), generator=gen)
    if mix == "all_none":
        return torch.full((T,), -1, dtype=torch.long)
    if mix == "random":
        return torch.randint(0, N, (T,), generator=gen)
    raise KeyError(mix)


def lora_inputs(op: str, T: int, fin: int, r: int, fout: int, N: int, mix: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = make_idx(mix, T, N, gen)
    x = torch.randn(T, fin, generator=gen)
    a = torch.randn(N, r, fin, generator=gen) * fin ** -0.5
    b = torch.randn(N, fout, r, generator=gen) * r ** -0.5
    s = torch.rand(N, generator=gen) + 0.5
    if op == "lora_shrink":
        return [x, a, idx]
    if op == "lora_expand":
        return [torch.randn(T, r, generator=gen), b, s, idx]
    return [x, a, b, s, idx]


def gm_inputs(T: int, H: int, d: int, N: int, mix: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = int(d ** 0.5)
    idx = make_idx(mix, T, N, gen)
    return [
        torch.randn(T, H, d, generator=gen),
        torch.randn(T, H, d, generator=gen),
        torch.randn(N, H, 2 * d, d, generator=gen) * d ** -0.5,
        torch.randn(N, H, d, 2 * d, generator=gen) * (2 * d) ** -0.5,
        torch.randn(N, H, s, d, generator=gen) * d ** -0.5,
        torch.randn(N, H, 1, s, generator=gen) * s ** -0.5 + 0.3,  # gates away from 0/1
        idx,
    ]


def check_op(op: str, inputs: list, dtype: torch.dtype, grad_scaling: bool = True) -> None:
    """Kernel on `dtype` inputs vs the reference in fp32 on the same (upcast) values."""
    gen = torch.Generator().manual_seed(1)
    fp = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    # 1-d scaling stays fp32 (as in the adapters); everything else takes `dtype`.
    low = [t.to(dtype) if i in fp and t.dim() > 1 else t for i, t in enumerate(inputs)]
    trains = [i for i in fp if grad_scaling or low[i].dim() > 1]
    k_in = [t.clone().requires_grad_(i in trains) for i, t in enumerate(low)]
    r_in = [t.float().clone().requires_grad_(i in trains) if i in fp else t for i, t in enumerate(low)]
    out = cpu_backend.IMPLEMENTED[op](*k_in)
    ref = getattr(reference, op)(*r_in)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "out", f"{op} out")
    if out.numel() == 0:
        return
    cot = torch.randn(ref.shape, generator=gen)
    out.backward(cot.to(dtype))
    if not ref.requires_grad:  # no token has an adapter: the reference is a constant
        for i in trains:
            g = k_in[i].grad
            assert g is None or not g.any(), f"{op}: non-zero gradient for input {i}"
        return
    ref.backward(cot)
    for i in trains:
        got, want = k_in[i].grad, r_in[i].grad
        if want is None:  # the reference's graph skips inputs no token with an adapter reaches
            assert got is None or not got.any(), f"{op}: non-zero gradient for input {i}"
            continue
        assert got is not None, f"{op}: no gradient for input {i}"
        assert got.dtype == k_in[i].dtype
        assert_close(got, want, dtype, "grad", f"{op} grad[{i}]")


# ------------------------------------------------------------------ LoRA

LORA_OPS = ["lora_shrink", "lora_expand", "lora_linear_delta"]
LORA_SHAPES = [  # (T, in, r, out)
    (1, 5, 1, 7),
    (13, 37, 3, 29),
    (BLOCK + 1, 100, 128, 50),  # rank 128, a block boundary
    (300, 576, 16, 192),        # the default model's q/k widths
]
MIXES = ["one", "skewed", "segments", "none", "random"]


@pytest.mark.parametrize("op", LORA_OPS)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mix", MIXES)
def test_lora_fp32(op, shape, mix):
    T, fin, r, fout = shape
    check_op(op, lora_inputs(op, T, fin, r, fout, 4, mix), torch.float32)


@pytest.mark.parametrize("op", LORA_OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["distinct", "all_none", "skewed"])
def test_lora_mixes_and_dtypes(op, dtype, mix):
    check_op(op, lora_inputs(op, 37, 24, 8, 40, 40, mix, seed=3), dtype)


@pytest.mark.parametrize("op", LORA_OPS)
def test_lora_bf16_realistic(op):
    check_op(op, lora_inputs(op, 257, 576, 16, 576, 3, "random", seed=5), torch.bfloat16)


@pytest.mark.parametrize("op", LORA_OPS)
def test_lora_zero_tokens(op):
    check_op(op, lora_inputs(op, 0, 8, 2, 6, 2, "random"), torch.float32)


@pytest.mark.parametrize("op", LORA_OPS)
def test_lora_noncontiguous_and_int32_idx(op):
    inputs = lora_inputs(op, 29, 19, 4, 11, 3, "none", seed=7)
    inputs[0] = inputs[0].t().contiguous().t()  # column-major activations
    inputs[-1] = inputs[-1].to(torch.int32)
    check_op(op, inputs, torch.float32)


def test_lora_frozen_inputs_get_no_grad():
    x, a, b, s, idx = lora_inputs("lora_linear_delta", 40, 12, 4, 9, 3, "random")
    b.requires_grad_(True)
    cpu_backend.lora_linear_delta(x, a, b, s, idx).sum().backward()
    assert b.grad is not None and x.grad is None and a.grad is None


# ------------------------------------------------------------------ Gated Memory

GM_SHAPES = [  # (T, H, d)
    (1, 1, 4),
    (13, 3, 16),
    (BLOCK + 3, 2, 64),
    (40, 9, 64),   # the default model's heads
    (21, 2, 128),  # head dim 128: gate width 11
]


@pytest.mark.parametrize("shape", GM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mix", MIXES)
def test_gated_memory_fp32(shape, mix):
    T, H, d = shape
    check_op("gated_memory_blend", gm_inputs(T, H, d, 3, mix), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["distinct", "all_none", "skewed"])
def test_gated_memory_mixes_and_dtypes(dtype, mix):
    check_op("gated_memory_blend", gm_inputs(30, 3, 32, 30, mix, seed=2), dtype)


def test_gated_memory_zero_tokens():
    check_op("gated_memory_blend", gm_inputs(0, 2, 8, 2, "random"), torch.float32)


def test_gated_memory_partial_grads():
    attn, q, w1, w2, w3, w4, idx = gm_inputs(50, 2, 16, 3, "none", seed=4)
    w2.requires_grad_(True)
    q.requires_grad_(True)
    out = cpu_backend.gated_memory_blend(attn, q, w1, w2, w3, w4, idx)
    ref_q, ref_w2 = q.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    ref = reference.gated_memory_blend(attn, ref_q, w1, ref_w2, w3, w4, idx)
    cot = torch.randn_like(ref)
    out.backward(cot)
    ref.backward(cot)
    assert attn.grad is None and w1.grad is None
    assert_close(q.grad, ref_q.grad, torch.float32, "grad", "dq")
    assert_close(w2.grad, ref_w2.grad, torch.float32, "grad", "dw2")


def test_gated_memory_no_grad_saves_nothing():
    args = gm_inputs(20, 2, 8, 2, "random")
    with torch.no_grad():
        out = cpu_backend.gated_memory_blend(*args)
    assert out.grad_fn is None
    assert_close(out, reference.gated_memory_blend(*args), torch.float32)


# ------------------------------------------------------------------ backward entry points


@pytest.mark.parametrize("op", [*LORA_OPS, "gated_memory_blend"])
def test_backward_entry_points_match_autograd(op):
    """custom_ops.py calls <op>_backward under torch.compile; same gradients as autograd."""
    inputs = (gm_inputs(33, 2, 16, 3, "none", seed=6) if op == "gated_memory_blend"
              else lora_inputs(op, 33, 20, 4, 12, 3, "none", seed=6))
    fp = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    leaves = [t.clone().requires_grad_(i in fp) for i, t in enumerate(inputs)]
    ref = getattr(reference, op)(*leaves)
    cot = torch.randn_like(ref)
    ref.backward(cot)
    grads = cpu_backend.BACKWARD[op](cot, *inputs, needs=(True,) * len(fp))
    assert len(grads) == len(fp)
    for g, i in zip(grads, fp):
        assert_close(g, leaves[i].grad, torch.float32, "grad", f"{op} backward[{i}]")


# ------------------------------------------------------------------ errors and fallbacks


def test_out_of_range_adapter_raises_index_error():
    x, a, idx = lora_inputs("lora_shrink", 5, 4, 2, 3, 2, "random")
    idx[2] = 2
    with pytest.raises(IndexError, match="out of range"):
        cpu_backend.lora_shrink(x, a, idx)
    args = gm_inputs(5, 1, 4, 2, "random")
    args[-1][0] = 7
    with pytest.raises(IndexError, match="out of range"):
        cpu_backend.gated_memory_blend(*args)


def test_bad_shapes_raise_value_error():
    x, a, idx = lora_inputs("lora_shrink", 5, 4, 2, 3, 2, "random")
    with pytest.raises(ValueError):
        cpu_backend.lora_shrink(x, a, idx[:3])
    with pytest.raises(ValueError):
        cpu_backend.lora_shrink(x.unsqueeze(0), a, idx)
    attn, q, *w, idx = gm_inputs(5, 2, 4, 2, "random")
    with pytest.raises(ValueError):
        cpu_backend.gated_memory_blend(attn, q[:, :1], *w, idx)


@pytest.fixture
def forced_cpu(monkeypatch):
    """LIFT_BACKEND=cpu with fresh warning memory: dispatch, not the backend, falls back."""
    from lift_engine.ops import dispatch

    monkeypatch.setenv("LIFT_BACKEND", "cpu")
    monkeypatch.setattr(dispatch, "_warned", set())
    return dispatch


def test_low_precision_goes_to_reference_by_default(monkeypatch, forced_cpu):
    from lift_engine import ops

    monkeypatch.setattr(cpu_backend, "LOW_PRECISION", False)
    args = [t.bfloat16() if t.is_floating_point() else t for t in lora_inputs("lora_shrink", 17, 9, 3, 5, 2, "none")]
    with pytest.raises(forced_cpu.Unsupported, match="LIFT_CPU_LOW_PRECISION"):
        cpu_backend.lora_shrink(*args)  # the backend refuses; dispatch falls back
    with pytest.warns(RuntimeWarning, match="cpu backend does not take these inputs for lora_shrink"):
        torch.testing.assert_close(ops.lora_shrink(*args), reference.lora_shrink(*args), rtol=0, atol=0)


def test_float64_goes_to_reference_exactly(forced_cpu):
    from lift_engine import ops

    args = [t.double() if t.is_floating_point() else t for t in lora_inputs("lora_linear_delta", 17, 9, 3, 5, 2, "none")]
    with pytest.raises(forced_cpu.Unsupported, match="float64"):
        cpu_backend.lora_linear_delta(*args)
    with pytest.warns(RuntimeWarning, match="float64"):
        torch.testing.assert_close(ops.lora_linear_delta(*args), reference.lora_linear_delta(*args), rtol=0, atol=0)


def test_dispatch_picks_cpu_backend(monkeypatch):
    from lift_engine.ops import dispatch

    monkeypatch.setenv("LIFT_BACKEND", "cpu")
    for op in cpu_backend.IMPLEMENTED:
        exposed = hasattr(cpu_backend, op)
        name, fn = dispatch.resolve(op, "cpu")
        assert name == ("cpu" if exposed else "reference"), op
    assert cpu_backend.supports("cpu") is None
    assert cpu_backend.supports("cuda")


def test_aten_gemm_fallback_in_subprocess():
    """LIFT_CPU_GEMM=aten forces the GEMM path used where torch's BLAS exports no sgemm_."""
    code = textwrap.dedent("""
        import torch
        from lift_engine.ops import cpu_backend, reference, native
        assert native.load("cpu").gemm_backend == "aten", native.load("cpu").gemm_backend
        g = torch.Generator().manual_seed(0)
        x, a, b = torch.randn(70, 9, generator=g), torch.randn(3, 4, 9, generator=g), torch.randn(3, 6, 4, generator=g)
        s, idx = torch.rand(3, generator=g), torch.randint(-1, 3, (70,), generator=g)
        xs = [t.clone().requires_grad_() for t in (x, a, b)]
        xr = [t.clone().requires_grad_() for t in (x, a, b)]
        yk = cpu_backend.lora_linear_delta(*xs, s, idx); yr = reference.lora_linear_delta(*xr, s, idx)
        torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)
        yk.sum().backward(); yr.sum().backward()
        for k, r in zip(xs, xr):
            torch.testing.assert_close(k.grad, r.grad, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, LIFT_CPU_GEMM="aten")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_op("lora_linear_delta", lora_inputs("lora_linear_delta", 300, 40, 8, 24, 5, "skewed", seed=9), torch.float32)
        check_op("gated_memory_blend", gm_inputs(300, 3, 16, 5, "skewed", seed=9), torch.float32)
    finally:
        torch.set_num_threads(old)
