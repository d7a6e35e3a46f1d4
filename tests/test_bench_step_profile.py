"""bench/bench_step_profile.py's accounting: op groups, GEMM FLOPs from recorded shapes,
and, on a tiny batched job, that the frozen GEMMs the profiler saw execute the FLOPs
bench_tune.model_flops counts for the step (the numerator of every %-of-peak figure).
No benchmark runs here."""
from __future__ import annotations

import pytest

from bench.bench_step_profile import GROUPS, gemm_flops, op_group, profile_step
from bench.bench_tune import model_flops, with_dtype
from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.batch.job import BatchTuneJob
from lift_engine.config import make_config
from lift_engine.models.loading import load_base_model


def test_op_groups_and_gemm_flops():
    assert op_group("aten::mm") == "frozen GEMMs" and op_group("aten::bmm") == "LoRA"
    assert op_group("_LoraLinearRowsBackward") == "LoRA" and op_group("_LoraShrink") == "LoRA"
    assert op_group("_AttentionBackward") == "attention" and op_group("_GatedMemoryBlend") == "attention"
    assert op_group("_SwiGLU") == "norm/SwiGLU/RoPE" and op_group("aten::copy_") == "other"
    assert op_group("_ChunkedTokenLossFrozenHead") == "loss"
    assert gemm_flops("aten::mm", [[3, 5], [5, 7]]) == 2 * 3 * 5 * 7
    assert gemm_flops("aten::addmm", [[7], [3, 5], [5, 7], [], []]) == 2 * 3 * 5 * 7
    assert gemm_flops("aten::baddbmm_", [[2, 3, 7], [2, 3, 5], [2, 5, 7], [], []]) == 2 * 2 * 3 * 5 * 7
    assert gemm_flops("aten::mm", []) == 0.0 and gemm_flops("aten::relu", [[3]]) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_profiled_frozen_gemms_execute_the_counted_flops(tmp_path, dtype):
    base = load_base_model(str(make_tiny_model_dir(tmp_path / "model")))
    cfg = make_config("cpu", "lora")
    cfg.segment.length, cfg.context.length, cfg.qa.num_extractive = 96, 24, 4
    cfg.train.batch_size = 3
    cfg = with_dtype(cfg, dtype)
    job = BatchTuneJob(base, cfg, tmp_path / "job", max_active=2, checkpoint_every=10**9)
    try:
        job.submit(DOCUMENT, "a")
        job.submit(DOCUMENT[::-1], "b")
        report, groups = profile_step(job)
    finally:
        job.close()
    assert report is not None and set(groups) <= set(GROUPS)
    assert groups["frozen GEMMs"][0] > 0 and groups["LoRA"][0] > 0 and groups["attention"][0] > 0
    assert (groups["LoRA"][1] > 0) == (dtype == "bfloat16")  # bf16: bmm GEMMs; fp32: the C++ LoRA kernels
    counted = model_flops(base.model, report.tokens, report.loss_tokens)
    executed = groups["frozen GEMMs"][1]
    # autograd skips the input gradient of the first layer's q/k/v (their input needs none):
    # the executed FLOPs are a little under the count, never over it
    assert 0.85 * counted <= executed <= counted * 1.0001, (executed, counted)
    assert "step" not in vars(job.optimizer)  # the profiler's label is gone: the class's step again
