"""Per-batch adapter metadata read by every adapter layer (docs/DESIGN.md §3).

The analogue of vLLM's PunicaWrapper.token_lora_indices: the caller says which adapter
each sequence (or each token) uses, and every patched layer asks for the flat per-token
index vector of the tensor it is processing.

    idx [B]     one adapter per sequence, broadcast over all its tokens — also valid for
                cached generation, where each step runs on [B, 1] tokens. A [1] index
                broadcasts to any batch size.
    idx [B, S]  one adapter per token (training batches mixing documents); the model
                must then run on exactly [B, S] tokens.
    -1          no adapter: the token sees the base model.

Nothing set → every token is -1 (base model).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class AdapterContext:
    """Holds the current adapter indices for one model.

    num_adapters: size of the banks; indices must lie in [-1, num_adapters).
    """

    def __init__(self, num_adapters: int | None = None) -> None:
        self.num_adapters = num_adapters
        self._idx: torch.Tensor | None = None
        self._active = False
        self._cache: dict[tuple, torch.Tensor] = {}

    # ----------------------------------------------------------------- setting
    def set_indices(self, idx: torch.Tensor | list[int] | int | None) -> None:
        """Set the adapter of each sequence ([B]) or token ([B, S]); None clears (base model)."""
        self._cache.clear()
        if idx is None:
            self._idx, self._active = None, False
            return
        idx = torch.as_tensor(idx)
        if idx.dim() == 0:
            idx = idx.reshape(1)
        if idx.dim() not in (1, 2):
            raise ValueError(f"adapter indices must be [B] or [B, S], got shape {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
            raise TypeError(f"adapter indices must be integers, got {idx.dtype}")
        idx = idx.to(torch.long)
        if idx.numel():
            low, high = int(idx.min()), int(idx.max())
            if low < -1:
                raise ValueError(f"adapter index {low} is invalid (use -1 for the base model)")
            if self.num_adapters is not None and high >= self.num_adapters:
                raise IndexError(f"adapter index {high} out of range for {self.num_adapters} adapters")
            self._active = high >= 0
        else:
            self._active = False
        self._idx = idx

    def clear(self) -> None:
        """Back to the base model for every token."""
        self.set_indices(None)

    @contextlib.contextmanager
    def use(self, idx: torch.Tensor | list[int] | int | None) -> Iterator["AdapterContext"]:
        """Set indices for the duration of a `with` block, then restore the previous ones."""
        previous, previous_active = self._idx, self._active
        self.set_indices(idx)
        try:
            yield self
        finally:
            self._idx, self._active = previous, previous_active
            self._cache.clear()

    # ----------------------------------------------------------------- reading
    @property
    def indices(self) -> torch.Tensor | None:
        """The indices as set ([B] or [B, S], int64), or None."""
        return self._idx

    @property
    def active(self) -> bool:
        """False when no token uses an adapter: layers may then skip adapter math entirely."""
        return self._active

    def token_indices(self, batch: int, seq: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Flat per-token adapter index for a [batch, seq] token grid → LongTensor[batch*seq]."""
        key = (batch, seq, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        idx = self._idx
        if idx is None:
            out = torch.full((batch * seq,), -1, dtype=torch.long, device=device)
        elif idx.dim() == 1:
            if idx.shape[0] not in (batch, 1):
                raise ValueError(
                    f"adapter indices are set for {idx.shape[0]} sequences but the model ran on a batch of {batch}"
                )
            out = idx.to(device).reshape(-1, 1).expand(batch, seq).reshape(-1)
        else:
            if tuple(idx.shape) != (batch, seq):
                raise ValueError(
                    f"per-token adapter indices are {tuple(idx.shape)} but the model ran on {(batch, seq)} tokens "
                    "(use per-sequence indices [B] for cached generation)"
                )
            out = idx.to(device).reshape(-1)
        out = out.contiguous()
        self._cache[key] = out
        return out

    def __repr__(self) -> str:
        shape = None if self._idx is None else tuple(self._idx.shape)
        return f"AdapterContext(num_adapters={self.num_adapters}, indices={shape}, active={self._active})"
