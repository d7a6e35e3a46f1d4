"""CUDA kernels (csrc/cuda, lift_engine._C_cuda via lift_engine.ops.cuda_backend).

1. Compile check (CI, no GPU needed): every csrc/cuda/*.cu compiles with nvcc for sm_80
   and sm_90 (warnings are errors), in parallel, and the torch binding (bindings.cpp)
   passes a syntax check with torch's and CUDA's headers. Skipped when nvcc is not on PATH.
   The .cu files include no torch header, so this takes seconds, not minutes.
2. GPU correctness (skipped without a CUDA device and a built extension): every kernel
   against the reference op, outputs and gradients, float32 / float16 / bfloat16
   (tolerances: tests/kernel_tolerances.py), odd shapes and adapter mixes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
ARCHS = ("80", "90")
COMPILE_BUDGET_S = 60  # target for the whole check on 2 cores (measured: bench/README.md)


def _cuda_include(nvcc: str) -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(os.path.realpath(nvcc)).parents[1]), "/usr/local/cuda"]
    for base in filter(None, candidates):
        if (Path(base) / "include" / "cuda_runtime.h").is_file():
            return Path(base) / "include"
    return None


# ------------------------------------------------------------------ 1. compile check


def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    sources = sorted(CUDA_SRC.glob("*.cu"))
    assert sources, "no .cu files in csrc/cuda"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    jobs = {}
    started = time.perf_counter()
    for src in sources:
        cmd = [nvcc, "-c", "-O3", "-std=c++17", *gencode, "-Werror", "all-warnings",
               f"-I{CUDA_SRC}", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        jobs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The binding (the one file that sees torch): a syntax check with the host compiler.
    include = _cuda_include(nvcc)
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is not None and cxx is not None:
        from torch.utils.cpp_extension import include_paths

        cmd = [cxx, "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in include_paths()],
               f"-I{sysconfig.get_paths()['include']}", f"-I{include}", f"-I{CUDA_SRC}",
               str(CUDA_SRC / "bindings.cpp")]
        jobs["bindings.cpp"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = {}
    for name, proc in jobs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures[name] = out[-4000:]
    elapsed = time.perf_counter() - started
    print(f"compiled {', '.join(jobs)} for sm_{' sm_'.join(ARCHS)} in {elapsed:.1f} s (budget {COMPILE_BUDGET_S} s)")
    assert not failures, "\n\n".join(f"--- {n}\n{o}" for n, o in failures.items())
    for src in sources:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0
    # A loose bound: the machine is shared, so only a gross regression (torch headers in a
    # .cu, say: minutes) fails here; the measured time is reported above.
    assert elapsed < 5 * COMPILE_BUDGET_S, f"CUDA compile check took {elapsed:.0f} s"


# ------------------------------------------------------------------ 2. GPU correctness

def _cuda_ready() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from lift_engine.ops.native import status

    st = status()["cuda"]
    return None if st == "loaded" else f"CUDA extension: {st}"


_WHY_NOT = _cuda_ready()
gpu = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MIXES = ["one", "skewed", "segments", "none", "random", "distinct", "all_none"]


def _idx(mix: str, T: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if mix == "one":
        return torch.full((T,), N - 1, dtype=torch.long)
    if mix == "distinct":
        return torch.randperm(T, generator=gen) % N
    if mix == "skewed":
        idx = torch.randint(0, N, (T,), generator=gen)
        return torch.where(torch.rand(T, generator=gen) < 0.85, torch.zeros_like(idx), idx)
    if mix == "segments":
        return torch.arange(T) * N // max(T, 1)
    if mix == "none":
        return torch.randint(-1, N, (T,), generator=gen)
    if mix == "all_none":
        return torch.full((T,), -1, dtype=torch.long)
    return torch.randint(0, N, (T,), generator=gen)


def _lora_inputs(op, T, fin, r, fout, N, mix, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = _idx(mix, T, N, gen)
    x = torch.randn(T, fin, generator=gen)
    a = torch.randn(N, r, fin, generator=gen) * fin ** -0.5
    b = torch.randn(N, fout, r, generator=gen) * r ** -0.5
    s = torch.rand(N, generator=gen) + 0.5
    if op == "lora_shrink":
        return [x, a, idx]
    if op == "lora_expand":
        return [torch.randn(T, r, generator=gen), b, s, idx]
    return [x, a, b, s, idx]


def _gm_inputs(T, H, d, N, mix, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = int(d ** 0.5)
    return [torch.randn(T, H, d, generator=gen), torch.randn(T, H, d, generator=gen),
            torch.randn(N, H, 2 * d, d, generator=gen) * d ** -0.5,
            torch.randn(N, H, d, 2 * d, generator=gen) * (2 * d) ** -0.5,
            torch.randn(N, H, s, d, generator=gen) * d ** -0.5,
            torch.randn(N, H, 1, s, generator=gen) * s ** -0.5 + 0.3, _idx(mix, T, N, gen)]


def _check(op, inputs, dtype, backward=True):
    from kernel_tolerances import assert_close
    from lift_engine.ops import cuda_backend, reference

    fp = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    low = [t.to(dtype) if i in fp and t.dim() > 1 else t for i, t in enumerate(inputs)]
    k_in = [t.cuda().requires_grad_(backward and i in fp) for i, t in enumerate(low)]
    r_in = [t.float().cuda().requires_grad_(backward) if i in fp else t.cuda() for i, t in enumerate(low)]
    out = cuda_backend.IMPLEMENTED[op](*k_in)
    ref = getattr(reference, op)(*r_in)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out", f"{op} out")
    if not backward or out.numel() == 0:
        return
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).cuda()
    out.backward(cot.to(dtype))
    if not ref.requires_grad:
        for i in fp:
            assert k_in[i].grad is None or not k_in[i].grad.any()
        return
    ref.backward(cot)
    for i in fp:
        want = r_in[i].grad
        if want is None:
            assert k_in[i].grad is None or not k_in[i].grad.any()
            continue
        assert_close(k_in[i].grad, want, dtype, "grad", f"{op} grad[{i}]")


@gpu
@pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "lora_linear_delta"])
@pytest.mark.parametrize("shape", [(1, 5, 1, 7), (13, 37, 3, 29), (33, 100, 128, 50), (300, 576, 16, 192),
                                   (2048, 4096, 64, 1024)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mix", MIXES)
def test_lora_vs_reference(op, shape, mix):
    T, fin, r, fout = shape
    N = max(T, 4) if mix == "distinct" else 4
    _check(op, _lora_inputs(op, T, fin, r, fout, N, mix), torch.float32)


@gpu
@pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "lora_linear_delta"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_dtypes(op, dtype):
    _check(op, _lora_inputs(op, 257, 576, 16, 576, 5, "none", seed=3), dtype)


@gpu
@pytest.mark.parametrize("shape", [(1, 1, 4), (13, 3, 16), (40, 9, 64), (33, 2, 128), (4096, 9, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mix", MIXES)
def test_gated_memory_vs_reference(shape, mix):
    T, H, d = shape
    N = max(T, 3) if mix == "distinct" else 3
    _check("gated_memory_blend", _gm_inputs(T, H, d, N, mix), torch.float32)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_memory_dtypes(dtype):
    _check("gated_memory_blend", _gm_inputs(100, 4, 64, 3, "none", seed=2), dtype)


@gpu
def test_out_of_range_index_raises():
    from lift_engine.ops import cuda_backend

    x, a, idx = (t.cuda() for t in _lora_inputs("lora_shrink", 9, 8, 2, 3, 2, "random"))
    idx[0] = 5
    with pytest.raises(IndexError):
        cuda_backend.lora_shrink(x, a, idx)


@gpu
def test_dispatch_picks_cuda_backend(monkeypatch):
    from lift_engine.ops import dispatch

    monkeypatch.setenv("LIFT_BACKEND", "cuda")
    assert dispatch.resolve("lora_shrink", "cuda")[0] == "cuda"


# ------------------------------------------------------------------ 3. emulated kernels (CPU)
# No GPU on CI: the CUDA code is only compile-checked there. What can be checked without
# one is everything around it — the tile plan cuda_backend builds, the strides it passes
# to each kernel, how it assembles gradients — by running cuda_backend against a PyTorch
# emulation of the kernels' contract (lift_cuda.h), tile by tile as the grids do (same
# tile search as find_tile in common.cuh), asserting every row is written exactly once.


class EmulatedKernels:
    tile = 32

    @staticmethod
    def _tiles(order, bin_off, tile_off, max_tiles):
        n_bins = bin_off.numel() - 1
        bin_off, tile_off = bin_off.tolist(), tile_off.tolist()
        for tile in range(max_tiles):
            if tile >= tile_off[n_bins]:
                continue
            lo, hi = 0, n_bins - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if tile_off[mid] <= tile else (lo, mid - 1)
            start = bin_off[lo] + (tile - tile_off[lo]) * 32
            length = min(32, bin_off[lo + 1] - start)
            if length > 0:
                yield lo, order[start:start + length].long()

    @staticmethod
    def _weights(W, base, rows_stride, cols_stride, n_rows, n_cols):
        i = torch.arange(n_rows)[:, None] * rows_stride + torch.arange(n_cols)[None, :] * cols_stride
        return W.reshape(-1)[base + i].float()

    @classmethod
    def _rows_product(cls, X, Y, order, bin_off, tile_off, max_tiles, weights, alpha):
        written = torch.zeros(Y.shape[0], dtype=torch.long)
        for b, rows in cls._tiles(order, bin_off, tile_off, max_tiles):
            written[rows] += 1
            if b == 0:
                Y[rows] = 0
                continue
            al = float(alpha[b - 1]) if alpha is not None else 1.0
            Y[rows] = (al * (X[rows].float() @ weights(b - 1).t())).to(Y.dtype)
        assert bool((written == 1).all()), "a row was written zero or several times"

    @classmethod
    def reduce_k(cls, X, W, sa, sj, sk, alpha, Y, order, bin_off, tile_off, max_tiles, stream):
        n_out, K = Y.shape[1], X.shape[1]
        cls._rows_product(X, Y, order, bin_off, tile_off, max_tiles,
                          lambda a: cls._weights(W, a * sa, sj, sk, n_out, K), alpha)

    @classmethod
    def wide_out(cls, X, W, sa, so, sj, alpha, Y, order, bin_off, tile_off, max_tiles, stream):
        n_out, K = Y.shape[1], X.shape[1]
        cls._rows_product(X, Y, order, bin_off, tile_off, max_tiles,
                          lambda a: cls._weights(W, a * sa, so, sj, n_out, K), alpha)

    @classmethod
    def outer(cls, U, V, dW, order, bin_off, tile_off, max_tiles, stream):
        for b, rows in cls._tiles(order, bin_off, tile_off, max_tiles):
            if b:
                dW[b - 1] += U[rows].float().t() @ V[rows].float()

    @classmethod
    def gated_memory_fwd(cls, attn, q, w1, w2, w3, w4, out, order, bin_off, tile_off, max_tiles, stream):
        from lift_engine.ops.reference.gated_memory_blend import memory_and_gate

        for b, rows in cls._tiles(order, bin_off, tile_off, max_tiles):
            if b == 0:
                out[rows] = attn[rows]
                continue
            a = b - 1
            memory, gate = memory_and_gate(q[rows].float(), w1[a].float(), w2[a].float(), w3[a].float(), w4[a].float())
            at = attn[rows].float()
            out[rows] = (at + gate * (memory - at)).to(out.dtype)


@pytest.fixture
def emulated_cuda_backend(monkeypatch):
    import importlib

    from lift_engine.ops import native

    real_load = native.load
    monkeypatch.setattr(native, "load", lambda name: EmulatedKernels if name == "cuda" else real_load(name))
    sys.modules.pop("lift_engine.ops.cuda_backend", None)
    module = importlib.import_module("lift_engine.ops.cuda_backend")

    def require_kernel(*ts):  # CPU tensors stand in for CUDA ones here
        if not (ts[0].dtype in module._DTYPES and all(t.dtype == ts[0].dtype for t in ts)):
            raise module.Unsupported("not an emulated kernel dtype")

    monkeypatch.setattr(module, "_require_kernel", require_kernel)

    def launch(plan, kernel, *args):
        kernel(*args, plan.order, plan.bin_off, plan.tile_off, plan.max_tiles, 0)

    monkeypatch.setattr(module.Plan, "launch", launch)
    yield module
    sys.modules.pop("lift_engine.ops.cuda_backend", None)


def _check_emulated(module, op, inputs):
    from kernel_tolerances import assert_close
    from lift_engine.ops import reference

    fp = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    k_in = [t.clone().requires_grad_(i in fp) for i, t in enumerate(inputs)]
    r_in = [t.clone().requires_grad_(i in fp) for i, t in enumerate(inputs)]
    out = module.IMPLEMENTED[op](*k_in)
    ref = getattr(reference, op)(*r_in)
    assert_close(out, ref, torch.float32, "out", f"{op} out")
    cot = torch.randn_like(ref)
    out.backward(cot)
    if not ref.requires_grad:
        return
    ref.backward(cot)
    for i in fp:
        if r_in[i].grad is None:
            assert k_in[i].grad is None or not k_in[i].grad.any()
        else:
            assert_close(k_in[i].grad, r_in[i].grad, torch.float32, "grad", f"{op} grad[{i}]")


@pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "lora_linear_delta"])
@pytest.mark.parametrize("mix", ["one", "skewed", "none", "distinct", "all_none"])
def test_emulated_lora_plan_strides_and_grads(emulated_cuda_backend, op, mix):
    N = 70 if mix == "distinct" else 5
    _check_emulated(emulated_cuda_backend, op, _lora_inputs(op, 70, 37, 3, 45, N, mix, seed=11))


@pytest.mark.parametrize("mix", ["one", "skewed", "none", "all_none"])
def test_emulated_gated_memory(emulated_cuda_backend, mix):
    _check_emulated(emulated_cuda_backend, "gated_memory_blend", _gm_inputs(45, 3, 16, 4, mix, seed=12))


@pytest.mark.parametrize("op", ["lora_shrink", "lora_expand", "lora_linear_delta"])
def test_emulated_backward_entry_points(emulated_cuda_backend, op):
    from kernel_tolerances import assert_close
    from lift_engine.ops import reference

    inputs = _lora_inputs(op, 40, 12, 4, 9, 3, "none", seed=13)
    fp = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    leaves = [t.clone().requires_grad_(i in fp) for i, t in enumerate(inputs)]
    ref = getattr(reference, op)(*leaves)
    cot = torch.randn_like(ref)
    ref.backward(cot)
    grads = getattr(emulated_cuda_backend, f"{op}_backward")(cot, *inputs, needs=(True,) * len(fp))
    for g, i in zip(grads, fp):
        assert_close(g, leaves[i].grad, torch.float32, "grad", f"{op}_backward[{i}]")
