"""The `lift` command with good and bad input: one-line errors, non-zero exits, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.checkpoint import CHECKPOINT_FILE, partial_dir_for
from lift_engine.cli import main
from lift_engine.config import make_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture()
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(DOCUMENT * 3)
    return path


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lift: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "empty"), (b"   \n\t\n", "empty"), (b"\x00\x01\x02binary\x00data" * 50, "binary"),
     (b"caf\xe9 au lait, not UTF-8 at all", "utf-8")],
    ids=["empty", "whitespace", "binary", "latin1"],
)
def test_tune_rejects_unusable_documents(capsys, tmp_path, model_dir, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    code, _, err = run_main(capsys, "tune", bad, "-o", tmp_path / "out", "--model", model_dir)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_tune_missing_document(capsys, tmp_path, model_dir):
    code, _, err = run_main(capsys, "tune", tmp_path / "nope.txt", "-o", tmp_path / "out", "--model", model_dir)
    assert_one_line_error(code, err, "nope.txt")


@pytest.mark.parametrize("model", ["missing", "file", "empty_dir"])
def test_tune_with_a_bad_model_path(capsys, tmp_path, doc, model):
    path = tmp_path / model
    if model == "file":
        path.write_text("not a model")
    elif model == "empty_dir":
        path.mkdir()
    code, _, err = run_main(capsys, "tune", doc, "-o", tmp_path / "out", "--model", path)
    assert_one_line_error(code, err, str(path))


def test_tune_then_ask_and_corrupt_adapters(capsys, tmp_path, model_dir, doc, monkeypatch):
    monkeypatch.setenv("LIFT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    short = tmp_path / "short.txt"
    short.write_text("Anouk Seldt closed the lab in 2011.")  # shorter than one segment: still tunes
    store = tmp_path / "store"
    code, stdout, err = run_main(capsys, "tune", short, "-o", out, "--model", model_dir, "--adapter", "gated-memory",
                                 "--store", store, "--tenant", "acme", "--name", "short-doc")
    assert code == 0, err
    assert "adapter written" in stdout
    assert (store / "tenants" / "acme" / "short-doc" / "lift_adapter.json").is_file()
    code, stdout, err = run_main(capsys, "ask", out, "-q", "Who closed the lab?", "--context", short,
                                 "--window", 16, "--model", model_dir, "--max-new-tokens", 4)
    assert code == 0, err
    assert stdout.strip() != "" or err == ""
    # corrupt: truncated tensor file
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_main(capsys, "ask", out, "-q", "x", "--model", model_dir)
    assert_one_line_error(code, err)
    # not an adapter at all
    code, _, err = run_main(capsys, "ask", tmp_path, "-q", "x", "--model", model_dir)
    assert_one_line_error(code, err)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a" * 200, ".hidden"])
def test_tune_refuses_hostile_store_names_before_tuning(capsys, tmp_path, model_dir, doc, name):
    code, _, err = run_main(capsys, "tune", doc, "-o", tmp_path / "out", "--model", model_dir,
                            "--store", tmp_path / "store", "--name", name)
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_model_is_refused(capsys, tmp_path, model_dir):
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    short = tmp_path / "short.txt"
    short.write_text(DOCUMENT)
    code, _, err = run_main(capsys, "tune", short, "-o", tmp_path / "a", "--model", other)
    assert code == 0, err
    code, _, err = run_main(capsys, "ask", tmp_path / "a", "-q", "x", "--model", model_dir)
    assert_one_line_error(code, err)


def test_every_command_has_help():
    for command in ("tune", "ask", "eval", "demo"):
        result = subprocess.run([sys.executable, "-m", "lift_engine.cli", command, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage: lift " + command in result.stdout


def test_kill_9_then_rerun_resumes(tmp_path, model_dir, doc):
    """A real process killed with SIGKILL mid-tuning resumes from its last checkpoint."""
    out = tmp_path / "adapter"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "lift_engine.cli", "tune", str(doc), "-o", str(out), "--model", str(model_dir),
           "--preset", "cpu", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = partial_dir_for(out) / CHECKPOINT_FILE
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed at step" in result.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert not partial_dir_for(out).exists()


def test_tune_with_a_bf16_base_records_it_and_rejects_unknown_dtypes(capsys, tmp_path, model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT[:300])
    out = tmp_path / "adapter"
    code, stdout, err = run_main(capsys, "tune", doc, "-o", out, "--model", model_dir, "--compute-dtype", "bfloat16")
    assert code == 0, err
    manifest = json.loads((out / "lift_adapter.json").read_text())
    assert manifest["lift_config"]["train"]["compute_dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as exc:  # argparse: usage line + one error line, exit 2
        main(["tune", str(doc), "-o", str(tmp_path / "other"), "--model", str(model_dir), "--compute-dtype", "float8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--compute-dtype" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()


def test_ask_answers_a_document_that_fits_the_window_in_context(capsys, tmp_path, model_dir):
    short = tmp_path / "short.txt"
    short.write_text("Anouk Seldt closed the lab in 2011.")
    code, _, err = run_main(capsys, "tune", short, "-o", tmp_path / "a", "--model", model_dir)
    assert code == 0, err
    ask = ["ask", tmp_path / "a", "-q", "Who closed the lab?", "--context", short, "--model", model_dir,
           "--max-new-tokens", 4]
    code, _, err = run_main(capsys, *ask, "--window", 512)
    assert code == 0 and "answered in context, no adapter" in err
    code, _, err = run_main(capsys, *ask, "--window", 512, "--force-lift")
    assert code == 0 and "answered with the adapter" in err
    code, routed, err = run_main(capsys, *ask, "--window", 4)
    assert code == 0 and "answered with the adapter and the document cut to 4 tokens" in err
    kept_base = "confidence routing kept the base model's answer" in err
    code, adapter_only, err = run_main(capsys, *ask, "--window", 4, "--no-routing")
    assert code == 0 and "confidence routing" not in err
    assert routed == adapter_only or kept_base  # the answer changes only when routing says the base's was kept


def test_bad_distillation_flags_are_one_line_errors_before_anything_is_written(tmp_path, capsys):
    from lift_engine import cli as cli_module

    doc = tmp_path / "doc.txt"
    doc.write_text("A document.")
    for flags, needle in ((["--anchor-fraction", "0.5"], "needs --distill"),
                          (["--distill", "--anchor-fraction", "1.5"], "between 0 and 1"),
                          (["--no-generated-queries"], "needs --distill")):
        assert cli_module.main(["tune", str(doc), "-o", str(tmp_path / "out")] + flags) != 0
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [("--distill", "--no-generated-queries", "--anchor-fraction", "0.5"),
                                   ("--preset", "cpu-prose")])
def test_distill_without_generated_queries_reaches_the_config(capsys, tmp_path, model_dir, flags):
    """The three flags, or --preset cpu-prose: bench_quality's `lift-anchor` recipe."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT[:300])
    out = tmp_path / "adapter"
    code, _, err = run_main(capsys, "tune", doc, "-o", out, "--model", model_dir, *flags)
    assert code == 0, err
    written = json.loads((out / "lift_adapter.json").read_text())["lift_config"]
    distill = written["distill"]
    assert distill["enabled"] and not distill["generate_queries"] and distill["anchor_fraction"] == 0.5
    assert written["qa"] == make_config("cpu").to_dict()["qa"]  # otherwise the cpu preset's sizes
