"""`lift eval` on LongBench and LooGLE records with a tiny model: metrics, predictions, cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _longbench(tmp_path: Path) -> Path:
    rows = [
        {"_id": "lb-1", "context": DOCUMENT, "input": "Who founded Quenwick Labs?", "answers": ["Ilsa Marrow"]},
        {"_id": "lb-2", "context": DOCUMENT, "input": "Where did the lab move by 1995?", "answers": ["Harlow Point"]},
        {"_id": "lb-3", "context": DOCUMENT + " Appendix.", "input": "Who closed the lab?", "answers": ["Anouk Seldt"]},
    ]
    return _write_jsonl(tmp_path / "lb.jsonl", rows)


def test_eval_lift_writes_predictions_and_reuses_adapters(capsys, tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LIFT_CACHE_DIR", str(tmp_path / "cache"))
    data = _longbench(tmp_path)
    preds = tmp_path / "preds.jsonl"
    args = ["eval", str(data), "--mode", "lift", "--window", "32", "--predictions", str(preds), "--model", str(model_dir)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["questions"] == 3 and summary["contexts"] == 2 and summary["mode"] == "lift"
    for key in ("qa_f1", "rouge_l", "exact_match"):
        assert 0.0 <= summary[key] <= 1.0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["_id"] for r in rows] == ["lb-1", "lb-2", "lb-3"]
    assert all(set(r) >= {"_id", "question", "prediction", "answers"} for r in rows)
    assert rows[0]["answers"] == ["Ilsa Marrow"]
    adapters = sorted((tmp_path / "cache" / "adapters").iterdir())
    assert len(adapters) == 2  # one adapter per distinct context
    assert err.count("tuning an adapter") == 2
    assert ": slot 0," in err and ": slot 1," in err  # both contexts trained in one job, side by side
    # A rerun tunes nothing: the cached adapters are reused.
    assert main(args) == 0
    out2, err2 = capsys.readouterr()
    assert "tuning an adapter" not in err2
    assert json.loads(out2)["qa_f1"] == summary["qa_f1"]
    assert 0 <= summary["answered_by_base_after_routing"] <= 3  # confidence routing, on by default
    for row in rows:  # both candidates routing chose between, the kept one being the prediction
        routing = row["routing"]
        assert set(routing) == {"adapter", "adapter_logprob", "base", "base_logprob"}
        assert row["prediction"] in (routing["adapter"], routing["base"])
        assert all(v is None or v <= 0 for v in (routing["adapter_logprob"], routing["base_logprob"]))
    # Routing is answering only: the same cached adapters, nothing tuned, the adapters' own answers.
    assert main(args + ["--no-routing"]) == 0
    out3, err3 = capsys.readouterr()
    assert "tuning an adapter" not in err3 and json.loads(out3)["answered_by_base_after_routing"] == 0
    assert not any("routing" in json.loads(line) for line in preds.read_text().splitlines())


def test_eval_icl_on_loogle_records(capsys, tmp_path, model_dir):
    qa_pairs = str([{"Q": "Who founded Quenwick Labs?", "A": "Professor Ilsa Marrow", "S": "Professor Ilsa Marrow founded"},
                    {"Q": "What ink was the report printed in?", "A": "violet ink", "S": "printed in violet ink"}])
    data = _write_jsonl(tmp_path / "loogle.jsonl",
                        [{"input": DOCUMENT, "title": "Quenwick", "qa_pairs": qa_pairs, "output": "none"}])
    for mode in ("icl", "full-icl"):
        assert main(["eval", str(data), "--mode", mode, "--window", "32", "--model", str(model_dir)]) == 0
        summary = json.loads(capsys.readouterr()[0])
        assert summary["questions"] == 2 and summary["mode"] == mode


@pytest.mark.parametrize("content", ["", "{not json\n", json.dumps({"unrelated": 1}) + "\n"])
def test_eval_rejects_malformed_files(capsys, tmp_path, model_dir, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(["eval", str(bad), "--model", str(model_dir)])
    err = capsys.readouterr()[1]
    assert code != 0 and "Traceback" not in err and err.startswith("lift: error:")


def test_eval_lift_answers_a_context_that_fits_the_window_in_context(capsys, tmp_path, model_dir, monkeypatch):
    """Hybrid: the short context needs no adapter (none is tuned, the log says so); the long
    one is tuned; --force-lift tunes both."""
    monkeypatch.setenv("LIFT_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"_id": "short", "context": "Anouk Seldt closed the lab.", "input": "Who closed the lab?", "answers": ["Anouk"]},
            {"_id": "long", "context": DOCUMENT, "input": "Who founded Quenwick Labs?", "answers": ["Ilsa Marrow"]}]
    data = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    args = ["eval", str(data), "--mode", "lift", "--window", "32", "--model", str(model_dir)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["contexts_answered_in_context"] == 1
    assert "answered in context, no adapter" in err and err.count("tuning an adapter") == 1
    assert len(list((tmp_path / "cache" / "adapters").iterdir())) == 1
    assert main(args + ["--force-lift"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["contexts_answered_in_context"] == 0 and err.count("tuning an adapter") == 1
    assert len(list((tmp_path / "cache" / "adapters").iterdir())) == 2
