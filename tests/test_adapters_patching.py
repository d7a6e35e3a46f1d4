"""attach_adapters on llama / mistral / qwen2 tiny models (GQA), both kinds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers_models import make_tiny_model
from lift_engine.adapters import AdapterContext, LoRABankLinear, attach_adapters
from lift_engine.config import LiftConfig, make_config
from lift_engine.errors import AdapterError

ARCHS = ["llama", "mistral", "qwen2"]
KINDS = ["lora", "gated-memory"]


def _cfg(kind: str):
    cfg = make_config("cpu", kind)
    cfg.lora.r, cfg.lora.alpha = 4, 8.0
    return cfg


def _perturb(handle, scale: float = 0.3, seed: int = 0) -> None:
    """Random non-zero weights in every slot (different per slot)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_banks().items():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_at_init_is_exactly_the_base_model(arch):
    model = make_tiny_model(arch, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (2, 7))
    base = _logits(model, ids)
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=2)
    assert len(handle.banks) == 2 * 7  # every target in both layers
    with handle.use(torch.tensor([0, 1])):
        assert torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_change_logits_and_minus_one_is_base(arch, kind):
    model = make_tiny_model(arch, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (2, 7))
    base = _logits(model, ids)
    handle = attach_adapters(model, kind, _cfg(kind), num_adapters=2)
    _perturb(handle)
    assert torch.equal(_logits(model, ids), base)  # nothing set → base model
    with handle.use(torch.tensor([-1, -1])):
        assert torch.equal(_logits(model, ids), base)
    with handle.use(torch.tensor([0, -1])):
        out = _logits(model, ids)
    assert (out[0] - base[0]).abs().max() > 1e-2
    assert torch.equal(out[1], base[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_two_adapters_in_one_batch_equal_each_alone(arch, kind):
    model = make_tiny_model(arch, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (2, 9))
    handle = attach_adapters(model, kind, _cfg(kind), num_adapters=2)
    _perturb(handle)
    with handle.use(torch.tensor([0, 1])):
        both = _logits(model, ids)
    with handle.use(torch.tensor([0])):
        first = _logits(model, ids[:1])
    with handle.use(torch.tensor([1])):
        second = _logits(model, ids[1:])
    torch.testing.assert_close(both[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], second[0], atol=1e-5, rtol=1e-5)
    assert (first[0] - _logits_with(handle, model, ids[:1], 1)[0]).abs().max() > 1e-2  # slots really differ


def _logits_with(handle, model, ids, slot):
    with handle.use(torch.tensor([slot])):
        return _logits(model, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_per_token_indices(kind):
    """[B, S] indices: a sequence whose tokens all use slot 1 equals per-sequence slot 1."""
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (2, 6))
    handle = attach_adapters(model, kind, _cfg(kind), num_adapters=2)
    _perturb(handle)
    per_token = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with handle.use(per_token):
        out = _logits(model, ids)
    torch.testing.assert_close(out[0], _logits_with(handle, model, ids[:1], 1)[0], atol=1e-5, rtol=1e-5)
    # causal: the mixed row's first 3 positions only saw slot-0 tokens
    torch.testing.assert_close(out[1, :3], _logits_with(handle, model, ids[1:], 0)[0, :3], atol=1e-5, rtol=1e-5)
    assert (out[1, 3:] - _logits_with(handle, model, ids[1:], 0)[0, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_original_model(kind):
    model = make_tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, 5))
    base = _logits(model, ids)
    modules_before = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = attach_adapters(model, kind, _cfg(kind))
    _perturb(handle)
    handle.set_indices(torch.tensor([0]))
    assert not torch.equal(_logits(model, ids), base)
    handle.remove()
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(_logits(model, ids), base)


def test_only_adapter_parameters_train():
    model = make_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=3)
    trainable = {id(p) for p in handle.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.shape[0] == 3 for p in handle.trainable_parameters())
    groups = handle.parameter_groups()
    assert {id(p) for g in groups for p in g["params"]} == trainable
    torch.optim.AdamW(groups, lr=1e-3)  # usable as optimizer param groups


def test_lora_targets_and_shapes():
    model = make_tiny_model("llama", heads=4, kv_heads=2, hidden=64, intermediate=96)
    cfg = _cfg("lora")
    cfg.lora.targets = ("q_proj", "v_proj", "down_proj")
    handle = attach_adapters(model, "lora", cfg, num_adapters=2)
    assert sorted(handle.banks) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    v = model.model.layers[0].self_attn.v_proj
    assert isinstance(v, LoRABankLinear) and isinstance(v.base_layer, nn.Linear)
    assert v.lora_a.shape == (2, 4, 64) and v.lora_b.shape == (2, 32, 4)
    assert torch.equal(v.scaling, torch.full((2,), 2.0))
    assert model.model.layers[0].mlp.down_proj.lora_a.shape == (2, 4, 96)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    # PEFT init: A ~ kaiming_uniform(a=√5) → |A| ≤ 1/√in, B = 0
    assert v.lora_a.abs().max() <= 1 / 8 and v.lora_a.abs().max() > 0.05
    assert torch.count_nonzero(v.lora_b) == 0


def test_slot_state_reset_and_load():
    model = make_tiny_model("llama")
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=2)
    _perturb(handle)
    state = handle.state_for_slot(1)
    assert set(state) == set(handle.slot_shapes(1))
    assert state["model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    handle.reset_slot(1, seed=3)
    a = model.model.layers[0].self_attn.q_proj.lora_a
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.lora_b[1]) == 0
    first = a[1].clone()
    handle.reset_slot(1, seed=3)
    assert torch.equal(a[1], first)
    handle.load_slot(0, state)
    assert all(torch.equal(v, handle.state_for_slot(0)[k]) for k, v in state.items())
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.full((64, 4), float("nan"))
    with pytest.raises(AdapterError, match="NaN"):
        handle.load_slot(1, bad)
    assert torch.equal(a[1], first)  # validated before anything was written


