"""Batched answering (docs/DESIGN.md §2.5, §4.9): questions of several adapters, and base-model
rows, decoded together give the one-question path's greedy tokens exactly; several saved
adapters load into one bank (load_adapters)."""
from __future__ import annotations

import random

import pytest
import torch

from helpers_models import make_tiny_model
from helpers_tokenizer import make_tokenizer
from lift_engine.adapters import attach_adapters, load_adapter, load_adapters, save_adapter
from lift_engine.adapters.gated_memory import QueryCapture
from lift_engine.config import make_config
from lift_engine.errors import AdapterError
from lift_engine.inference import (
    AnswerRequest,
    stop_ids,
    context_for_window,
    decode_answers,
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
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer, prompts))
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


def _perturb(handle, seed, scale=0.3):
    """Random adapter weights big enough that adapter rows answer unlike base rows (w4, the
    gate's last layer, at 1.0; the rest at `scale`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_banks().items():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith("w4") else scale))


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
    answers = greedy_answers(base.model, tokenizer, prompts, requests[:4], handle=handle, max_new_tokens=NEW_TOKENS)
    assert answers == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected[:4]]

    # the test means something: every adapter changes every prompt's answer, and some rows
    # stop at a stop token while others in their batch go on to max_new_tokens
    by_prompt: dict[tuple, dict] = {}
    for request, ids in zip(requests, got):
        by_prompt.setdefault((request.question, request.window), {})[request.slot] = ids
    for answers_by_slot in by_prompt.values():
        assert all(answers_by_slot[slot] != answers_by_slot[None] for slot in (0, 1, 2))
    stops = set(stop_ids(tokenizer, prompts))
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


# ------------------------------------------------------------------ load_adapters
def _save(base, kind, tmp_path, name, seed, **cfg_kwargs):
    cfg = _cfg(kind, **cfg_kwargs)
    handle = attach_adapters(base.model, kind, cfg, num_adapters=1)
    _perturb(handle, seed)
    out = save_adapter(handle, 0, tmp_path / name, base=base, lift_config=cfg)
    handle.remove()
    return out


def _unpatched(model) -> bool:
    return not any(isinstance(m, QueryCapture) or hasattr(m, "lora_a") for m in model.modules())


@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_load_adapters_one_bank_answers_as_each_adapter_alone(tmp_path, kind):
    base = _loaded()
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    dirs = [_save(base, kind, tmp_path, "a", seed=5)]
    # LoRA: a second adapter of another rank, alpha and target set
    dirs.append(_save(base, kind, tmp_path, "b", seed=6, r=2, alpha=5.0, targets=["q_proj", "v_proj", "down_proj"]))
    requests = [r for r in _requests(tokenizer, slots=(None, 0, 1)) if r.doc_ids is not None]
    ids = torch.tensor([list(range(20, 50))])
    alone_ids, alone_logits, alone_state = {}, {}, {}
    for slot, d in enumerate(dirs):
        single = load_adapter(d, base)
        alone_state[slot] = single.state_for_slot(0)
        with torch.no_grad(), single.use([0]):
            alone_logits[slot] = base.model(ids).logits
        for i, r in enumerate(requests):
            if r.slot == slot:
                alone_ids[i] = _reference_ids(base.model, tokenizer, prompts, AnswerRequest(r.question, r.doc_ids, r.window, 0),
                                              single)
        single.remove()
    bank = load_adapters(dirs, base)
    try:
        assert bank.kind == kind and bank.num_adapters == 2
        if kind == "lora":
            assert bank.config.lora.r == 4
            assert bank.slot_lora_config(0) == {"r": 4, "alpha": 8.0}
            assert bank.slot_lora_config(1) == {"r": 2, "alpha": 5.0}
        for slot in (0, 1):
            state = bank.state_for_slot(slot)
            assert all(torch.equal(state[k], v) for k, v in alone_state[slot].items())
            assert all(not state[k].any() for k in state.keys() - alone_state[slot].keys())  # modules it lacks
            with torch.no_grad(), bank.use([slot]):
                torch.testing.assert_close(base.model(ids).logits, alone_logits[slot], atol=1e-4, rtol=1e-4)
        with torch.no_grad(), bank.use([-1]):
            plain = base.model(ids).logits
        assert (alone_logits[0] - plain).abs().max() > 1e-2 and (alone_logits[1] - plain).abs().max() > 1e-2
        got = greedy_answer_ids(base.model, tokenizer, prompts, requests, handle=bank, max_new_tokens=NEW_TOKENS,
                                batch_size=4)
        for i, r in enumerate(requests):
            if r.slot is not None:
                assert got[i] == alone_ids[i], (i, r.slot)
    finally:
        bank.remove()
    assert _unpatched(base.model)


def test_load_adapters_errors(tmp_path):
    base = _loaded()
    lora = _save(base, "lora", tmp_path, "lora", seed=1)
    gated = _save(base, "gated-memory", tmp_path, "gm", seed=2)
    with pytest.raises(AdapterError, match="no adapters"):
        load_adapters([], base)
    with pytest.raises(AdapterError, match="one bank holds one kind") as err:
        load_adapters([lora, gated], base)
    assert str(gated) in str(err.value) and "\n" not in str(err.value)
    assert _unpatched(base.model)
    broken = _save(base, "lora", tmp_path, "broken", seed=3)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError, match="cannot read") as err:
        load_adapters([lora, broken], base)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)
    assert _unpatched(base.model)  # the bank attached for the first adapter is gone again
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapters([lora, tmp_path / "nope"], base)
    other = _loaded(seed=1)
    with pytest.raises(AdapterError, match="was tuned for base model"):
        load_adapters([lora], other)
    assert _unpatched(other.model)


# ------------------------------------------------------------------ lift demo
def test_demo_columns_are_decoded_inanswer_batches(monkeypatch):
    from lift_engine import demo
    from lift_engine.data.documents import tokenize_long

    base = _loaded()
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    cfg = make_config("cpu", "lora")
    cfg.inference.max_new_tokens = 6
    questions = demo.demo_questions()[:5]
    doc_ids = tokenize_long(demo.demo_document(), tokenizer)[:300]
    handle = attach_adapters(base.model, "lora", _cfg("lora"), num_adapters=1)
    _perturb(handle, seed=4)
    batches = []  # rows per generate call
    generate = base.model.generate
    monkeypatch.setattr(base.model, "generate", lambda **kw: batches.append(kw["input_ids"].shape[0]) or generate(**kw))
    for column_handle, window in ((None, 64), (None, None), (handle, 64)):  # truncated ICL, full ICL, LIFT
        batches.clear()
        got = demo._answers(base, prompts, questions, doc_ids, window, cfg, column_handle, "column")
        # the whole column in one batch; LIFT's with the base's row beside each (confidence routing)
        assert batches == [len(questions) * (2 if column_handle else 1)]
        want = [greedy_answer(base.model, tokenizer, prompts, q["question"], doc_ids=doc_ids, window=window,
                              max_new_tokens=6, handle=column_handle, slot=0 if column_handle else None,
                              route_by_confidence=column_handle is not None)
                for q in questions]
        assert got == want


def test_answer_batches_respect_the_token_budget():
    from lift_engine.inference import answer_batches

    lengths = [100, 90, 80, 10, 10, 10]
    assert answer_batches([0, 1, 2, 3, 4, 5], lengths, batch_size=4, max_tokens=199) == [[0], [1, 2], [3, 4, 5]]
    assert answer_batches([0, 1, 2, 3, 4, 5], lengths, batch_size=2, max_tokens=10**6) == [[0, 1], [2, 3], [4, 5]]
    assert answer_batches([0], [5000], batch_size=16, max_tokens=100) == [[0]]  # a long prompt still decodes, alone


def _teacher_forced_mean_logprob(model, prompts, request, ids, handle) -> float:
    """Mean log-probability of `ids` after the request's prompt under its slot, from one
    forward pass over prompt + ids (what decoding recorded step by step)."""
    prompt = prompts.question_prompt(context_for_window(request.doc_ids, request.window, prompts), request.question)
    full = torch.tensor([prompt + ids])
    with torch.no_grad(), handle.use(torch.tensor([-1 if request.slot is None else request.slot])):
        logprobs = model(input_ids=full).logits[0].float().log_softmax(-1)
    picked = logprobs[len(prompt) - 1 : len(prompt) + len(ids) - 1].gather(-1, torch.tensor(ids)[:, None])
    return float(picked.mean())


@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_route_by_confidence_keeps_the_surer_of_adapter_and_base(kind):
    """Each adapter question over a document is also decoded by the base alone; the answer
    with the higher mean log-probability under its own model is kept. Requests without a
    document, or without a slot, are decoded as without routing."""
    base = _loaded()
    tokenizer, prompts = base.tokenizer, PromptBuilder(base.tokenizer, True)
    handle = attach_adapters(base.model, kind, _cfg(kind), num_adapters=3)
    _perturb(handle, seed=0, scale=0.1)  # at 0.3 the random LoRA is less sure than the base on every prompt
    requests = _requests(tokenizer)
    kwargs = dict(handle=handle, max_new_tokens=NEW_TOKENS, batch_size=6)
    plain = decode_answers(base.model, tokenizer, prompts, requests, **kwargs)
    by_base = decode_answers(base.model, tokenizer, prompts, [AnswerRequest(r.question, r.doc_ids, r.window, None)
                                                              for r in requests], **kwargs)
    done = []
    routed = decode_answers(base.model, tokenizer, prompts, requests, route_by_confidence=True, progress=done.append,
                            **kwargs)
    assert sum(done) == len(requests)  # progress counts questions, not the base's extra rows
    assert handle.context.indices is None

    # the confidence recorded while decoding is the answer's teacher-forced mean log-probability
    for request, answer in list(zip(requests, plain))[:6]:
        want = _teacher_forced_mean_logprob(base.model, prompts, request, answer.ids, handle)
        assert answer.mean_logprob == pytest.approx(want, abs=1e-4)

    picked = {"adapter": 0, "base": 0}
    for request, mine, theirs, got in zip(requests, plain, by_base, routed):
        if request.slot is None or not request.doc_ids:
            assert got.ids == mine.ids and got.from_adapter == (request.slot is not None)
            assert got.passed_over is None
            continue
        assert abs(mine.mean_logprob - theirs.mean_logprob) > 1e-3  # no near-tie: the choice below is determined
        surer, other = (theirs, mine) if theirs.mean_logprob > mine.mean_logprob else (mine, theirs)
        assert got.ids == surer.ids and got.from_adapter == (surer is mine)
        # the answer not kept comes along: the other model's, with its own confidence
        assert got.passed_over.ids == other.ids and got.passed_over.from_adapter == (other is mine)
        assert got.passed_over.mean_logprob == pytest.approx(other.mean_logprob, abs=1e-4)
        picked["adapter" if got.from_adapter else "base"] += 1
    assert picked["adapter"] > 0 and picked["base"] > 0, picked  # both ways taken: the check means something
    texts = greedy_answers(base.model, tokenizer, prompts, requests, route_by_confidence=True, **kwargs)
    assert texts == [tokenizer.decode(a.ids, skip_special_tokens=True).strip() for a in routed]


def test_routing_is_on_for_lora_presets_off_for_gated_memory_and_changes_no_adapter_key():
    from lift_engine.config import LiftConfig

    for preset in ("paper", "cpu", "cpu-prose"):
        lora, gated = make_config(preset, "lora"), make_config(preset, "gated-memory")
        assert lora.inference.route_by_confidence and not gated.inference.route_by_confidence
        for cfg in (lora, gated):
            legacy = cfg.to_dict()
            del legacy["inference"]["route_by_confidence"]  # a manifest written before the field
            assert LiftConfig.from_dict(legacy) == cfg
            toggled = LiftConfig.from_dict(cfg.to_dict())
            toggled.inference.route_by_confidence = not cfg.inference.route_by_confidence
            assert toggled.fingerprint() == cfg.fingerprint()  # answering only: cached adapters stay valid
