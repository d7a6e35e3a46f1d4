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
