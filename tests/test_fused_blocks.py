"""models/fused_blocks.py: a Llama-family model's norms, SwiGLU MLPs and RoPE on the fused
ops while it trains — same outputs and input gradients as the model's own code (fp32, and
bf16 to bf16 rounding), only known classes patched, the patch gone afterwards (RoPE's
process-wide binding counted over nested blocks); and the
frozen-head loss that computes its gradient in the forward pass (batch/loss.py)."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers_models import make_tiny_model
from lift_engine.batch.loss import chunked_token_loss
from lift_engine.models.fused_blocks import ROPE_FUNCTION, fusable_modules, fused_blocks, rope_modules
from lift_engine.ops.native import status as native_status

HAVE_KERNELS = native_status()["cpu"] == "loaded"


def _forward_backward(model, ids, dtype):
    emb = model.get_input_embeddings()(ids).detach().to(dtype).requires_grad_()
    out = model(inputs_embeds=emb).logits.float()
    out.pow(2).mean().backward()
    return out.detach(), emb.grad


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
def test_fused_blocks_keep_outputs_and_gradients(arch, dtype, tol):
    """fp32: the same numbers to 2e-5. bf16: both run with bf16 roundings in different
    places (the fused ops round once per output, HF's chains after every step), so each
    is compared with the model run in fp32 on the same weights: the fused error must stay
    within twice HF's own (plus 1% of the scale), and both within `tol` of each other."""
    model = make_tiny_model(arch, dtype=dtype, hidden=72, intermediate=200, layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 128, (3, 11))
    ref_out, ref_grad = _forward_backward(model, ids, dtype)
    (modeling,) = rope_modules(model)
    original = getattr(sys.modules[modeling], ROPE_FUNCTION)
    with fused_blocks(model) as patched:
        # two norms and one MLP per layer, the final norm, and the modeling module's RoPE
        assert patched == 2 * 2 + 2 + 1 + 1
        assert getattr(sys.modules[modeling], ROPE_FUNCTION).lift_original is original
        out, grad = _forward_backward(model, ids, dtype)
    assert getattr(sys.modules[modeling], ROPE_FUNCTION) is original
    scale, grad_scale = float(ref_out.abs().max()), float(ref_grad.float().abs().max())
    if dtype == torch.bfloat16:
        truth_out, truth_grad = _forward_backward(copy.deepcopy(model).float(), ids, torch.float32)
        for ours, hf, truth, size in ((out, ref_out, truth_out, scale), (grad, ref_grad, truth_grad, grad_scale)):
            hf_error = float((hf.float() - truth).abs().max())
            assert float((ours.float() - truth).abs().max()) <= 2 * hf_error + 0.01 * size
        tol = 2 * tol  # each within its rounding of fp32, so within twice that of each other
    assert float((out - ref_out).abs().max()) <= tol * scale
    assert float((grad.float() - ref_grad.float()).abs().max()) <= tol * grad_scale
    assert not [m for m, _ in fusable_modules(model) if "forward" in m.__dict__]  # patch removed


def test_fused_blocks_leave_unknown_norms_alone_and_restore_on_error():
    class GemmaRMSNorm(torch.nn.Module):  # y = x̂ (1 + w): not Llama's formula
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x):
            return x

    model = make_tiny_model("llama")
    model.model.extra = GemmaRMSNorm()
    assert all(type(m).__name__ != "GemmaRMSNorm" for m, _ in fusable_modules(model))
    with pytest.raises(RuntimeError, match="boom"):
        with fused_blocks(model) as patched:
            assert patched > 0 and "forward" in model.model.norm.__dict__
            raise RuntimeError("boom")
    assert "forward" not in model.model.norm.__dict__
    with fused_blocks(model, enabled=False) as patched:
        assert patched == 0


def test_rope_binding_is_counted_over_nested_blocks_and_restored_on_error():
    model, other = make_tiny_model("llama"), make_tiny_model("llama")
    module = sys.modules[rope_modules(model)[0]]
    original = getattr(module, ROPE_FUNCTION)
    with fused_blocks(model):
        fused = getattr(module, ROPE_FUNCTION)
        assert fused is not original
        with pytest.raises(RuntimeError, match="inner"):
            with fused_blocks(other):
                assert getattr(module, ROPE_FUNCTION) is fused  # bound once, not wrapped twice
                raise RuntimeError("inner")
        assert getattr(module, ROPE_FUNCTION) is fused  # the outer block still needs it
    assert getattr(module, ROPE_FUNCTION) is original


def test_fused_blocks_skip_an_mlp_whose_activation_is_not_silu():
    model = make_tiny_model("llama", hidden_act="gelu")
    kinds = [kind for _, kind in fusable_modules(model)]
    assert "mlp" not in kinds and kinds.count("norm") == 5


# ------------------------------------------------------------------ loss with a frozen head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_frozen_head_loss_computes_the_gradient_in_forward_exactly(dtype, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).to(dtype).requires_grad_(False)
    hidden = torch.randn(9, 16).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (9,))
    weights = torch.rand(9)
    ours = chunked_token_loss(hidden, head, targets, chunk)
    (ours * weights).sum().backward()
    g_ours, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    (ref * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_ours.float(), hidden.grad.float(), rtol=tol, atol=tol * float(hidden.grad.abs().max()))


def test_frozen_head_loss_without_grad_gives_the_loss_only():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        loss = chunked_token_loss(hidden, head, targets, 2)
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden), targets, reduction="none"), rtol=1e-5, atol=1e-6)


def test_frozen_head_loss_under_autocast_takes_the_allocating_path():
    """Under autocast the GEMMs' dtype is not the inputs' (no in-place buffer): still the loss and gradient."""
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_token_loss(hidden, head, targets, 4)
    ours.sum().backward()
    assert ours.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    g_ours, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy(head(hidden), targets, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_ours, hidden.grad, rtol=3e-2, atol=3e-2 * float(hidden.grad.abs().max()))
