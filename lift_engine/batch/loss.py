"""Next-token loss at the loss positions only, with the vocabulary projection chunked.

The output projection of a 135M model is [49152, 576]; materialising logits for every
loss token of a 16-document step (~16k tokens) would take ~3 GB in fp32, plus as much
again for their gradient. `chunked_token_loss` computes them `chunk` rows at a time, in
forward and again (recomputed) in backward, so the live size is chunk × vocab:

    loss[t] = logsumexp(h[t] Wᵀ + b) − (h[t] Wᵀ + b)[y[t]]          (float32)
    ∂loss/∂h[t] = g[t] · (softmax(h[t] Wᵀ + b) − onehot(y[t])) W

Exact: the same numbers as F.cross_entropy on the full logits (to float rounding).

When only h needs a gradient (LIFT: the head is frozen), the forward pass computes it
too, as Liger-Kernel's fused linear cross entropy does: per chunk one GEMM for the
logits, one fused pass (`ops.cross_entropy_with_grad_`: loss, and softmax − onehot in
place of the logits) and one GEMM for (softmax − onehot) W, kept as [T, H]. The backward
then only scales its rows by g[t]: no logits are recomputed, and none outlive their chunk.
A trainable head (W or b needing a gradient) takes the recomputing path above.
"""
from __future__ import annotations

import torch

from lift_engine import ops

DEFAULT_CHUNK = 1024


def scaled_rows(unscaled: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    """The backward of a frozen-head loss whose forward kept d loss[t] / d h[t] as
    `unscaled` [T, H]: row t scaled by grad[t] (in float32); None when h needs no gradient."""
    if unscaled is None:
        return None
    return (unscaled.float() * grad.float()[:, None]).to(unscaled.dtype)


class _ChunkedTokenLossFrozenHead(torch.autograd.Function):
    """The loss and its gradient for h in one pass (W and b need no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unscaled = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (softmax − onehot) W
        # One logits buffer for every chunk, and GEMMs that write in place, where the dtypes
        # allow (no autocast): a fresh [chunk, V] tensor per chunk (100 MB in bf16 at 1024 ×
        # 49152) costs page faults on CPU; measured ~1.15× on this op, same numbers.
        in_place = hidden.dtype == weight.dtype and not torch.is_autocast_enabled(hidden.device.type)
        buffer = (torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
                  if in_place else None)
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], weight, bias, buffer)
            out[s : s + chunk] = ops.cross_entropy_with_grad_(logits, targets[s : s + chunk])
            if unscaled is None:
                continue
            if in_place:
                torch.mm(logits, weight, out=unscaled[s : s + chunk])
            else:
                unscaled[s : s + chunk] = (logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(unscaled)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (scaled_rows(ctx.saved_tensors[0], grad),) + (None,) * 4


class _ChunkedTokenLoss(torch.autograd.Function):
    """The loss, with logits recomputed in backward (for a head that trains)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], weight, bias).float()
            out[s : s + chunk] = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias, ctx.chunk = bias is not None, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        chunk = ctx.chunk
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            probs = torch.softmax(_logits(h, weight, bias).float(), dim=-1)
            probs[torch.arange(h.shape[0], device=h.device), targets[s : s + chunk]] -= 1.0
            probs.mul_(grad[s : s + chunk, None].float())
            if need_h:
                dh[s : s + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dw += probs.t() @ h.float()
            if need_b:
                db += probs.sum(0)
        return (dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            buffer: torch.Tensor | None = None) -> torch.Tensor:
    """h Wᵀ + b in the GEMM's dtype, [rows, V]; written into buffer[:rows] when one is given
    (same dtype as h and W)."""
    if buffer is None:
        logits = h @ weight.t()
    else:
        logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
    if bias is not None:
        logits += bias
    return logits


def chunked_token_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token cross entropy [T] (float32) of hidden [T, H] through `head` (an nn.Linear) against targets [T]."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    bias = getattr(head, "bias", None)
    head_trains = head.weight.requires_grad or (bias is not None and bias.requires_grad)
    loss = _ChunkedTokenLoss if head_trains and torch.is_grad_enabled() else _ChunkedTokenLossFrozenHead
    return loss.apply(hidden, head.weight, bias, targets, max(1, int(chunk)))


class _ChunkedDistillLoss(torch.autograd.Function):
    """KL(teacher top-k ‖ student) per token, with the gradient for h computed in forward
    (frozen head, as _ChunkedTokenLossFrozenHead): d loss / d logits = softmax − p̃ scattered."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, top_ids, top_probs, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unscaled = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        entropy_term = (top_probs * top_probs.clamp(min=1e-30).log()).sum(-1)  # Σ p̃ log p̃, [T]
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], weight, bias).float()
            ids, probs = top_ids[s : s + chunk], top_probs[s : s + chunk]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            out[s : s + chunk] = entropy_term[s : s + chunk] - (probs * (logits.gather(1, ids) - lse)).sum(-1)
            if unscaled is None:
                continue
            grad_logits = logits.sub_(lse).exp_().scatter_add_(1, ids, -probs)  # softmax − p̃, in place
            unscaled[s : s + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(unscaled)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (scaled_rows(ctx.saved_tensors[0], grad),) + (None,) * 5


def chunked_distill_loss(hidden: torch.Tensor, head: torch.nn.Module, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Context-distillation loss per token [T] (float32, docs/DESIGN.md §2.6): the KL divergence
    from the teacher's top-k distribution, renormalised over its k tokens (p̃), to the
    student's full softmax q over the vocabulary:

        loss[t] = Σ_j p̃[t, j] · (log p̃[t, j] − log q[t, top_ids[t, j]])        ≥ 0

    hidden [T, H] through `head` (a frozen nn.Linear); top_ids [T, k] (long) and
    top_logprobs [T, k] (the teacher's log-probabilities of those tokens). Logits live one
    chunk of rows at a time, as in `chunked_token_loss`; k = 1 with log-probability 0 is
    plain cross entropy."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    bias = getattr(head, "bias", None)
    if head.weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("chunked_distill_loss needs a frozen output head")
    top_probs = torch.softmax(top_logprobs.float(), dim=-1)  # p̃: the top-k renormalised
    return _ChunkedDistillLoss.apply(hidden, head.weight, bias, top_ids.long(), top_probs, max(1, int(chunk)))


def loss_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets) of every position whose NEXT token carries a label; labels [B, S]."""
    nxt = labels[:, 1:]
    rows, cols = (nxt != ignore_index).nonzero(as_tuple=True)
    return rows, cols, nxt[rows, cols]