def test_shared_context_and_both_kinds_in_either_order():
    ids = torch.randint(0, 128, (1, 6))
    outs = []
    for order in (("lora", "gated-memory"), ("gated-memory", "lora")):
        model = make_tiny_model("llama")
        ctx = AdapterContext(1)
        handles = {kind: attach_adapters(model, kind, _cfg(kind), context=ctx) for kind in order}
        for kind, h in handles.items():
            _perturb(h, seed=0 if kind == "lora" else 1)
        # LoRA sits directly on the Linear, inside the Gated Memory wrappers
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_proj.base_layer, LoRABankLinear) and isinstance(attn.o_proj.base_layer, LoRABankLinear)
        ctx.set_indices(torch.tensor([0]))
        outs.append(_logits(model, ids))
        for h in handles.values():
            h.remove()
    torch.testing.assert_close(outs[0], outs[1])


def test_errors():
    model = make_tiny_model("llama")
    with pytest.raises(AdapterError, match="unknown adapter kind"):
        attach_adapters(model, "prefix", _cfg("lora"))
    cfg = _cfg("lora")
    cfg.lora.targets = ("q_proj", "c_attn")
    with pytest.raises(AdapterError, match="c_attn"):
        attach_adapters(model, "lora", cfg)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # failed attach left nothing behind
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=2)
    with pytest.raises(AdapterError, match="already has LoRA"):
        attach_adapters(model, "lora", _cfg("lora"))
    with pytest.raises(IndexError):
        handle.set_indices(torch.tensor([2]))
    handle.set_indices(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="batch of 2"):
        model(torch.randint(0, 128, (2, 4)))
    gm = _cfg("gated-memory").to_dict()  # the gate scale is a constant now; a config that says otherwise is refused
    gm["gated_memory"]["gate_scale"] = 2.0
    with pytest.raises(ValueError, match="gate_scale"):
        LiftConfig.from_dict(gm)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_attach_is_reproducible(kind):
    states = []
    for _ in range(2):
        torch.manual_seed(len(states))  # different global RNG state each time
        handle = attach_adapters(make_tiny_model("llama"), kind, _cfg(kind), num_adapters=2, seed=5)
        states.append(handle.state_for_slot(1))
        assert all(torch.equal(v, handle.state_for_slot(0)[k]) for k, v in states[-1].items())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    unseeded = attach_adapters(make_tiny_model("llama"), kind, _cfg(kind), num_adapters=1)
    assert any(not torch.equal(v, unseeded.state_for_slot(0)[k]) for k, v in states[0].items())


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_reset_reuses_the_seed_values_and_a_new_seed_draws_again(kind):
    """reset_slot(n, seed) copies the values the last reset with that seed drew (the cache
    holds copies: training a slot does not change what a later reset gives)."""
    handle = attach_adapters(make_tiny_model("llama"), kind, _cfg(kind), num_adapters=3, seed=5)
    start = handle.state_for_slot(0)
    _perturb(handle)
    handle.reset_slot(1, seed=5)
    assert all(torch.equal(v, handle.state_for_slot(1)[k]) for k, v in start.items())
    handle.reset_slot(2, seed=6)
    other = attach_adapters(make_tiny_model("llama"), kind, _cfg(kind), num_adapters=1, seed=6).state_for_slot(0)
    assert all(torch.equal(v, handle.state_for_slot(2)[k]) for k, v in other.items())
    assert any(not torch.equal(v, other[k]) for k, v in start.items())
    handle.reset_slot(0, seed=5)  # back to seed 5 after 6: drawn again, the same values
    assert all(torch.equal(v, handle.state_for_slot(0)[k]) for k, v in start.items())


