"""Batched job: kill -9 and restart (≤ 1 step lost per document, no half-written adapter)
and memory planning (exact micro-batching, checkpointing, refusal instead of OOM). The
queue directory (`lift tune-service`) is tested in tests/test_service_queue.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_pipeline import make_tiny_model_dir
from lift_engine.adapters.io import load_adapter, read_manifest
from lift_engine.batch.job import STATUS_FILE, BatchTuneJob
from lift_engine.batch.planner import MemoryPlanner, measure_saved_bytes
from lift_engine.checkpoint import CHECKPOINT_FILE, partial_dir_for
from lift_engine.models.loading import load_base_model
from lift_engine.precision import training_precision
from test_batch_job import DOCS, adapter_tensors, tiny_config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_batch_job import DOCS, tiny_config
from lift_engine.batch.job import BatchTuneJob
from lift_engine.models.loading import load_base_model
base = load_base_model({model!r})
job = BatchTuneJob(base, tiny_config("lora"), Path({out!r}), max_active=3)
for name, text in DOCS.items():
    job.submit(text, name)
job.run()
job.close()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("resume") / "model")


def _checkpoint_step(out: Path, name: str) -> int | None:
    path = partial_dir_for(out / name) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def test_kill9_and_restart_loses_at_most_one_step_and_matches_an_uninterrupted_run(model_dir, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS), model=str(model_dir), out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status_path = out / STATUS_FILE
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                status = json.loads(status_path.read_text())
            except (OSError, ValueError):
                status = None
            if status and status["global_step"] >= 4:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        else:
            pytest.fail("the job never reached step 4")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    status = json.loads(status_path.read_text())
    # Nothing visible is half-written: every adapter dir present loads completely.
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    for adapter_dir in visible:
        read_manifest(adapter_dir)
        base = load_base_model(str(model_dir))
        load_adapter(adapter_dir, base).remove()
    unfinished = {name: info for name, info in status["documents"].items() if info["status"] == "training"}
    assert unfinished, status  # the kill landed while documents were training
    saved = {}
    for name, info in unfinished.items():
        saved[name] = _checkpoint_step(out, name)
        # The status file is written after the step's checkpoints, so a checkpoint is at
        # least as far as the status says; the step in flight at the kill is the most lost.
        assert saved[name] is not None and info["step"] <= saved[name] <= info["step"] + 1, (name, info, saved[name])

    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    final = json.loads(status_path.read_text())["documents"]
    # The restarted job resumed each unfinished document from its checkpoint (not from 0).
    for name in unfinished:
        assert final[name]["status"] == "done"
        assert final[name]["resumed_from"] == saved[name] > 0
    # … and its adapters are those of a job that was never interrupted.
    base = load_base_model(str(model_dir))
    job = BatchTuneJob(base, tiny_config("lora"), tmp_path / "ref", max_active=3)
    for name, text in DOCS.items():
        job.submit(text, name)
    job.run()
    job.close()
    for name in DOCS:
        ref, got = adapter_tensors(tmp_path / "ref" / name, "lora"), adapter_tensors(out / name, "lora")
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-5, msg=f"{name} {key}")
    assert not [p for p in out.iterdir() if p.name.endswith(".lift-partial")]


# ------------------------------------------------------------------ memory planning
def test_planner_estimate_bounds_the_measured_activations(model_dir):
    base = load_base_model(str(model_dir))
    job = BatchTuneJob(base, tiny_config("lora"), "/nonexistent-unused", max_active=2)
    try:
        planner = job.planner
        base.model.train()
        for rows, seq in [(1, 150), (3, 80), (2, 300)]:
            with job.handle.use(torch.zeros(rows, dtype=torch.long)), \
                    training_precision(base.model, job.compute_dtype, job._cast_cache):  # as a step runs
                measured = measure_saved_bytes(base.model, torch.ones(rows, seq, dtype=torch.long))
            estimate = planner.activation_bytes(rows, seq, checkpointing=False)
            assert measured <= estimate <= 2.0 * measured, (rows, seq, measured, estimate)
        assert planner.activation_bytes(2, 300, True) < planner.activation_bytes(2, 300, False)
    finally:
        job.close()


def test_planner_closes_a_full_pass_before_it_pads_too_much(model_dir):
    from lift_engine.batch.planner import MAX_PADDING, MIN_PASS_TOKENS

    base = load_base_model(str(model_dir))
    job = BatchTuneJob(base, tiny_config("lora"), "/nonexistent-unused", max_active=2)
    try:
        lengths = [400] * 6 + [120] * 30 + [60] * 10  # long segments, short QA: a mixed step
        one_pass = job.planner.plan(lengths, max_padding=None, max_tokens=None)
        assert len(one_pass.batches) == 1
        plan = job.planner.plan(lengths)
        assert sorted(i for b in plan.batches for i in b) == list(range(len(lengths)))  # every sample, once
        assert len(plan.batches) >= 2
        for b in plan.batches:
            real = sum(lengths[i] for i in b)
            cells = len(b) * max(lengths[i] for i in b)
            # padding is bounded, except in a last pass too small to close (under MIN_PASS_TOKENS + one sample)
            assert 1 - real / cells <= MAX_PADDING or real - min(lengths[i] for i in b) < MIN_PASS_TOKENS, (b, real, cells)
        padded = lambda p: sum(len(b) * max(lengths[i] for i in b) for b in p.batches)  # noqa: E731
        assert padded(plan) < 0.6 * padded(one_pass)
    finally:
        job.close()


def test_planner_caps_a_pass_at_max_tokens_for_speed(model_dir):
    from lift_engine.batch.planner import MAX_PASS_TOKENS

    base = load_base_model(str(model_dir))
    job = BatchTuneJob(base, tiny_config("lora"), "/nonexistent-unused", max_active=2)
    try:
        lengths = [200] * 64 + [MAX_PASS_TOKENS + 50]  # one sample longer than the cap still gets a pass
        plan = job.planner.plan(lengths, max_padding=None)
        assert sorted(i for b in plan.batches for i in b) == list(range(len(lengths)))
        assert [len(b) for b in plan.batches] == [1, 40, 24]
        assert all(len(b) * max(lengths[i] for i in b) <= MAX_PASS_TOKENS for b in plan.batches[1:])
        assert len(job.planner.plan(lengths, max_padding=None, max_tokens=None).batches) == 1
    finally:
        job.close()


def test_pass_limits_by_device_and_prefix_sharing():
    from lift_engine.batch.planner import MAX_PADDING, MAX_PASS_TOKENS, pass_limits

    assert pass_limits("cpu", False) == (MAX_PADDING, MAX_PASS_TOKENS)
    assert pass_limits("cuda", False) == (MAX_PADDING, None)  # a CPU measurement: not on a GPU
    assert pass_limits("cpu", True) == pass_limits("cuda", True) == (None, None)  # a document's samples stay together


def _run(model_dir, out: Path, budget_factor: float | None, longest: int = 0, adapter="lora"):
    """A job over DOCS whose budget is `budget_factor` × the activations of one `longest`-token
    sample without checkpointing (plus the fixed part)."""
    base = load_base_model(str(model_dir))
    job = BatchTuneJob(base, tiny_config(adapter), out, max_active=3, checkpoint_every=10**9)
    if budget_factor is not None:
        planner = job.planner
        one = planner.safety * planner.activation_bytes(1, longest, checkpointing=False)
        planner.budget = int(planner.fixed_bytes + planner.loss_bytes + budget_factor * one)
    try:
        for name, text in DOCS.items():
            job.submit(text, name)
        job.run()
        return job.history, job.progress()
    finally:
        job.close()


def test_memory_budget_splits_steps_exactly_and_switches_on_checkpointing(model_dir, tmp_path):
    free_hist, _ = _run(model_dir, tmp_path / "free", None)
    assert all(r.passes == 1 and not r.gradient_checkpointing for r in free_hist)
    longest = max(r.max_len for r in free_hist)
    tight_hist, progress = _run(model_dir, tmp_path / "tight", 2.5, longest)
    assert max(r.passes for r in tight_hist) >= 3 and not any(r.gradient_checkpointing for r in tight_hist)
    assert all(progress[name]["status"] == "done" for name in DOCS)
    # The longest sample fits only with checkpointing (2 layers: it keeps ~1/2 + layer inputs).
    ckpt_hist, _ = _run(model_dir, tmp_path / "ckpt", 0.8, longest)
    assert any(r.gradient_checkpointing for r in ckpt_hist)
    for name in DOCS:
        ref = adapter_tensors(tmp_path / "free" / name, "lora")
        for run in ("tight", "ckpt"):
            got = adapter_tensors(tmp_path / run / name, "lora")
            for key in ref:
                # Passes change the order gradients are summed in; AdamW's normalisation turns that
                # rounding into ~1e-5 on near-zero entries. A wrong split (a lost or doubled pass,
                # a wrong normaliser) moves weights by the order of lr = 2e-3 per step.
                torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=5e-5, msg=f"{run} {name} {key}")


def test_budget_too_small_for_one_sample_fails_that_document_not_the_process(model_dir, tmp_path):
    _, progress = _run(model_dir, tmp_path / "none", 0.01, 150)
    for name in DOCS:
        assert progress[name]["status"] == "failed"
        assert "memory budget" in progress[name]["error"]
