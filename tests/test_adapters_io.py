"""Adapter files (docs/DESIGN.md §6): round trips, validation, atomic writes, PEFT parity."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_models import make_loaded, make_tiny_model
from lift_engine.adapters import attach_adapters, load_adapter, read_manifest, save_adapter
from lift_engine.adapters import io as adapter_io
from lift_engine.adapters.gated_memory import QueryCapture
from lift_engine.config import make_config
from lift_engine.errors import AdapterError


def _cfg(kind: str):
    cfg = make_config("cpu", kind)
    cfg.lora.r, cfg.lora.alpha = 4, 8.0
    return cfg


def _perturb(handle, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.named_banks().values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _saved(tmp_path, kind, arch="llama", slot=1):
    base = make_loaded(arch)
    cfg = _cfg(kind)
    handle = attach_adapters(base.model, kind, cfg, num_adapters=2)
    _perturb(handle)
    out = save_adapter(handle, slot, tmp_path / "adapter", base=base, lift_config=cfg, extra={"doc": "x"})
    return base, handle, out


@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    base, handle, out = _saved(tmp_path, kind)
    ids = torch.randint(0, 128, (1, 8))
    with handle.use(torch.tensor([1])):
        expected = _logits(base.model, ids)
    fresh = make_loaded("llama")  # same seed → same base model, new object
    loaded = load_adapter(out, fresh)
    assert loaded.kind == kind and loaded.num_adapters == 1
    saved_state, loaded_state = handle.state_for_slot(1), loaded.state_for_slot(0)
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    with loaded.use(torch.tensor([0])):
        assert torch.equal(_logits(fresh.model, ids), expected)
    manifest = read_manifest(out)
    assert manifest["kind"] == kind and manifest["base_model"]["fingerprint"] == base.fingerprint
    assert manifest["extra"] == {"doc": "x"} and manifest["lift_config"]["adapter"] == kind


def test_file_layout(tmp_path):
    base, _, lora_dir = _saved(tmp_path / "l", "lora")
    names = set(load_file(str(lora_dir / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 2 * 7 * 2
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == base.model_id
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    _, _, gm_dir = _saved(tmp_path / "g", "gated-memory")
    tensors = load_file(str(gm_dir / "gated_memory.safetensors"))
    assert tensors["model.layers.1.self_attn.gated_memory.w1"].shape == (4, 32, 16)
    assert tensors["model.layers.0.self_attn.gated_memory.w4"].shape == (4, 1, 4)
    gm_config = json.loads((gm_dir / "gated_memory_config.json").read_text())
    assert {k: gm_config[k] for k in ("num_layers", "num_heads", "head_dim", "gate_dim", "hidden")} == {
        "num_layers": 2, "num_heads": 4, "head_dim": 16, "gate_dim": 4, "hidden": 32,
    }
    assert gm_config["base_model_fingerprint"] == base.fingerprint


def test_load_into_a_slot_of_an_existing_bank(tmp_path):
    base, handle, out = _saved(tmp_path, "gated-memory")
    other = make_loaded("llama")
    bank = attach_adapters(other.model, "gated-memory", _cfg("gated-memory"), num_adapters=3)
    before = bank.state_for_slot(0)
    assert load_adapter(out, other, handle=bank, slot=2) is bank
    assert all(torch.equal(v, handle.state_for_slot(1)[k]) for k, v in bank.state_for_slot(2).items())
    assert all(torch.equal(v, bank.state_for_slot(0)[k]) for k, v in before.items())
    with pytest.raises(AdapterError, match="gated-memory adapter; the handle holds lora"):
        load_adapter(out, other, handle=attach_adapters(other.model, "lora", _cfg("lora")))


def test_lower_rank_lora_into_a_bigger_bank(tmp_path):
    base, handle, out = _saved(tmp_path, "lora")
    other = make_loaded("llama")
    cfg = _cfg("lora")
    cfg.lora.r, cfg.lora.alpha = 8, 99.0
    bank = attach_adapters(other.model, "lora", cfg, num_adapters=2)
    load_adapter(out, other, handle=bank, slot=1)
    assert bank.slot_lora_config(1) == {"r": 4, "alpha": 8.0}
    ids = torch.randint(0, 128, (1, 6))
    with handle.use(torch.tensor([1])):
        expected = _logits(base.model, ids)
    # rtol 1e-4: the rank-8 bank runs other GEMM shapes than the rank-4 one; on an AMD EPYC
    # without AMX one logit of 768 (0.12) differed by 1.2e-5 (relative 1e-4) in fp32.
    with bank.use(torch.tensor([1])):
        torch.testing.assert_close(_logits(other.model, ids), expected, atol=1e-5, rtol=1e-4)
    again = save_adapter(bank, 1, tmp_path / "again", base=other, lift_config=cfg)
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 4


def _rewrite(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


CORRUPTIONS = {
    "truncated": lambda d, w: w.write_bytes(w.read_bytes()[: w.stat().st_size // 2]),
    "wrong shape": lambda d, w: _rewrite(w, lambda t: t.update({k: v[..., :-1].contiguous() for k, v in list(t.items())[:1]})),
    "nan": lambda d, w: _rewrite(w, lambda t: next(iter(t.values())).view(-1).__setitem__(0, float("nan"))),
    "missing tensor": lambda d, w: _rewrite(w, lambda t: t.pop(sorted(t)[0])),
    "wrong dtype": lambda d, w: _rewrite(w, lambda t: t.update({k: v.double() for k, v in t.items()})),
    "missing manifest": lambda d, w: (d / "lift_adapter.json").unlink(),
    "garbled manifest": lambda d, w: (d / "lift_adapter.json").write_text("{not json"),
    "unknown kind": lambda d, w: (d / "lift_adapter.json").write_text(
        json.dumps({**json.loads((d / "lift_adapter.json").read_text()), "kind": "prefix"})
    ),
    "missing weights": lambda d, w: w.unlink(),
}
MESSAGES = {
    "truncated": "cannot read", "wrong shape": "shape", "nan": "NaN", "missing tensor": "missing tensor",
    "wrong dtype": "float64", "missing manifest": "lift_adapter.json is missing", "garbled manifest": "cannot parse",
    "unknown kind": "unknown kind", "missing weights": "is missing",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_corrupt_adapters_raise_adapter_error(tmp_path, kind, corruption):
    _, _, out = _saved(tmp_path, kind)
    weights = out / ("adapter_model.safetensors" if kind == "lora" else "gated_memory.safetensors")
    CORRUPTIONS[corruption](out, weights)
    fresh = make_loaded("llama")
    with pytest.raises(AdapterError, match=MESSAGES[corruption]) as err:
        load_adapter(out, fresh)
    assert "\n" not in str(err.value)
    # a failed load leaves the model unpatched
    assert not any(isinstance(m, QueryCapture) or hasattr(m, "lora_a") for m in fresh.model.modules())


def test_wrong_base_model_is_named_in_the_error(tmp_path):
    base, _, out = _saved(tmp_path, "gated-memory")
    other = make_loaded("llama", seed=1, model_id="other-model")
    with pytest.raises(AdapterError) as err:
        load_adapter(out, other)
    message = str(err.value)
    assert base.fingerprint in message and other.fingerprint in message and "other-model" in message


def test_missing_or_non_directory_adapter(tmp_path):
    base = make_loaded("llama")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope", base)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "file", base)


def test_save_is_atomic_and_replaces_whole_directory(tmp_path, monkeypatch):
    base, handle, out = _saved(tmp_path, "lora")
    (out / "stray.txt").write_text("from an older adapter")
    save_adapter(handle, 0, out, base=base, lift_config=_cfg("lora"))
    assert not (out / "stray.txt").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp leftovers
    good = {k: v.clone() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(handle, 1, out, base=base, lift_config=_cfg("lora"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    now = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(now[k], good[k]) for k in good)  # the old adapter is intact


def test_peft_loads_our_lora_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_loaded("qwen2", heads=4, kv_heads=2)  # qwen2: biases on q/k/v
    cfg = _cfg("lora")
    handle = attach_adapters(base.model, "lora", cfg, num_adapters=2)
    _perturb(handle, scale=0.2)
    out = save_adapter(handle, 1, tmp_path / "adapter", base=base, lift_config=cfg)
    ids = torch.randint(0, 128, (2, 10))
    with handle.use(torch.tensor([1])):
        ours = _logits(base.model, ids)
    with handle.use(torch.tensor([-1])):
        plain = _logits(base.model, ids)
    fresh = make_tiny_model("qwen2", heads=4, kv_heads=2)
    peft_model = peft.PeftModel.from_pretrained(fresh, str(out))
    theirs = _logits(peft_model, ids)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exchange", [True, False])
def test_fsutil_directory_publish(tmp_path, monkeypatch, exchange):
    from lift_engine import fsutil

    if not exchange:
        monkeypatch.setattr(fsutil, "exchange_paths", lambda a, b: False)
    dst = tmp_path / "d"
    for content in ("one", "two"):
        with fsutil.atomic_dir(dst) as tmp:
            (tmp / "f.txt").write_text(content)
            assert not (dst / "f.txt").exists() or (dst / "f.txt").read_text() != content
        assert (dst / "f.txt").read_text() == content
    with fsutil.atomic_dir(dst, replace=False) as tmp:  # first writer wins
        (tmp / "f.txt").write_text("three")
    assert (dst / "f.txt").read_text() == "two"
    fsutil.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.json"]
