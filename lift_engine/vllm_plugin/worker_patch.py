"""Lets vLLM's worker-side LoRA manager load Gated Memory adapters (runtime hook, no vLLM edit).

vLLM loads every adapter named in a request through `WorkerLoRAManager._load_adapter`,
which expects the PEFT layout. `install()` wraps that method once per process: for a
directory holding `gated_memory_config.json` it returns a `LoRAModel` with no LoRA
weights for any layer (every LoRA layer resets that slot to zero, so the base projections
are used; one zero entry under a name that matches no module keeps vLLM's manager happy)
and the memory weights attached as `lift_gated_memory` = [(w1, w2, w3, w4) per layer];
LiftGatedMemoryLlamaForCausalLM copies them into its slot banks when vLLM activates the
adapter in a slot. PEFT directories go to vLLM's own loader unchanged.

Everything else — LRU caching on CPU, slot assignment, eviction, the per-token slot
mapping — stays vLLM's. install() is idempotent and only called by the Gated Memory
architecture (so a server without it never changes vLLM's behaviour).
"""
from __future__ import annotations

import os
import threading

import torch

_lock = threading.Lock()
_PATCH_MARK = "_lift_gated_memory_patch"
MARKER_MODULE = "lift_gated_memory.no_lora"


def is_gated_memory_dir(path: str) -> bool:
    from lift_engine.store import GM_CONFIG_FILE

    return os.path.isfile(os.path.join(path, GM_CONFIG_FILE))


def load_gated_memory_weights(path: str, num_layers: int, num_heads: int, head_dim: int,
                              dtype: torch.dtype, heads: slice | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Read and validate a Gated Memory adapter → [(w1, w2, w3, w4)] per layer, in `dtype`.

    num_heads: the model's total query heads; heads: the ones this tensor-parallel rank holds.
    """
    from pathlib import Path

    from lift_engine.vllm_plugin.validate import ModelGeometry, read_gated_memory_tensors

    geometry = ModelGeometry(num_layers=num_layers, hidden=num_heads * head_dim, intermediate=1,
                             num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim)
    tensors = read_gated_memory_tensors(Path(path), geometry)
    return [
        tuple(tensors[f"model.layers.{i}.self_attn.gated_memory.{w}"][heads or slice(None)].to(dtype).contiguous()
              for w in ("w1", "w2", "w3", "w4"))
        for i in range(num_layers)
    ]


def install() -> None:
    """Wrap WorkerLoRAManager._load_adapter once in this process."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    with _lock:
        if getattr(WorkerLoRAManager._load_adapter, _PATCH_MARK, False):
            return
        original = WorkerLoRAManager._load_adapter

        def _load_adapter(self, lora_request):
            from vllm.lora.lora_model import LoRAModel
            from vllm.lora.lora_weights import LoRALayerWeights
            from vllm.lora.utils import get_adapter_absolute_path

            path = get_adapter_absolute_path(lora_request.lora_path)
            if not is_gated_memory_dir(path):
                return original(self, lora_request)
            from lift_engine.vllm_plugin.model import GM_WEIGHTS_ATTR

            model = self._adapter_manager.model
            geometry = getattr(model, "lift_geometry", None)
            if geometry is None:
                raise ValueError(f"adapter {lora_request.lora_name!r} is a Gated Memory adapter; "
                                 "serve the model with the LiftGatedMemoryLlamaForCausalLM architecture")
            layers, total_heads, heads, head_dim = geometry
            dtype = self.lora_config.lora_dtype
            if not isinstance(dtype, torch.dtype):
                dtype = next(model.parameters()).dtype
            rank = 0
            if heads != total_heads:
                from vllm.distributed import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            weights = load_gated_memory_weights(path, layers, total_heads, head_dim, dtype,
                                                slice(rank * heads, (rank + 1) * heads))
            # vLLM's manager needs at least one entry; this name matches no module, so
            # activation resets every LoRA layer's slot (base projections, exactly).
            marker = LoRALayerWeights(MARKER_MODULE, 1, 1, torch.zeros(1, 1, dtype=dtype), torch.zeros(1, 1, dtype=dtype))
            lora = LoRAModel(lora_request.lora_int_id, 1, {MARKER_MODULE: marker})
            setattr(lora, GM_WEIGHTS_ATTR, weights)
            lora.is_3d_lora_weight = False
            return lora

        setattr(_load_adapter, _PATCH_MARK, True)
        _load_adapter.__wrapped__ = original
        WorkerLoRAManager._load_adapter = _load_adapter
