"""lift_engine's vLLM plugin (entry point group `vllm.general_plugins`, docs/DESIGN.md §7.1).

vLLM calls `register()` in every process it starts (API server, engine core, workers);
it is idempotent and cheap (nothing heavy is imported until vLLM uses it):

- registers the Gated Memory architecture `LiftGatedMemoryLlamaForCausalLM` (vLLM's
  Llama + per-request Gated Memory after paged attention; model.py) with
  `ModelRegistry.register_model`, lazily by "module:Class";
- registers a `LoRAResolver` over the adapter store (resolver.py), used by vLLM's API
  server when runtime LoRA resolution is on (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1);
- on CPU, makes vLLM's platform choose `LiftPunicaWrapperCPU` (punica.py) for its
  multi-LoRA path: base-model tokens batched with LoRA tokens stay base-model (vLLM
  0.32's CPU ops give them the last slot's LoRA), and adapter-grouped matmuls through
  lift_engine.ops instead of one weight copy per token. LIFT_VLLM_PUNICA=stock: off.

The tenant middleware (auth.py) is passed to the server with `--middleware`; when the
server builds it, it calls `install_public_model_names()`, so that vLLM's responses name
an adapter as the tenant does. `lift serve` (lift_engine.serve) sets all of it up.
"""
from __future__ import annotations

import threading

ARCHITECTURE = "LiftGatedMemoryLlamaForCausalLM"
MODEL_CLASS = "lift_engine.vllm_plugin.model:LiftGatedMemoryLlamaForCausalLM"
RESOLVER_NAME = "lift_engine_store"
PUNICA_CPU = "lift_engine.vllm_plugin.punica.LiftPunicaWrapperCPU"

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Entry point of `vllm.general_plugins`: safe to call any number of times."""
    global _registered
    with _lock:
        if _registered:
            return
        from vllm import ModelRegistry

        if ARCHITECTURE not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
        from vllm.lora.resolver import LoRAResolverRegistry

        if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
            from lift_engine.vllm_plugin.resolver import make_resolver

            LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver())
        install_punica_wrapper()
        _registered = True


def install_punica_wrapper() -> bool:
    """On CPU platforms, have vLLM build LiftPunicaWrapperCPU (by qualified name). True if done."""
    import os

    if os.environ.get("LIFT_VLLM_PUNICA", "").strip().lower() == "stock":
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    cls = type(current_platform)
    if not getattr(cls, "_lift_punica_installed", False):
        cls.get_punica_wrapper = classmethod(lambda _cls: PUNICA_CPU)
        cls._lift_punica_installed = True
    return True


def install_public_model_names() -> bool:
    """Have vLLM's responses call a tenant's adapter by the tenant's name. True if done.

    vLLM's OpenAI server takes the `model` of every completion response from one method,
    `OpenAIServingModels.model_name(lora_request)` (the LoRA's name, i.e. the internal
    "tenant/adapter@version" the tenant middleware resolved). Wrapped here to pass that
    name through `auth.public_model_name`, which gives back the name the client asked for
    during that request and leaves every other name as it is. Idempotent.

    Only where vLLM's server module is already imported (its API server imports it before
    it builds the app and our middleware): a process without it (a test driving the
    middleware in front of a stand-in app) is left alone and does not import vLLM.
    """
    import sys

    module = sys.modules.get("vllm.entrypoints.openai.models.serving")
    if module is None:
        return False
    cls = module.OpenAIServingModels
    if getattr(cls, "_lift_public_names", False):
        return True
    from lift_engine.vllm_plugin.auth import public_model_name

    stock = cls.model_name

    def model_name(self, lora_request=None) -> str:
        return public_model_name(stock(self, lora_request))

    model_name.__doc__ = stock.__doc__
    cls.model_name = model_name
    cls._lift_public_names = True
    return True
