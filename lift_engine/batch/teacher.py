"""The teacher of context distillation (docs/DESIGN.md §2.6), run by the tuning engine.

The teacher is the frozen base model itself — the job's own model with adapter index -1
on every row, so the same banks and no second copy of the model — reading one chunk of
the document in its prompt (samples.teacher_passage: the chunk, and with
distill.teacher_context the document's head/tail context around it). For each (chunk,
query) it answers greedily, in batches (inference.greedy_answer_ids), then a
teacher-forced pass over prompt + answer, without gradient, gives its next-token
distribution at every answer position, cut to the top k:

    prompt_i = question_prompt(passages[c_i], q_i)              teacher sees the passage
    a_i      = greedy answer (end of turn included)              [n_i]
    top_ids_i, top_logprobs_i = topk(log_softmax(logits at the n_i positions that
                                     predict a_i), k)            [n_i, k] each

The student later sees question_prompt(head/tail context, q_i) + a_i (samples.py) and is
pulled towards those distributions (loss.chunked_distill_loss).
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Callable

import torch

from lift_engine.batch.forward import collate, pad_token_id
from lift_engine.batch.loss import loss_positions
from lift_engine.config import DistillConfig
from lift_engine.fsutil import atomic_write_bytes
from lift_engine.inference import AnswerRequest, greedy_answer_ids, stop_ids
from lift_engine.models.loading import model_device
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import IGNORE_INDEX, Sample, TeacherAnswer


@torch.no_grad()
def teacher_answers(model, handle, tokenizer, prompts: PromptBuilder, passages: list[list[int]],
                    queries: list[tuple[int, str]], cfg: DistillConfig) -> tuple[list[TeacherAnswer], int]:
    """(targets, dropped): one TeacherAnswer per query whose answer is not empty, in query
    order; dropped counts the empty answers. queries: (chunk index, question); passages: the
    context the teacher reads for each chunk."""
    if not queries:
        return [], 0
    was_training = model.training
    model.eval()
    try:
        requests = [AnswerRequest(q, passages[c], None, None) for c, q in queries]
        answers = greedy_answer_ids(model, tokenizer, prompts, requests, handle=handle,
                                    max_new_tokens=cfg.max_answer_tokens, batch_size=cfg.teacher_batch)
        stops = set(stop_ids(tokenizer, prompts))
        kept = [(c, q, a) for (c, q), a in zip(queries, answers) if any(t not in stops for t in a)]
        targets = []
        for start in range(0, len(kept), cfg.teacher_batch):
            targets += _distributions(model, handle, tokenizer, prompts, passages, kept[start : start + cfg.teacher_batch],
                                      cfg.top_k)
    finally:
        model.train(was_training)
    return targets, len(queries) - len(kept)


def _distributions(model, handle, tokenizer, prompts, passages, batch, top_k: int) -> list[TeacherAnswer]:
    """The teacher-forced pass of one batch of (chunk, question, answer ids)."""
    samples = []
    for c, q, answer in batch:
        prompt = prompts.question_prompt(passages[c], q)
        samples.append(Sample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, "distill"))
    ids, mask, labels, _ = collate(samples, pad_token_id(tokenizer), model_device(model))
    with handle.use(torch.full((len(samples),), -1, dtype=torch.long, device=ids.device)):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols, _ = loss_positions(labels)
    logprobs = torch.log_softmax(model.get_output_embeddings()(hidden[rows, cols]).float(), dim=-1)
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    out, at = [], 0
    for (c, q, answer) in batch:
        n = len(answer)
        out.append(TeacherAnswer(q, list(answer), top.indices[at : at + n].cpu(), top.values[at : at + n].cpu(), c))
        at += n
    return out


TEACHER_FILE = "teacher.pt"


def stored_teacher_answers(work_dir: Path, make: Callable[[], list[TeacherAnswer]]) -> list[TeacherAnswer]:
    """The teacher answers stored in the job's work dir, or `make()`'s, written there
    atomically first (a resumed job distils the same targets without asking again). A
    damaged file is rebuilt, never trusted."""
    path = Path(work_dir) / TEACHER_FILE
    if path.is_file():
        try:
            rows = torch.load(path, map_location="cpu", weights_only=True)
            return [TeacherAnswer(**row) for row in rows]
        except Exception:
            pass
    targets = make()
    buffer = io.BytesIO()
    torch.save([dataclasses.asdict(t) for t in targets], buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return targets
