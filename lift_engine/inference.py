"""Answering from a truncated context plus an adapter (DESIGN.md §2.5).

The context is middle-truncated to the window (first W/2 and last W/2 tokens, "..."
between), laid out by the same PromptBuilder used in training, and decoded greedily
with the document's adapter slot active (or none: plain in-context learning).
"""
from __future__ import annotations

import torch

from lift_engine.data.truncation import middle_truncate
from lift_engine.models.loading import model_device
from lift_engine.prompts import PromptBuilder


def context_for_window(doc_ids: list[int] | None, window: int | None, prompts: PromptBuilder) -> list[int] | None:
    """The document's ids cut to `window` tokens (None: no context; window None: whole)."""
    if not doc_ids:
        return None
    if window is None:
        return list(doc_ids)
    if window <= 0:
        return None
    return middle_truncate(list(doc_ids), window, prompts.separator_ids)


@torch.no_grad()
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
) -> str:
    """Greedy answer to `question`.

    doc_ids: the tokenised document (None = no context); window: tokens of it kept.
    handle/slot: adapter bank and the slot to use; None = the base model alone.
    """
    context = context_for_window(doc_ids, window, prompts)
    prompt = prompts.question_prompt(context, question)
    device = model_device(model)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    if handle is not None:
        handle.set_indices(torch.tensor([-1 if slot is None else slot], dtype=torch.long, device=device))
    try:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=_stop_ids(tokenizer, prompts),
        )
    finally:
        if handle is not None:
            handle.set_indices(None)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def _stop_ids(tokenizer, prompts: PromptBuilder) -> list[int]:
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    end = prompts.end_of_turn_ids
    if end:
        stops.add(end[0])
    return sorted(stops)
