"""Context distillation (docs/DESIGN.md §2.6): the top-k KL loss against its full-softmax
reference, the teacher's targets, weights per sample kind, and "batched equals one by one"."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers_pipeline import make_tiny_model_dir
from lift_engine.batch.job import BatchTuneJob
from lift_engine.batch.loss import chunked_distill_loss, chunked_token_loss
from lift_engine.batch.teacher import TEACHER_FILE
from lift_engine.data.queries import document_chunks
from lift_engine.checkpoint import partial_dir_for
from lift_engine.config import BatchConfig, DistillConfig
from lift_engine.models.loading import load_base_model
from lift_engine.pipeline import tune_document
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import DocumentSamples, TeacherAnswer
from test_batch_job import DOCS, WEIGHTS, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("distill") / "model")


def distill_config(adapter: str = "lora", anchor_fraction: float = 0.0):
    cfg = tiny_config(adapter)
    cfg.distill.enabled = True
    cfg.distill.anchor_fraction = anchor_fraction
    cfg.queries.chunk_tokens = 40
    cfg.queries.queries_per_chunk = 2
    cfg.distill.max_answer_tokens = 6
    cfg.distill.top_k = 5
    cfg.train.distill_weight = 0.5
    return cfg


def _reference_distill(hidden, head, top_ids, top_logprobs):
    p = torch.softmax(top_logprobs, dim=-1)
    logq = torch.log_softmax(head(hidden).float(), dim=-1).gather(1, top_ids)
    return (p * (p.log() - logq)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_distill_loss_and_gradient_match_the_full_softmax_reference(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 37, bias=True).requires_grad_(False)
    hidden = torch.randn(7, 12, requires_grad=True)
    top_ids = torch.stack([torch.randperm(37)[:5] for _ in range(7)])
    top_logprobs = torch.log_softmax(torch.randn(7, 37), -1).gather(1, top_ids)
    ours = chunked_distill_loss(hidden, head, top_ids, top_logprobs, chunk)
    weights = torch.rand(7)
    (ours * weights).sum().backward()
    grad_ours, hidden.grad = hidden.grad.clone(), None
    ref = _reference_distill(hidden, head, top_ids, top_logprobs)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, hidden.grad, rtol=1e-5, atol=1e-6)
    assert bool((ours >= -1e-6).all())  # a KL divergence


def test_distill_loss_with_one_certain_token_is_cross_entropy():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 29, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8)
    targets = torch.randint(0, 29, (5,))
    kl = chunked_distill_loss(hidden, head, targets[:, None], torch.zeros(5, 1))
    torch.testing.assert_close(kl, chunked_token_loss(hidden, head, targets), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        chunked_distill_loss(hidden, torch.nn.Linear(8, 29), targets[:, None], torch.zeros(5, 1))


def test_kinds_of_weight_zero_leave_the_plan_and_weights_reach_the_samples(model_dir):
    base = load_base_model(str(model_dir))
    cfg = distill_config()
    ids = base.tokenizer(DOCS["long"], add_special_tokens=False)["input_ids"]
    target = TeacherAnswer("Who?", [5, 6, 7], torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), 0)
    samples = DocumentSamples(ids, [], cfg, PromptBuilder(base.tokenizer), teacher_answers=[target])
    kinds = {r.kind for r in samples.full_plan()}
    assert kinds == {"segment", "distill"}
    built = {r.kind: samples.build(r) for r in samples.full_plan()}
    assert built["distill"].weight == 0.5 and built["distill"].soft is not None
    assert built["distill"].labels[-3:] == [5, 6, 7] and built["segment"].weight == 1.0
    cfg.train.segment_weight = 0.0
    assert {r.kind for r in DocumentSamples(ids, [], cfg, PromptBuilder(base.tokenizer),
                                            teacher_answers=[target]).full_plan()} == {"distill"}


def test_anchor_samples_show_the_student_the_teachers_own_prompt(model_dir):
    """anchor_fraction of the targets train again with their chunk in view: the student's
    prompt is exactly the teacher's, the target the same; the rest keep the head/tail context."""
    base = load_base_model(str(model_dir))
    cfg = distill_config(anchor_fraction=0.5)
    prompts = PromptBuilder(base.tokenizer)
    ids = base.tokenizer(DOCS["long"], add_special_tokens=False)["input_ids"]
    chunks = document_chunks(ids, base.tokenizer, cfg.queries.chunk_tokens)
    assert len(chunks) > 1
    targets = [TeacherAnswer(f"Q{i}?", [5, 6, 7], torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), -0.1 * i),
                             i % len(chunks)) for i in range(4)]
    samples = DocumentSamples(ids, [], cfg, prompts, teacher_answers=targets)
    plan = samples.full_plan()
    anchors = [r for r in plan if r.kind == "anchor"]
    assert len(anchors) == 2 * cfg.train.stage2_epochs and {r.index for r in anchors} == {1, 3}
    assert not any(r.kind == "anchor" for r in samples.epoch_plan(1, 0))
    for ref in anchors:
        built, target = samples.build(ref), targets[ref.index]
        chunk = chunks[target.chunk]
        teacher_prompt = prompts.question_prompt(ids[chunk.start : chunk.end], target.question)
        assert built.input_ids == teacher_prompt + [5, 6, 7] and built.labels[-3:] == [5, 6, 7]
        assert built.soft[1] is target.top_logprobs and built.weight == cfg.train.distill_weight
    plain = samples.build(next(r for r in plan if r.kind == "distill" and r.index == anchors[0].index))
    assert plain.input_ids != samples.build(anchors[0]).input_ids
    cfg.distill.anchor_fraction = 0.0
    assert cfg.fingerprint() != distill_config(anchor_fraction=0.5).fingerprint()
    with pytest.raises(ValueError, match="anchor_fraction"):
        DistillConfig(anchor_fraction=1.5)


