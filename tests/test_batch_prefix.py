"""Prefix sharing is exact: the same samples give the same loss and gradients as running
every full sample; and the job with prefix sharing computes fewer tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_pipeline import make_tiny_model_dir
from lift_engine.adapters.patching import attach_adapters
from lift_engine.batch.forward import plain_token_loss
from lift_engine.batch.job import BatchTuneJob
from lift_engine.batch.prefix import prefix_passes, prefix_shared_token_loss, shared_context_refs, shared_prefix_length
from lift_engine.data.extractive import QAItem
from lift_engine.models.loading import load_base_model
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import IGNORE_INDEX, DocumentSamples, TeacherAnswer
from test_batch_job import DOCS, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("prefix") / "model")


def _teacher_answers(n_chunks: int, vocab: int, k: int = 4) -> list[TeacherAnswer]:
    """One made-up distillation target per chunk: 3 answer tokens, a top-k distribution each."""
    g = torch.Generator().manual_seed(1)
    return [TeacherAnswer(f"What does part {c} say?", [int(t) for t in torch.randint(5, vocab, (3,), generator=g)],
                          torch.randint(0, vocab, (3, k), generator=g),
                          torch.log_softmax(torch.randn(3, k, generator=g), dim=-1), c)
            for c in range(n_chunks)]


def _step_samples(base, cfg, slots=(0, 2), anchors: int = 0):
    """One step's samples of two documents (segments and QA mixed), shared context per
    document; with `anchors`, also a distillation sample and that many anchor samples
    (whose prompt is a chunk of the document, not its context) per document."""
    prompts = PromptBuilder(base.tokenizer)
    out = []
    for slot, text in zip(slots, (DOCS["long"], DOCS["medium"])):
        ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        qa = [QAItem("Who founded Quenwick Labs?", "Professor Ilsa Marrow", "", "generated"),
              QAItem("Where is the river?", "the Dunmere", "", "generated")]
        samples = DocumentSamples(ids, qa, cfg, prompts)
        if anchors:
            samples.teacher_answers = _teacher_answers(len(samples.chunks), len(base.tokenizer))
        plan = samples.epoch_plan(2, 0)
        refs = [r for r in plan if r.kind == "qa"][:1] + [r for r in plan if r.kind == "segment"][:2]
        refs += [r for r in plan if r.kind == "distill"][:1 if anchors else 0]
        refs += sorted((r for r in plan if r.kind == "anchor"), key=lambda r: -r.index)[:anchors]
        for ref in shared_context_refs(refs):
            sample = samples.build(ref)
            sample.doc = slot
            out.append(sample)
    return out


@pytest.mark.parametrize("adapter,anchors", [("lora", 0), ("gated-memory", 0), ("lora", 2), ("gated-memory", 1)])
def test_prefix_shared_loss_and_gradients_equal_the_full_samples(model_dir, adapter, anchors):
    cfg = tiny_config(adapter)
    cfg.context.length = 48
    if anchors:
        cfg.distill.enabled, cfg.distill.anchor_fraction = True, 1.0
        cfg.queries.chunk_tokens = 80
    base = load_base_model(str(model_dir))
    handle = attach_adapters(base.model, adapter, cfg, num_adapters=3, seed=0)
    with torch.no_grad():  # make every adapter matter (LoRA B starts at zero)
        for p in handle.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = _step_samples(base, cfg, anchors=anchors)
    group = [s for s in samples if s.doc == 0 and s.kind != "anchor"]
    p = shared_prefix_length(group)
    assert p > cfg.context.length  # the shared part covers the whole context
    assert all(lab == IGNORE_INDEX for s in group for lab in s.labels[: p + 1])
    passes, alone = prefix_passes(samples)
    if anchors:  # the anchors share no context: they do not cut the documents' shared prefix
        assert sum(s.kind == "anchor" for s in samples) == 2 * anchors
        assert [sorted(s.kind for s in group) for group in passes[:1]] == [
            sorted(s.kind for s in samples if s.kind != "anchor")]
        assert all(s.kind == "anchor" for group in passes[1:] for s in group)
        assert all(s.kind == "anchor" for s in alone)
    else:
        assert passes == [samples] and alone == []
    params = handle.trainable_parameters()
    pad = base.tokenizer.pad_token_id
    results = {}
    for name, fn in (("plain", plain_token_loss), ("prefix", prefix_shared_token_loss)):
        for q in params:
            q.grad = None
        base.model.train()
        token_loss, token_docs, used = fn(base.model, handle, samples, pad, 7)
        # a weight per token that depends on the token alone, not on where a pass put it
        weights = 0.5 + torch.sigmoid(3.0 * token_loss.detach())
        (token_loss * weights).sum().backward()
        handle.set_indices(None)
        per_doc = torch.zeros(3).index_add(0, token_docs, token_loss.detach())
        results[name] = (per_doc, [q.grad.clone() for q in params], used, token_docs)
    torch.testing.assert_close(results["prefix"][3].sort().values, results["plain"][3].sort().values)
    torch.testing.assert_close(results["prefix"][0], results["plain"][0], rtol=1e-5, atol=1e-5)
    for g_prefix, g_plain in zip(results["prefix"][1], results["plain"][1]):
        scale = float(g_plain.abs().max())
        assert scale > 0
        torch.testing.assert_close(g_prefix, g_plain, rtol=1e-4, atol=1e-5 * scale)
    assert results["prefix"][2] < 0.8 * results["plain"][2]  # fewer tokens through the model
    handle.remove()


def test_job_with_prefix_sharing_trains_and_computes_fewer_tokens(model_dir, tmp_path):
    cfg = tiny_config("lora")
    cfg.context.length = 64
    tokens = {}
    for sharing in (False, True):
        base = load_base_model(str(model_dir))
        job = BatchTuneJob(base, cfg, tmp_path / str(sharing), max_active=3, prefix_sharing=sharing,
                           checkpoint_every=10**9)
        for name in ("long", "short"):
            job.submit(DOCS[name], name)
        job.run()
        job.close()
        progress = job.progress()
        assert all(p["status"] == "done" for p in progress.values())
        assert progress["long"]["last_loss"] < progress["long"]["first_loss"]
        tokens[sharing] = sum(r.tokens for r in job.history)
    assert tokens[True] < 0.8 * tokens[False]
