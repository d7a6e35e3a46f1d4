"""Tuning one document into an adapter slot (DESIGN.md §2.4, §4).

The step is written for a bank of adapters: every trainable tensor has a leading adapter
axis [N, …], each sample carries its document's slot, each document's loss is normalised
over its own loss tokens and the per-document losses are summed, and gradient clipping
is per slot. With one document that is plain LIFT. The batched multi-document job
(lift_engine/batch/) shares `per_document_loss` and `clip_per_slot` but steps its own
per-slot AdamW, because a slot whose document sits out a step must get no update.

Logits are computed only at positions that carry a loss (the vocabulary projection of a
135M model is a fifth of its weights), from the decoder's hidden states.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lift_engine.adapters.patching import AdapterHandle
from lift_engine.batch.loss import chunked_token_loss
from lift_engine.batch.optim import fused_adamw_available
from lift_engine.checkpoint import load_checkpoint, partial_dir_for, remove_work_dir, save_checkpoint
from lift_engine.config import LiftConfig
from lift_engine.models.loading import model_device
from lift_engine.precision import compute_dtype, training_precision
from lift_engine.samples import IGNORE_INDEX, DocumentSamples, Sample, SampleRef

# Measured on the 2-core development machine (DESIGN.md §8), quiet: the cpu preset's
# demo plan (~68k planned tokens) tuned the 135M default model in 352 s, ~194 tok/s in
# fp32, i.e. about 6·135e6·194 ≈ 1.6e11 FLOP/s. Other jobs on the cores slow it 2–10×.
ASSUMED_TRAIN_FLOPS = 1.6e11
# train.compute_dtype = "bfloat16" (precision.py) on the same machine: the same demo plan
# tuned in 101 s instead of 336 s (with the bf16 AMX attention kernel and fused RoPE).
ASSUMED_SPEEDUP = {"float32": 1.0, "bfloat16": 336 / 101}


@dataclass
class TuneReport:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    losses: list[float] = field(default_factory=list)


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


def per_document_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    docs: torch.Tensor, num_docs: int,
) -> torch.Tensor:
    """Per-document mean next-token loss, [num_docs] (0 for a document with no tokens).

    input_ids, attention_mask, labels: [B, S]; docs: [B] slot of each row.
    Only positions whose next token carries a label go through the output projection, in
    chunks, with the loss's gradient computed in the same pass (batch/loss.py) — the same
    loss the batched job uses, so one document trains alike either way.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=training_attention_mask(attention_mask)).last_hidden_state
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    token_loss = chunked_token_loss(hidden[rows, cols], model.get_output_embeddings(), targets[rows, cols])
    token_docs = docs[rows]
    sums = token_loss.new_zeros(num_docs).index_add(0, token_docs, token_loss)
    counts = token_loss.new_zeros(num_docs).index_add(0, token_docs, torch.ones_like(token_loss))
    return sums / counts.clamp(min=1)


