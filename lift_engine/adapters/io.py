"""Adapter files on disk (docs/DESIGN.md §6).

An adapter directory holds one adapter (one slot of a bank):

    lift_adapter.json            manifest: format_version, kind, base_model {id, fingerprint},
                                 dtype, lift_config (LiftConfig.to_dict()), extra
    LoRA (PEFT layout — loads unchanged in peft and vLLM):
      adapter_config.json        peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
                                 target_modules, base_model_name_or_path, …
      adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
                                 base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight [out, r] …
    Gated Memory:
      gated_memory_config.json   format_version, base_model, base_model_fingerprint, num_layers,
                                 num_heads, head_dim, gate_dim, hidden, gate_scale, dtype
      gated_memory.safetensors   model.layers.{i}.self_attn.gated_memory.{w1,w2,w3,w4}
                                 [H, 2d, d], [H, d, 2d], [H, s, d], [H, 1, s]

save_adapter writes the whole directory atomically (temp dir beside it, fsync, swap in);
load_adapter validates everything before touching the model and raises AdapterError
with one line on any problem; load_adapters puts several adapters of one kind into one
bank (slot i = the i-th directory), through the same checks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lift_engine.adapters.patching import AdapterHandle, attach_adapters, decoder_layers, head_geometry
from lift_engine.config import ADAPTER_KINDS, GATE_SCALE, LiftConfig
from lift_engine.errors import AdapterError
from lift_engine.fsutil import atomic_dir

FORMAT_VERSION = 1
MANIFEST = "lift_adapter.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
GM_CONFIG = "gated_memory_config.json"
GM_WEIGHTS = "gated_memory.safetensors"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _peft_config(handle: AdapterHandle, slot: int, base_id: str) -> dict:
    meta = handle.slot_lora_config(slot)
    targets = sorted({path.rsplit(".", 1)[-1] for path in handle.banks})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_id,
        "r": meta["r"],
        "lora_alpha": meta["alpha"],
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _gated_memory_config(handle: AdapterHandle, base: Any, dtype: torch.dtype) -> dict:
    bank = next(iter(handle.banks.values()))
    return {
        "format_version": FORMAT_VERSION,
        "base_model": base.model_id,
        "base_model_fingerprint": base.fingerprint,
        "num_layers": len(handle.banks),
        "num_heads": bank.num_heads,
        "head_dim": bank.head_dim,
        "gate_dim": bank.gate_dim,
        "hidden": bank.hidden,
        "gate_scale": GATE_SCALE,
        "dtype": _dtype_name(dtype),
    }


def save_adapter(
    handle: AdapterHandle,
    slot: int,
    out_dir: str | os.PathLike,
    *,
    base: Any,
    lift_config: LiftConfig,
    extra: dict | None = None,
) -> Path:
    """Write slot `slot` of `handle` as an adapter directory at `out_dir` (atomically).

    base: the LoadedModel the handle is attached to (its id and fingerprint are recorded).
    lift_config: the run's config (recorded in the manifest). extra: any JSON-able metadata.
    An existing `out_dir` is replaced as a whole. Returns the directory path.
    """
    if handle.removed:
        raise ValueError("cannot save from a removed adapter handle")
    tensors = handle.state_for_slot(slot)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"adapter tensors have mixed dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": handle.kind,
        "base_model": {"id": base.model_id, "fingerprint": base.fingerprint},
        "dtype": _dtype_name(dtype),
        "lift_config": lift_config.to_dict(),
        "extra": extra or {},
    }
    json.dumps(manifest, default=str)  # fail before writing anything if extra is not serialisable
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replace=True) as tmp:
        if handle.kind == "lora":
            _write_json(tmp / PEFT_CONFIG, _peft_config(handle, slot, base.model_id))
            save_file({PEFT_PREFIX + k: v for k, v in tensors.items()}, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        else:
            _write_json(tmp / GM_CONFIG, _gated_memory_config(handle, base, dtype))
            save_file(tensors, str(tmp / GM_WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / MANIFEST, manifest)
    return out_dir


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise AdapterError(f"{what}: {path.name} is missing in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{what}: cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{what}: {path} is not a JSON object")
    return data


def read_manifest(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's lift_adapter.json, checked for a known format version and kind."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise AdapterError(f"adapter {str(adapter_dir)!r} does not exist")
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter {str(adapter_dir)!r} is not a directory")
    manifest = _read_json(adapter_dir / MANIFEST, f"not a lift_engine adapter {str(adapter_dir)!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(f"adapter {str(adapter_dir)!r} has unsupported format_version {version!r}")
    if manifest.get("kind") not in ADAPTER_KINDS:
        raise AdapterError(f"adapter {str(adapter_dir)!r} has unknown kind {manifest.get('kind')!r}")
    base = manifest.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise AdapterError(f"adapter {str(adapter_dir)!r}: manifest lacks base_model.fingerprint")
    if manifest.get("dtype") not in _DTYPES:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: unsupported dtype {manifest.get('dtype')!r}")
    return manifest


def _load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"adapter {str(path.parent)!r}: {path.name} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"adapter {str(path.parent)!r}: cannot read {name}: {first}") from exc


def _lora_tensors(adapter_dir: Path, handle: AdapterHandle) -> tuple[dict, float, bool]:
    config = _read_json(adapter_dir / PEFT_CONFIG, f"adapter {str(adapter_dir)!r}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {str(adapter_dir)!r}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise AdapterError(f"adapter {str(adapter_dir)!r}: {flag} adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"adapter {str(adapter_dir)!r}: per-module rank/alpha patterns are not supported")
    alpha, r = config.get("lora_alpha"), config.get("r")
    if not isinstance(alpha, (int, float)) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: adapter_config.json needs a positive integer r and a number lora_alpha")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    handle_targets = {path.rsplit(".", 1)[-1] for path in handle.banks}
    extra_targets = sorted(set(targets) - handle_targets)
    if extra_targets:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} targets {extra_targets[0]!r}, which has no LoRA in this model "
            f"(LoRA on {sorted(handle_targets)})"
        )
    raw = _load_tensors(adapter_dir / PEFT_WEIGHTS, PEFT_WEIGHTS)
    tensors = {}
    for name, tensor in raw.items():
        if not name.startswith(PEFT_PREFIX):
            raise AdapterError(f"adapter {str(adapter_dir)!r}: unexpected tensor name {name!r}")
        tensors[name[len(PEFT_PREFIX):]] = tensor
    ranks = {int(t.shape[0]) for n, t in tensors.items() if n.endswith(".lora_A.weight") and t.dim() == 2}
    if ranks and ranks != {r}:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: tensors have rank {sorted(ranks)}, config says r={r}")
    return tensors, float(alpha), set(targets) == handle_targets


def _gated_memory_tensors(adapter_dir: Path, handle: AdapterHandle, base: Any) -> dict:
    config = _read_json(adapter_dir / GM_CONFIG, f"adapter {str(adapter_dir)!r}")
    heads, dim = head_geometry(handle.model)
    bank = next(iter(handle.banks.values()))
    want = {
        "num_layers": len(decoder_layers(handle.model)),
        "num_heads": heads,
        "head_dim": dim,
        "gate_dim": bank.gate_dim,
        "hidden": bank.hidden,
    }
    for key, value in want.items():
        if config.get(key) != value:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r}: {GM_CONFIG} says {key}={config.get(key)!r}, this model needs {value}"
            )
    return _load_tensors(adapter_dir / GM_WEIGHTS, GM_WEIGHTS)


def _checked_manifest(adapter_dir: Path, base: Any) -> dict:
    """read_manifest, plus: the adapter was tuned for `base` (same fingerprint)."""
    manifest = read_manifest(adapter_dir)
    recorded = manifest["base_model"]
    if recorded["fingerprint"] != base.fingerprint:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} was tuned for base model {recorded.get('id')!r} "
            f"(fingerprint {recorded['fingerprint']}), but the loaded base model is {base.model_id!r} "
            f"(fingerprint {base.fingerprint})"
        )
    return manifest


def _bank_config(adapter_dir: Path, manifest: dict) -> LiftConfig:
    """The LiftConfig to attach a bank that this adapter fits: its manifest's lift_config,
    and for LoRA the rank, targets and alpha of its PEFT config."""
    try:
        cfg = LiftConfig.from_dict(manifest.get("lift_config") or {})
    except Exception as exc:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: invalid lift_config in {MANIFEST}: {exc}") from exc
    if manifest["kind"] == "lora":
        # Size the bank from the PEFT config, so that the adapter always fits.
        peft = _read_json(adapter_dir / PEFT_CONFIG, f"adapter {str(adapter_dir)!r}")
        targets = peft.get("target_modules") or list(cfg.lora.targets)
        targets = [targets] if isinstance(targets, str) else list(targets)
        r = peft.get("r") if isinstance(peft.get("r"), int) and peft.get("r") > 0 else cfg.lora.r
        cfg.lora.r, cfg.lora.targets = r, tuple(targets)
        if isinstance(peft.get("lora_alpha"), (int, float)):
            cfg.lora.alpha = float(peft["lora_alpha"])
    return cfg


def _load_slot_from(adapter_dir: Path, manifest: dict, base: Any, handle: AdapterHandle, slot: int) -> None:
    """Validate the adapter's files against `handle` and copy them into `slot`."""
    dtype = _DTYPES[manifest["dtype"]]
    if manifest["kind"] == "lora":
        tensors, alpha, complete = _lora_tensors(adapter_dir, handle)
    else:
        tensors, alpha, complete = _gated_memory_tensors(adapter_dir, handle, base), None, True
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r}: tensor {name!r} is {_dtype_name(tensor.dtype)}, manifest says {manifest['dtype']}"
            )
    try:
        handle.load_slot(slot, tensors, alpha=alpha, strict=complete)
    except AdapterError as exc:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: {exc}") from exc


