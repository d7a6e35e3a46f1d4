"""Resumable training checkpoints (one per tuning job, beside the adapter's output dir).

A checkpoint holds the adapter slot's tensors, the optimizer state, the step reached and
a key (document hash, config fingerprint, base model fingerprint, adapter kind). It is
written atomically (temp file, fsync, rename), so a kill -9 at any moment leaves either
the previous checkpoint or the new one — never a torn file. A checkpoint whose key does
not match the job is ignored (the job starts over), never silently mixed in.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lift_engine.fsutil import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pt"
KEY_FILE = "job.json"


def partial_dir_for(out_dir: str | os.PathLike) -> Path:
    """The work dir of an unfinished job writing `out_dir`: a hidden sibling of it."""
    out = Path(out_dir).resolve()
    return out.parent / f".{out.name}.lift-partial"


def save_checkpoint(work_dir: Path, key: dict, step: int, adapter_state: dict, optimizer_state: dict) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    import io

    buffer = io.BytesIO()
    torch.save({"key": key, "step": step, "adapter": adapter_state, "optimizer": optimizer_state}, buffer)
    atomic_write_bytes(work_dir / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(work_dir: Path, key: dict) -> dict | None:
    """The saved state if it exists, loads and matches `key`; otherwise None."""
    path = work_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    return state


def remove_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


def reset_stale_work_dir(work_dir: Path, key: dict) -> None:
    """Make `work_dir` the work dir of the job `key`: one left by a different job (other
    document, config, model or trainer) is discarded, then the key is written."""
    key_file = work_dir / KEY_FILE
    if work_dir.exists():
        try:
            same = json.loads(key_file.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:
            remove_work_dir(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_file, json.dumps(key).encode())
