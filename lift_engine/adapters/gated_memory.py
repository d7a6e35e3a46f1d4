"""Gated Memory, the paper's attention adapter, attached generically (docs/DESIGN.md §3.2).

Per decoder layer, for every query head h with pre-RoPE query q (head dim d, s = ⌊√d⌋):

    m_h(q) = W2_h · SiLU(W1_h · q)
    g_h(q) = sigmoid(3 · (w4_h · SiLU(W3_h · q) − 1))
    o_h    = (1 − g_h) · Attention_h(q, K, V) + g_h · m_h(q)

Bank parameters (N adapters, H query heads): w1 [N, H, 2d, d], w2 [N, H, d, 2d],
w3 [N, H, s, d], w4 [N, H, 1, s]; each head's matrices initialised as nn.Linear's
default (uniform ±1/√fan_in, no bias), so the gate starts near sigmoid(−3) ≈ 0.05.

How it hooks into an unmodified HF attention module, whatever attention implementation
(eager, sdpa, …) and with or without a KV cache:

    self_attn.q_proj  → QueryCapture(q_proj): returns q_proj's output unchanged and hands
                        it (pre-RoPE, including any LoRA on q_proj) to the bank;
    self_attn.o_proj  → GatedOutput(o_proj): its input is the concatenation of the heads'
                        attention outputs [B, S, H·d]; it blends them with the memory via
                        ops.gated_memory_blend, then calls the frozen o_proj.

Both see the same [B, S] token grid (S = 1 per cached decoding step).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lift_engine import ops
from lift_engine.adapters.context import AdapterContext


def gate_dim(head_dim: int) -> int:
    """s = ⌊√d⌋, the width of the gate's hidden layer."""
    return math.isqrt(head_dim)


class GatedMemoryBank(nn.Module):
    """N Gated Memory adapters for one attention layer.

    forward(attn_out [T, H, d], q [T, H, d], idx [T]) → [T, H, d]  (tokens with -1 unchanged)
    """

    def __init__(
        self,
        num_adapters: int,
        num_heads: int,
        head_dim: int,
        hidden_factor: int = 2,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: bool = True,
    ) -> None:
        """init: draw every slot from torch's global RNG now (False: all zero, for a caller
        that resets each slot itself, as attach_adapters with a seed does)."""
        super().__init__()
        if num_adapters < 1:
            raise ValueError(f"need num_adapters >= 1, got {num_adapters}")
        self.num_adapters, self.num_heads, self.head_dim = num_adapters, num_heads, head_dim
        self.hidden = hidden_factor * head_dim
        self.gate_dim = gate_dim(head_dim)
        self.pending_query: torch.Tensor | None = None  # set by QueryCapture, consumed by GatedOutput
        shapes = self.slot_shapes()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(num_adapters, *shape, dtype=dtype, device=device)))
        if init:
            for n in range(num_adapters):
                self.reset_slot(n)

    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor with a slot axis first (what reset_slot sets)."""
        return tuple(getattr(self, name) for name in self.slot_shapes())

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter for one adapter (no N axis)."""
        h, d, e, s = self.num_heads, self.head_dim, self.hidden, self.gate_dim
        return {"w1": (h, e, d), "w2": (h, d, e), "w3": (h, s, d), "w4": (h, 1, s)}

    @torch.no_grad()
    def reset_slot(self, n: int, generator: torch.Generator | None = None) -> None:
        """Re-initialise adapter n: every head's matrix as nn.Linear's default, U(±1/√fan_in)."""
        for name, shape in self.slot_shapes().items():
            bound = 1.0 / math.sqrt(shape[-1])  # = kaiming_uniform(a=√5) bound for fan_in = shape[-1]
            fresh = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            getattr(self, name)[n].copy_(fresh.to(getattr(self, name).dtype))

    def forward(self, attn_out: torch.Tensor, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        dtype = self.w1.dtype
        out = ops.gated_memory_blend(attn_out.to(dtype), q.to(dtype), self.w1, self.w2, self.w3, self.w4, idx)
        return out.to(attn_out.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_adapters={self.num_adapters}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"hidden={self.hidden}, gate_dim={self.gate_dim}"
        )


class QueryCapture(nn.Module):
    """Wraps q_proj: output unchanged; the output is handed to the layer's bank as q."""

    def __init__(self, base_layer: nn.Module, bank: GatedMemoryBank) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._bank = [bank]  # a list, so the bank is not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.base_layer(x)
        self._bank[0].pending_query = q
        return q


class GatedOutput(nn.Module):
    """Wraps o_proj: blends the heads' attention outputs with the memory, then o_proj.

    The bank itself is registered on the attention module as `self_attn.gated_memory`
    (parameter names `model.layers.{i}.self_attn.gated_memory.w1`, as in the files);
    the wrappers only reference it.
    """

    def __init__(self, base_layer: nn.Module, bank: GatedMemoryBank, context: AdapterContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._bank = [bank]
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, H·d] attention output (heads concatenated) → o_proj(blend(x))."""
        bank = self._bank[0]
        q = getattr(bank, "pending_query", None)
        bank.pending_query = None  # never reuse a query across forward calls
        if not self.context.active:
            return self.base_layer(x)
        if q is None:
            raise RuntimeError("Gated Memory: o_proj ran without q_proj in the same attention call")
        if q.shape != x.shape:
            raise RuntimeError(f"Gated Memory: query {tuple(q.shape)} and attention output {tuple(x.shape)} differ")
        heads, dim = bank.num_heads, bank.head_dim
        batch = x.shape[0] if x.dim() > 2 else 1
        tokens = x.reshape(-1, heads, dim)
        idx = self.context.token_indices(batch, tokens.shape[0] // batch, device=x.device)
        blended = bank(tokens, q.reshape(-1, heads, dim), idx)
        return self.base_layer(blended.reshape(x.shape))
