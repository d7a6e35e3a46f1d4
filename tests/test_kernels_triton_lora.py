"""Triton multi-adapter LoRA kernels vs the reference ops: outputs and gradients.

Runs on CPU under TRITON_INTERPRET=1 (small shapes); on a CUDA machine the same tests
run compiled with larger shapes.
"""
from helpers_triton import ensure_interpreter

INTERPRETED = ensure_interpreter()  # before anything imports triton's kernels

import pytest  # noqa: E402
import torch  # noqa: E402

from lift_engine.kernels._common import build_segments  # noqa: E402
from lift_engine.kernels.lora_expand import expand_launch, lora_expand  # noqa: E402
from lift_engine.kernels.lora_linear_delta import lora_linear_delta  # noqa: E402
from lift_engine.kernels.lora_segment_outer import lora_segment_outer  # noqa: E402
from lift_engine.kernels.lora_shrink import lora_shrink, shrink_launch  # noqa: E402
from lift_engine.ops.reference import lora as ref  # noqa: E402

from kernel_tolerances import assert_close  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
BIG = 1 if INTERPRETED else 8  # shape multiplier on a GPU
DTYPES = [torch.float32, torch.bfloat16]


def make_idx(kind: str, num_tokens: int, num_adapters: int, seed: int = 0) -> torch.Tensor:
    """Adapter mixes: one adapter, all distinct, skewed, some tokens with none, all none."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        idx = torch.full((num_tokens,), num_adapters - 1)
    elif kind == "distinct":
        idx = torch.randperm(num_adapters, generator=g)[:num_tokens] if num_adapters >= num_tokens else \
            torch.arange(num_tokens) % num_adapters
    elif kind == "skewed":
        idx = torch.where(torch.rand(num_tokens, generator=g) < 0.8, torch.tensor(1),
                          torch.randint(0, num_adapters, (num_tokens,), generator=g))
    elif kind == "with_none":
        idx = torch.randint(-1, num_adapters, (num_tokens,), generator=g)
    elif kind == "all_none":
        idx = torch.full((num_tokens,), -1)
    else:
        raise ValueError(kind)
    return idx.to(DEVICE)


def rand(*shape, dtype=torch.float32, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def banks(n, r, d_in, d_out, dtype, seed=0):
    torch.manual_seed(seed)
    a = rand(n, r, d_in, dtype=dtype, scale=d_in ** -0.5)
    b = rand(n, d_out, r, dtype=dtype, scale=r ** -0.5)
    s = (torch.rand(n) + 0.5).to(DEVICE)
    return a, b, s


# ----------------------------------------------------------------------- segment metadata
def test_segments_group_tokens_by_adapter():
    idx = torch.tensor([2, -1, 0, 2, 2, -1, 0, 3], device=DEVICE)
    meta = build_segments(idx, 5)
    assert meta.num_segments == 3 and meta.max_len == 3 and meta.num_assigned == 6
    assert meta.seg_adapter.tolist() == [0, 2, 3]
    order = meta.token_order.tolist()
    for n, start, length in zip(meta.seg_adapter.tolist(), meta.seg_start.tolist(), meta.seg_len.tolist()):
        rows = order[start:start + length]
        assert rows == sorted(rows) and all(int(idx[t]) == n for t in rows)
    assert build_segments(idx, 5) is meta  # cached on the tensor
    idx[1] = 4  # an in-place change invalidates the cache
    assert build_segments(idx, 5).num_segments == 4
    with pytest.raises(IndexError):
        build_segments(torch.tensor([0, 5], device=DEVICE), 5)
    with pytest.raises(IndexError):
        build_segments(torch.tensor([0, -2], device=DEVICE), 5)


# ------------------------------------------------------------------------ forward ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", ["one", "distinct", "skewed", "with_none", "all_none"])
def test_delta_forward_and_grads_match_reference(dtype, mix):
    num_tokens, n = 37 * BIG, 6
    if mix == "distinct":  # every token its own adapter (one program per segment: keep T small)
        num_tokens = n = 13 * BIG
    a, b, s = banks(n, 8, 40, 24, dtype)
    x = rand(num_tokens, 40, dtype=dtype, seed=1)
    idx = make_idx(mix, num_tokens, n)
    xs, As, Bs, ss = leaf(x), leaf(a), leaf(b), leaf(s)
    y = lora_linear_delta(xs, As, Bs, ss, idx)
    xr, Ar, Br, sr = leaf(x, torch.float32), leaf(a, torch.float32), leaf(b, torch.float32), leaf(s)
    yr = ref.lora_linear_delta(xr, Ar, Br, sr, idx)
    assert y.dtype == dtype and y.shape == (num_tokens, 24)
    assert_close(y, yr, dtype, name="delta")
    dy = rand(num_tokens, 24, dtype=dtype, seed=2)
    grads = torch.autograd.grad(y, (xs, As, Bs, ss), dy)
    if yr.requires_grad:
        rgrads = torch.autograd.grad(yr, (xr, Ar, Br, sr), dy.float())
    else:  # no token has an adapter: the reference is a constant zero
        rgrads = [torch.zeros_like(t) for t in (xr, Ar, Br, sr)]
    for name, got, want in zip(("dx", "dA", "dB", "dscaling"), grads, rgrads):
        assert_close(got, want, dtype, kind="grad", name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_and_expand_separately(dtype):
    num_tokens, n = 29 * BIG, 4
    a, b, s = banks(n, 16, 33, 50, dtype)
    x = rand(num_tokens, 33, dtype=dtype, seed=3)
    idx = make_idx("with_none", num_tokens, n, seed=5)
    xs, As = leaf(x), leaf(a)
    h = lora_shrink(xs, As, idx)
    xr, Ar = leaf(x, torch.float32), leaf(a, torch.float32)
    hr = ref.lora_shrink(xr, Ar, idx)
    assert_close(h, hr, dtype, name="shrink")
    dh = rand(num_tokens, 16, dtype=dtype, seed=4)
    for name, got, want in zip(("dx", "dA"), torch.autograd.grad(h, (xs, As), dh),
                               torch.autograd.grad(hr, (xr, Ar), dh.float())):
        assert_close(got, want, dtype, kind="grad", name=f"shrink {name}")
    hin = rand(num_tokens, 16, dtype=dtype, seed=6)
    hs, Bs = leaf(hin), leaf(b)
    y = lora_expand(hs, Bs, s, idx)
    hr2, Br = leaf(hin, torch.float32), leaf(b, torch.float32)
    yr = ref.lora_expand(hr2, Br, s, idx)
    assert_close(y, yr, dtype, name="expand")
    dy = rand(num_tokens, 50, dtype=dtype, seed=7)
    for name, got, want in zip(("dh", "dB"), torch.autograd.grad(y, (hs, Bs), dy),
                               torch.autograd.grad(yr, (hr2, Br), dy.float())):
        assert_close(got, want, dtype, kind="grad", name=f"expand {name}")


@pytest.mark.parametrize("rank,num_tokens", [(1, 45), (128, 5)])
def test_rank_extremes(rank, num_tokens):
    """rank 1 (a single row, padded to a 16-wide dot) and rank 128 (keep T tiny)."""
    dtype = torch.float32
    n = 3
    a, b, s = banks(n, rank, 24, 20, dtype, seed=rank)
    x = rand(num_tokens * BIG, 24, seed=8)
    idx = make_idx("with_none", num_tokens * BIG, n, seed=rank)
    xs, As, Bs = leaf(x), leaf(a), leaf(b)
    y = lora_linear_delta(xs, As, Bs, s, idx, decode=False)
    xr, Ar, Br = leaf(x), leaf(a), leaf(b)
    yr = ref.lora_linear_delta(xr, Ar, Br, s, idx)
    assert_close(y, yr, dtype, name=f"delta r={rank}")
    dy = rand(*y.shape, seed=9)
    for name, got, want in zip(("dx", "dA", "dB"), torch.autograd.grad(y, (xs, As, Bs), dy),
                               torch.autograd.grad(yr, (xr, Ar, Br), dy)):
        assert_close(got, want, dtype, kind="grad", name=f"{name} r={rank}")


def test_per_adapter_ranks_mask_the_padding():
    """ranks [N]: adapter n uses only its first ranks[n] rows of A / columns of B, whatever the
    padding holds, and its padding receives zero gradient."""
    dtype = torch.float32
    n, r = 4, 16
    ranks = torch.tensor([1, 16, 5, 8], device=DEVICE)
    a, b, s = banks(n, r, 32, 24, dtype, seed=11)  # padding is NOT zero: the mask must ignore it
    x = rand(41 * BIG, 32, seed=12)
    idx = make_idx("with_none", x.shape[0], n, seed=13)
    keep = (torch.arange(r, device=DEVICE)[None, :] < ranks[:, None]).float()  # [N, R]
    a0, b0 = a * keep[:, :, None], b * keep[:, None, :]  # the equivalent zero-padded bank
    xs, As, Bs = leaf(x), leaf(a), leaf(b)
    y = lora_linear_delta(xs, As, Bs, s, idx, ranks=ranks)
    xr, Ar, Br = leaf(x), leaf(a0), leaf(b0)
    yr = ref.lora_linear_delta(xr, Ar, Br, s, idx)
    assert_close(y, yr, dtype, name="ranked delta")
    dy = rand(*y.shape, seed=14)
    gx, ga, gb = torch.autograd.grad(y, (xs, As, Bs), dy)
    rx, ra, rb = torch.autograd.grad(yr, (xr, Ar, Br), dy)
    assert_close(gx, rx, dtype, "grad", "dx")
    assert_close(ga, ra * keep[:, :, None], dtype, "grad", "dA")
    assert_close(gb, rb * keep[:, None, :], dtype, "grad", "dB")
    assert float(ga[0, 1:].abs().max()) == 0.0 and float(gb[0, :, 1:].abs().max()) == 0.0
    # the decode path honours ranks too
    yd = lora_linear_delta(x[:9], a, b, s, idx[:9], ranks=ranks, decode=True)
    assert_close(yd, yr[:9], dtype, name="ranked decode")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_qkv_slices(dtype):
    """Fused q/k/v with unequal widths (GQA: q = 3 × kv): one launch, per-slice B banks."""
    n, r, d_in = 5, 8, 32
    slices = (48, 16, 16)
    torch.manual_seed(3)
    a_s = [rand(n, r, d_in, dtype=dtype, scale=d_in ** -0.5) for _ in slices]
    b_s = [rand(n, o, r, dtype=dtype, scale=r ** -0.5) for o in slices]
    s = (torch.rand(n) + 0.5).to(DEVICE)
    x = rand(33 * BIG, d_in, dtype=dtype, seed=15)
    idx = make_idx("skewed", x.shape[0], n, seed=16)
    a_cat = leaf(torch.cat(a_s, 1))
    b_cat = leaf(torch.cat(b_s, 1))
    xs = leaf(x)
    y = lora_linear_delta(xs, a_cat, b_cat, s, idx, output_slices=slices)
    xr = leaf(x, torch.float32)
    ar = [leaf(t, torch.float32) for t in a_s]
    br = [leaf(t, torch.float32) for t in b_s]
    yr = torch.cat([ref.lora_linear_delta(xr, ai, bi, s, idx) for ai, bi in zip(ar, br)], 1)
    assert_close(y, yr, dtype, name="qkv delta")
    dy = rand(*y.shape, dtype=dtype, seed=17)
    gx, ga, gb = torch.autograd.grad(y, (xs, a_cat, b_cat), dy)
    rg = torch.autograd.grad(yr, [xr, *ar, *br], dy.float())
    assert_close(gx, rg[0], dtype, "grad", "dx")
    assert_close(ga, torch.cat(rg[1:4], 1), dtype, "grad", "dA")
    assert_close(gb, torch.cat(rg[4:7], 1), dtype, "grad", "dB")
    # a list of per-slice banks is accepted by lora_expand; decode path with slices
    h = ref.lora_shrink(x.float(), torch.cat(a_s, 1).float(), idx).to(dtype)
    y_list = lora_expand(h, b_s, s, idx, decode=True)
    assert_close(y_list, torch.cat([ref.lora_expand(h[:, i * r:(i + 1) * r].float(), b.float(), s, idx)
                                    for i, b in enumerate(b_s)], 1), dtype, name="sliced decode expand")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_one_token_per_sequence(dtype):
    """Serving shape: one token per sequence, every sequence its own adapter (some none)."""
    num_seqs, n = 12, 16
    a, b, s = banks(n, 16, 64, 48, dtype, seed=21)
    x = rand(num_seqs, 64, dtype=dtype, seed=22)
    idx = torch.tensor([3, 0, 15, -1, 7, 7, 2, 9, -1, 11, 1, 4], device=DEVICE)
    yr = ref.lora_linear_delta(x.float(), a.float(), b.float(), s, idx)
    for decode in (None, True, False):
        y = lora_linear_delta(x, a, b, s, idx, decode=decode)
        assert_close(y, yr, dtype, name=f"decode={decode}")
    # accumulate into a base output in place (serving epilogue): tokens with no adapter keep base
    base = rand(num_seqs, 48, dtype=dtype, seed=23)
    h = shrink_launch(x, a, idx, decode=True)
    out = base.clone()
    expand_launch(h, b, idx, scaling=s, decode=True, out=out, accumulate=True)
    assert_close(out, base.float() + yr, dtype, name="accumulate")
    assert torch.equal(out[3], base[3])


def test_segment_outer_and_its_gradient():
    dtype = torch.float32
    n = 5
    idx = make_idx("with_none", 30 * BIG, n, seed=31)
    a = rand(idx.numel(), 12, seed=32)
    bm = rand(idx.numel(), 20, seed=33)
    s = (torch.rand(n) + 0.5).to(DEVICE)
    As, Bs = leaf(a), leaf(bm)
    g = lora_segment_outer(As, Bs, idx, n, s)
    want = torch.zeros(n, 12, 20, device=DEVICE)
    for t, k in enumerate(idx.tolist()):
        if k >= 0:
            want[k] += s[k] * torch.outer(a[t], bm[t])
    assert_close(g, want, dtype, "grad", "G")
    dg = rand(n, 12, 20, seed=34)
    da, db = torch.autograd.grad(g, (As, Bs), dg)
    Ar, Br = leaf(a), leaf(bm)
    wr = torch.stack([sum((s[k] * torch.outer(Ar[t], Br[t]) for t in range(len(idx)) if idx[t] == k),
                          torch.zeros(12, 20, device=DEVICE)) for k in range(n)])
    ra, rb = torch.autograd.grad(wr, (Ar, Br), dg)
    assert_close(da, ra, dtype, "grad", "da")
    assert_close(db, rb, dtype, "grad", "db")


def test_long_segment_split_reduction_matches_unsplit():
    """The split (workspace) reduction the GPU uses gives the unsplit result."""
    from lift_engine.kernels.lora_segment_outer import segment_outer_launch

    idx = make_idx("skewed", 70, 3, seed=41)
    a, bm = rand(70, 16, seed=42), rand(70, 24, seed=43)
    one = segment_outer_launch(a, bm, idx, 3, splits=1)
    many = segment_outer_launch(a, bm, idx, 3, splits=3)
    assert_close(many, one, torch.float32, "grad", "split")
    x, w = rand(20, 200, seed=44), rand(3, 16, 200, seed=45)
    idx2 = make_idx("with_none", 20, 3, seed=46)
    assert_close(shrink_launch(x, w, idx2, decode=False, split_k=3), ref.lora_shrink(x, w, idx2),
                 torch.float32, name="split-k shrink")


def test_wrong_adapter_mapping_is_detected():
    """Negative control: the comparison fails when tokens use the wrong adapter."""
    a, b, s = banks(4, 8, 16, 16, torch.float32, seed=51)
    x = rand(20, 16, seed=52)
    idx = make_idx("with_none", 20, 4, seed=53)
    y = lora_linear_delta(x, a, b, s, idx)
    shifted = torch.where(idx >= 0, (idx + 1) % 4, idx)
    with pytest.raises(AssertionError):
        assert_close(y, ref.lora_linear_delta(x, a, b, s, shifted), torch.float32)


def test_bad_inputs_raise():
    a, b, s = banks(3, 4, 8, 8, torch.float32)
    x = rand(6, 8)
    with pytest.raises(IndexError):
        lora_shrink(x, a, torch.tensor([0, 1, 3, 0, 0, 0], device=DEVICE), decode=False)
    with pytest.raises(ValueError):
        lora_shrink(x, a, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError):
        lora_shrink(rand(6, 9), a, torch.zeros(6, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError):
        lora_shrink(x, a.double(), torch.zeros(6, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError):
        lora_expand(rand(6, 4), b, s, torch.zeros(6, dtype=torch.long, device=DEVICE), output_slices=(4, 5))


# ------------------------------------------------- LoRA fused into the projection GEMM
# Oracle: the reference op lift_engine.ops.reference.lora_linear (F.linear + reference delta).
def _linear_case(dtype, mix, num_tokens, n, r, d_in, d_out, seed, with_bias=True):
    a, b, s = banks(n, r, d_in, d_out, dtype, seed=seed)
    w = rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5, seed=seed + 1)
    bias = rand(d_out, dtype=dtype, seed=seed + 2) if with_bias else None
    x = rand(num_tokens, d_in, dtype=dtype, seed=seed + 3)
    return x, w, bias, a, b, s, make_idx(mix, num_tokens, n, seed=seed + 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", ["one", "distinct", "skewed", "with_none", "all_none"])
def test_fused_lora_linear_matches_reference_op(dtype, mix):
    """Outputs and all six gradients (dW, dbias too: the op must honour requires_grad on the
    frozen base) on odd shapes, for every adapter mix."""
    from lift_engine.kernels.lora_linear import lora_linear
    from lift_engine.ops.reference import lora_linear as ref_linear

    num_tokens, n = 35 * BIG, 4
    if mix == "distinct":  # every token its own adapter
        num_tokens = n = 11 * BIG
    x, w, bias, a, b, s, idx = _linear_case(dtype, mix, num_tokens, n, 8, 37, 29, seed=61)
    leaves = [leaf(t) for t in (x, w, bias, a, b, s)]
    y = lora_linear(*leaves, idx)
    rl = [leaf(t, torch.float32) for t in (x, w, bias, a, b, s)]
    yr = ref_linear(*rl, idx)
    assert y.dtype == dtype and y.shape == (num_tokens, 29)
    assert_close(y, yr, dtype, name="fused linear")
    dy = rand(*y.shape, dtype=dtype, seed=66)
    names = ("dx", "dW", "dbias", "dA", "dB", "dscaling")
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(yr, rl, dy.float(), allow_unused=True, materialize_grads=True)
    for name, g, w_ in zip(names, got, want):
        assert_close(g, w_, dtype, "grad", name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_lora_linear_frozen_base_without_bias(dtype):
    """LIFT's case: weight frozen (no dW computed), no bias; gradients reach x and the banks."""
    from lift_engine.kernels.lora_linear import lora_linear
    from lift_engine.ops.reference import lora_linear as ref_linear

    x, w, _, a, b, s, idx = _linear_case(dtype, "skewed", 23 * BIG, 5, 4, 19, 33, seed=81, with_bias=False)
    xs, As, Bs = leaf(x), leaf(a), leaf(b)
    y = lora_linear(xs, w, None, As, Bs, s, idx)
    xr, Ar, Br = leaf(x, torch.float32), leaf(a, torch.float32), leaf(b, torch.float32)
    yr = ref_linear(xr, w.float(), None, Ar, Br, s, idx)
    assert_close(y, yr, dtype, name="frozen fused linear")
    assert not w.requires_grad
    dy = rand(*y.shape, dtype=dtype, seed=82)
    for name, got, want in zip(("dx", "dA", "dB"), torch.autograd.grad(y, (xs, As, Bs), dy),
                               torch.autograd.grad(yr, (xr, Ar, Br), dy.float())):
        assert_close(got, want, dtype, "grad", name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_lora_linear_qkv_slices_and_ranks(dtype):
    """Fused q/k/v with unequal widths and per-adapter ranks = one reference lora_linear per
    slice (its rows of W and bias, its A rows, its B rows) on zero-padded banks, concatenated."""
    from lift_engine.kernels.lora_linear import lora_linear
    from lift_engine.ops.reference import lora_linear as ref_linear

    n, r, d_in = 3, 16, 31
    slices = (45, 15, 15)
    ranks = torch.tensor([16, 3, 9], device=DEVICE)
    a = rand(n, 3 * r, d_in, dtype=dtype, scale=d_in ** -0.5, seed=71)
    b = rand(n, sum(slices), r, dtype=dtype, scale=r ** -0.5, seed=72)
    s = (torch.rand(n) + 0.5).to(DEVICE)
    w = rand(sum(slices), d_in, dtype=dtype, scale=d_in ** -0.5, seed=73)
    bias = rand(sum(slices), dtype=dtype, seed=77)
    x = rand(27 * BIG, d_in, dtype=dtype, seed=74)
    idx = make_idx("with_none", x.shape[0], n, seed=75)
    keep = (torch.arange(r, device=DEVICE)[None, :] < ranks[:, None]).float()
    keep_a, keep_b = keep.repeat(1, 3)[:, :, None], keep[:, None, :]
    xs, As, Bs = leaf(x), leaf(a), leaf(b)
    y = lora_linear(xs, w, bias, As, Bs, s, idx, output_slices=slices, ranks=ranks)
    xr, Ar, Br = leaf(x, torch.float32), leaf(a.float() * keep_a), leaf(b.float() * keep_b)
    off, parts = 0, []
    for i, o in enumerate(slices):
        parts.append(ref_linear(xr, w[off:off + o].float(), bias[off:off + o].float(), Ar[:, i * r:(i + 1) * r],
                                Br[:, off:off + o], s, idx))
        off += o
    yr = torch.cat(parts, 1)
    assert_close(y, yr, dtype, name="fused qkv")
    dy = rand(*y.shape, dtype=dtype, seed=76)
    gx, ga, gb = torch.autograd.grad(y, (xs, As, Bs), dy)
    rx, ra, rb = torch.autograd.grad(yr, (xr, Ar, Br), dy.float())
    assert_close(gx, rx, dtype, "grad", "dx")
    assert_close(ga, ra * keep_a, dtype, "grad", "dA")
    assert_close(gb, rb * keep_b, dtype, "grad", "dB")


def test_fused_lora_linear_wrong_adapter_mapping_is_detected():
    """Negative control for the fused op: the reference with shifted adapters disagrees."""
    from lift_engine.kernels.lora_linear import lora_linear
    from lift_engine.ops.reference import lora_linear as ref_linear

    x, w, bias, a, b, s, idx = _linear_case(torch.float32, "with_none", 20, 4, 8, 16, 16, seed=91)
    y = lora_linear(x, w, bias, a, b, s, idx)
    assert_close(y, ref_linear(x, w, bias, a, b, s, idx), torch.float32)
    shifted = torch.where(idx >= 0, (idx + 1) % 4, idx)
    with pytest.raises(AssertionError):
        assert_close(y, ref_linear(x, w, bias, a, b, s, shifted), torch.float32)


def test_patched_model_on_triton_backend_matches_reference(monkeypatch):
    """A LoRA-patched tiny model (LoRABankLinear → ops.lora_linear → the fused kernel) gives
    the reference backend's logits and adapter gradients."""
    from helpers_models import make_tiny_model
    from lift_engine.adapters import attach_adapters
    from lift_engine.config import make_config
    from lift_engine.ops import dispatch

    model = make_tiny_model("qwen2", heads=4, kv_heads=2, hidden=32, layers=1).to(DEVICE)  # q/k/v with bias
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = make_config("cpu", "lora")
    cfg.lora.r, cfg.lora.alpha = 4, 8.0
    handle = attach_adapters(model, "lora", cfg, num_adapters=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.named_banks().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(0, 128, (2, 9), generator=gen).to(DEVICE)
    idx = torch.tensor([[0] * 4 + [2] * 5, [-1, -1, 1, 1, 1, 0, 0, 2, 2]], device=DEVICE)
    params = list(handle.trainable_parameters())
    from lift_engine.ops import triton_backend

    fused_calls = []
    kernel = triton_backend._k_linear
    monkeypatch.setattr(triton_backend, "_k_linear", lambda *a: fused_calls.append(1) or kernel(*a))
    out = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LIFT_BACKEND", backend)
        assert dispatch.resolve("lora_linear", DEVICE)[0] == backend
        with handle.use(idx):
            logits = model(ids).logits
        out[backend] = (logits, torch.autograd.grad(logits.square().mean(), params))
    assert len(fused_calls) == 7  # every projection of the layer ran the fused kernel
    assert_close(out["triton"][0], out["reference"][0], torch.float32, name="logits")
    for i, (got, want) in enumerate(zip(out["triton"][1], out["reference"][1])):
        assert_close(got, want, torch.float32, "grad", f"param {i}")
