"""AdapterContext: per-sequence / per-token indices → flat per-token indices."""
from __future__ import annotations

import pytest
import torch

from lift_engine.adapters import AdapterContext


def test_default_is_base_model():
    ctx = AdapterContext(2)
    assert not ctx.active
    assert torch.equal(ctx.token_indices(2, 3), torch.full((6,), -1))


def test_per_sequence_broadcasts_over_tokens_and_decode_steps():
    ctx = AdapterContext(3)
    ctx.set_indices(torch.tensor([2, -1]))
    assert ctx.active
    assert ctx.token_indices(2, 3).tolist() == [2, 2, 2, -1, -1, -1]
    assert ctx.token_indices(2, 1).tolist() == [2, -1]  # one cached decoding step
    ctx.set_indices([1])
    assert ctx.token_indices(3, 2).tolist() == [1] * 6  # [1] broadcasts to any batch


def test_per_token_indices():
    ctx = AdapterContext(2)
    ctx.set_indices(torch.tensor([[0, 1, -1], [1, 1, 0]], dtype=torch.int32))
    out = ctx.token_indices(2, 3)
    assert out.dtype == torch.long and out.tolist() == [0, 1, -1, 1, 1, 0]
    with pytest.raises(ValueError, match="cached generation"):
        ctx.token_indices(2, 1)


def test_use_restores_and_validation():
    ctx = AdapterContext(2)
    ctx.set_indices([0, 0])
    with ctx.use([1, -1]):
        assert ctx.token_indices(2, 1).tolist() == [1, -1]
    assert ctx.token_indices(2, 1).tolist() == [0, 0]
    ctx.set_indices([-1, -1])
    assert not ctx.active
    with pytest.raises(IndexError):
        ctx.set_indices([2])
    with pytest.raises(ValueError):
        ctx.set_indices([-2])
    with pytest.raises(TypeError):
        ctx.set_indices(torch.tensor([0.0]))
    ctx.set_indices([0, 1])
    with pytest.raises(ValueError, match="batch of 3"):
        ctx.token_indices(3, 4)
