"""LIFT end to end on a tiny random model: samples, loss, tuning, resume, answering."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.adapters.io import read_manifest
from lift_engine.checkpoint import partial_dir_for
from lift_engine.config import BatchConfig, make_config
from lift_engine.data.extractive import QAItem
from lift_engine.inference import greedy_answer
from lift_engine.models.loading import load_base_model
from lift_engine.pipeline import load_tuned, tune_document
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import IGNORE_INDEX, DocumentSamples
from lift_engine.batch.forward import collate, per_document_loss
from lift_engine.batch.optim import clip_per_slot


def tiny_config(adapter: str = "lora"):
    cfg = make_config("cpu", adapter)
    cfg.segment.length = 48
    cfg.context.length = 24
    cfg.qa.num_extractive = 4
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 2, 2
    cfg.train.batch_size = 2
    cfg.train.lr_lora = cfg.train.lr_gated_memory = 1e-2
    cfg.inference.window = 32
    cfg.inference.max_new_tokens = 8
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def base(model_dir):
    return load_base_model(str(model_dir))


def _doc_samples(base, cfg, qa=None):
    prompts = PromptBuilder(base.tokenizer)
    ids = base.tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"]
    qa = qa if qa is not None else [QAItem("Who founded Quenwick Labs?", "Professor Ilsa Marrow",
                                           "Professor Ilsa Marrow founded Quenwick Labs", "generated")]
    return DocumentSamples(ids, qa, cfg, prompts), ids, prompts


def test_loss_masks_cover_exactly_the_response(base):
    cfg = tiny_config()
    samples, ids, prompts = _doc_samples(base, cfg)
    plan = samples.full_plan()
    n_seg, n_qa = len(samples.spans), 1
    assert len(plan) == cfg.train.stage1_epochs * n_seg + cfg.train.stage2_epochs * (n_seg + n_qa)
    seg_ref = next(r for r in plan if r.kind == "segment")
    seg = samples.build(seg_ref)
    start, end = samples.spans[seg_ref.index]
    labelled = [t for t, lab in zip(seg.input_ids, seg.labels) if lab != IGNORE_INDEX]
    assert labelled == ids[start:end]
    assert seg.input_ids[-(end - start):] == ids[start:end]
    qa = samples.build(next(r for r in plan if r.kind == "qa"))
    labelled = [t for t in qa.labels if t != IGNORE_INDEX]
    assert labelled == prompts.answer_ids("Professor Ilsa Marrow")
    assert base.tokenizer.decode(labelled).startswith("Professor Ilsa Marrow")
    # The context before the instruction is at most C tokens plus the "..." separator.
    template_len = len(prompts.question_prompt([0], "Who founded Quenwick Labs?")) - 1
    context_len = len(qa.input_ids) - len(labelled) - template_len
    assert 0 < context_len <= cfg.context.length + len(prompts.separator_ids)


def test_plan_is_deterministic_and_context_split_varies(base):
    cfg = tiny_config()
    samples, _, _ = _doc_samples(base, cfg)
    assert samples.full_plan() == samples.full_plan()
    builds = {tuple(samples.build(r).input_ids) for r in samples.full_plan() if r.kind == "segment" and r.index == 0}
    assert len(builds) > 1  # a fresh head/tail split per epoch


def test_selective_logits_loss_equals_full_logits_loss(base):
    cfg = tiny_config()
    samples, _, _ = _doc_samples(base, cfg)
    batch = [samples.build(r) for r in samples.full_plan()[:3]]
    ids, mask, labels, docs = collate(batch, base.tokenizer.pad_token_id)
    ours = per_document_loss(base.model, ids, mask, labels, docs, num_docs=1)[0]
    logits = base.model(input_ids=ids, attention_mask=mask).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_clip_per_slot_is_independent_per_adapter():
    p = torch.zeros(3, 4, requires_grad=True)
    p.grad = torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [30.0, 40.0, 0, 0]])
    norms = clip_per_slot([p], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 50.0]))
    torch.testing.assert_close(p.grad.norm(dim=1), torch.tensor([1.0, 0.5, 1.0]), rtol=1e-4, atol=1e-4)


def _segment_loss(base, handle, cfg) -> float:
    samples, _, _ = _doc_samples(base, cfg, qa=[])
    batch = [samples.build(r) for r in samples.epoch_plan(1, 0)]
    ids, mask, labels, docs = collate(batch, base.tokenizer.pad_token_id)
    if handle is not None:
        handle.set_indices(docs)
    with torch.no_grad():
        loss = per_document_loss(base.model, ids, mask, labels, docs, num_docs=1)[0]
    if handle is not None:
        handle.set_indices(None)
    return float(loss)


@pytest.mark.parametrize("adapter", ["lora", "gated-memory"])
def test_tuning_lowers_the_documents_loss(base, tmp_path, adapter):
    cfg = tiny_config(adapter)
    before = _segment_loss(base, None, cfg)
    outcome = tune_document(base, DOCUMENT, tmp_path / "adapter", cfg, progress=False, log=lambda *a: None)
    assert read_manifest(outcome.adapter_dir)["kind"] == adapter
    assert not partial_dir_for(outcome.adapter_dir).exists()
    handle = load_tuned(base, outcome.adapter_dir)
    try:
        after = _segment_loss(base, handle, cfg)
        prompts = PromptBuilder(base.tokenizer)
        answer = greedy_answer(base.model, base.tokenizer, prompts, "Who founded Quenwick Labs?",
                               doc_ids=base.tokenizer(DOCUMENT)["input_ids"], window=32, max_new_tokens=4,
                               handle=handle, slot=0)
        assert isinstance(answer, str)
    finally:
        handle.remove()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)
    assert _segment_loss(base, None, cfg) == pytest.approx(before)  # base model untouched


class _Stop(Exception):
    pass


def test_interrupted_tune_resumes_to_the_same_adapter(model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config()
    cfg.train.stage1_epochs = cfg.train.stage2_epochs = 1
    every3 = BatchConfig(checkpoint_every=3)
    base = load_base_model(str(model_dir))
    straight = tune_document(base, DOCUMENT, tmp_path / "straight", cfg, every3, progress=False, log=lambda *a: None)

    out = tmp_path / "resumed"
    import lift_engine.batch.job as job_mod

    original = job_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Stop()

    job_mod.save_checkpoint = save_then_die
    try:
        with pytest.raises(_Stop):
            tune_document(load_base_model(str(model_dir)), DOCUMENT, out, cfg, every3, progress=False,
                          log=lambda *a: None)
    finally:
        job_mod.save_checkpoint = original
    assert not out.exists()  # nothing half-written is published
    assert partial_dir_for(out).exists()
    resumed = tune_document(load_base_model(str(model_dir)), DOCUMENT, out, cfg, every3, progress=False,
                            log=lambda *a: None)
    assert resumed.report.resumed_from == 6
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_expected_time_is_printed_before_training(base, tmp_path):
    lines = []

    def log(msg):
        lines.append(msg)
        raise _Stop()

    with pytest.raises(_Stop):
        tune_document(base, DOCUMENT, tmp_path / "a", tiny_config(), progress=False, log=log)
    assert "expected time" in lines[0] and "tokens" in lines[0]


def test_million_token_document_is_planned_with_bounded_memory(base, tmp_path):
    """A 1M-token document: tokenised in chunks, planned lazily, the expected time shown
    before any training step, with Python-side memory a small multiple of the text."""
    import random
    import tracemalloc

    words = DOCUMENT.split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(230_000))
    lines = []

    def log(msg):
        lines.append(msg)
        raise _Stop()

    tracemalloc.start()
    try:
        with pytest.raises(_Stop):
            tune_document(base, text, tmp_path / "big", make_config("cpu"), progress=False, log=log)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = int(lines[0].split(" tokens")[0].split()[-1])
    assert tokens >= 1_000_000, lines[0]
    assert "expected time" in lines[0]
    assert peak < 40 * len(text), (peak, len(text))  # token ids as Python ints dominate
    assert not (tmp_path / "big").exists()
