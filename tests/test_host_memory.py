"""host_memory.keep_freed_memory: a freed block stays mapped for the next allocation (no
page faults when it is taken again), the opt-out, and which CLI commands use it. Run in
subprocesses: malloc settings are per process, and the test process keeps glibc's defaults
(conftest sets the opt-out)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lift_engine import cli

PROBE = """
import resource, sys
from lift_engine.host_memory import keep_freed_memory
kept = keep_freed_memory()
import torch
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(12):  # 64 MiB, touched and freed: above glibc's largest mmap threshold
    before = faults()
    block = torch.ones(64 * 2**20 // 4)
    counts.append(faults() - before)
    del block
print(kept, max(counts[-4:]))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc's")


def _probe(keep: str) -> tuple[bool, int]:
    """(settings applied, most page faults of one of the last 4 of 12 allocate-touch-free rounds)."""
    env = {**os.environ, "LIFT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@glibc_only
def test_a_freed_block_is_reused_without_page_faults():
    kept, faults = _probe("1")
    # 64 MiB is 16384 pages of 4 KiB. glibc's heap takes a few rounds to settle (torch's
    # 64-byte-aligned blocks do not fit the exact hole they left; measured: 7), then reuses
    assert kept and faults < 2000, faults
    default_kept, default_faults = _probe("0")
    assert not default_kept and default_faults > 8000, default_faults  # glibc's default: unmapped, faulted in again


def test_the_cli_keeps_freed_memory_for_training_commands_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing.txt")
    assert cli.main(["tune", missing, "-o", str(tmp_path / "out")]) != 0  # fails on the missing file, after the setting
    assert calls == [1]
    assert cli.main(["ask", str(tmp_path / "no-adapter"), "-q", "a question?"]) != 0
    assert calls == [1]  # ask (and serve, whose engine is vLLM's process) leave malloc alone
    assert {"tune", "tune-service", "eval", "demo"} == cli.TRAINING_COMMANDS
