"""Gated Memory: the patched attention layer against a direct transcription of docs/DESIGN.md §3.2."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers_models import make_tiny_model
from lift_engine.adapters import GatedMemoryBank, attach_adapters
from lift_engine.adapters.patching import innermost
from lift_engine.config import make_config


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def transcribe_attention(attn, config, hidden, slots, weights):
    """docs/DESIGN.md §3.2 written out per sequence and per head with nn.functional.

    attn: the (patched) attention module — only its frozen q/k/v/o weights are read.
    hidden: [B, S, D] input of the attention; slots: adapter per sequence (-1 = none);
    weights: {slot: (W1 [H,2d,d], W2 [H,d,2d], W3 [H,s,d], w4 [H,1,s])}.
    """
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    q_lin, k_lin, v_lin, o_lin = (innermost(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    batch, seq, _ = hidden.shape
    inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos = torch.cat((angles, angles), dim=-1).cos().float()  # [S, d]
    sin = torch.cat((angles, angles), dim=-1).sin().float()
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    out = torch.empty(batch, seq, heads * d)
    for b in range(batch):
        x = hidden[b]
        q = F.linear(x, q_lin.weight, q_lin.bias).view(seq, heads, d)
        k = F.linear(x, k_lin.weight, k_lin.bias).view(seq, kv_heads, d)
        v = F.linear(x, v_lin.weight, v_lin.bias).view(seq, kv_heads, d)
        head_outputs = []
        for h in range(heads):
            g_kv = h // (heads // kv_heads)
            q_h = q[:, h]  # pre-RoPE query of this head
            q_rot = q_h * cos + _rotate_half(q_h) * sin
            k_rot = k[:, g_kv] * cos + _rotate_half(k[:, g_kv]) * sin
            scores = q_rot @ k_rot.T / math.sqrt(d) + causal
            attention = torch.softmax(scores, dim=-1) @ v[:, g_kv]
            if slots[b] >= 0:
                w1, w2, w3, w4 = (w[h] for w in weights[slots[b]])
                memory = F.linear(F.silu(F.linear(q_h, w1)), w2)
                gate = torch.sigmoid(3.0 * (F.linear(F.silu(F.linear(q_h, w3)), w4) - 1.0))
                attention = (1.0 - gate) * attention + gate * memory
            head_outputs.append(attention)
        out[b] = torch.cat(head_outputs, dim=-1)
    return F.linear(out, o_lin.weight, o_lin.bias)


def _attention_io(model, layer: int, input_ids):
    """Run the model; return (input hidden states, output) of one attention module."""
    seen = {}
    attn = model.model.layers[layer].self_attn

    def hook(module, args, kwargs, output):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["out"] = output[0]

    remove = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        remove.remove()
    return seen["hidden"], seen["out"]


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patched_attention_matches_transcription(arch, attn_impl):
    torch.manual_seed(0)
    model = make_tiny_model(arch, heads=4, kv_heads=2, hidden=64, attn_implementation=attn_impl)
    cfg = make_config("cpu", "gated-memory")
    handle = attach_adapters(model, "gated-memory", cfg, num_adapters=2)
    with torch.no_grad():  # make the gate and memory matter: gate weights large, slots differ
        for name, p in handle.named_banks().items():
            p.mul_(4.0 if name.endswith("w4") else 1.5)
    slots = [1, -1, 0]
    input_ids = torch.randint(0, 128, (3, 9))
    handle.set_indices(torch.tensor(slots))
    for layer in range(2):
        hidden, out = _attention_io(model, layer, input_ids)
        bank = model.model.layers[layer].self_attn.gated_memory
        weights = {n: (bank.w1[n], bank.w2[n], bank.w3[n], bank.w4[n]) for n in range(2)}
        with torch.no_grad():
            expected = transcribe_attention(model.model.layers[layer].self_attn, model.config, hidden, slots, weights)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
        # the memory changed the output where an adapter is on, and not where it is off
        with handle.use(torch.tensor([-1, -1, -1])):
            hidden_base, base_out = _attention_io(model, layer, input_ids)
        if layer == 0:
            assert torch.equal(hidden_base, hidden)
            assert torch.equal(base_out[1], out[1])
            assert (base_out[0] - out[0]).abs().max() > 1e-3
            assert (base_out[2] - out[2]).abs().max() > 1e-3


def test_gqa_memory_is_per_query_head():
    model = make_tiny_model("mistral", heads=4, kv_heads=1, hidden=64)
    handle = attach_adapters(model, "gated-memory", make_config("cpu", "gated-memory"))
    bank = model.model.layers[0].self_attn.gated_memory
    d = 16
    assert bank.w1.shape == (1, 4, 2 * d, d) and bank.w2.shape == (1, 4, d, 2 * d)
    assert bank.w3.shape == (1, 4, 4, d) and bank.w4.shape == (1, 4, 1, 4)
    # slot state uses the file names and has no N axis
    state = handle.state_for_slot(0)
    assert state["model.layers.1.self_attn.gated_memory.w3"].shape == (4, 4, d)


def test_init_is_nn_linear_default_and_gate_near_005():
    torch.manual_seed(0)
    heads, d = 9, 64  # the default model's geometry
    bank = GatedMemoryBank(1, heads, d)
    s = math.isqrt(d)
    for name, fan_in in (("w1", d), ("w2", 2 * d), ("w3", d), ("w4", s)):
        w = getattr(bank, name)
        bound = 1.0 / math.sqrt(fan_in)
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform(±bound)
    q = torch.randn(2000, heads, d)
    w3, w4 = bank.w3[0], bank.w4[0]
    gate = torch.sigmoid(3.0 * (torch.einsum("ths,hos->tho", F.silu(torch.einsum("thd,hsd->ths", q, w3)), w4) - 1.0))
    assert abs(gate.mean().item() - 0.05) < 0.015
    zero_gate = torch.sigmoid(torch.tensor(-3.0))
    # through the bank: with attention output A and q = 0, memory = 0, so out = (1 - sigmoid(-3)) A
    attn_out = torch.randn(5, heads, d)
    out = bank(attn_out, torch.zeros(5, heads, d), torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out, (1 - zero_gate) * attn_out)


def test_reset_slot_with_seed_is_reproducible_and_slot_independent():
    bank = GatedMemoryBank(3, 2, 16)
    bank.reset_slot(0, generator=torch.Generator().manual_seed(7))
    bank.reset_slot(2, generator=torch.Generator().manual_seed(7))
    for name in ("w1", "w2", "w3", "w4"):
        w = getattr(bank, name)
        assert torch.equal(w[0], w[2])
        assert not torch.equal(w[0], w[1])


def test_backward_reaches_only_used_slots():
    model = make_tiny_model("llama")
    handle = attach_adapters(model, "gated-memory", make_config("cpu", "gated-memory"), num_adapters=3)
    model.train()
    handle.set_indices(torch.tensor([[0, 0, 2, 2, -1]]))
    model(torch.randint(0, 128, (1, 5))).logits.sum().backward()
    w1 = model.model.layers[0].self_attn.gated_memory.w1
    assert w1.grad[0].abs().sum() > 0 and w1.grad[2].abs().sum() > 0
    assert w1.grad[1].abs().sum() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if "gated_memory" not in n)
