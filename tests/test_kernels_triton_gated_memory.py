"""Triton Gated-Memory kernels (epilogue and fused attention) vs the reference ops:
outputs and every gradient (dq, dk, dv, dW1..dw4).

CPU runs use TRITON_INTERPRET=1 and small shapes; with a CUDA device the same tests run
compiled on larger shapes.
"""
from helpers_triton import ensure_interpreter

INTERPRETED = ensure_interpreter()

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import lift_engine.kernels.gated_memory_attention as gma  # noqa: E402
from lift_engine.kernels.gated_memory_attention import gated_memory_attention  # noqa: E402
from lift_engine.kernels.gated_memory_blend import gated_memory_blend  # noqa: E402
from lift_engine.ops.reference.gated_memory_attention import gated_memory_attention as ref_attention  # noqa: E402
from lift_engine.ops.reference.gated_memory_blend import gated_memory_blend as ref_blend  # noqa: E402

from kernel_tolerances import assert_close  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
BIG = 1 if INTERPRETED else 8


def banks(n, heads, dim, dtype, seed=0, gate_bias=0.0):
    """nn.Linear-like init; gate_bias raises w4 so gates are far from sigmoid(-3) and the
    memory path carries weight in the comparison."""
    g = torch.Generator().manual_seed(seed)
    sg = math.isqrt(dim)

    def lin(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * shape[-1] ** -0.5

    w4 = lin(n, heads, 1, sg) + gate_bias
    return [t.to(DEVICE, dtype) for t in (lin(n, heads, 2 * dim, dim), lin(n, heads, dim, 2 * dim),
                                          lin(n, heads, sg, dim), w4)]


def rope(batch, seq, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(seq).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    # distinct positions per sequence (as with left padding / packed offsets)
    shift = torch.arange(batch).float()[:, None, None] * 3.0
    cos = torch.cos(emb[None] + shift * inv.repeat(2)[None, None, :])
    sin = torch.sin(emb[None] + shift * inv.repeat(2)[None, None, :])
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


def idx_for(mix: str, batch: int, seq: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mix == "one":
        idx = torch.full((batch, seq), n - 1)
    elif mix == "per_sequence":  # LIFT training: each sample is one document; one sample without
        idx = torch.arange(batch)[:, None].expand(batch, seq) % (n + 1) - 1
    elif mix == "per_token":  # every token its own adapter (worst case for the block loop)
        idx = torch.randint(0, n, (batch, seq), generator=g)
    elif mix == "skewed":
        idx = torch.where(torch.rand(batch, seq, generator=g) < 0.85, torch.tensor(0),
                          torch.randint(-1, n, (batch, seq), generator=g))
    elif mix == "with_none":
        idx = torch.randint(-1, n, (batch, seq), generator=g)
    elif mix == "all_none":
        idx = torch.full((batch, seq), -1)
    else:
        raise ValueError(mix)
    return idx.to(DEVICE)


def leafs(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def check_against_reference(kernel_fn, ref_fn, inputs, consts, dtype, names, seed=0):
    """Run kernel (inputs in dtype) and reference (the same values in fp32); compare the
    output and the gradients of every input in `inputs`."""
    ins = leafs(inputs)
    rins = leafs(inputs, torch.float32)
    out = kernel_fn(*ins, *consts(dtype))
    ref = ref_fn(*rins, *consts(torch.float32))
    assert out.dtype == dtype
    assert_close(out, ref, dtype, name="out")
    g = torch.Generator().manual_seed(seed + 99)
    dout = torch.randn(ref.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, ins, dout)
    if ref.requires_grad:
        rgrads = torch.autograd.grad(ref, rins, dout.float(), allow_unused=True, materialize_grads=True)
    else:
        rgrads = [torch.zeros_like(t) for t in rins]
    for name, got, want in zip(names, grads, rgrads):
        assert_close(got, want, dtype, kind="grad", name=f"d{name}")
    return out, ref


# ------------------------------------------------------------------------ epilogue
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["one", "per_token", "skewed", "with_none", "all_none"])
def test_blend_matches_reference(dtype, mix):
    heads, dim, n = 2, 64, 3
    tokens = 37 * BIG
    g = torch.Generator().manual_seed(1)
    attn = torch.randn(tokens, heads, dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(tokens, heads, dim, generator=g).to(DEVICE, dtype)
    w = banks(n, heads, dim, dtype, seed=2, gate_bias=2.0)
    idx = idx_for(mix, 1, tokens, n, seed=3).reshape(-1)
    check_against_reference(
        lambda a, qq, *ws: gated_memory_blend(a, qq, *ws, idx),
        lambda a, qq, *ws: ref_blend(a, qq, *ws, idx),
        [attn, q, *w], lambda dt: (), dtype, ["attn", "q", "w1", "w2", "w3", "w4"],
    )


def test_blend_strided_inputs_and_bad_shapes():
    """Non-contiguous [T, H, d] views (as the attention op passes) and argument checks."""
    heads, dim, n = 3, 32, 2
    base = torch.randn(heads, 21, dim, device=DEVICE)
    attn = base.transpose(0, 1)  # [T, H, d] with token stride != H·d
    q = torch.randn(21, heads, dim, device=DEVICE)
    w = banks(n, heads, dim, torch.float32, seed=4, gate_bias=2.0)
    idx = idx_for("with_none", 1, 21, n, seed=5).reshape(-1)
    assert_close(gated_memory_blend(attn, q, *w, idx), ref_blend(attn, q, *w, idx), torch.float32)
    with pytest.raises(IndexError):
        gated_memory_blend(attn, q, *w, torch.full((21,), n, device=DEVICE))
    with pytest.raises(ValueError):
        gated_memory_blend(attn, q, w[1], w[0], w[2], w[3], idx)  # W1/W2 swapped
    with pytest.raises(ValueError):
        gated_memory_blend(attn, q[:20], *w, idx)


def test_blend_negative_control():
    """The comparison catches a memory path that uses the wrong adapter."""
    heads, dim, n = 2, 32, 3
    attn = torch.randn(16, heads, dim, device=DEVICE)
    q = torch.randn(16, heads, dim, device=DEVICE)
    w = banks(n, heads, dim, torch.float32, seed=6, gate_bias=2.0)
    idx = torch.randint(0, n, (16,), device=DEVICE)
    out = gated_memory_blend(attn, q, *w, idx)
    with pytest.raises(AssertionError):
        assert_close(out, ref_blend(attn, q, *w, (idx + 1) % n), torch.float32)


# ------------------------------------------------------------------ fused attention
ATTN_CASES = [
    # (dtype, batch, heads, kv_heads, seq, dim, mix, blocks)
    pytest.param(torch.float32, 2, 2, 2, 45, 64, "with_none", None, id="fp32-gqa1-S45-with_none"),
    pytest.param(torch.bfloat16, 2, 6, 2, 33, 64, "skewed", None, id="bf16-gqa3-S33-skewed"),
    pytest.param(torch.float32, 1, 8, 1, 20, 64, "one", None, id="fp32-gqa8-S20-one"),
    pytest.param(torch.bfloat16, 3, 3, 1, 24, 64, "per_sequence", None, id="bf16-gqa3-per_sequence"),
    pytest.param(torch.float32, 1, 2, 1, 29, 64, "per_token", None, id="fp32-gqa2-per_token"),
    pytest.param(torch.float32, 1, 2, 2, 19, 64, "all_none", None, id="fp32-pure-attention"),
    # the GPU's block shapes (fwd BLOCK_N < BLOCK_M; bwd BLOCK_M < BLOCK_N) over several blocks
    pytest.param(torch.float32, 1, 3, 1, 83, 64, "with_none", {"fwd": (32, 16), "bwd": (16, 32)},
                 id="fp32-gqa3-S83-multiblock"),
    pytest.param(torch.float32, 1, 2, 1, 17, 128, "skewed", None, id="fp32-d128"),
]


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,seq,dim,mix,blocks", ATTN_CASES)
def test_attention_matches_reference(dtype, batch, heads, kv_heads, seq, dim, mix, blocks, monkeypatch):
    if blocks is not None:
        monkeypatch.setattr(gma, "BLOCK_OVERRIDE", blocks)
    seq = seq * BIG
    n = 3
    g = torch.Generator().manual_seed(seq + heads)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g).to(DEVICE, dtype)
    w = banks(n, heads, dim, dtype, seed=seq, gate_bias=2.0)
    idx = idx_for(mix, batch, seq, n, seed=seq)
    cos, sin = rope(batch, seq, dim, dtype)

    def consts(dt):
        return (idx,)

    check_against_reference(
        lambda q_, k_, v_, *ws: gated_memory_attention(q_, k_, v_, cos, sin, *ws, idx),
        lambda q_, k_, v_, *ws: ref_attention(q_, k_, v_, cos.float(), sin.float(), *ws, idx),
        [q, k, v, *w], lambda dt: (), dtype, ["q", "k", "v", "w1", "w2", "w3", "w4"], seed=seq,
    )


def test_attention_strided_qkv_and_explicit_scale():
    """q/k/v as transposed views of [B, S, H, d] projections (the HF layout) and scale≠1/√d."""
    batch, heads, kv_heads, seq, dim, n = 1, 4, 2, 26, 32, 2
    q = torch.randn(batch, seq, heads, dim, device=DEVICE).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, device=DEVICE).transpose(1, 2)
    v = torch.randn(batch, seq, kv_heads, dim, device=DEVICE).transpose(1, 2)
    w = banks(n, heads, dim, torch.float32, seed=7, gate_bias=2.0)
    idx = idx_for("with_none", batch, seq, n, seed=8)
    cos, sin = rope(batch, seq, dim, torch.float32)
    check_against_reference(
        lambda q_, k_, v_: gated_memory_attention(q_, k_, v_, cos, sin, *w, idx, scale=0.3),
        lambda q_, k_, v_: ref_attention(q_, k_, v_, cos, sin, *w, idx, scale=0.3),
        [q, k, v], lambda dt: (), torch.float32, ["q", "k", "v"],
    )


def test_attention_saves_logsumexp_and_attention_output():
    """The forward's saved state is what FA2's backward needs: base-2 logsumexp per
    (b, s, h) and the un-blended attention output."""
    batch, heads, kv_heads, seq, dim, n = 1, 2, 1, 21, 32, 2
    q = torch.randn(batch, heads, seq, dim, device=DEVICE)
    k = torch.randn(batch, kv_heads, seq, dim, device=DEVICE)
    v = torch.randn(batch, kv_heads, seq, dim, device=DEVICE)
    w = banks(n, heads, dim, torch.float32, seed=9)
    cos, sin = rope(batch, seq, dim, torch.float32)
    idx = idx_for("with_none", batch, seq, n)
    out, attn, lse = gma.attention_fwd_launch(q, k, v, cos, sin, *w, idx)
    from lift_engine.ops.reference.gated_memory_attention import apply_rope

    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin).repeat_interleave(heads // kv_heads, 1)
    scores = (qr @ kr.transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    want_lse = torch.logsumexp(scores, -1).transpose(1, 2) / math.log(2)  # [B, S, H], base 2
    assert_close(lse, want_lse, torch.float32)
    want_attn = torch.softmax(scores, -1) @ v.repeat_interleave(heads // kv_heads, 1)
    assert_close(attn, want_attn.transpose(1, 2), torch.float32)


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 3, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    w = banks(1, 3, 16, torch.float32)
    cos, sin = rope(1, 8, 16, torch.float32)
    idx = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        gated_memory_attention(q, k, k, cos, sin, *w, idx)
    with pytest.raises(ValueError, match="adapter_idx"):
        gated_memory_attention(q, k[:, :1], k[:, :1], cos, sin, *w, idx[:, :7])
