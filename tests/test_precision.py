"""Mixed-precision tuning: ops.lora_linear_rows, the bf16 frozen base, the training mask."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import make_tiny_model
from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.adapters import LoRABankLinear, attach_adapters, save_adapter
from lift_engine.batch.forward import training_attention_mask
from lift_engine.batch.job import BatchTuneJob
from lift_engine.config import LiftConfig, make_config
from lift_engine.models.loading import load_base_model
from lift_engine.ops.lora_linear_rows import lora_linear_rows
from lift_engine.ops.reference import lora_linear
from lift_engine.precision import compute_dtype, frozen_base_in


# ------------------------------------------------------------------ lora_linear_rows
def _rows_case(dtype: torch.dtype, bias: bool, seed: int = 0):
    """Odd shapes: B=5 rows, S=7, in=13, out=11, N=4 adapters of rank 3; one row without adapter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 13, generator=g).to(dtype)
    weight = torch.randn(11, 13, generator=g).to(dtype)
    b = torch.randn(11, generator=g).to(dtype) if bias else None
    lora_a = torch.randn(4, 3, 13, generator=g)  # fp32 master weights
    lora_b = torch.randn(4, 11, 3, generator=g)
    scaling = torch.tensor([0.5, 2.0, 1.0, 0.25])
    rows = torch.tensor([2, -1, 0, 2, 3])  # adapter 1 absent, 2 twice, one base-only row
    return x, weight, b, lora_a, lora_b, scaling, rows


def _reference(x, weight, bias, lora_a, lora_b, scaling, rows):
    """ops.reference.lora_linear in fp32 with the row index expanded to every token."""
    idx = rows[:, None].expand(x.shape[0], x.shape[1]).reshape(-1)
    return lora_linear(x.float(), weight.float(), None if bias is None else bias.float(), lora_a, lora_b, scaling, idx)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lora_linear_rows_matches_the_reference_op(dtype, tol, bias):
    """Outputs and gradients (x, A, B, scaling, and W/bias when they require grad) against
    the token-level reference op; bf16 activations with an fp32 bank: grads land in fp32."""
    x, weight, b, lora_a, lora_b, scaling, rows = _rows_case(dtype, bias)
    leaves = [t.requires_grad_() for t in (x, weight, lora_a, lora_b, scaling) + ((b,) if bias else ())]
    out = lora_linear_rows(x, weight, b, lora_a, lora_b, scaling, rows)
    assert out.dtype == dtype and out.shape == (5, 7, 11)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad((out.float() * grad_out).sum(), leaves)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    rx, rw, ra, rb, rs = ref_leaves[:5]
    rbias = ref_leaves[5] if bias else None
    want_out = _reference(rx, rw, rbias, ra, rb, rs, rows)
    want = torch.autograd.grad((want_out * grad_out).sum(), ref_leaves)
    scale = float(want_out.detach().abs().max())
    torch.testing.assert_close(out.detach().float(), want_out.detach(), rtol=tol, atol=tol * scale)
    for name, g, w, leaf in zip(("x", "weight", "lora_a", "lora_b", "scaling", "bias"), got, want, leaves):
        assert g.dtype == leaf.dtype, name
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol * float(w.abs().max()), msg=name)
    assert got[2][1].abs().max() == 0 and got[3][1].abs().max() == 0 and got[4][1] == 0  # adapter 1: in no row
    # the base-only row is exactly the base linear
    base_row = torch.nn.functional.linear(x[1].detach(), weight.detach(), None if b is None else b.detach())
    torch.testing.assert_close(out[1].detach(), base_row)


def test_lora_linear_rows_rejects_shapes_that_do_not_fit():
    x, weight, b, lora_a, lora_b, scaling, rows = _rows_case(torch.float32, False)
    with pytest.raises(ValueError, match="row_idx"):
        lora_linear_rows(x, weight, b, lora_a, lora_b, scaling, rows[:3])
    with pytest.raises(ValueError, match="row_idx"):
        lora_linear_rows(x[0], weight, b, lora_a, lora_b, scaling, rows)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_rows(x, weight[:, :5], b, lora_a, lora_b, scaling, rows)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_rows(x, weight, b, lora_a[:, :, :5], lora_b, scaling, rows)


