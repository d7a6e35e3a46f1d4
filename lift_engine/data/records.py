"""Evaluation datasets: LongBench and LooGLE jsonl files as `EvalRecord`s.

Layouts read (one JSON object per line):

- LongBench: {"_id", "context", "input" (the question), "answers": [str, ...],
  optional "length", "dataset", "language", "all_classes"}. A flat variant with
  "question" for "input" and "answer" (str) for "answers" is accepted too.
- LooGLE: {"input" (the long document), "title", "qa_pairs", "output", optional
  "doc_id"}. "qa_pairs" is a list of {"Q", "A", "S" (evidence), optional "type"}, or a
  string holding that list as a Python literal (as the released files store it) or as
  JSON. "A" is a string, or for the cloze task a {"<mask-0>": "...", ...} dict. A
  record whose qa_pairs is "none" (the summarisation task) gives one record asking for
  a summary with "output" as the reference.
"""
from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass

from lift_engine.data.jsonl import iter_json_objects
from lift_engine.errors import InputError

SUMMARY_QUESTION = "Write a summary of the document."


@dataclass
class EvalRecord:
    """One question about one long document.

    id: unique within the file; context: the long document; question: the question;
    answers: non-empty list of acceptable references; source: the dataset name.
    """

    id: str
    context: str
    question: str
    answers: list[str]
    source: str


def read_records(path: str | os.PathLike) -> list[EvalRecord]:
    """All records of a LongBench or LooGLE jsonl file (formats may mix line by line).

    Blank lines are skipped. Raises InputError for a missing file, a line that is not a
    JSON object of a known layout (the message names the line number) and a file with
    no records.
    """
    name = os.fspath(path)
    records: list[EvalRecord] = []
    for lineno, obj in iter_json_objects(path):
        records.extend(_parse_object(obj, name, lineno))
    return records


def has_qa_layout(obj: dict) -> bool:
    """Whether a JSON object is laid out as a LooGLE (qa_pairs) or LongBench (context +
    input/question) record, i.e. carries questions (`parse_record` reads it)."""
    return "qa_pairs" in obj or ("context" in obj and ("input" in obj or "question" in obj))


def parse_record(obj: dict, name: str, lineno: int) -> list[EvalRecord]:
    """The records of one JSON object of file `name`, line `lineno`: one for LongBench, one
    per qa pair for LooGLE. Raises InputError naming `name:lineno` for another layout or a
    malformed field."""
    return _parse_object(obj, name, lineno)


def _parse_object(obj: dict, name: str, lineno: int) -> list[EvalRecord]:
    where = f"{name}:{lineno}"
    if "qa_pairs" in obj:
        return _parse_loogle(obj, where, lineno)
    if "context" in obj and ("input" in obj or "question" in obj):
        return [_parse_longbench(obj, where, lineno)]
    keys = ", ".join(sorted(obj)[:8])
    raise InputError(
        f"{where}: unknown record layout (keys: {keys}); expected LongBench "
        f"(_id, context, input, answers) or LooGLE (input, title, qa_pairs)"
    )


def _text_field(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _answer_list(value, where: str) -> list[str]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{where}: answers must be a list of strings")
    answers = [str(a) for a in value if isinstance(a, (str, int, float)) and str(a).strip()]
    if not answers:
        raise InputError(f"{where}: no usable reference answer")
    return answers


def _parse_longbench(obj: dict, where: str, lineno: int) -> EvalRecord:
    context = _text_field(obj, "context", where)
    qkey = "input" if "input" in obj else "question"
    question = _text_field(obj, qkey, where)
    if "answers" in obj:
        answers = _answer_list(obj["answers"], where)
    elif "answer" in obj:
        answers = _answer_list(obj["answer"], where)
    else:
        raise InputError(f"{where}: missing field 'answers'")
    rid = obj.get("_id", obj.get("id"))
    rid = str(rid) if rid not in (None, "") else f"line{lineno}"
    source = obj.get("dataset") if isinstance(obj.get("dataset"), str) and obj.get("dataset") else "longbench"
    return EvalRecord(id=rid, context=context, question=question, answers=answers, source=source)


def _parse_qa_pairs(value, where: str) -> list | None:
    """The list of QA dicts, or None for the summarisation task's "none"."""
    if value is None:
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lower() in ("", "none", "null"):
            return None
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                raise InputError(f"{where}: qa_pairs is a string but not a list literal") from None
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise InputError(f"{where}: qa_pairs must be a list of objects with keys Q and A")
    return value


def _loogle_answer(value, where: str) -> list[str]:
    if isinstance(value, dict):  # cloze: {"<mask-0>": "Andy", "<mask-1>": "Tank"}
        if not value:
            raise InputError(f"{where}: empty cloze answer")
        return ["; ".join(f"{k}: {v}" for k, v in value.items())]
    return _answer_list(value, where)


def _parse_loogle(obj: dict, where: str, lineno: int) -> list[EvalRecord]:
    context = _text_field(obj, "input", where)
    title = obj.get("title") if isinstance(obj.get("title"), str) else ""
    doc_id = obj.get("doc_id")
    base = str(doc_id) if doc_id not in (None, "") else (title.strip() or f"line{lineno}")
    source = obj.get("dataset") if isinstance(obj.get("dataset"), str) and obj.get("dataset") else "loogle"
    pairs = _parse_qa_pairs(obj["qa_pairs"], where)
    if pairs is None:
        output = obj.get("output")
        if isinstance(output, str) and output.strip() and output.strip().lower() != "none":
            return [EvalRecord(f"{base}-0", context, SUMMARY_QUESTION, [output], source)]
        raise InputError(f"{where}: qa_pairs is 'none' and there is no reference 'output'")
    records = []
    for k, pair in enumerate(pairs):
        pw = f"{where} (qa_pairs[{k}])"
        question = pair.get("Q")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{pw}: 'Q' must be a non-empty string")
        if "A" not in pair:
            raise InputError(f"{pw}: missing 'A'")
        records.append(EvalRecord(f"{base}-{k}", context, question, _loogle_answer(pair["A"], pw), source))
    return records
