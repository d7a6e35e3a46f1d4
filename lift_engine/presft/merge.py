"""The shared adapter merged into the base's weights, and the model directory written.

    merge_lora(base, adapter_dir)        W ← W + (α/r) · B A   for every LoRA target, in place
    mark_pre_sft(base.model, marker)     the marker into the config (and the fingerprint)
    write_model_dir(base, out_dir, info, replace)
                                         config (with the marker) + tokenizer (chat template
                                         included) + safetensors + lift_pre_sft.json, atomically

The marker (config.json's "lift_pre_sft": base fingerprint, corpus hash, adapter hash) is
part of models.loading.model_fingerprint, so a pre-SFT'd model never shares a fingerprint
with its raw base — whatever tensors the fingerprint samples — and adapters tuned on one
are refused on the other.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lift_engine.adapters.io import PEFT_WEIGHTS, load_adapter
from lift_engine.errors import AdapterError
from lift_engine.fsutil import atomic_dir, atomic_write_json
from lift_engine.models.loading import PRE_SFT_MARKER_KEY

INFO_FILE = "lift_pre_sft.json"


@torch.no_grad()
def merge_lora(base, adapter_dir: str | Path) -> int:
    """Add the LoRA adapter at `adapter_dir` (tuned on `base`) into base.model's weights:
    W[out, in] += scaling · B[out, r] @ A[r, in], computed in fp32. Returns how many weights
    changed. The adapter is detached again; the model keeps no adapter modules."""
    handle = load_adapter(adapter_dir, base)
    try:
        if handle.kind != "lora":
            raise AdapterError(f"adapter {str(adapter_dir)!r} is a {handle.kind} adapter; only LoRA can be merged")
        merged = 0
        for bank in handle.banks.values():
            weight = bank.base_layer.weight
            delta = float(bank.scaling[0]) * (bank.lora_b[0].float() @ bank.lora_a[0].float())
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
            merged += 1
    finally:
        handle.remove()
    return merged


def adapter_sha256(adapter_dir: str | Path) -> str:
    """Hex SHA-256 of an adapter's weights file (what the merged model is made of)."""
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / PEFT_WEIGHTS, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_pre_sft(model, marker: dict) -> None:
    """Record the pre-SFT marker in model.config (saved in config.json; part of the
    model's fingerprint from now on)."""
    setattr(model.config, PRE_SFT_MARKER_KEY, dict(marker))


def write_model_dir(base, out_dir: str | Path, info: dict, replace: bool = False) -> Path:
    """Write base.model (weights as safetensors, its config) and base.tokenizer (its chat
    template included) as a Hugging Face model directory at `out_dir`, plus `info` as
    lift_pre_sft.json — filled in a temp dir beside it and renamed in at the end, so
    `out_dir` appears complete or not at all. replace: an existing `out_dir` is swapped
    out (False: raise FileExistsError and write nothing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise FileExistsError(f"{out_dir} exists")
    with atomic_dir(out_dir, replace=replace) as tmp:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
    return out_dir