def test_lora_layer_takes_the_row_path_only_for_per_row_indices_in_mixed_precision(monkeypatch):
    """A bf16 base with an fp32 bank and [B] indices goes through lora_linear_rows; per-token
    indices keep the token-level path; and both give the same logits."""
    from lift_engine.ops import dispatch  # the path choice lives in dispatch.lora_bank_linear

    model = make_tiny_model("llama", dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = make_config("cpu", "lora")
    handle = attach_adapters(model, "lora", cfg, num_adapters=3, dtype=torch.float32, seed=1)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    calls = []
    real = dispatch.lora_linear_rows
    monkeypatch.setattr(dispatch, "lora_linear_rows", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([2, 0, -1])
    with handle.use(rows), torch.no_grad():
        by_row = model(ids).logits
    assert calls, "the [B]-index bf16 batch did not take the row path"
    calls.clear()
    with handle.use(rows[:, None].expand(3, 6)), torch.no_grad():
        by_token = model(ids).logits
    assert not calls
    torch.testing.assert_close(by_row.float(), by_token.float(), rtol=2e-2, atol=2e-2 * by_token.float().abs().max())
    monkeypatch.setattr(LoRABankLinear, "fused", False)
    with handle.use(rows), torch.no_grad():
        model(ids)
    assert not calls  # fused = False keeps the two-op path


# ------------------------------------------------------------------ frozen_base_in
def test_frozen_base_in_casts_frozen_weights_once_and_restores_them():
    model = make_tiny_model("llama", tie_word_embeddings=True)
    for p in model.parameters():
        p.requires_grad_(False)
    handle = attach_adapters(model, "lora", make_config("cpu", "lora"), num_adapters=2)
    frozen = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.data for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    cache: dict = {}
    with frozen_base_in(model, torch.bfloat16, cache) as cast:
        assert cast == len(frozen)
        for n, p in model.named_parameters():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
        assert all(b is buffers[n] for n, b in model.named_buffers())  # rotary inv_freq untouched
        first = {n: p.data.data_ptr() for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(RuntimeError, match="inside"):
        with frozen_base_in(model, torch.bfloat16, cache):
            assert {n: p.data.data_ptr() for n, p in model.named_parameters() if not p.requires_grad} == first  # cached
            raise RuntimeError("inside")
    for n, p in model.named_parameters():  # every original tensor back, also after an error
        assert p.dtype == torch.float32
        assert p.data.data_ptr() == (frozen.get(n, trainable.get(n))).data_ptr(), n
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(handle.trainable_parameters()) == len(trainable)
    with frozen_base_in(model, torch.float32) as cast:
        assert cast == 0  # already in that dtype: nothing to do


def test_compute_dtype_names():
    assert compute_dtype("bfloat16") is torch.bfloat16 and compute_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        compute_dtype("float8")


def test_float32_compute_dtype_keeps_older_fingerprints():
    """Adapters tuned before the field existed (manifest without it) still match fp32 runs."""
    cfg = make_config("cpu", "lora")
    old = cfg.to_dict()
    del old["train"]["compute_dtype"]
    assert LiftConfig.from_dict(old).fingerprint() == cfg.fingerprint()
    cfg_bf16 = make_config("cpu", "lora")
    cfg_bf16.train.compute_dtype = "bfloat16"
    assert cfg_bf16.fingerprint() != cfg.fingerprint()


# ------------------------------------------------------------------ training mask
def test_right_padded_batches_need_no_attention_mask():
    """Without the padding mask (causal only) every real token's output is unchanged."""
    model = make_tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
        causal = model(ids, attention_mask=training_attention_mask(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(causal[real], masked[real], rtol=1e-5, atol=1e-5)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        training_attention_mask(left)


# ------------------------------------------------------------------ bf16 tuning end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("precision") / "model")


def _tiny_cfg(adapter: str, dtype: str):
    cfg = make_config("cpu", adapter)
    cfg.segment.length, cfg.context.length, cfg.qa.num_extractive = 96, 24, 6
    cfg.train.stage1_epochs = cfg.train.stage2_epochs = 1
    cfg.train.batch_size, cfg.inference.window = 3, 32
    cfg.train.compute_dtype = dtype
    return cfg


@pytest.mark.parametrize("adapter", ["lora", "gated-memory"])
def test_bf16_batched_tuning_trains_what_fp32_trains(model_dir, tmp_path, adapter):
    """Two documents tuned with a bf16 base: fp32 adapter files, the base back in fp32 after
    every step, and adapters close to the fp32 run's (far closer than to their init)."""
    docs = {"a": DOCUMENT[:160], "b": DOCUMENT[40:]}
    results = {}
    for dtype in ("float32", "bfloat16"):
        base = load_base_model(str(model_dir))
        job = BatchTuneJob(base, _tiny_cfg(adapter, dtype), tmp_path / dtype, max_active=2, checkpoint_every=10**9,
                           prefix_sharing=False)
        try:
            for name, text in docs.items():
                job.submit(text, name)
            while job.step() is not None:
                assert all(p.dtype == torch.float32 for p in base.model.parameters())
        finally:
            job.close()
        assert all(v["status"] == "done" for v in job.progress().values())
        results[dtype] = job
    weights = "adapter_model.safetensors" if adapter == "lora" else "gated_memory.safetensors"
    base = load_base_model(str(model_dir))  # the seeded initial adapter every slot starts from
    cfg = _tiny_cfg(adapter, "float32")
    handle = attach_adapters(base.model, adapter, cfg, num_adapters=1, seed=cfg.train.seed)
    save_adapter(handle, 0, tmp_path / "init", base=base, lift_config=cfg)
    init = load_file(str(tmp_path / "init" / weights))
    for name in docs:
        full = load_file(str(tmp_path / "float32" / name / weights))
        half = load_file(str(tmp_path / "bfloat16" / name / weights))
        assert full.keys() == half.keys() == init.keys()
        assert all(half[k].dtype == torch.float32 for k in half)
        # Frobenius norms over all tensors (AdamW's first steps move near-zero-gradient
        # entries by ±lr whatever their sign, so a max-abs difference says little)
        moved = sum(float((full[k] - init[k]).square().sum()) for k in full) ** 0.5  # what training changed
        off = sum(float((full[k] - half[k]).square().sum()) for k in full) ** 0.5  # what bf16 changed
        assert moved > 0 and off < 0.25 * moved, (name, off, moved)
    lf = results["float32"].docs["a"].losses
    lh = results["bfloat16"].docs["a"].losses
    assert len(lf) == len(lh) and abs(lf[0] - lh[0]) < 0.02 * lf[0]


def test_bf16_one_document_tuning_restores_the_base(model_dir, tmp_path):
    """tune_document with a bf16 base: fp32 adapter, and the model answers afterwards
    exactly as before tuning (every frozen weight back, bit for bit)."""
    from lift_engine.pipeline import tune_document

    base = load_base_model(str(model_dir))
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    tune_document(base, DOCUMENT[:200], tmp_path / "one", _tiny_cfg("lora", "bfloat16"), progress=False,
                  log=lambda *a: None)
    for n, p in base.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    tensors = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    assert base.model.config._attn_implementation == "sdpa"


def test_time_estimate_follows_the_compute_dtype():
    from lift_engine.batch.estimate import ASSUMED_SPEEDUP, estimate_seconds

    model = make_tiny_model("llama")
    fp32, bf16 = estimate_seconds(model, 10_000), estimate_seconds(model, 10_000, "bfloat16")
    assert bf16 == pytest.approx(fp32 / ASSUMED_SPEEDUP["bfloat16"]) and bf16 < fp32