def load_adapter(
    adapter_dir: str | os.PathLike,
    base: Any,
    handle: AdapterHandle | None = None,
    slot: int = 0,
) -> AdapterHandle:
    """Load the adapter at `adapter_dir` into `handle`'s slot `slot`.

    base: the LoadedModel; its fingerprint must match the one the adapter was tuned for.
    handle: an existing handle of the same kind on base.model; None → attach a new
    one-slot handle (kind and sizes from the adapter's manifest) and load into slot 0
    (= load_adapters([adapter_dir], base)).
    Returns the handle. Raises AdapterError (one line); the model is left as it was.
    """
    if handle is None:
        return load_adapters([adapter_dir], base)
    adapter_dir = Path(adapter_dir)
    manifest = _checked_manifest(adapter_dir, base)
    if handle.kind != manifest["kind"]:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} is a {manifest['kind']} adapter; the handle holds {handle.kind} adapters"
        )
    _load_slot_from(adapter_dir, manifest, base, handle, slot)
    return handle


def load_adapters(adapter_dirs: list[str | os.PathLike], base: Any) -> AdapterHandle:
    """Attach one bank holding every adapter of `adapter_dirs`: slot i = adapter_dirs[i].

    So that their questions can share a batch (lift_engine.inference.greedy_answers).
    All must be of one kind and tuned for `base`. The bank's config is the first
    adapter's lift_config; for LoRA its rank is the largest of the adapters' ranks and
    its targets the union of theirs: each slot keeps its own rank and alpha (smaller
    ranks are zero-padded, modules an adapter does not target stay zero for it), so every
    slot computes what its adapter loaded alone computes.
    Every manifest is checked before the model is touched; raises AdapterError (one line,
    naming the adapter); on any error the model is left as it was.
    """
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise AdapterError("no adapters to load")
    manifests = [_checked_manifest(d, base) for d in dirs]
    kind = manifests[0]["kind"]
    for d, manifest in zip(dirs, manifests):
        if manifest["kind"] != kind:
            raise AdapterError(
                f"adapter {str(d)!r} is a {manifest['kind']} adapter but {str(dirs[0])!r} is a {kind} adapter; "
                "one bank holds one kind"
            )
    configs = [_bank_config(d, m) for d, m in zip(dirs, manifests)]
    cfg = configs[0]
    if kind == "lora":
        cfg.lora.r = max(c.lora.r for c in configs)
        cfg.lora.targets = tuple(dict.fromkeys(t for c in configs for t in c.lora.targets))
    handle = attach_adapters(base.model, kind, cfg, num_adapters=len(dirs))
    try:
        for slot, (d, manifest) in enumerate(zip(dirs, manifests)):
            _load_slot_from(d, manifest, base, handle, slot)
    except BaseException:
        handle.remove()
        raise
    return handle
