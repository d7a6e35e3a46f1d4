"""bench_quality's question sets: the oracle passage holds the answer, the in-window split
says whether the truncated window shows it, and added questions land on the right document.
No model runs here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.bench_quality import ADDED_QUESTIONS, DEV_SET, ORACLE_TOKENS, added_records, oracle_records, window_split
from lift_engine.data.records import read_records
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord
from helpers_tokenizer import make_tokenizer

FILLER = "The quick brown fox jumps over the lazy dog. "


def _record(answer_at: float, answer: str = "QX-7731", paragraphs: int = 400) -> EvalRecord:
    """A long document with `answer` stated once, at fraction `answer_at` of its length."""
    cut = int(paragraphs * answer_at)
    text = FILLER * cut + f"Its code was {answer}. " + FILLER * (paragraphs - cut)
    return EvalRecord(f"q{answer_at}", text, "What was its code?", [answer], "test")


def test_the_oracle_passage_holds_the_answer_wherever_it_is():
    tokenizer = make_tokenizer()
    records = [_record(at) for at in (0.0, 0.02, 0.5, 0.98, 1.0)]
    assert all(len(tokenize_long(r.context, tokenizer)) > 4 * ORACLE_TOKENS for r in records)
    passages, found = oracle_records(records, tokenizer)
    assert found == len(records)
    for r, p in zip(records, passages):
        assert "QX-7731" in p.context, f"answer at {r.id}: not in its oracle passage"
        assert len(tokenize_long(p.context, tokenizer)) <= ORACLE_TOKENS + 2  # re-tokenising the decoded text
        assert len(tokenize_long(p.context, tokenizer)) >= ORACLE_TOKENS // 2
    # mid-document the passage has text on both sides of the answer
    middle = passages[2].context
    assert middle.index("QX-7731") > len(middle) // 4 and len(middle) - middle.index("QX-7731") > len(middle) // 4


def test_an_answer_is_found_across_line_breaks_and_quotes():
    tokenizer = make_tokenizer()
    text = FILLER * 50 + "It lies between \u2018config-failed\u2019 and\n \u2018installed\u2019. " + FILLER * 50
    record = EvalRecord("q", text, "Between which states?", ["config-failed and installed"], "test")
    passages, found = oracle_records([record], tokenizer)
    assert found == 1 and "config-failed" in passages[0].context and "installed" in passages[0].context


def test_an_answer_absent_from_the_document_gets_an_empty_passage():
    tokenizer = make_tokenizer()
    record = EvalRecord("none", FILLER * 10, "What was its code?", ["ZZ-0000"], "test")
    passages, found = oracle_records([record], tokenizer)
    assert found == 0 and passages[0].context.strip() == ""


def test_window_split_sees_the_head_and_the_tail_not_the_middle():
    tokenizer = make_tokenizer()
    records = [_record(0.0), _record(0.5), _record(1.0)]
    split = window_split(records, tokenizer, 256)
    assert [split[r.id] for r in records] == ["in-window", "outside", "in-window"]


def _added_file(tmp_path: Path, questions: dict) -> Path:
    path = tmp_path / "added.json"
    path.write_text(json.dumps({"questions": questions}))
    return path


def test_added_questions_go_to_their_dataset_s_document(tmp_path):
    docs = [EvalRecord("a-q0", "Alpha was founded in 1901 by Ada.", "?", ["1901"], "alpha"),
            EvalRecord("b-q0", "Beta runs on port 8080.", "?", ["8080"], "beta")]
    path = _added_file(tmp_path, {"beta": [["Which port?", ["port 8080"]]],
                                  "alpha": [["Who founded Alpha?", ["Ada"]],
                                            ["Was it Ada?", ["Ada"], "retired: the answer is in the question"],
                                            ["When?", ["in 1901", "1901"]]]})
    added = added_records(docs, path)
    assert [(r.id, r.context, r.answers) for r in added] == [
        ("beta-added-q0", docs[1].context, ["port 8080"]),
        ("alpha-added-q0", docs[0].context, ["Ada"]),
        ("alpha-added-q2", docs[0].context, ["in 1901", "1901"])]  # a retired question keeps its position
    assert {r.source for r in added} == {"alpha", "beta"}


@pytest.mark.parametrize("questions, message", [
    ({"gamma": [["?", ["x"]]]}, "no document of dataset 'gamma'"),
    ({"alpha": [["Who?", ["Bob"]]]}, "no answer of 'Who?'"),
    ({"alpha": [["Was Alpha founded by Ada?", ["Ada"]]]}, "an answer of 'Was Alpha founded by Ada?' occurs in the question"),
])
def test_an_added_question_that_does_not_fit_the_set_is_refused(tmp_path, questions, message):
    docs = [EvalRecord("a-q0", "Alpha was founded in 1901 by Ada.", "?", ["1901"], "alpha")]
    with pytest.raises(ValueError, match=re.escape(message)):
        added_records(docs, _added_file(tmp_path, questions))


@pytest.mark.skipif(not DEV_SET.is_file(), reason="the shared dev set is not beside this checkout")
def test_the_project_s_added_questions_fit_the_shared_dev_set():
    given = read_records(DEV_SET)
    added = added_records(given, ADDED_QUESTIONS)
    assert len(added) >= len(given)
    assert len({r.question for r in given + added}) == len(given) + len(added)  # no question asked twice


def test_question_set_dev_plus_marks_given_and_added_questions():
    from bench.bench_quality import question_set
    records, (origin,) = question_set("dev-plus", DEV_SET, ADDED_QUESTIONS)
    given = read_records(DEV_SET)
    assert [r.id for r in records[: len(given)]] == [r.id for r in given]
    assert {origin[r.id] for r in records[: len(given)]} == {"given"}
    assert {origin[r.id] for r in records[len(given):]} == {"added"} and len(records) > len(given)
    assert question_set("dev", DEV_SET)[1] == ()


def test_routing_rules_replay_the_engine_s_choice_at_margin_zero():
    """margin 0 is inference.decode_answers' rule (base kept iff strictly surer); +inf never
    keeps the base, -inf always does unless its answer had no real token."""
    import math
    from bench.routing_rules import keeps_base
    surer_base = {"adapter": "a", "adapter_logprob": -1.2, "base": "b", "base_logprob": -0.4}
    tie = {"adapter": "a", "adapter_logprob": -0.4, "base": "b", "base_logprob": -0.4}
    empty_base = {"adapter": "a", "adapter_logprob": -3.0, "base": "", "base_logprob": None}
    assert keeps_base(surer_base, 0.0) and not keeps_base(tie, 0.0) and not keeps_base(empty_base, 0.0)
    assert keeps_base(surer_base, 0.5) and not keeps_base(surer_base, 1.0)  # the base must win by more than the margin
    assert not keeps_base(surer_base, math.inf) and keeps_base(tie, -math.inf) and not keeps_base(empty_base, -math.inf)
