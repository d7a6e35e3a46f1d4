"""Atomic writes publish files readable like any other file (a server may run as another user)."""
import os
import stat

import torch
from safetensors.torch import save_file

from lift_engine.fsutil import atomic_dir, atomic_write_bytes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_publish_files_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with atomic_dir(tmp_path / "adapter") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "adapter" / "weights.safetensors") == 0o644
    assert _mode(tmp_path / "adapter" / "sub" / "x.txt") == 0o644
    assert _mode(tmp_path / "adapter") == 0o755
