"""Gated Memory over vLLM's paged attention: an out-of-tree Llama architecture.

`LiftGatedMemoryLlamaForCausalLM` is vLLM's own `LlamaForCausalLM` (same weights, same
LoRA support, same paged attention) whose attention layers add, per token, the Gated
Memory of the adapter that token's request uses (docs/DESIGN.md §3.2):

    q_pre = q (query after qkv_proj — with q_proj's LoRA if any — before RoPE)
    a     = Attention(RoPE(q), RoPE(k), v)                      vLLM's paged attention
    a     = (1 − g(q_pre)) · a + g(q_pre) · m(q_pre)            per token, per query head
    out   = o_proj(a)

Which adapter a token uses comes from vLLM's multi-LoRA machinery, not from a second
mapping: a Gated Memory adapter is requested like a LoRA adapter (its name in the
`model` field), vLLM's LoRA manager puts it in a slot (`lora_index_to_id`) and writes
each token's slot into the Punica wrapper (`token_lora_indices`). Before each forward
this class

  1. syncs its per-slot memory banks with the LoRA manager's slots (a slot holding a
     Gated Memory adapter — loaded by worker_patch — gets its w1..w4; any other slot is
     marked "no memory"), and
  2. turns the per-token slot index into a per-token memory index (-1 for tokens of
     requests without a Gated Memory adapter) in a persistent buffer,

both outside the compiled region; the attention layers read the banks and the index
buffer through the `lift_vllm::gated_memory_blend_` custom op (opaque to torch.compile,
works in eager and compiled mode). Tokens with index -1 are left bit-for-bit unchanged,
so LoRA requests and base-model requests are unaffected. A batch in which no token has a
Gated Memory adapter (known once per forward) skips the blend and the copy of q in every
layer in eager mode, which is how vLLM runs LoRA on CPU; while torch.compile traces, the op
is always in the graph and checks the index itself.

Banks per layer: w1 [S, H, 2d, d], w2 [S, H, d, 2d], w3 [S, H, s, d], w4 [S, H, 1, s]
with S = max_loras slots (H query heads of this tensor-parallel rank, d head dim).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from lift_engine.vllm_plugin import worker_patch

ARCHITECTURE = "LiftGatedMemoryLlamaForCausalLM"
GM_WEIGHTS_ATTR = "lift_gated_memory"  # set by worker_patch on a LoRAModel holding a Gated Memory adapter


@torch.library.custom_op("lift_vllm::gated_memory_blend_", mutates_args=("attn_out",))
def gated_memory_blend_(
    attn_out: torch.Tensor,
    q: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    w4: torch.Tensor,
    token_idx: torch.Tensor,
    num_heads: int,
    head_dim: int,
) -> None:
    """In place: attn_out[t] ← blend for tokens with token_idx[t] ≥ 0 (attn_out, q: [T, H·d])."""
    tokens = attn_out.shape[0]
    idx = token_idx[:tokens]
    if tokens == 0 or not bool((idx >= 0).any()):
        return
    from lift_engine import ops

    a = attn_out.view(tokens, num_heads, head_dim)
    blended = ops.gated_memory_blend(a, q.reshape(tokens, num_heads, head_dim).to(a.dtype), w1, w2, w3, w4, idx)
    a.copy_(blended)


@gated_memory_blend_.register_fake
def _(attn_out, q, w1, w2, w3, w4, token_idx, num_heads, head_dim) -> None:
    return None


class _SlotState:
    """Shared by all layers of one model: the per-token memory index buffer, and whether
    some token of the current batch has a Gated Memory adapter (set once per forward)."""

    def __init__(self, size: int, device: torch.device | None) -> None:
        self.token_idx = torch.full((size,), -1, dtype=torch.long, device=device)
        self.active = False  # some token of this batch has a memory index ≥ 0
        self.clean = True  # token_idx is all -1


def _memory_needed(state: _SlotState) -> bool:
    """Whether the layers must run the blend for this batch. Eager mode (vLLM's CPU LoRA path):
    only when some token has a Gated Memory adapter. While torch.compile traces, always (the
    custom op then checks the index itself at run time, so no branch is baked into the graph)."""
    return state.active or torch.compiler.is_compiling()


class LiftGatedMemoryLlamaAttention(LlamaAttention):
    """LlamaAttention + the Gated Memory blend between paged attention and o_proj."""

    def __init__(self, *args, lift_slots: int = 1, lift_state: _SlotState | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        h, d = self.num_heads, self.head_dim
        s, e = math.isqrt(d), 2 * d
        dtype = torch.get_default_dtype()
        self.register_buffer("gm_w1", torch.zeros(lift_slots, h, e, d, dtype=dtype), persistent=False)
        self.register_buffer("gm_w2", torch.zeros(lift_slots, h, d, e, dtype=dtype), persistent=False)
        self.register_buffer("gm_w3", torch.zeros(lift_slots, h, s, d, dtype=dtype), persistent=False)
        self.register_buffer("gm_w4", torch.zeros(lift_slots, h, 1, s, dtype=dtype), persistent=False)
        assert lift_state is not None
        self.lift_state = lift_state
        self.register_buffer("gm_token_idx", lift_state.token_idx, persistent=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        memory = _memory_needed(self.lift_state)
        q_pre = q.clone() if memory else None  # the CPU rotary embedding works in place
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        if memory:  # a batch without Gated Memory tokens: no copy, no op, no scan
            torch.ops.lift_vllm.gated_memory_blend_(
                attn_output, q_pre, self.gm_w1, self.gm_w2, self.gm_w3, self.gm_w4, self.gm_token_idx,
                self.num_heads, self.head_dim,
            )
        output, _ = self.o_proj(attn_output)
        return output

    @torch.no_grad()
    def load_slot(self, slot: int, weights: tuple[torch.Tensor, ...] | None) -> None:
        """Copy one adapter's (w1, w2, w3, w4) for this layer into `slot` (None: zeros)."""
        for name, bank, w in zip(("w1", "w2", "w3", "w4"), (self.gm_w1, self.gm_w2, self.gm_w3, self.gm_w4),
                                 weights or (None,) * 4):
            if w is None:
                bank[slot].zero_()
            else:
                if tuple(w.shape) != tuple(bank.shape[1:]):
                    raise ValueError(f"Gated Memory {name} has shape {list(w.shape)}, layer needs {list(bank.shape[1:])}")
                bank[slot].copy_(w.to(device=bank.device, dtype=bank.dtype))


class LiftGatedMemoryLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with per-request Gated Memory (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        worker_patch.install()
        lora_config = vllm_config.lora_config
        slots = lora_config.max_loras if lora_config is not None else 1
        tokens = max(int(vllm_config.scheduler_config.max_num_batched_tokens), 1)
        tokens = int(math.ceil(tokens / 8) * 8) + 8
        state = _SlotState(tokens, None)
        attn = partial(LiftGatedMemoryLlamaAttention, lift_slots=slots, lift_state=state)
        layer = partial(LlamaDecoderLayer, attn_layer_type=attn)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
        self._lift_state = state
        self.lift_num_slots = slots
        self._lift_slot_models: list[object | None] = [None] * slots
        self._lift_slot_is_gm = torch.zeros(slots + 1, dtype=torch.bool)  # last entry: "no slot" (-1)
        self._lift_any_gm = False

    # ------------------------------------------------------------------ layers
    def lift_attention_layers(self) -> list[LiftGatedMemoryLlamaAttention]:
        return [m for m in self.modules() if isinstance(m, LiftGatedMemoryLlamaAttention)]

    @property
    def lift_geometry(self) -> tuple[int, int, int, int]:
        """(layers, total query heads, query heads of this tensor-parallel rank, head dim)."""
        layers = self.lift_attention_layers()
        return len(layers), layers[0].total_num_heads, layers[0].num_heads, layers[0].head_dim

    # ------------------------------------------------------------------ slots
    def _lift_sync_slots(self, manager) -> None:
        """Make the memory banks match the LoRA manager's slot → adapter assignment."""
        index_to_id = manager.lora_index_to_id
        layers = None
        for slot in range(self.lift_num_slots):
            lora_id = index_to_id[slot] if slot < len(index_to_id) else None
            model = manager._registered_adapters.get(lora_id) if lora_id is not None else None
            if model is self._lift_slot_models[slot]:
                continue
            self._lift_slot_models[slot] = model
            weights = getattr(model, GM_WEIGHTS_ATTR, None) if model is not None else None
            layers = layers or self.lift_attention_layers()
            if weights is None:
                if bool(self._lift_slot_is_gm[slot]):
                    for layer in layers:
                        layer.load_slot(slot, None)
                self._lift_slot_is_gm[slot] = False
            else:
                if len(weights) != len(layers):
                    raise ValueError(f"Gated Memory adapter has {len(weights)} layers, the model {len(layers)}")
                for layer, w in zip(layers, weights):
                    layer.load_slot(slot, w)
                self._lift_slot_is_gm[slot] = True
        self._lift_any_gm = bool(self._lift_slot_is_gm.any())

    def _lift_prepare(self, num_tokens: int) -> None:
        buf = self._lift_state.token_idx
        manager = getattr(self, "lora_manager", None)
        if manager is None:
            return
        self._lift_sync_slots(manager)
        from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

        wrapper = manager.punica_wrapper_mapping.get(DEFAULT_LANGUAGE_WRAPPER_KEY)
        if wrapper is not None and hasattr(wrapper, "skip_slots"):
            # Slots holding a Gated Memory adapter have no LoRA weights: no LoRA math for their tokens.
            wrapper.skip_slots(tuple(self._lift_slot_is_gm[: self.lift_num_slots].tolist()))
        state = self._lift_state
        state.active = False
        if not state.clean:
            buf.fill_(-1)
            state.clean = True
        if not self._lift_any_gm or wrapper is None:
            return
        n = wrapper.indices_len[0] if wrapper.indices_len[0] is not None else 0
        n = min(int(n), num_tokens, buf.shape[0])
        if n:
            slots = wrapper._token_lora_indices[:n]
            is_gm = self._lift_slot_is_gm.to(slots.device)[slots]  # index -1 → the last ("no slot") entry
            if bool(is_gm.any()):  # once per forward, not per layer
                buf[:n].copy_(torch.where(is_gm, slots, torch.full_like(slots, -1)))
                state.active, state.clean = True, False

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        num_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if num_tokens > self._lift_state.token_idx.shape[0]:
            raise RuntimeError(f"batch of {num_tokens} tokens exceeds the Gated Memory index buffer "
                               f"({self._lift_state.token_idx.shape[0]}); raise max_num_batched_tokens")
        self._lift_prepare(num_tokens)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
