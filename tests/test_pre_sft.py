"""Pre-LIFT SFT (`lift pre-sft`, issue 17): one shared adapter trained on a corpus through
the batched engine, merged and written as a model directory; its fingerprint, resume, the
corpus reader and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.adapters.io import load_adapter, read_manifest
from lift_engine.batch.forward import collate, per_document_loss
from lift_engine.batch.prefix import shared_context_refs
from lift_engine.checkpoint import CHECKPOINT_FILE, partial_dir_for
from lift_engine.cli import main
from lift_engine.config import PreSftConfig
from lift_engine.data.tasks import build_qa_items
from lift_engine.errors import AdapterError, InputError
from lift_engine.inference import greedy_answer
from lift_engine.models.loading import load_base_model, model_fingerprint
from lift_engine.pipeline import tune_document
from lift_engine.presft.corpus import GOLD_KIND, read_corpus
from lift_engine.presft.merge import INFO_FILE, mark_pre_sft, merge_lora
from lift_engine.presft.run import ADAPTER_NAME, run_pre_sft, work_dir_for
from lift_engine.presft.samples import CorpusSamples
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import DocumentSamples
from test_batch_job import tiny_config
from test_cli import assert_one_line_error, run_main

QUESTION = "Who closed the lab on 3 March 2011?"


def presft_config(**overrides) -> PreSftConfig:
    values = dict(epochs=2, rank=4, lr=1e-2, batch_size=8, num_extractive=4)
    values.update(overrides)
    return PreSftConfig(**values)


def write_corpus(root: Path) -> list[str]:
    """A directory of two documents and a LongBench jsonl (two questions on one context)."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text(DOCUMENT[:300])
    (docs / "b.txt").write_text(DOCUMENT[250:])
    (docs / "notes.csv").write_text("skipped,in,a,directory\n")
    context = "The Dunmere report. " + DOCUMENT[100:400]
    rows = [{"_id": "q1", "context": context, "input": QUESTION, "answers": ["Anouk Seldt"]},
            {"_id": "q2", "context": context, "input": "What ink was the report printed in?", "answers": ["violet"]}]
    jsonl = root / "gold.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(docs), str(jsonl)]


def silent(*_):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("presft") / "model")


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """One uninterrupted pre-SFT of the tiny corpus: (outcome, documents, raw base state, out dir)."""
    root = tmp_path_factory.mktemp("presft-run")
    documents = read_corpus(write_corpus(root), presft_config())
    base = load_base_model(model_dir, progress=False)
    raw_fingerprint = base.fingerprint
    raw_state = {k: v.clone() for k, v in base.model.state_dict().items()}
    out = root / "model-presft"
    outcome = run_pre_sft(base, documents, out, tiny_config(), presft_config(), progress=False, log=silent)
    return {"outcome": outcome, "documents": documents, "raw_state": raw_state, "raw_fingerprint": raw_fingerprint,
            "out": out, "root": root}


# ------------------------------------------------------------------ corpus
def test_corpus_reads_directories_gold_qa_and_records_without_qa(tmp_path):
    sources = write_corpus(tmp_path)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"name": "note", "text": "A plain note without questions. " * 5}) + "\n\n")
    documents = read_corpus(sources + [str(plain)], PreSftConfig(synthetic=1, synthetic_paragraphs=3))
    assert [d.name for d in documents[:2]] == ["a", "b"]  # the .csv in the directory is skipped
    gold = documents[2]
    assert [q.question for q in gold.gold] == [QUESTION, "What ink was the report printed in?"]  # one context, two questions
    assert gold.gold[0].answer == "Anouk Seldt" and gold.gold[0].kind == GOLD_KIND
    assert documents[3].name == "note" and documents[3].gold == []  # allowed: segments + extractive tasks only
    synthetic = documents[4]
    assert synthetic.name.startswith("synthetic-") and len(synthetic.gold) == 12  # make_dataset's 12 facts
    assert all(q.answer in synthetic.text for q in synthetic.gold)


