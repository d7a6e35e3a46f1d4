"""Multi-adapter LoRA layer (docs/DESIGN.md §3.1, §4).

LoRABankLinear wraps a frozen nn.Linear W and a bank of N LoRA adapters:

    y[t] = x[t] Wᵀ (+ bias) + scaling[n] · (x[t] A[n]ᵀ) B[n]ᵀ     n = idx[t], none if n == -1

    lora_a  [N, r, in]   Parameter, PEFT init: kaiming_uniform(a=√5) per adapter
    lora_b  [N, out, r]  Parameter, zeros (so a fresh adapter is the base model)
    scaling [N]          buffer, α/r per adapter

The forward asks the dispatch point, lift_engine.ops.lora_bank_linear, which op to run
(ops/dispatch.py, `lora_bank_path`): while adapters are active usually one op,
ops.lora_linear (base weight + LoRA: one fused GEMM on the Triton backend; on the
reference and C++ CPU backends exactly F.linear + lora_linear_delta, so outputs and
gradients are bit for bit those of the two-op path); base_layer(x) + ops.lora_linear_delta
when the base is not a plain, hook-free nn.Linear or the dtypes differ, or when `fused`
is False; with one adapter per sequence and a bank in another dtype than x (fp32
adapters on a bf16 base, the mixed-precision training of lift_engine.precision) or low
precision on CPU, ops.lora_linear_rows: two batched GEMMs, no per-token gather.
The indices come from the shared AdapterContext.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lift_engine import ops
from lift_engine.adapters.context import AdapterContext


def kaiming_uniform_bound(fan_in: int) -> float:
    """Bound of nn.init.kaiming_uniform_(a=√5): the default init of nn.Linear weights."""
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


class LoRABankLinear(nn.Module):
    """A frozen linear plus N LoRA adapters selected per token.

    base_layer: the wrapped nn.Linear (kept frozen and reachable as `.base_layer`).
    num_adapters: N; rank: r (the bank's rank; a slot may use fewer rows, zero-padded).
    scaling: initial α/r for every slot. context: where per-token indices come from.
    dtype: bank dtype (default: the base weight's dtype). init: draw every slot's A from
    torch's global RNG now (False: all zero, for a caller that resets each slot itself).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_adapters: int,
        rank: int,
        scaling: float,
        context: AdapterContext,
        dtype: torch.dtype | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"need num_adapters >= 1 and rank >= 1, got {num_adapters}, {rank}")
        self.base_layer = base_layer
        self.context = context
        weight = base_layer.weight
        dtype = dtype or weight.dtype
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_adapters, self.rank = num_adapters, rank
        self.lora_a = nn.Parameter(torch.zeros(num_adapters, rank, self.in_features, dtype=dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(num_adapters, self.out_features, rank, dtype=dtype, device=weight.device))
        self.register_buffer("scaling", torch.full((num_adapters,), float(scaling), dtype=torch.float32, device=weight.device))
        self.default_scaling = float(scaling)
        if init:  # False: A stays zero until the caller resets the slots (attach_adapters with a seed)
            self._reset_all()

    @torch.no_grad()
    def _reset_all(self) -> None:
        """reset_slot(n) for every n from torch's global RNG, in one draw: the values are those
        of N consecutive reset_slot calls (the CPU generator fills a tensor in order)."""
        bound = kaiming_uniform_bound(self.in_features)
        fresh = torch.empty(self.lora_a.shape, dtype=torch.float32).uniform_(-bound, bound)
        self.lora_a.copy_(fresh.to(self.lora_a.dtype))
        self.lora_b.zero_()
        self.scaling.fill_(self.default_scaling)

    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor with a slot axis first (what reset_slot sets)."""
        return self.lora_a, self.lora_b, self.scaling

    @torch.no_grad()
    def reset_slot(self, n: int, generator: torch.Generator | None = None) -> None:
        """Re-initialise adapter n as PEFT does: A ~ kaiming_uniform(a=√5), B = 0, default scaling."""
        bound = kaiming_uniform_bound(self.in_features)
        fresh = torch.empty(self.lora_a.shape[1:], dtype=torch.float32)
        fresh.uniform_(-bound, bound, generator=generator)
        self.lora_a[n].copy_(fresh.to(self.lora_a.dtype))
        self.lora_b[n].zero_()
        self.scaling[n] = self.default_scaling

    #: Let dispatch pick a one-op path (ops.lora_linear, ops.lora_linear_rows); False keeps
    #: the two-op path base_layer(x) + ops.lora_linear_delta.
    fused: bool = True

    def _plain_base(self) -> bool:
        """The one-op paths compute F.linear(x, W, b) themselves, so the base must be a plain
        nn.Linear whose forward is exactly that (no subclass, no hooks, no patched forward,
        e.g. by accelerate)."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
                and "forward" not in base.__dict__)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Dispatch would run ops.lora_linear on x with per-token indices (x, W and the bank in one dtype)."""
        return ops.lora_bank_path(x, self.base_layer.weight, self.lora_a, None, plain_base=self._plain_base(),
                                  fused=self.fused) == "lora_linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] (leading dims [B, S] or [B]) → [..., out]."""
        base = self.base_layer
        return ops.lora_bank_linear(x, base.weight, base.bias, self.lora_a, self.lora_b, self.scaling, self.context,
                                    base=base, plain_base=self._plain_base(), fused=self.fused)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, num_adapters={self.num_adapters}, rank={self.rank}"