def test_with_teacher_context_teacher_and_anchor_read_the_chunk_inside_the_head_and_tail(model_dir, tmp_path,
                                                                                         monkeypatch):
    """distill.teacher_context: the teacher reads head + "..." + chunk + "..." + tail (document
    order, overlaps merged), and an anchor's student exactly that; off, the chunk alone."""
    from lift_engine.batch import job as job_module

    base = load_base_model(str(model_dir))
    cfg = distill_config(anchor_fraction=1.0)
    cfg.distill.teacher_context = True
    cfg.context.length = 10
    prompts = PromptBuilder(base.tokenizer)
    sep = prompts.separator_ids
    ids = base.tokenizer(DOCS["long"], add_special_tokens=False)["input_ids"]
    chunks = document_chunks(ids, base.tokenizer, cfg.queries.chunk_tokens)
    assert len(chunks) > 2
    first, middle, last = chunks[0], chunks[1], chunks[-1]
    head, tail = ids[:5], ids[-5:]
    expected = {0: ids[: first.end] + sep + tail,  # the head lies inside the first chunk
                1: head + sep + ids[middle.start : middle.end] + sep + tail,
                last.index: head + sep + ids[last.start :]}
    targets = [TeacherAnswer("Q?", [5, 6], torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2), c) for c in expected]
    samples = DocumentSamples(ids, [], cfg, prompts, teacher_answers=targets)
    for ref in (r for r in samples.epoch_plan(2, 0) if r.kind == "anchor"):
        passage = expected[targets[ref.index].chunk]
        assert samples.build(ref).input_ids == prompts.question_prompt(passage, "Q?") + [5, 6]

    seen = {}

    def fake_teacher(model, handle, tokenizer, prompts, passages, queries, cfg):
        seen["passages"] = passages
        return [], 0

    monkeypatch.setattr(job_module, "teacher_answers", fake_teacher)
    for context, want in ((True, expected), (False, {c.index: ids[c.start : c.end] for c in chunks})):
        cfg.distill.teacher_context = context
        job = BatchTuneJob(base, cfg, tmp_path / f"out-{context}", max_active=1, status_file=None)
        try:
            job.teacher_targets("long", ids, [])
        finally:
            job.close()
        assert all(seen["passages"][c] == passage for c, passage in want.items())
    before = distill_config(anchor_fraction=1.0)
    before.context.length = 10
    assert cfg.fingerprint() == before.fingerprint()  # off: the key of before the field existed
    cfg.distill.teacher_context = True
    assert cfg.fingerprint() != before.fingerprint()


