"""Tiny random Llama-family models built in code (nothing is downloaded).

    make_tiny_model(arch="llama" | "mistral" | "qwen2", heads=4, kv_heads=2, ...) -> model
    save_tiny_model(path, arch=..., ...) -> path         model + tokenizer as an HF directory
    make_loaded(arch=..., ...) -> LoadedModel             frozen, eval, with fingerprint
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_tiny_config(
    arch: str = "llama",
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 128,
    intermediate: int = 128,
    max_positions: int = 512,
    attn_implementation: str = "eager",
    **overrides,
):
    """A config for a tiny `arch` model (head dim = hidden / heads). Extra kwargs go to the config."""
    config_cls, _ = ARCHS[arch]
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def make_tiny_model(
    arch: str = "llama",
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in eval mode (parameters NOT frozen).

    Weights are scaled up from HF's 0.02 init (initializer_range=0.2 by default) so that
    logits and attention patterns are far from uniform and adapter effects are visible.
    """
    overrides.setdefault("initializer_range", 0.2)
    config = make_tiny_config(arch, heads, kv_heads, hidden, layers, vocab, attn_implementation=attn_implementation, **overrides)
    _, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.eval()
    return model


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **kwargs) -> Path:
    """Save a tiny `arch` model and a small byte-level tokenizer to `path` (an HF model dir)."""
    from helpers_tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    kwargs.setdefault("vocab", len(tokenizer))
    model = make_tiny_model(arch, seed=seed, **kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_loaded(arch: str = "llama", seed: int = 0, model_id: str | None = None, **kwargs):
    """A LoadedModel around a fresh tiny model (frozen, eval), without touching the disk."""
    from lift_engine.models.loading import LoadedModel, model_fingerprint

    model = make_tiny_model(arch, seed=seed, **kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, model_id=model_id or f"tiny-{arch}-{seed}", fingerprint=model_fingerprint(model))
