"""Answering from a truncated context plus an adapter (docs/DESIGN.md §2.5).

The context is middle-truncated to the window (first W/2 and last W/2 tokens, "..."
between), laid out by the same PromptBuilder used in training, and decoded greedily
with the document's adapter slot active (or none: plain in-context learning).

Questions are decoded in batches across adapters (docs/DESIGN.md §4.9): each row of a batch
carries its own adapter slot (-1: the base model) through the multi-adapter ops, so the
questions of many documents, and ICL rows without an adapter, share one generation.

Confidence routing (`route_by_confidence`, docs/DESIGN.md §2.5): a question asked with an
adapter over a window of its document is also decoded by the base model alone over the
same prompt, as one more row of the same batches, and the answer whose tokens its own
model gave the higher mean log-probability is kept — where the window shows the answer the
base copies it with confidence, and an adapter that would overrule it with a less sure
answer loses to the base's reading.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lift_engine.data.truncation import middle_truncate
from lift_engine.models.loading import model_device
from lift_engine.prompts import PromptBuilder


# Padded prompt tokens per answering batch: 16 questions over a 512-token window fit; a
# 5k-token full-context prompt decodes alone (its prefill's attention grows as rows × L²).
DEFAULT_BATCH_TOKENS = 8192


def context_for_window(doc_ids: list[int] | None, window: int | None, prompts: PromptBuilder) -> list[int] | None:
    """The document's ids cut to `window` tokens (None: no context; window None: whole)."""
    if not doc_ids:
        return None
    if window is None:
        return list(doc_ids)
    if window <= 0:
        return None
    return middle_truncate(list(doc_ids), window, prompts.separator_ids)


@dataclass
class AnswerRequest:
    """One question to answer.

    doc_ids: the tokenised document (None: no context); window: tokens of it kept
    (None: the whole document, as context_for_window); slot: the adapter slot of the
    handle passed to greedy_answers (None or -1: the base model, no adapter).
    """

    question: str
    doc_ids: list[int] | None = None
    window: int | None = None
    slot: int | None = None


@dataclass
class DecodedAnswer:
    """One request's greedy answer.

    ids: the generated token ids, up to and including the first stop token;
    mean_logprob: their mean log-probability under the model that wrote them (each step's
    chosen token, log-softmax over the vocabulary); from_adapter: False when the base
    model wrote them (a request without a slot, or routed to the base); passed_over: with
    confidence routing, the other model's answer, the one not kept (None when not routed).
    """

    ids: list[int]
    mean_logprob: float
    from_adapter: bool
    passed_over: DecodedAnswer | None = None


