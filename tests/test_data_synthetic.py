import json
import os

import pytest

from lift_engine.data.documents import read_document
from lift_engine.data.records import read_records
from lift_engine.data.synthetic import (
    DEMO_DOCUMENT,
    DEMO_QUESTIONS,
    demo_asset_path,
    load_demo_records,
    make_dataset,
    make_demo,
    make_document,
    write_jsonl,
)


def test_document_facts_are_verbatim_unique_and_answerable():
    doc, qs = make_document(7, n_facts=20, filler_paragraphs=40)
    assert doc.startswith("# ")
    assert len(qs) == 20
    assert len({q["question"] for q in qs}) == 20
    for q in qs:
        assert doc.count(q["evidence"]) == 1
        assert q["answer"] == q["answers"][0]
        assert q["answer"] in q["evidence"]
        assert q["answer"] not in q["question"]
        assert 0 <= q["position"] <= 1
        assert doc.index(q["evidence"]) == pytest.approx(q["position"] * len(doc), abs=len(doc) * 1e-4 + 1)


def test_deterministic_per_seed():
    assert make_document(3, 10, 20) == make_document(3, 10, 20)
    assert make_document(3, 10, 20)[0] != make_document(4, 10, 20)[0]


@pytest.mark.parametrize("fraction,expected_mid", [(0.6, 12), (1.0, 20), (0.0, 0)])
def test_middle_fraction_places_facts_in_middle_third(fraction, expected_mid):
    doc, qs = make_document(5, n_facts=20, filler_paragraphs=60, middle_fraction=fraction)
    # paragraph thirds and character thirds differ slightly: allow one at each edge
    mid = sum(1 / 3 <= q["position"] < 2 / 3 for q in qs)
    assert abs(mid - expected_mid) <= 2
    head = sum(q["position"] < 1 / 3 for q in qs)
    tail = sum(q["position"] >= 2 / 3 for q in qs)
    if fraction < 1:
        assert head >= 2 and tail >= 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_document(0, 5, 2)
    with pytest.raises(ValueError):
        make_document(0, 5, 10, middle_fraction=1.5)


def test_dataset_roundtrips_through_read_records(tmp_path):
    records = make_dataset(2, seed=1, n_facts=4, filler_paragraphs=8)
    assert len(records) == 8
    assert {r["dataset"] for r in records} == {"lift-synthetic"}
    assert len({r["_id"] for r in records}) == 8
    assert all(r["length"] == len(r["context"].split()) for r in records)
    path = tmp_path / "sub" / "synthetic.jsonl"
    write_jsonl(records, path)
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]
    back = read_records(path)
    assert [(b.id, b.question, b.answers, b.source) for b in back] == [
        (r["_id"], r["input"], r["answers"], "lift-synthetic") for r in records
    ]


def test_write_jsonl_is_atomic_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl([{"a": 1}], path)

    def bad_records():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(bad_records(), path)
    assert path.read_text() == '{"a": 1}\n'  # the old file is untouched
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind


def test_bundled_demo_assets_match_generator():
    doc, rows = make_demo()
    assert read_document(demo_asset_path(DEMO_DOCUMENT)) == doc
    with open(demo_asset_path(DEMO_QUESTIONS), encoding="utf-8") as fh:
        stored = [json.loads(line) for line in fh if line.strip()]
    assert stored == rows
    assert len(rows) == 12
    assert 9_000 <= len(doc) <= 13_000
    assert sum(1 / 3 <= r["position"] < 2 / 3 for r in rows) >= 8
    for r in rows:
        assert doc.count(r["evidence"]) == 1 and r["answer"] in r["evidence"]
    recs = load_demo_records()
    assert [r.question for r in recs] == [r["question"] for r in rows]
    assert all(r.context == doc for r in recs)
