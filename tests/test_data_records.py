import json

import pytest

from lift_engine.data.records import SUMMARY_QUESTION, EvalRecord, read_records
from lift_engine.errors import InputError

LONGBENCH = {
    "input": "Who wrote the report?",
    "context": "A long context. The report was written by Ada.",
    "answers": ["Ada"],
    "length": 10,
    "dataset": "narrativeqa",
    "language": "en",
    "all_classes": None,
    "_id": "abc123",
}

# As LooGLE's released jsonl stores it: qa_pairs is a *string* with a Python list literal.
LOOGLE_QA_STRING = (
    "[{'S': \"Putin's advisers opposed it.\", 'Q': \"Did Putin's advisers support it?\", 'A': 'No.'}, "
    "{'S': 'On 10 April 2021, Ukraine invoked Paragraph 16.', 'Q': 'What did Ukraine invoke on 10 April 2021?', "
    "'A': 'Paragraph 16 of the Vienna Document', 'type': 'comprehension'}]"
)
LOOGLE = {"input": "The long document text.", "title": "Prelude", "qa_pairs": LOOGLE_QA_STRING, "output": "none"}


def _write_lines(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_longbench(tmp_path):
    p = _write_lines(tmp_path, [json.dumps(LONGBENCH), "", json.dumps({**LONGBENCH, "_id": "x2", "answers": ["a", "b"]})])
    recs = read_records(p)
    assert recs[0] == EvalRecord("abc123", LONGBENCH["context"], "Who wrote the report?", ["Ada"], "narrativeqa")
    assert recs[1].id == "x2" and recs[1].answers == ["a", "b"]


def test_loogle_string_qa_pairs(tmp_path):
    p = _write_lines(tmp_path, [json.dumps(LOOGLE)])
    recs = read_records(p)
    assert [r.id for r in recs] == ["Prelude-0", "Prelude-1"]
    assert recs[0].question == "Did Putin's advisers support it?" and recs[0].answers == ["No."]
    assert recs[1].answers == ["Paragraph 16 of the Vienna Document"]
    assert all(r.context == "The long document text." and r.source == "loogle" for r in recs)


def test_loogle_list_qa_pairs_json_string_doc_id_and_cloze(tmp_path):
    pairs = [{"Q": "Who is <mask-0>?", "A": {"<mask-0>": "Andy", "<mask-1>": "Tank"}, "S": "Andy and Tank."}]
    rec_list = {"input": "Doc.", "title": "T", "doc_id": "d7", "qa_pairs": pairs}
    rec_json = {"input": "Doc2.", "title": "", "qa_pairs": json.dumps([{"Q": "q?", "A": "a", "S": "s"}])}
    p = _write_lines(tmp_path, [json.dumps(rec_list), json.dumps(rec_json)])
    recs = read_records(p)
    assert recs[0].id == "d7-0"
    assert recs[0].answers == ["<mask-0>: Andy; <mask-1>: Tank"]
    assert recs[1].id == "line2-0"  # no doc_id, empty title -> line number
    assert recs[1].question == "q?" and recs[1].answers == ["a"]


def test_loogle_summarization(tmp_path):
    p = _write_lines(tmp_path, [json.dumps({"input": "Doc.", "title": "S", "qa_pairs": "none", "output": "A summary."})])
    (rec,) = read_records(p)
    assert rec.question == SUMMARY_QUESTION and rec.answers == ["A summary."] and rec.id == "S-0"


@pytest.mark.parametrize(
    "bad_line,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"foo": 1}), "unknown record layout"),
        (json.dumps({**LONGBENCH, "answers": []}), "no usable reference"),
        (json.dumps({k: v for k, v in LONGBENCH.items() if k != "answers"}), "missing field 'answers'"),
        (json.dumps({**LONGBENCH, "context": ""}), "'context'"),
        (json.dumps({**LOOGLE, "qa_pairs": "[{'Q': 'x'"}), "qa_pairs"),
        (json.dumps({**LOOGLE, "qa_pairs": "[{'Q': 'no answer'}]"}), "missing 'A'"),
        (json.dumps({**LOOGLE, "qa_pairs": "[1, 2]"}), "qa_pairs must be a list"),
    ],
)
def test_malformed_line_names_line_number(tmp_path, bad_line, match):
    p = _write_lines(tmp_path, [json.dumps(LONGBENCH), bad_line])
    with pytest.raises(InputError, match=match) as exc:
        read_records(p)
    assert f"{p}:2" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        read_records(empty)
    with pytest.raises(InputError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
