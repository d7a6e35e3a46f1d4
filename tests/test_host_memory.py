"""host_memory.keep_freed_memory: a freed block stays mapped (resident) instead of going back
to the kernel, the opt-out, and which CLI commands use it. (What that buys, ~1.2x on a
16-document job, is a benchmark's to show, not a test's.) Run in
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
import os
from lift_engine.host_memory import keep_freed_memory
kept = keep_freed_memory()
import torch
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: far above glibc's largest mmap threshold
before = resident()
del block
print(kept, (before - resident()) // 2**20)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc's")


def _probe(keep: str) -> tuple[bool, int]:
    """(settings applied, MiB of resident memory the process gave back when a 256 MiB block was freed)."""
    env = {**os.environ, "LIFT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    kept, released = out.stdout.split()
    return kept == "True", int(released)


@glibc_only
def test_a_freed_block_stays_mapped_for_the_next_step():
    kept, released = _probe("1")
    assert kept and released < 16, released  # kept resident, for later allocations to reuse
    default_kept, default_released = _probe("0")
    assert not default_kept and default_released >= 250, default_released  # glibc's default: unmapped at once


def test_the_cli_keeps_freed_memory_for_training_commands_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing.txt")
    assert cli.main(["tune", missing, "-o", str(tmp_path / "out")]) != 0  # fails on the missing file, after the setting
    assert calls == [1]
    assert cli.main(["ask", str(tmp_path / "no-adapter"), "-q", "a question?"]) != 0
    assert calls == [1]  # ask (and serve, whose engine is vLLM's process) leave malloc alone
    assert {"tune", "tune-service", "eval", "demo", "pre-sft"} == cli.TRAINING_COMMANDS
