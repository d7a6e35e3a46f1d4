"""Batched answering (DESIGN.md §2.5, §4): questions of several adapters, and base-model
rows, decoded together give the one-question path's greedy tokens exactly."""
from __future__ import annotations

import random

import pytest
import torch

from helpers_models import make_tiny_model
from helpers_tokenizer import make_tokenizer
from lift_engine.adapters import attach_adapters
from lift_engine.config import make_config
from lift_engine.inference import (
    AnswerRequest,
    _stop_ids,
    context_for_window,
    greedy_answer,
    greedy_answer_ids,
    greedy_answers,
)
from lift_engine.models.loading import LoadedModel, model_fingerprint
from lift_engine.prompts import PromptBuilder

NEW_TOKENS = 12
QUESTIONS = ["Who founded it?", "What year was the lab closed, and by whom?", "Where?", "What is QX-7731?", "Why?"]


def _reference_ids(model, tokenizer, prompts, request, handle, max_new_tokens=NEW_TOKENS) -> list[int]:
    """The one-question path as it was before batching: one row, no padding, model.generate."""
    ids = prompts.question_prompt(context_for_window(request.doc_ids, request.window, prompts), request.question)
    input_ids = torch.tensor([ids])
    if handle is not None:
        handle.set_indices(torch.tensor([-1 if request.slot is None else request.slot]))
    try:
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=_stop_ids(tokenizer, prompts))
    finally:
        if handle is not None:
            handle.set_indices(None)
    return output[0, len(ids):].tolist()


def _loaded(attn_impl="eager", seed=0) -> LoadedModel:
    """A tiny Llama with a real tokenizer; EOS's output row is scaled up by half so that
    some answers end at EOS before max_new_tokens (a random model rarely says EOS)."""
    tokenizer = make_tokenizer()
    model = make_tiny_model("llama", vocab=len(tokenizer), seed=seed, attn_implementation=attn_impl)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight[tokenizer.eos_token_id] *= 1.5
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=f"tiny-{seed}", fingerprint=model_fingerprint(model))


def _cfg(kind, r=4, alpha=8.0, targets=None):
    cfg = make_config("cpu", kind)
    cfg.lora.r, cfg.lora.alpha = r, alpha
    if targets is not None:
        cfg.lora.targets = tuple(targets)
    return cfg


def _perturb(handle, seed):
    """Random adapter weights big enough that adapter rows answer unlike base rows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_banks().items():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith("w4") else 0.3))


def _requests(tokenizer, slots=(None, 0, 1, 2)) -> list[AnswerRequest]:
    """Five prompts of different lengths (documents, windows, none), each asked at every
    slot (None = base), in a shuffled order."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, len(tokenizer), (n,), generator=gen).tolist() for n in (90, 40, 7)]
    contexts = [(docs[0], None), (docs[1], 32), (docs[2], None), (None, None), (docs[0], 16)]
    requests = [AnswerRequest(q, doc, window, slot) for q, (doc, window) in zip(QUESTIONS, contexts) for slot in slots]
    random.Random(0).shuffle(requests)
    return requests


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_batched_answers_equal_one_question_at_a_time(kind, attn_impl):
    base = _loaded(attn_impl)
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    handle = attach_adapters(base.model, kind, _cfg(kind), num_adapters=3)
    _perturb(handle, seed=0)
    requests = _requests(tokenizer)
    lengths = {len(prompts.question_prompt(context_for_window(r.doc_ids, r.window, prompts), r.question)) for r in requests}
    assert len(lengths) >= 4  # rows of several lengths: left padding matters
    expected = [_reference_ids(base.model, tokenizer, prompts, r, handle) for r in requests]

    done = []
    got = greedy_answer_ids(base.model, tokenizer, prompts, requests, handle=handle, max_new_tokens=NEW_TOKENS,
                            batch_size=6, progress=done.append)
    assert done == [6, 6, 6, 2]  # several batches, every one mixing adapters
    assert handle.context.indices is None  # the handle's indices are restored
    assert got == expected  # token for token
    answers = greedy_answers(base.model, tokenizer, prompts, requests, handle=handle, max_new_tokens=NEW_TOKENS,
                             batch_size=6)
    assert answers == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]

    # the test means something: every adapter changes every prompt's answer, and some rows
    # stop at a stop token while others in their batch go on to max_new_tokens
    by_prompt: dict[tuple, dict] = {}
    for request, ids in zip(requests, got):
        by_prompt.setdefault((request.question, request.window), {})[request.slot] = ids
    for answers_by_slot in by_prompt.values():
        assert all(answers_by_slot[slot] != answers_by_slot[None] for slot in (0, 1, 2))
    stops = set(_stop_ids(tokenizer, prompts))
    assert any(ids[-1] in stops and len(ids) < NEW_TOKENS for ids in got)
    assert any(len(ids) == NEW_TOKENS for ids in got)


def test_greedy_answer_is_one_request_of_greedy_answers():
    base = _loaded()
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    handle = attach_adapters(base.model, "lora", _cfg("lora"), num_adapters=2)
    _perturb(handle, seed=3)
    doc = list(range(10, 70))
    for slot in (None, 1):
        request = AnswerRequest("Who founded it?", doc, 32, slot)
        want = tokenizer.decode(_reference_ids(base.model, tokenizer, prompts, request, handle),
                                skip_special_tokens=True).strip()
        assert greedy_answer(base.model, tokenizer, prompts, "Who founded it?", doc_ids=doc, window=32,
                             max_new_tokens=NEW_TOKENS, handle=handle, slot=slot) == want
    assert greedy_answer(base.model, tokenizer, prompts, "Where?", max_new_tokens=NEW_TOKENS) == tokenizer.decode(
        _reference_ids(base.model, tokenizer, prompts, AnswerRequest("Where?"), None), skip_special_tokens=True).strip()


def test_greedy_answers_arguments():
    base = _loaded()
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    assert greedy_answers(base.model, tokenizer, prompts, []) == []
    with pytest.raises(ValueError, match="no adapter handle"):
        greedy_answers(base.model, tokenizer, prompts, [AnswerRequest("q", slot=0)])
    handle = attach_adapters(base.model, "lora", _cfg("lora"), num_adapters=2)
    with pytest.raises(IndexError, match="out of range"):
        greedy_answers(base.model, tokenizer, prompts, [AnswerRequest("q", slot=2)], handle=handle)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_answers(base.model, tokenizer, prompts, [AnswerRequest("q")], handle=handle, batch_size=0)
