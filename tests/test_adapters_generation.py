"""Cached generation (model.generate, KV cache) with adapters = an uncached greedy loop."""
from __future__ import annotations

import pytest
import torch

from helpers_models import make_tiny_model
from lift_engine.adapters import attach_adapters
from lift_engine.config import make_config

NEW_TOKENS = 8


def _greedy_uncached(model, ids, steps):
    """Full forward over the whole sequence at every step, no cache."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _generate(model, ids, steps):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, use_cache=True, pad_token_id=0,
        )


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gated-memory", "lora"])
def test_cached_generate_matches_uncached_greedy(kind, attn_impl):
    model = make_tiny_model("llama", heads=4, kv_heads=2, attn_implementation=attn_impl)
    model.generation_config.eos_token_id = None
    cfg = make_config("cpu", kind)
    cfg.lora.r = 4
    handle = attach_adapters(model, kind, cfg, num_adapters=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in handle.named_banks().items():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith("w4") else 0.3))
    prompt = torch.randint(3, 128, (2, 6), generator=gen)
    with handle.use(torch.tensor([1, 0])):
        cached = _generate(model, prompt, NEW_TOKENS)
        uncached = _greedy_uncached(model, prompt, NEW_TOKENS)
    assert cached.shape == (2, 6 + NEW_TOKENS)
    assert torch.equal(cached, uncached)
    with handle.use(torch.tensor([-1, -1])):
        base = _generate(model, prompt, NEW_TOKENS)
    assert not torch.equal(base, cached)  # the adapters steer generation
    with handle.use(torch.tensor([1])):  # each sequence alone gives the same tokens
        assert torch.equal(_generate(model, prompt[:1], NEW_TOKENS), cached[:1])


@pytest.mark.parametrize("kind", [None, "lora", "gated-memory"])
def test_serving_reference_greedy_lets_eos_win_like_vllm_ignore_eos(tmp_path, kind):
    """vllm_harness.hf_greedy is the reference for vLLM's greedy `ignore_eos=True` answers: EOS is
    an ordinary token there (chosen when it has the best logit, decoding goes on after it).
    A reference that banned EOS (generate(min_new_tokens=…)) picked the runner-up instead:
    an adapter that learned to end its answer then "mismatched" vLLM from the second token."""
    from helpers_tokenizer import make_tokenizer
    from lift_engine.models.loading import load_base_model
    import vllm_harness

    tokenizer = make_tokenizer()
    base = load_base_model(vllm_harness.tiny_llama_dir(tmp_path / "model", tokenizer, logit_scale=50.0), progress=False)
    adapter = vllm_harness.make_adapter(base, kind, tmp_path / "adapter", seed=1) if kind else None
    prompt = tokenizer("Who founded Quenwick Labs?", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS the best first token: its lm_head row = 2 × the winner's
        first = vllm_harness.hf_greedy_ids(base, adapter, prompt, 1)[0]
        assert first != eos
        base.model.lm_head.weight[eos] = 2.0 * base.model.lm_head.weight[first]
    got, _ = vllm_harness.hf_greedy(base, adapter, prompt, NEW_TOKENS)
    assert got[0] == eos and len(got) == NEW_TOKENS
    from lift_engine.adapters.io import load_adapter

    handle = load_adapter(adapter, base) if adapter else None
    try:
        if handle is not None:
            handle.set_indices(torch.tensor([0]))
        want = _greedy_uncached(base.model, torch.tensor([prompt]), NEW_TOKENS)[0, len(prompt):].tolist()
    finally:
        if handle is not None:
            handle.remove()
    assert got == want
