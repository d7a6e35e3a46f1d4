"""A training batch through the model: collation and per-token losses at loss positions.

    ids, mask, labels, docs = collate(samples, pad_id, device)          [B, S] ×3, [B]
    token_loss, token_docs, used = plain_token_loss(model, handle, samples, pad_id, chunk)
    losses = per_document_loss(model, ids, mask, labels, docs, num_docs)   [num_docs]

Logits are computed only at positions whose next token carries a label (the vocabulary
projection of a 135M model is a fifth of its weights), in chunks (batch/loss.py). Each
position's loss follows its sample (`sample_token_losses`): cross entropy, or for a
distillation sample the KL to the teacher's top-k; scaled by the sample's weight.
`lift_engine.batch.prefix` computes the same token losses with a shared prefix.
"""
from __future__ import annotations

import torch

from lift_engine.batch.loss import DEFAULT_CHUNK, chunked_distill_loss, chunked_token_loss, loss_positions
from lift_engine.models.loading import model_device
from lift_engine.samples import IGNORE_INDEX, Sample


def pad_token_id(tokenizer) -> int:
    """The id training batches are padded with: pad, else end of sequence, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def collate(
    samples: list[Sample], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad samples. Returns input_ids [B, S], attention_mask [B, S], labels [B, S], doc [B],
    built on the CPU and moved to `device` (the model's; None: stay on the CPU)."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        mask[row, :n] = 1
    docs = torch.tensor([s.doc for s in samples], dtype=torch.long)
    if device is not None and torch.device(device).type != "cpu":
        ids, mask, labels, docs = (t.to(device, non_blocking=True) for t in (ids, mask, labels, docs))
    return ids, mask, labels, docs


def training_attention_mask(mask: torch.Tensor) -> None:
    """The attention mask a right-padded training batch passes to the decoder: none.

    Every pad key sits after all real tokens of its row, so the causal mask alone already
    hides it from every real query, and a pad query's output never reaches a loss (it
    feeds only later pad positions). Real tokens get the same outputs and gradients, and
    attention runs the is_causal kernel, ~30% faster on CPU than with an explicit mask.
    `mask` ([B, S], 1 = real) is taken to document the contract: it must be right-padded.
    """
    if mask.shape[1] and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("training batches must be right-padded")
    return None


def sample_token_losses(hidden_at: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, rows: torch.Tensor,
                        samples: list[Sample] | None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token loss [T] (float32) at the loss positions of a batch, each as its sample asks.

    hidden_at [T, H]: hidden states at the loss positions, in row-major order (all of row
    0's positions first); targets [T]: the labelled next tokens; rows [T]: the row (index
    into `samples`) of each position. A sample with `soft` targets (distillation) gets
    `chunked_distill_loss` at its positions, the others cross entropy; every loss is scaled
    by its sample's weight. samples None: cross entropy everywhere, weight 1.
    """
    soft_rows = [i for i, s in enumerate(samples or []) if s.soft is not None]
    if not soft_rows:
        loss = chunked_token_loss(hidden_at, head, targets, chunk)
    else:
        device = hidden_at.device
        is_soft = torch.zeros(len(samples), dtype=torch.bool, device=device)
        is_soft[soft_rows] = True
        token_soft = is_soft[rows]
        hard_at, soft_at = (~token_soft).nonzero().squeeze(1), token_soft.nonzero().squeeze(1)
        top_ids = torch.cat([samples[i].soft[0] for i in soft_rows]).to(device)
        top_logprobs = torch.cat([samples[i].soft[1] for i in soft_rows]).to(device)
        if top_ids.shape[0] != soft_at.shape[0]:
            raise ValueError(f"distillation targets for {top_ids.shape[0]} positions, but the samples label {soft_at.shape[0]}")
        hard = chunked_token_loss(hidden_at[hard_at], head, targets[hard_at], chunk)
        soft = chunked_distill_loss(hidden_at[soft_at], head, top_ids, top_logprobs, chunk)
        loss = torch.cat([hard, soft])[torch.argsort(torch.cat([hard_at, soft_at]))]
    weights = [s.weight for s in samples or []]
    if any(w != 1.0 for w in weights):
        loss = loss * torch.tensor(weights, dtype=loss.dtype, device=loss.device)[rows]
    return loss


def token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                 samples: list[Sample] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss at every loss position of a right-padded batch, with the adapter
    indices already set on the model's handle.

    input_ids, attention_mask, labels: [B, S]; samples: the B rows' samples (their kinds
    and weights, `sample_token_losses`; None: cross entropy). Returns (token_loss [T]
    float32, rows [T]: the batch row of each loss position).
    """
    hidden = model.get_decoder()(input_ids=input_ids,
                                 attention_mask=training_attention_mask(attention_mask)).last_hidden_state
    rows, cols, targets = loss_positions(labels)
    return sample_token_losses(hidden[rows, cols], model.get_output_embeddings(), targets, rows, samples, chunk), rows


def plain_token_loss(model, handle, samples: list[Sample], pad_id: int, chunk: int = DEFAULT_CHUNK):
    """Right-padded batch through the decoder (each row with its sample's adapter slot);
    per-token loss at loss positions only.

    Returns (token_loss [T] float32, token_docs [T] slot of each, padded tokens used).
    """
    ids, mask, labels, docs = collate(samples, pad_id, model_device(model))
    handle.set_indices(docs)
    token_loss, rows = token_losses(model, ids, mask, labels, chunk, samples)
    return token_loss, docs[rows], int(ids.numel())


def per_document_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    docs: torch.Tensor, num_docs: int,
) -> torch.Tensor:
    """Per-document mean next-token loss, [num_docs] (0 for a document with no tokens).

    input_ids, attention_mask, labels: [B, S]; docs: [B] slot of each row (the caller sets
    the adapter indices). What the engine's step minimises, summed over documents.
    """
    token_loss, rows = token_losses(model, input_ids, attention_mask, labels)
    token_docs = docs[rows]
    sums = token_loss.new_zeros(num_docs).index_add(0, token_docs, token_loss)
    counts = token_loss.new_zeros(num_docs).index_add(0, token_docs, torch.ones_like(token_loss))
    return sums / counts.clamp(min=1)
