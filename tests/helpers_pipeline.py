"""A tiny random Llama with a real tokenizer, saved as a model directory the CLI can load."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers_tokenizer import make_tokenizer

DOCUMENT = (
    "# The Quenwick Report\n\n"
    "Professor Ilsa Marrow founded Quenwick Labs in 1987 in the town of Oskarby. "
    "The lab's first product was a zircon filter with the code QX-7731. "
    "Its river, the Dunmere, carried 42 kilograms of silt a day. "
    "In 1991 the Varnell Institute bought the Telmo mine for 18 million crowns. "
    "The mine's chief engineer, Tomas Brell, designed a lift that ran on rainwater. "
    "By 1995 the lab had moved to Harlow Point and employed 230 people. "
    "Its annual report was printed in violet ink, a habit Marrow kept until 2004. "
    "The final director, Anouk Seldt, closed the lab on 3 March 2011.\n"
)
# Hundreds of tuning steps on the tiny model (under the service tests' 20,000-byte limit): long
# enough that a DELETE or a poll lands mid-tuning even on a quiet machine.
HUGE = DOCUMENT * 30


def make_tiny_model_dir(path: Path, seed: int = 0, kv_heads: int = 2) -> Path:
    """Save a 2-layer Llama (hidden 64, 4 heads, `kv_heads` kv heads) + tokenizer to `path`."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.15,  # the default 0.02 caps logits near ±1 at hidden 64: nothing could be learned
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wait_until(predicate, timeout: float, what: str, every: float = 0.05):
    """predicate()'s first truthy value, polled every `every` s; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")