def test_corpus_plan_mixes_documents_and_covers_every_sample_once_per_epoch(model_dir):
    base = load_base_model(model_dir, progress=False)
    cfg = presft_config().lift_config(tiny_config())
    prompts = PromptBuilder(base.tokenizer, True)
    texts = [DOCUMENT[:300], DOCUMENT[250:], DOCUMENT[::-1]]
    per_doc = [DocumentSamples(base.tokenizer(t, add_special_tokens=False)["input_ids"],
                               build_qa_items(t, cfg, None, False), cfg, prompts, doc=i) for i, t in enumerate(texts)]
    corpus = CorpusSamples(per_doc, epochs=2, seed=0)
    plan = corpus.full_plan()
    per_epoch = sum(len(d.spans) + len(d.qa_items) for d in per_doc)
    assert len(plan) == 2 * per_epoch
    first = [corpus.locate(r) for r in plan[:per_epoch]]
    assert sorted((d, r.kind, r.index) for d, r in first) == sorted(
        (d, kind, i) for d, doc in enumerate(per_doc)
        for kind, n in (("segment", len(doc.spans)), ("qa", len(doc.qa_items))) for i in range(n))
    assert len({d for d, _ in first[:8]}) > 1  # the first steps already mix documents
    for ref in plan[:20]:  # a corpus ref builds its document's sample; prefix sharing's rewrite keeps the document
        d, local = corpus.locate(ref)
        assert corpus.build(ref).input_ids == per_doc[d].build(local).input_ids
        (shared,) = shared_context_refs([ref])
        assert corpus.locate(shared)[0] == d