def test_bank_init_draws_every_slot_as_consecutive_resets():
    linear = nn.Linear(10, 6)
    torch.manual_seed(3)
    bank = LoRABankLinear(linear, 4, 3, 2.0, AdapterContext(4))
    torch.manual_seed(3)
    by_slot = LoRABankLinear(linear, 4, 3, 2.0, AdapterContext(4), init=False)
    assert torch.count_nonzero(by_slot.lora_a) == 0
    for n in range(4):
        by_slot.reset_slot(n)
    assert torch.equal(bank.lora_a, by_slot.lora_a) and torch.equal(bank.scaling, by_slot.scaling)
    assert not torch.equal(bank.lora_a[0], bank.lora_a[1]) and torch.count_nonzero(bank.lora_b) == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with bias
def test_fused_lora_linear_path_leaves_outputs_and_grads_unchanged(arch, dtype, backend, monkeypatch):
    """The layer's one-op path (ops.lora_linear) gives bit for bit what base linear +
    ops.lora_linear_delta gave, logits and adapter gradients, on the reference and C++ CPU
    backends (same autograd graph, so even q/k/v's gradient contributions to their shared
    input are summed in the same order); the base stays frozen."""
    from lift_engine import ops
    from lift_engine.ops import dispatch

    monkeypatch.setenv("LIFT_BACKEND", backend)
    try:
        dispatch.resolve("lora_linear", "cpu")
    except dispatch.BackendUnavailable as exc:
        pytest.skip(str(exc))
    calls = []
    real = ops.lora_linear
    monkeypatch.setattr(dispatch, "lora_linear", lambda *a: calls.append(1) or real(*a))  # what lora_bank_linear calls
    model = make_tiny_model(arch, heads=4, kv_heads=2, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=3)
    _perturb(handle, scale=0.1)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 0, 2, 2, -1, 1, 1], [-1, -1, 2, 0, 0, 0, 1]])
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(LoRABankLinear, "fused", fused)
        calls.clear()
        params = list(handle.trainable_parameters())
        with handle.use(idx):
            logits = model(ids).logits
            grads = torch.autograd.grad(logits.float().square().mean(), params)
        assert bool(calls) == fused  # the fused run really took the one-op path
        results[fused] = (logits, grads)
    assert torch.equal(results[True][0], results[False][0])
    for got, want in zip(results[True][1], results[False][1]):
        assert torch.equal(got, want)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lora_layer_keeps_the_two_op_path_for_a_hooked_base():
    """A base Linear with a forward hook (or another dtype than the bank) is called as a module."""
    model = make_tiny_model("llama")
    handle = attach_adapters(model, "lora", _cfg("lora"), num_adapters=2)
    _perturb(handle)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    seen = []
    with handle.use(torch.tensor([0, 1])):
        assert layer._fusable(x)
        want = layer(x)
        hook = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        assert not layer._fusable(x)
        assert torch.equal(layer(x), want) and seen == [(2, 5, layer.out_features)]
        hook.remove()
        assert not layer._fusable(x.double())
        layer.lora_a.data = layer.lora_a.data.double()  # bank in another dtype than the base
        assert not layer._fusable(x)
