"""vLLM's CPU multi-LoRA path, through lift_engine's LoRA ops (a PunicaWrapper subclass).

vLLM picks its Punica wrapper class by name from `current_platform.get_punica_wrapper()`
(vllm/lora/punica_wrapper/punica_selector.py); on CPU that is `PunicaWrapperCPU`, whose
ops (vllm/lora/ops/torch_ops) have two problems this class fixes:

1. Correctness. A token without an adapter has index -1; the torch ops gather
   `lora_weights[idx]`, so -1 silently selects the *last* slot's adapter: a base-model
   request batched next to LoRA requests gets someone's LoRA added (vLLM 0.32; upstream
   PRs vllm-project/vllm#48421 and #49656 are open). Here -1 rows get exactly nothing.
2. Speed. The torch ops materialise one weight copy per token ([T, out, in]). Here the
   tokens are grouped by adapter (SGMV style) and each group is one matmul, through
   `lift_engine.ops.lora_shrink` / `lora_expand` — the dispatch point, so the project's
   C++ CPU kernels are used when they are built (reference PyTorch otherwise).

Semantics are those of PunicaWrapperCPU (per slice: shrink writes `scale · x Aᵀ` into the
buffer, expand adds `h Bᵀ` into its column slice), with -1 rows contributing zero.
The plugin's register() makes vLLM's CPU platform choose this class (by name, so this
module is imported only when vLLM builds its LoRA manager); set LIFT_VLLM_PUNICA=stock
to keep vLLM's own.

Cost per step, decided once per batch (update_metadata, which vLLM calls only when the
batch's mapping or slot layout changes) and not per token per layer:

- no token of the batch has a LoRA (base-model requests, or only Gated Memory adapters):
  every method returns at once — no kernel, no gather, no per-token scan (the layers'
  outputs are the base projections, bit for bit);
- otherwise the tokens' adapter index is planned once per batch (the C++ kernels' token
  plan: tokens sorted by adapter, -1 dropped, cut into blocks of one adapter) and every
  LoRA layer runs one fused shrink+expand per slice over that plan (column-parallel
  layers) or one planned shrink and one planned expand (row-parallel layers), whatever
  the number of distinct adapters: no Python loop over adapters.

vLLM runs its CPU LoRA path in eager mode (its CPU platform turns compilation off when
LoRA is on), so these Python-level checks are evaluated on every call.
"""
from __future__ import annotations

import torch

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = "lift_engine.vllm_plugin.punica.LiftPunicaWrapperCPU"


def _pad_idx(idx: torch.Tensor, rows: int) -> torch.Tensor:
    if idx.shape[0] == rows:
        return idx
    if idx.shape[0] > rows:
        return idx[:rows]
    return torch.cat([idx, idx.new_full((rows - idx.shape[0],), -1)])


_NATIVE: list = []  # [module or None], resolved once per process


def native_kernels():
    """lift_engine.ops.cpu_backend when dispatch picks the C++ CPU kernels for LoRA, else None."""
    if not _NATIVE:
        from lift_engine import ops

        module = None
        try:
            if ops.resolve("lora_linear_delta", "cpu")[0] == "cpu":
                from lift_engine.ops import cpu_backend

                if cpu_backend.HAS_PLANNED_DELTA:
                    module = cpu_backend
        except Exception:  # a backend that cannot load: the generic path below
            module = None
        _NATIVE.append(module)
    return _NATIVE[0]


class LiftPunicaWrapperCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU with -1 = no adapter honoured and adapter-grouped matmuls.

    Per batch (on each mapping update) the per-token slot index is turned once into the
    index the LoRA math uses (slots holding no LoRA weights — Gated Memory adapters — are
    treated as -1, see skip_slots), with a flag for "no token has a LoRA", and, with the
    C++ kernels, into their token plan (built on first use, shared by every layer).
    """

    _lift_idx: torch.Tensor | None = None  # the LoRA index of this batch's tokens
    _lift_sampler: torch.Tensor | None = None  # the LoRA index of this batch's sampled rows
    _lift_tokens_any = True  # some token of the batch uses a LoRA (set per update)
    _lift_sampler_any = True
    _lift_skip: tuple[bool, ...] = ()  # slots without LoRA weights
    _lift_plans: dict | None = None

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._lift_refresh()

    @property
    def lift_tokens_any(self) -> bool:
        """Whether some token of the current batch gets LoRA math (False: every method is a no-op)."""
        return self._lift_tokens_any

    def skip_slots(self, skip: tuple[bool, ...]) -> None:
        """Slots whose adapter has no LoRA weights (their tokens get no LoRA math at all)."""
        skip = tuple(bool(v) for v in skip)
        if skip != self._lift_skip:
            self._lift_skip = skip
            self._lift_refresh()

    def _lift_refresh(self) -> None:
        idx, sampler = self.token_lora_indices, self.sampler_indices
        if any(self._lift_skip):
            table = torch.tensor(list(self._lift_skip) + [False], dtype=torch.bool, device=idx.device)
            idx = torch.where(table[idx], torch.full_like(idx, -1), idx)  # -1 reads the last entry (False)
            sampler = torch.where(table[sampler], torch.full_like(sampler, -1), sampler)
        self._lift_idx, self._lift_sampler = idx, sampler
        self._lift_tokens_any = bool((idx >= 0).any())
        self._lift_sampler_any = bool((sampler >= 0).any())
        self._lift_plans = {}

    def _token_idx(self, rows: int) -> torch.Tensor:
        idx = self._lift_idx if self._lift_idx is not None else self.token_lora_indices
        return _pad_idx(idx, rows)

    def _sampler_idx(self, rows: int) -> torch.Tensor:
        return _pad_idx(self._lift_sampler if self._lift_sampler is not None else self.sampler_indices, rows)

    def _plan(self, native, n_adapters: int, rows: int):
        """The C++ kernels' token plan of this batch for a bank of n_adapters and `rows` tokens (cached)."""
        if self._lift_plans is None:
            self._lift_plans = {}
        key = (n_adapters, rows)
        plan = self._lift_plans.get(key)
        if plan is None:
            plan = self._lift_plans[key] = native.token_plan(self._token_idx(rows), n_adapters)
        return plan

    @staticmethod
    def _native_for(*tensors: torch.Tensor):
        """The C++ kernels when they are built and take these tensors (fp32), else None."""
        native = native_kernels()
        if native is None or any(t.dtype != torch.float32 for t in tensors):
            return None
        return native

    @staticmethod
    def _bank(w: torch.Tensor) -> torch.Tensor:
        """vLLM's stacked bank [N, 1, a, b] as [N, a, b]."""
        return w.squeeze(1) if w.dim() == 4 else w

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        if not self._lift_tokens_any:  # no request of this batch has a LoRA: nothing to add
            return None
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        native = self._native_for(x2, y2, lora_a_stacked[0], lora_b_stacked[0])
        if native is None:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        n = lora_a_stacked[0].shape[0]
        plan = self._plan(native, n, x2.shape[0])
        scaling = torch.full((n,), float(scale), dtype=torch.float32)
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            delta = native.lora_delta_planned(x2, self._bank(a), self._bank(b), scaling, plan)
            cols = min(size, delta.shape[1])
            y2[:, offset: offset + cols] += delta[:, :cols]
            offset += size
        return None

    @staticmethod
    def _shrink(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, scale: float) -> None:
        """y[t, :r] = scale · x[t] @ w[idx[t]]ᵀ (0 where idx[t] == -1); w: [N, 1, r, in] or [N, r, in]."""
        from lift_engine import ops

        w = w.squeeze(1) if w.dim() == 4 else w
        h = ops.lora_shrink(x.to(w.dtype), w, idx)
        y[:, : h.shape[1]] = (h * scale).to(y.dtype)

    @staticmethod
    def _expand(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, offset: int, size: int,
                add_inputs: bool) -> None:
        """y[t, offset:offset+size] (+)= x[t] @ w[idx[t]]ᵀ (nothing where idx[t] == -1); w: [N, 1, out, r]."""
        from lift_engine import ops

        w = w.squeeze(1) if w.dim() == 4 else w
        ones = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        delta = ops.lora_expand(x.to(w.dtype), w, ones, idx).to(y.dtype)
        cols = min(size, delta.shape[1])
        if add_inputs:
            y[:, offset: offset + cols] += delta[:, :cols]
        else:
            y[:, offset: offset + cols] = delta[:, :cols]

    # ------------------------------------------------------------ PunicaWrapperCPU API
    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs) -> None:
        """y[i][t, :r] = scale · x[t] @ A_i[idx[t]]ᵀ per slice i (row-parallel layers: o_proj, down_proj).

        With no LoRA token in the batch y is left as it is (vLLM hands a zeroed buffer, which
        add_expand then leaves out too)."""
        if not self._lift_tokens_any:
            return
        x = x.view(-1, x.shape[-1])
        native = self._native_for(x, lora_a_stacked[0])
        if native is not None:
            plan = self._plan(native, lora_a_stacked[0].shape[0], x.shape[0])
            for slice_idx, w in enumerate(lora_a_stacked):
                out = y[slice_idx]
                out = out.view(-1, out.shape[-1])
                h = native.lora_shrink_planned(x, self._bank(w), plan)
                if scale != 1.0:
                    h.mul_(scale)
                out[:, : h.shape[1]] = h.to(out.dtype)
            return
        idx = self._token_idx(x.shape[0])
        for slice_idx, w in enumerate(lora_a_stacked):
            out = y[slice_idx]
            self._shrink(out.view(-1, out.shape[-1]), x, w, idx, scale)

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs=True, **kwargs) -> None:
        """y[t, offset_i : offset_i + size_i] (+)= x[i][t] @ B_i[idx[t]]ᵀ per slice i; nothing
        (y untouched) when no token of the batch has a LoRA."""
        if not self._lift_tokens_any:
            return
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        native = self._native_for(x[0], lora_b_stacked[0]) if add_inputs else None
        for slice_idx, w in enumerate(lora_b_stacked):
            h = x[slice_idx]
            h = h.view(-1, h.shape[-1])
            size = output_slices[slice_idx]
            if native is not None:
                bank = self._bank(w)
                plan = self._plan(native, bank.shape[0], h.shape[0])
                ones = torch.ones(bank.shape[0], dtype=torch.float32)
                delta = native.lora_expand_planned(h, bank, ones, plan)
                cols = min(size, delta.shape[1])
                y2[:, offset: offset + cols] += delta[:, :cols].to(y2.dtype)
            else:
                self._expand(y2, h, w, self._token_idx(h.shape[0]), offset, size, add_inputs)
            offset += size

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs) -> None:
        if not self._lift_tokens_any:
            return
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        self._expand(y2, x2, lora_b_stacked, self._token_idx(x2.shape[0]), 0, y2.shape[1], add_inputs)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs) -> None:
        if not self._lift_sampler_any:
            return
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        idx = self._sampler_idx(x2.shape[0])
        r = lora_b_stacked.size(-1)
        if buffer is None:
            buffer = torch.zeros((x2.size(0), r), dtype=torch.float32, device=x2.device)
        self._shrink(buffer, x2, lora_a_stacked, idx, scale)
        self._expand(y2, buffer, lora_b_stacked, idx, 0, y2.shape[1], True)