# ------------------------------------------------------------------ the run
def test_output_is_a_complete_model_directory_and_the_work_dir_is_gone(run):
    out, outcome = run["out"], run["outcome"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", INFO_FILE} <= names
    chat = (out / "chat_template.jinja").read_text() if "chat_template.jinja" in names else \
        json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in chat
    info = json.loads((out / INFO_FILE).read_text())
    assert info["base_model"]["fingerprint"] == run["raw_fingerprint"]
    assert info["corpus"]["documents"] == 3 and info["corpus"]["gold_questions"] == 2
    assert info["steps"] == outcome.steps > 0 and info["merged"] is True
    assert info["pre_sft"]["rank"] == 4 and info["lift_config"]["lora"]["r"] == 4
    assert len(info["corpus"]["sha256"]) == 64
    assert not work_dir_for(out).exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp siblings


def test_weights_change_only_where_lora_merges_and_the_corpus_loss_falls(run, model_dir):
    tuned = load_base_model(run["out"], progress=False)
    state = tuned.model.state_dict()
    raw = run["raw_state"]
    changed = {k for k in raw if not torch.equal(raw[k], state[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    # the training objective on the corpus's own samples: lower on the pre-SFT'd model
    raw_base = load_base_model(model_dir, progress=False)
    cfg = presft_config().lift_config(tiny_config())
    prompts = PromptBuilder(raw_base.tokenizer, True)
    per_doc = [DocumentSamples(raw_base.tokenizer(d.text, add_special_tokens=False)["input_ids"],
                               build_qa_items(d.text, cfg, None, False) + d.gold, cfg, prompts, doc=i)
               for i, d in enumerate(run["documents"])]
    corpus = CorpusSamples(per_doc, epochs=1)
    samples = [corpus.build(r) for r in corpus.full_plan()]
    for s in samples:
        s.doc = 0
    batch = collate(samples, raw_base.tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(per_document_loss(raw_base.model, *batch, 1)[0])
        after = float(per_document_loss(tuned.model, *batch, 1)[0])
    assert after < before - 0.1, (before, after)
    losses = run["outcome"].losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_output_loads_answers_and_has_its_own_fingerprint(run, model_dir, tmp_path):
    tuned = load_base_model(run["out"], progress=False)
    assert tuned.fingerprint == run["outcome"].fingerprint == json.loads((run["out"] / INFO_FILE).read_text())["model_fingerprint"]
    assert tuned.fingerprint != run["raw_fingerprint"]
    prompts = PromptBuilder(tuned.tokenizer, True)
    ids = tuned.tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"]
    answer = greedy_answer(tuned.model, tuned.tokenizer, prompts, QUESTION, doc_ids=ids, window=32, max_new_tokens=6)
    assert isinstance(answer, str)
    # an adapter tuned on the raw base is refused on the pre-SFT'd one, and the other way round
    raw = load_base_model(model_dir, progress=False)
    cfg = tiny_config()
    cfg.train.stage2_epochs = 0
    on_raw = tune_document(raw, DOCUMENT[:200], tmp_path / "on-raw", cfg, progress=False, log=silent).adapter_dir
    with pytest.raises(AdapterError, match="fingerprint"):
        load_adapter(on_raw, tuned)
    on_tuned = tune_document(tuned, DOCUMENT[:200], tmp_path / "on-tuned", cfg, progress=False, log=silent).adapter_dir
    assert read_manifest(on_tuned)["base_model"]["fingerprint"] == tuned.fingerprint
    load_adapter(on_tuned, tuned).remove()
    with pytest.raises(AdapterError, match="fingerprint"):
        load_adapter(on_tuned, raw)


def test_merge_equals_the_adapter_and_the_marker_alone_changes_the_fingerprint(model_dir, tmp_path):
    base = load_base_model(model_dir, progress=False)
    cfg = tiny_config()
    cfg.lora.r, cfg.lora.alpha = 4, 8.0
    cfg.train.stage2_epochs = 0
    adapter = tune_document(base, DOCUMENT[:200], tmp_path / "a", cfg, progress=False, log=silent).adapter_dir
    ids = torch.tensor([base.tokenizer(DOCUMENT[:80], add_special_tokens=False)["input_ids"]])
    handle = load_adapter(adapter, base)
    with torch.no_grad(), handle.use(0):
        with_adapter = base.model(ids).logits
    handle.remove()
    with torch.no_grad():
        raw_logits = base.model(ids).logits
    unmarked = model_fingerprint(base.model)
    assert merge_lora(base, adapter) == 2 * 7  # two layers × q/k/v/o/gate/up/down
    with torch.no_grad():
        merged = base.model(ids).logits
    assert (with_adapter - raw_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)
    # same weights, marker or not: the marker alone separates them; removing it restores the fingerprint
    weights_only = model_fingerprint(base.model)
    mark_pre_sft(base.model, {"base_fingerprint": unmarked, "corpus_sha256": "0" * 64})
    marked = model_fingerprint(base.model)
    assert marked != weights_only
    delattr(base.model.config, "lift_pre_sft")
    assert model_fingerprint(base.model) == weights_only


def test_interrupted_run_resumes_from_its_checkpoint_and_matches_the_uninterrupted_one(run, model_dir, tmp_path):
    root = tmp_path / "corpus"
    documents = read_corpus(write_corpus(root), presft_config())
    out = tmp_path / "model-presft"

    class Stop(Exception):
        pass

    def stop_at_3(report):
        if report.step == 3:
            raise Stop

    base = load_base_model(model_dir, progress=False)
    with pytest.raises(Stop):
        run_pre_sft(base, documents, out, tiny_config(), presft_config(), progress=False, log=silent, on_step=stop_at_3)
    assert not out.exists()
    checkpoint = partial_dir_for(work_dir_for(out) / ADAPTER_NAME) / CHECKPOINT_FILE
    assert int(torch.load(checkpoint, weights_only=True)["step"]) == 3
    base = load_base_model(model_dir, progress=False)  # a new process: the raw base again
    outcome = run_pre_sft(base, documents, out, tiny_config(), presft_config(), progress=False, log=silent)
    assert outcome.resumed_from == 3 and outcome.steps == run["outcome"].steps
    resumed, uninterrupted = load_file(str(out / "model.safetensors")), load_file(str(run["out"] / "model.safetensors"))
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
    assert outcome.fingerprint == run["outcome"].fingerprint


def test_no_merge_writes_the_shared_adapter_for_the_raw_base(model_dir, tmp_path):
    base = load_base_model(model_dir, progress=False)
    doc = tmp_path / "doc.md"
    doc.write_text(DOCUMENT[:300])
    documents = read_corpus([str(doc)], presft_config())
    out = tmp_path / "adapter"
    outcome = run_pre_sft(base, documents, out, tiny_config(), presft_config(epochs=1, merge=False), progress=False,
                          log=silent)
    assert outcome.fingerprint is None and base.fingerprint == model_fingerprint(base.model)  # base untouched
    assert json.loads((out / INFO_FILE).read_text())["merged"] is False
    load_adapter(out, base).remove()


# ------------------------------------------------------------------ the command
def test_cli_pre_sft_writes_a_model_that_lift_eval_takes_and_overwrite_replaces(capsys, model_dir, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOCUMENT[:300])
    out = tmp_path / "presft"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["pre-sft", doc, "-o", out, "--model", model_dir, "--epochs", "1", "--extractive", "2", "--rank", "2",
            "--batch-size", "8"]
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "old.txt").read_text() == "old"
    code, stdout, err = run_main(capsys, *args, "--overwrite")
    assert code == 0, err
    assert "model written to" in stdout and not (out / "old.txt").exists()
    info = json.loads((out / INFO_FILE).read_text())
    assert info["pre_sft"]["rank"] == 2 and info["corpus"]["documents"] == 1
    # another command's `--model` takes it
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"_id": "q", "context": DOCUMENT, "input": QUESTION, "answers": ["Anouk Seldt"]}) + "\n")
    code, stdout, err = run_main(capsys, "eval", questions, "--mode", "icl", "--model", out, "--window", "32")
    assert code == 0, err
    assert json.loads(stdout)["questions"] == 1


@pytest.mark.parametrize("case", ["nothing", "empty-dir", "csv", "not-json", "empty-jsonl", "bad-qa", "gated-memory",
                                  "epochs"])
def test_cli_bad_input_is_one_line_and_writes_nothing(capsys, model_dir, tmp_path, case):
    source = []
    extra = []
    if case == "empty-dir":
        (tmp_path / "empty").mkdir()
        source, needle = [tmp_path / "empty"], "no documents"
    elif case == "csv":
        (tmp_path / "c.csv").write_text("a,b\n")
        source, needle = [tmp_path / "c.csv"], "not a corpus file"
    elif case == "not-json":
        (tmp_path / "c.jsonl").write_text("this is not json\n")
        source, needle = [tmp_path / "c.jsonl"], "not valid json"
    elif case == "empty-jsonl":
        (tmp_path / "c.jsonl").write_text("\n")
        source, needle = [tmp_path / "c.jsonl"], "no records"
    elif case == "bad-qa":  # a question without an answer is malformed (a record with no question is fine)
        (tmp_path / "c.jsonl").write_text(json.dumps({"context": DOCUMENT, "input": QUESTION}) + "\n")
        source, needle = [tmp_path / "c.jsonl"], "answers"
    elif case == "gated-memory":
        (tmp_path / "d.md").write_text(DOCUMENT)
        source, extra, needle = [tmp_path / "d.md"], ["--adapter", "gated-memory"], "cannot be merged"
    elif case == "epochs":
        (tmp_path / "d.md").write_text(DOCUMENT)
        source, extra, needle = [tmp_path / "d.md"], ["--epochs", "0"], "--epochs must be"
    else:
        needle = "empty"
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "pre-sft", *source, "-o", out, "--model", model_dir, *extra)
    assert_one_line_error(code, err, needle)
    assert not out.exists() and not work_dir_for(out).exists()


def test_empty_corpus_and_existing_output_are_refused_by_the_api(model_dir, tmp_path):
    with pytest.raises(InputError, match="empty"):
        read_corpus([], PreSftConfig())
    base = load_base_model(model_dir, progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        run_pre_sft(base, read_corpus([], PreSftConfig(synthetic=1, synthetic_paragraphs=3)), tmp_path / "out",
                    tiny_config(), presft_config(), progress=False, log=silent)
