"""`lift serve` applies vLLM's CPU advice (tcmalloc and Intel OpenMP in LD_PRELOAD) where the
libraries are on the machine (lift_engine.vllm_plugin.preload). Fast; needs no vLLM."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lift_engine.vllm_plugin import preload

IOMP = preload.find_library(preload.IOMP_PATTERNS)
LINUX_X86 = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def test_search_order_and_patterns(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "libtcmalloc_minimal.so.4").write_bytes(b"")
    (first / "libtcmalloc.so.4").write_bytes(b"")
    # the minimal allocator is preferred (pattern order), wherever it lies
    assert preload.find_library(preload.TCMALLOC_PATTERNS, [first, second]) == str(second / "libtcmalloc_minimal.so.4")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert preload.find_library(preload.TCMALLOC_PATTERNS, [first, second]) == str(first / "libtcmalloc_minimal.so.4")
    assert preload.find_library(preload.IOMP_PATTERNS, [first, second]) is None


def test_plan_adds_what_is_found_and_names_what_is_missing(tmp_path):
    (tmp_path / "libiomp5.so").write_bytes(b"")
    p = preload.plan("", [tmp_path], machine="x86_64", system="Linux")
    assert p.add == [str(tmp_path / "libiomp5.so")]
    assert len(p.missing) == 1 and "tcmalloc" in p.missing[0] and "libtcmalloc-minimal4" in p.missing[0]
    # an OpenMP runtime already preloaded (vLLM refuses two): none added; tcmalloc already there: none looked for
    p = preload.plan("/x/libgomp.so.1:/y/libtcmalloc.so.4", [tmp_path], machine="x86_64", system="Linux")
    assert p.add == [] and p.missing == []
    assert preload.plan("", [tmp_path], machine="aarch64", system="Linux").add == []  # Intel OpenMP: x86 only
    assert preload.plan("", [tmp_path], machine="x86_64", system="Darwin").add == []


def test_apply_keeps_the_users_entries_and_off_changes_nothing(tmp_path):
    (tmp_path / "libiomp5.so").write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    env = {"LD_PRELOAD": "/opt/mine.so", "OTHER": "1"}
    if LINUX_X86:
        out, note = preload.apply(env, "auto", [tmp_path])
        assert out["LD_PRELOAD"].split(":") == [str(tmp_path / "libtcmalloc_minimal.so.4"), str(tmp_path / "libiomp5.so"),
                                                "/opt/mine.so"]
        assert "libtcmalloc_minimal.so.4" in note and "libiomp5.so" in note and out["OTHER"] == "1"
        assert env["LD_PRELOAD"] == "/opt/mine.so"  # the caller's dict is not changed
    out, note = preload.apply(env, "off", [tmp_path])
    assert out == env and "off" in note
    with pytest.raises(ValueError, match="auto"):
        preload.apply(env, "always", [tmp_path])


@pytest.mark.skipif(IOMP is None or not LINUX_X86, reason="no libiomp5.so on this machine (pip install intel-openmp)")
def test_a_process_started_with_the_env_runs_on_intel_openmp():
    """The real library, preloaded into a fresh interpreter: torch and the C++ LoRA kernel
    (OpenMP) still give the right numbers, with libiomp5 loaded."""
    env, _ = preload.apply({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "auto")
    assert IOMP in env["LD_PRELOAD"].split(":")
    code = (
        "import torch\n"
        "from lift_engine import ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, a, b = torch.randn(200, 64, generator=g), torch.randn(3, 8, 64, generator=g), torch.randn(3, 32, 8, generator=g)\n"
        "idx = torch.randint(-1, 3, (200,), generator=g)\n"
        "y = ops.lora_linear_delta(x, a, b, torch.ones(3), idx)\n"
        "want = torch.stack([(x[t] @ a[i].T) @ b[i].T if i >= 0 else torch.zeros(32) for t, i in enumerate(idx.tolist())])\n"
        "assert torch.allclose(y, want, atol=1e-4)\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.split()[-1]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # torch's own libgomp is still mapped (a dependency), but OpenMP symbols resolve to the preloaded one first
    assert "libiomp5.so" in done.stdout


def test_lift_serve_puts_the_libraries_into_the_servers_environment(tmp_path, capsys):
    import argparse

    from helpers_pipeline import make_tiny_model_dir
    from lift_engine import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    model = make_tiny_model_dir(tmp_path / "model")
    args = parser.parse_args(["--model", str(model), "--store", str(tmp_path / "s"), "--tune-workers", "0"])
    _, env = serve.build_command(args)
    err = capsys.readouterr().err
    want, note = preload.apply({k: v for k, v in os.environ.items()}, "auto")
    assert env.get("LD_PRELOAD") == want.get("LD_PRELOAD") and note in err
    if IOMP is not None and LINUX_X86 and "omp" not in os.environ.get("LD_PRELOAD", ""):
        assert IOMP in env["LD_PRELOAD"]
    assert f"{serve.DEFAULT_MAX_LORAS} adapter slots" in err
    args = parser.parse_args(["--model", str(model), "--store", str(tmp_path / "s"), "--tune-workers", "0",
                              "--preload", "off"])
    _, env = serve.build_command(args)
    assert env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")