class ChosenTokenLogprobs(LogitsProcessor):
    """Records, at each greedy step, every row's log-probability of the token greedy
    decoding picks (the argmax); leaves the scores unchanged. steps: one [B] tensor per
    generated token."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)  # stays on device: no sync
        return scores


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptBuilder,
    requests: Sequence[AnswerRequest],
    *,
    handle=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    route_by_confidence: bool = False,
) -> list[str]:
    """Greedy answers to `requests`, decoded in batches that mix adapters; in request order.

    handle: the AdapterHandle whose slots the requests name (None: every request must be
    a base-model one). batch_size: rows decoded together. progress: called with the
    number of answers finished after each batch (e.g. a tqdm bar's `update`).
    max_batch_tokens: a batch also ends before its padded prompt tokens (rows × longest)
    would pass this (a batch holds at least one row): long full-context prompts decode a
    few at a time, so the prefill's activations stay bounded. route_by_confidence: decode
    each adapter question over a document also without its adapter and keep the answer
    its own model is surer of (decode_answers).

    Requests are sorted by prompt length (longest first, so a batch that does not fit
    fails at once) and cut into batches of `batch_size`. A batch of B prompts, longest L:

        input_ids       [B, L]  left-padded (pad id; its value is masked out)
        attention_mask  [B, L]  0 on the padding, 1 on the prompt
        adapter indices [B]     the rows' slots (-1: base) — set on the handle for the
                                whole generation; the ops broadcast a [B] index over every
                                token of its row, the [B, L] prefill and each [B, 1] step
        output          [B, L + T]  T ≤ max_new_tokens new tokens

    Decoding is Hugging Face `generate` (greedy, KV cache), the call the one-question
    path always made: it derives position ids from the attention mask (each row's
    prompt starts at position 0 despite the padding), keeps the cache per architecture
    (e.g. sliding windows) and applies the model's generation_config exactly as a single
    question does, so a question's answer does not depend on whether it was decoded
    alone or in a batch (greedy_answer is this function with one request). A row stops
    at EOS or the end-of-turn token (`stop_ids`); finished rows wait, padded, until the
    batch's last row stops, and each answer is cut after its first stop token, as a
    single-row generation would end.

    Numerics: padding changes the shapes of the matmuls and of the attention, so a row's
    logits may differ from its one-row logits in the last bits (masked keys contribute
    exact zeros; the kernels' blocking may differ); a greedy token can then differ only
    where two logits are tied to within that rounding. Measured on tiny CPU models:
    eager attention bit-exact, sdpa within ~5e-6 (an explicit mask instead of the
    one-row causal kernel). Under RoPE the position offset left padding would cause
    cancels in q·k; the mask is what keeps padding out.
    """
    decoded = decode_answers(model, tokenizer, prompts, requests, handle=handle, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress, max_batch_tokens=max_batch_tokens,
                             route_by_confidence=route_by_confidence)
    return [tokenizer.decode(a.ids, skip_special_tokens=True).strip() for a in decoded]


def answer_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """`order` (longest first) cut into batches of at most batch_size rows and at most
    max_tokens padded tokens (rows × the batch's longest, its first row); ≥ 1 row each."""
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current is None or len(current) >= batch_size or (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append([i])
        else:
            current.append(i)
    return batches


@torch.no_grad()
def greedy_answer_ids(
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptBuilder,
    requests: Sequence[AnswerRequest],
    *,
    handle=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> list[list[int]]:
    """greedy_answers' generated token ids per request, up to and including the first stop
    token (what a one-row generation returns after the prompt); arguments as there."""
    return [a.ids for a in decode_answers(model, tokenizer, prompts, requests, handle=handle,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                          max_batch_tokens=max_batch_tokens)]


@torch.no_grad()
def decode_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptBuilder,
    requests: Sequence[AnswerRequest],
    *,
    handle=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    route_by_confidence: bool = False,
) -> list[DecodedAnswer]:
    """Every request's DecodedAnswer, in request order; arguments as greedy_answers'.

    route_by_confidence: each request that has both an adapter slot and a document gets a
    second row — the same prompt, slot -1 — decoded in the same batches; of the two
    answers the one with the higher mean_logprob under its own model is kept (ties: the
    adapter's). A request without a document has nothing for the base to read and is not
    routed. progress counts requests, not rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    slots = [-1 if r.slot is None else int(r.slot) for r in requests]
    if handle is None and any(s >= 0 for s in slots):
        raise ValueError("a request names an adapter slot but no adapter handle was given")
    if handle is not None and any(s >= handle.num_adapters for s in slots):
        raise IndexError(f"adapter slot {max(slots)} out of range for {handle.num_adapters} adapters")
    if any(s < -1 for s in slots):
        raise ValueError(f"adapter slot {min(slots)} is invalid (use None or -1 for the base model)")
    encoded = [prompts.question_prompt(context_for_window(r.doc_ids, r.window, prompts), r.question) for r in requests]
    # the requests that get a base twin: rows len(requests) + k decode twins[k]'s prompt with slot -1
    twins = [i for i, r in enumerate(requests) if slots[i] >= 0 and r.doc_ids] if route_by_confidence else []
    encoded, slots = encoded + [encoded[i] for i in twins], slots + [-1] * len(twins)
    device = model_device(model)
    stops = stop_ids(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = pad_id if pad_id is not None else (stops[0] if stops else 0)  # left padding's id: masked, any id does
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # stable: ties keep request order
    decoded: list[DecodedAnswer | None] = [None] * len(encoded)
    for rows in answer_batches(order, [len(e) for e in encoded], batch_size, max_batch_tokens):
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), fill, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, i in enumerate(rows):
            n = len(encoded[i])
            input_ids[b, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            attention_mask[b, width - n :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        indices = torch.tensor([slots[i] for i in rows], dtype=torch.long, device=device)
        recorder = ChosenTokenLogprobs()
        with handle.use(indices) if handle is not None else contextlib.nullcontext():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stops,
                logits_processor=LogitsProcessorList([recorder]),
            )
        new = output[:, width:].tolist()
        logprobs = torch.stack(recorder.steps, dim=1).cpu()  # [rows, generated steps]
        for b, i in enumerate(rows):
            tokens = new[b]
            end = next((t for t, tok in enumerate(tokens) if tok in stops), None)
            if end is not None:
                tokens = tokens[: end + 1]
            mean = float(logprobs[b, : len(tokens)].mean()) if tokens else float("-inf")
            decoded[i] = DecodedAnswer(tokens, mean, slots[i] >= 0)
        if progress is not None:
            progress(sum(1 for i in rows if i < len(requests)))
    answers = decoded[: len(requests)]
    for i, twin in zip(twins, decoded[len(requests):]):  # a base twin replaces its request's answer when surer
        adapters = answers[i]
        if twin.mean_logprob > adapters.mean_logprob:
            answers[i] = replace(twin, passed_over=adapters)
        else:
            answers[i] = replace(adapters, passed_over=twin)
    return answers


def greedy_answer(
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptBuilder,
    question: str,
    doc_ids: list[int] | None = None,
    window: int | None = 4096,
    max_new_tokens: int = 64,
    handle=None,
    slot: int | None = None,
    route_by_confidence: bool = False,
) -> str:
    """Greedy answer to `question` (greedy_answers with one request).

    doc_ids: the tokenised document (None = no context); window: tokens of it kept.
    handle/slot: adapter bank and the slot to use; None = the base model alone.
    route_by_confidence: as greedy_answers'.
    """
    request = AnswerRequest(question, doc_ids=doc_ids, window=window, slot=slot)
    return greedy_answers(model, tokenizer, prompts, [request], handle=handle, max_new_tokens=max_new_tokens,
                          batch_size=1, route_by_confidence=route_by_confidence)[0]


def stop_ids(tokenizer, prompts: PromptBuilder) -> list[int]:
    """The tokens that end an answer: end of sequence and the first end-of-turn token."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    end = prompts.end_of_turn_ids
    if end:
        stops.add(end[0])
    return sorted(stops)
