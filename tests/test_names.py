"""One name rule (lift_engine/names.py) for the CLI, the batch job, the document service and the store:
a document name the job takes is an adapter name the store takes, and the sanitiser of
file stems and .jsonl names yields valid names from hostile input."""
from __future__ import annotations

import json

import pytest

from lift_engine import names, store
from lift_engine.batch import inputs, job
from lift_engine.service import documents as service_documents
from lift_engine.errors import InputError, LiftError
from lift_engine.names import MAX_NAME_LENGTH, InvalidName, is_valid_name, sanitize_name, validate_name

CANDIDATES = [
    "a", "0", "contract-2024", "Doc_1.v2", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "", ".", "..", ".hidden",
    "-x", "x-", "_x", "x_", "x.", "a..b", "a b", "a/b", "../x", "/abs", "a\\b", "a\nb", "a\x00b", "caf\u00e9",
    "\uff41", "a:b", "~", "A.B_C-D",
]


def _accepts(check, name) -> bool:
    try:
        check(name)
        return True
    except InputError:
        return False


def test_every_user_of_a_name_uses_the_one_validator():
    assert store.validate_name is names.validate_name and store.is_valid_name is names.is_valid_name
    assert store.InvalidName is names.InvalidName and store.MAX_NAME_LENGTH == MAX_NAME_LENGTH == 64
    assert job.validate_name is names.validate_name and service_documents.validate_name is names.validate_name
    assert not hasattr(job, "NAME_RE") and not hasattr(inputs, "_safe")


@pytest.mark.parametrize("name", CANDIDATES)
def test_a_name_the_job_takes_is_a_name_the_store_takes_and_back(name):
    as_document = _accepts(lambda n: validate_name(n, "document"), name)
    as_adapter = _accepts(lambda n: validate_name(n, "adapter"), name)
    as_tenant = _accepts(lambda n: validate_name(n, "tenant"), name)
    assert as_document == as_adapter == as_tenant == is_valid_name(name)


def test_names_the_job_used_to_take_are_refused_clearly():
    for name, says in (("x" * 65, "65 characters long, more than 64"), ("_x", "invalid"), ("x.", "invalid")):
        with pytest.raises(InvalidName, match=says) as info:
            validate_name(name, "document")
        message = str(info.value)
        assert message.startswith("document name") and "starting and ending with a letter or digit" in message
    assert issubclass(InvalidName, InputError) and issubclass(InvalidName, ValueError)
    assert issubclass(InvalidName, LiftError)


HOSTILE = [
    "x" * 500, "../../etc/passwd", "/abs/path", "a\\b\\c", "...", "..", ".", ".hidden", "trailing.", "--x--",
    "__init__", "caf\u00e9 \u2615 \u6587\u66f8", "\u6587\u66f8", "a\nb\tc\x00d", " spaced out ", "a..b", "", "-",
    "\ud800", "名" * 100, "a" * 63 + "\u00e9" + "b" * 10, 12345, "A.B_C-D",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_sanitize_name_yields_valid_names(raw):
    name = sanitize_name(raw)
    assert is_valid_name(name) and 1 <= len(name) <= MAX_NAME_LENGTH, (raw, name)
    assert name == sanitize_name(raw)  # deterministic (resume finds the same directories)
    if is_valid_name(str(raw)):
        assert name == str(raw)  # a valid name is kept as it is


def test_sanitize_name_keeps_long_names_apart():
    a, b = "chapter-" + "x" * 80 + "-one", "chapter-" + "x" * 80 + "-two"
    assert sanitize_name(a) != sanitize_name(b)
    assert len(sanitize_name(a)) == MAX_NAME_LENGTH and sanitize_name(a).startswith("chapter-xxx")
    assert sanitize_name("...") == "doc" and sanitize_name("", default="item") == "item"
    assert sanitize_name("a b", suffix="-7") == "a-b-7" and sanitize_name("..", suffix="-7") == "doc-7"
    long = sanitize_name("q" * 100, suffix="-12345")
    assert len(long) == MAX_NAME_LENGTH and long.endswith("-12345") and is_valid_name(long)


def test_collected_document_names_are_store_names(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for stem in ("caf\u00e9 notes", "x" * 120, "--weird..", "r\u00e9sum\u00e9"):
        (folder / f"{stem}.txt").write_text("Some text about a topic.\n")
    rows = [{"name": "../../etc/passwd", "text": "one"}, {"id": "\u6587\u66f8/\u7b2c\u4e00", "text": "two"},
            {"_id": "y" * 200, "text": "three"}, {"text": "four"}]
    jsonl = tmp_path / ("z" * 70 + ".jsonl")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    collected = inputs.collect_documents([str(folder), str(jsonl)])
    assert len(collected) == 8
    target = store.AdapterStore(tmp_path / "store", create=True)
    for name, _, source in collected:
        assert is_valid_name(name), (name, source)
        assert target.target_dir("acme", name).parent.name == "acme"
    assert collected[-1][0].endswith("-4")  # default <stem>-<line number>, the stem shortened first