def clip_per_slot(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` separately for every adapter slot (leading axis).

    Returns the per-slot norms before clipping, [N].
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    sq = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norms = sq.sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))
    return norms


def make_optimizer(handle: AdapterHandle, cfg: LiftConfig) -> torch.optim.Optimizer:
    """torch's AdamW over the adapter's parameters, in its fused kernel where that takes them
    (one pass per tensor instead of eight ops; SlotAdamW uses the same kernel)."""
    lr = cfg.train.lr_lora if handle.kind == "lora" else cfg.train.lr_gated_memory
    params = list(handle.trainable_parameters())
    return torch.optim.AdamW(params, lr=lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay,
                             fused=fused_adamw_available(params) or None)


def estimate_seconds(model: torch.nn.Module, total_tokens: int, compute_dtype: str = "float32") -> float:
    """Rough time of `total_tokens` of forward+backward (6·params FLOP per token) when tuning
    in `compute_dtype`."""
    params = sum(p.numel() for p in model.parameters())
    return 6.0 * params * total_tokens / ASSUMED_TRAIN_FLOPS / ASSUMED_SPEEDUP.get(compute_dtype, 1.0)


class DocumentTuner:
    """Tunes the adapter in `slot` of `handle` on one document, resumably."""

    def __init__(self, model: torch.nn.Module, handle: AdapterHandle, cfg: LiftConfig, pad_id: int, slot: int = 0):
        self.model, self.handle, self.cfg, self.pad_id, self.slot = model, handle, cfg, pad_id, slot

    def train_step(self, optimizer: torch.optim.Optimizer, samples: list[Sample]) -> torch.Tensor:
        """One optimizer step over a batch; returns the per-document losses [N]."""
        ids, mask, labels, docs = collate(samples, self.pad_id, model_device(self.model))
        self.handle.set_indices(docs)
        losses = per_document_loss(self.model, ids, mask, labels, docs, self.handle.num_adapters)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        clip_per_slot(self.handle.trainable_parameters(), self.cfg.train.grad_clip)
        optimizer.step()
        return losses.detach()

    def tune(
        self, samples: DocumentSamples, out_dir, job_key: dict, progress: bool = True,
        on_checkpoint=None,
    ) -> TuneReport:
        """Run the full two-stage plan, checkpointing to a hidden work dir beside `out_dir`.

        A matching checkpoint there is resumed from. The work dir is removed only by
        `finish()`, after the adapter itself has been written.
        """
        plan = samples.full_plan()
        batch = max(1, self.cfg.train.batch_size)
        steps = [plan[i : i + batch] for i in range(0, len(plan), batch)]
        work_dir = partial_dir_for(out_dir)
        optimizer = make_optimizer(self.handle, self.cfg)
        start_step = 0
        state = load_checkpoint(work_dir, job_key)
        if state is not None:
            self.handle.load_slot(self.slot, state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
        self.model.train()
        losses: list[float] = []
        began = time.monotonic()
        bar = tqdm(total=len(steps), initial=start_step, desc="tuning", unit="step", disable=not progress, dynamic_ncols=True)
        dtype = compute_dtype(self.cfg.train.compute_dtype)
        try:
            with training_precision(self.model, dtype):  # bf16 base while tuning, if configured (precision.py)
                self._run_steps(optimizer, samples, steps, start_step, work_dir, job_key, losses, bar, on_checkpoint)
        finally:
            bar.close()
            self.model.eval()
            self.handle.set_indices(None)
        return TuneReport(
            steps=len(steps), resumed_from=start_step, first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None, seconds=time.monotonic() - began, losses=losses,
        )

    def _run_steps(self, optimizer, samples: DocumentSamples, steps: list, start_step: int, work_dir, job_key: dict,
                   losses: list[float], bar, on_checkpoint) -> None:
        """Steps start_step… of the plan, appending each step's loss and checkpointing on schedule."""
        for step in range(start_step, len(steps)):
            batch_samples = [samples.build(ref) for ref in steps[step]]
            loss = float(self.train_step(optimizer, batch_samples)[self.slot])
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            if done % max(1, self.cfg.train.checkpoint_every) == 0 and done < len(steps):
                save_checkpoint(work_dir, job_key, done, self.handle.state_for_slot(self.slot), optimizer.state_dict())
                if on_checkpoint is not None:
                    on_checkpoint(done)

    @staticmethod
    def finish(out_dir) -> None:
        """Drop the job's checkpoints once its adapter is safely written."""
        remove_work_dir(partial_dir_for(out_dir))


def plan_summary(samples: DocumentSamples, model: torch.nn.Module) -> dict:
    """Counts and a rough time estimate of a document's plan, shown before tuning."""
    plan = samples.full_plan()
    tokens = sum(samples.approx_length(ref) for ref in plan)
    return {
        "segments": len(samples.spans),
        "qa_items": len(samples.qa_items),
        "samples": len(plan),
        "train_tokens": tokens,
        "estimated_seconds": estimate_seconds(model, tokens, samples.cfg.train.compute_dtype),
    }


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