def test_teacher_targets_come_from_the_base_model_reading_the_chunk(model_dir, tmp_path):
    """Targets are stored in the work dir; their top-1 token is the teacher's greedy answer
    token, and an adapter slot that is far from zero does not change them (adapter off)."""
    base = load_base_model(str(model_dir))
    cfg = distill_config()
    job = BatchTuneJob(base, cfg, tmp_path / "out", max_active=1, checkpoint_every=1, status_file=None)
    try:
        with torch.no_grad():  # a slot far from the base: the teacher must not see it
            for p in job.handle.trainable_parameters():
                p.add_(0.5)
        ids = base.tokenizer(DOCS["long"], add_special_tokens=False)["input_ids"]
        from lift_engine.data.tasks import build_qa_items

        targets = job.teacher_targets("long", ids, build_qa_items(DOCS["long"], cfg, None, False))
        assert targets, "no distillation targets"
        chunks = len(document_chunks(ids, base.tokenizer, cfg.queries.chunk_tokens))
        assert chunks > 1 and all(0 <= t.chunk < chunks for t in targets)
        for t in targets:
            assert t.top_ids.shape == t.top_logprobs.shape == (len(t.answer_ids), cfg.distill.top_k)
            assert t.top_ids[:, 0].tolist() == t.answer_ids  # greedy = top-1 of the teacher-forced pass
            assert bool((t.top_logprobs[:, :-1] >= t.top_logprobs[:, 1:]).all())
    finally:
        job.close()
    fresh = load_base_model(str(model_dir))
    job = BatchTuneJob(fresh, cfg, tmp_path / "out2", max_active=1, status_file=None)
    try:
        again = job.teacher_targets("long", ids, build_qa_items(DOCS["long"], cfg, None, False))
    finally:
        job.close()
    assert [t.answer_ids for t in again] == [t.answer_ids for t in targets]
    for a, b in zip(again, targets):
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter, anchor_fraction", [("lora", 0.0), ("gated-memory", 0.0), ("gated-memory", 0.5)])
def test_distillation_batched_equals_one_by_one(model_dir, tmp_path, adapter, anchor_fraction):
    """Two documents with distillation (and anchors) in one job (prefix sharing on) give
    each the adapter its one-document job gives; the run trained on distill samples."""
    cfg = distill_config(adapter, anchor_fraction)
    settings = BatchConfig(prefix_sharing=True, checkpoint_every=10**9)
    docs = {"short": DOCS["short"], "long": DOCS["long"]}
    for name, text in docs.items():
        tune_document(load_base_model(str(model_dir)), text, tmp_path / "solo" / name, cfg, settings, progress=False,
                      log=lambda *a: None)
    job = BatchTuneJob(load_base_model(str(model_dir)), cfg, tmp_path / "batch", settings, max_active=2)
    try:
        for name, text in docs.items():
            job.submit(text, name)
        job.step()
        distilled = [d.samples.teacher_answers for d in job.docs.values()]
        assert all(distilled), "every document has distillation targets"
        assert (partial_dir_for(tmp_path / "batch" / "long") / TEACHER_FILE).is_file()
        job.run()
    finally:
        job.close()
    for name in docs:
        solo = load_file(str(tmp_path / "solo" / name / WEIGHTS[adapter]))
        batched = load_file(str(tmp_path / "batch" / name / WEIGHTS[adapter]))
        assert solo.keys() == batched.keys()
        for key in solo:
            torch.testing.assert_close(batched[key], solo[key], rtol=1e-3, atol=5e-5, msg=f"{name} {key}")


