"""Tuning on a CUDA device (`lift tune --device cuda`, bench_tune.py --device cuda).

Tuning follows the model's device: batches, adapter banks and the optimizer state live
where the model does, and adapters and checkpoints are written from CPU copies.

1. Everywhere: `--device` names are checked before the model loads (one-line errors;
   `lift ask`, `eval` and `demo` take `--device` too, answering on the model's device).
2. With a CUDA device (skipped without one): the batched job on the GPU trains the same
   adapters as on the CPU (fp32, TF32 off), for LoRA and Gated Memory, with and without
   prefix sharing; a bf16 job on the GPU trains its fp32 adapters (finite losses).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.batch.job import BatchTuneJob
from lift_engine.cli import main
from lift_engine.config import make_config
from lift_engine.errors import InputError
from lift_engine.models.loading import load_base_model, resolve_device

WEIGHTS = {"lora": "adapter_model.safetensors", "gated-memory": "gated_memory.safetensors"}
DOCS = {"short": DOCUMENT[:120], "long": DOCUMENT + DOCUMENT[::-1][:200]}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny_config(adapter: str = "lora", dtype: str = "float32"):
    cfg = make_config("cpu", adapter)
    cfg.segment.length, cfg.context.length = 96, 24
    cfg.qa.num_extractive = 6
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 1
    cfg.train.batch_size = 3
    cfg.train.compute_dtype = dtype
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("gpu") / "model")


# ------------------------------------------------------------------ 1. device names
def test_resolve_device_names():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("nonsense", "mps", "cuda:x"):
        with pytest.raises(InputError):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("command", ["tune", "demo"])
def test_a_missing_gpu_fails_before_loading(model_dir, tmp_path, capsys, command):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    args = {"tune": ["tune", str(doc), "-o", str(tmp_path / "out")], "demo": ["demo"]}[command]
    code = main(args + ["--model", str(model_dir), "--device", "cuda"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 2. on a GPU
def run_job(model_dir, out: Path, cfg, device: str, prefix: bool) -> dict:
    base = load_base_model(str(model_dir), device=device, progress=False)
    job = BatchTuneJob(base, cfg, out, max_active=2, prefix_sharing=prefix, checkpoint_every=2)
    try:
        for name, text in DOCS.items():
            job.submit(text, name)
        job.run()
    finally:
        job.close()
    progress = job.progress()
    assert all(p["status"] == "done" for p in progress.values()), progress
    return progress


@gpu
@pytest.mark.parametrize("adapter", ["lora", "gated-memory"])
@pytest.mark.parametrize("prefix", [False, True])
def test_gpu_job_trains_the_cpu_adapters(model_dir, tmp_path, adapter, prefix, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = tiny_config(adapter)
    on_cpu = run_job(model_dir, tmp_path / "cpu", cfg, "cpu", prefix)
    on_gpu = run_job(model_dir, tmp_path / "cuda", cfg, "cuda", prefix)
    lr = cfg.train.lr_lora if adapter == "lora" else cfg.train.lr_gated_memory
    for name in DOCS:
        for which in ("first_loss", "last_loss"):  # the same computation: losses agree to fp32 rounding
            assert on_gpu[name][which] == pytest.approx(on_cpu[name][which], rel=1e-4), (name, which)
        want = load_file(str(tmp_path / "cpu" / name / WEIGHTS[adapter]))
        got = load_file(str(tmp_path / "cuda" / name / WEIGHTS[adapter]))
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].device.type == "cpu"
            # Other kernels round differently, and AdamW turns a gradient entry near zero into
            # an update of about ±lr whose sign the rounding decides (test_batch_job's
            # exactness test): all but a few entries agree to 1e-4, none by more than 2·lr
            # per step, and the tensors as a whole to 1%.
            diff = (got[key] - want[key]).abs()
            off = diff > 1e-4 + 1e-3 * want[key].abs()
            rel = float(diff.norm() / want[key].norm().clamp(min=1e-12))
            detail = f"{name} {key}: {int(off.sum())}/{off.numel()} entries off, max {float(diff.max()):.2e}, rel {rel:.2e}"
            assert float(off.float().mean()) <= 2e-3 and float(diff.max()) <= 2 * lr * on_cpu[name]["steps"], detail
            assert rel <= 1e-2, detail


@gpu
def test_gpu_bf16_job_trains(model_dir, tmp_path):
    progress = run_job(model_dir, tmp_path / "bf16", tiny_config("lora", "bfloat16"), "cuda", prefix=True)
    for name, info in progress.items():
        assert torch.isfinite(torch.tensor([info["first_loss"], info["last_loss"]])).all(), info
        tensors = load_file(str(tmp_path / "bf16" / name / WEIGHTS["lora"]))
        lora_b = [t for k, t in tensors.items() if "lora_B" in k]
        assert lora_b and all(t.dtype == torch.float32 and t.abs().max() > 0 for t in lora_b)  # trained fp32 masters


@gpu
@pytest.mark.parametrize("adapter", ["lora", "gated-memory"])
def test_an_adapter_tuned_on_the_gpu_answers_there_as_on_the_cpu(model_dir, tmp_path, adapter, monkeypatch):
    """`lift ask --device cuda`: the adapter loads onto the GPU model and its logits match the CPU's."""
    from lift_engine.inference import greedy_answer
    from lift_engine.pipeline import load_tuned
    from lift_engine.prompts import PromptBuilder

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = tiny_config(adapter)
    run_job(model_dir, tmp_path / "tuned", cfg, "cuda", prefix=False)
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = {}
    for device in ("cpu", "cuda"):
        base = load_base_model(str(model_dir), device=device, progress=False)
        handle = load_tuned(base, tmp_path / "tuned" / "short")
        with torch.no_grad(), handle.use(torch.zeros(2, dtype=torch.long, device=device)):
            logits[device] = base.model(ids.to(device)).logits.float().cpu()
        prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
        answer = greedy_answer(base.model, base.tokenizer, prompts, "What is it?", doc_ids=ids[0].tolist(), window=16,
                               max_new_tokens=4, handle=handle, slot=0)
        assert isinstance(answer, str)
        handle.remove()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)