def test_a_dead_query_endpoint_warns_and_the_document_still_tunes(model_dir, tmp_path):
    """The QA endpoint is a closed port: bounded retries, a warning naming it, and the
    document distils on extractive and template queries."""
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = distill_config()
    cfg.qa.qa_endpoint, cfg.qa.qa_model = f"http://127.0.0.1:{port}/v1", "none"
    cfg.queries.retries, cfg.queries.request_timeout = 1, 2.0
    lines = []
    began = time.monotonic()
    outcome = tune_document(load_base_model(str(model_dir)), DOCS["long"], tmp_path / "a", cfg, progress=False,
                            log=lines.append)
    assert time.monotonic() - began < 120
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    warnings = [line for line in lines if "warning" in line]
    assert warnings and f"127.0.0.1:{port}" in warnings[0], lines
    assert any("distillation targets" in line and not line.split(": ")[1].startswith("0 ") for line in lines), lines


def _answer_kl(base, adapter_dir, targets, chunks, ids, prompts) -> tuple[float, float]:
    """(mean KL(base ‖ base + adapter) over the answer positions, share of positions whose
    top-1 token is the base's), each target asked with its chunk in the prompt."""
    from lift_engine.adapters.io import load_adapters

    handle = load_adapters([adapter_dir], base)
    kls, same = [], []
    try:
        for t in targets:
            chunk = chunks[t.chunk]
            prompt = prompts.question_prompt(ids[chunk.start : chunk.end], t.question)
            x = torch.tensor([prompt + t.answer_ids])
            at = slice(len(prompt) - 1, x.shape[1] - 1)
            with torch.no_grad():
                with handle.use(torch.tensor([-1])):
                    p = torch.log_softmax(base.model(x).logits[0, at].float(), -1)
                with handle.use(torch.tensor([0])):
                    q = torch.log_softmax(base.model(x).logits[0, at].float(), -1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
            same.append(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    finally:
        handle.remove()
    return sum(kls) / len(kls), sum(same) / len(same)


def test_anchors_keep_what_the_prompt_states_for_gated_memory(model_dir, tmp_path):
    """Gated Memory tuned hard on a document changes the base's answers even where the
    passage is in the prompt; with anchors (every target also trained with its chunk in
    view) it leaves them (near) alone: what the window states still wins."""
    cfg = distill_config("gated-memory")
    cfg.train.stage2_epochs, cfg.train.lr_gated_memory = 3, 1e-2
    base = load_base_model(str(model_dir))
    ids = base.tokenizer(DOCS["medium"], add_special_tokens=False)["input_ids"]
    job = BatchTuneJob(base, cfg, tmp_path / "teacher", max_active=1, status_file=None)
    try:
        from lift_engine.data.tasks import build_qa_items

        targets = job.teacher_targets("medium", ids, build_qa_items(DOCS["medium"], cfg, None, False))
    finally:
        job.close()
    assert targets
    chunks = document_chunks(ids, base.tokenizer, cfg.queries.chunk_tokens)
    prompts = PromptBuilder(base.tokenizer)
    measured = {}
    for fraction in (0.0, 1.0):
        cfg.distill.anchor_fraction = fraction
        out = tmp_path / f"anchors-{fraction}"
        tune_document(load_base_model(str(model_dir)), DOCS["medium"], out, cfg, BatchConfig(), progress=False,
                      log=lambda *a: None)
        measured[fraction] = _answer_kl(load_base_model(str(model_dir)), out, targets, chunks, ids, prompts)
    (kl_plain, same_plain), (kl_anchor, same_anchor) = measured[0.0], measured[1.0]
    assert kl_plain > 1e-3, f"tuning did not move the in-view answers at all ({kl_plain})"
    assert kl_anchor < 0.8 * kl_plain, measured  # measured here: 0.21 vs 0.31
    assert same_anchor >= same_plain, measured
