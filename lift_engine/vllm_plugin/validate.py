"""Checks an adapter directory against the served base model before vLLM sees it.

vLLM's own loader raises deep inside the engine on a bad file; the server therefore
validates every adapter version once, in the API-server process, and refuses a bad one
with a one-line message (HTTP 422) instead of handing it to the engine:

    geometry = ModelGeometry.from_model_dir("/models/smollm2")
    summary  = validate_adapter_dir(path, geometry, fingerprint="…", max_lora_rank=64)
    summary.kind, summary.rank

Checked: the manifest (lift_engine.adapters.io.read_manifest: format version, kind,
dtype, base-model fingerprint), the adapter's own config, every tensor's name, shape,
dtype and finiteness, nothing missing, nothing unexpected. Pure Python + safetensors:
no vLLM import, so it is unit-tested without an engine.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lift_engine.config import GATE_SCALE
from lift_engine.errors import AdapterError
from lift_engine.store import GM_CONFIG_FILE, GM_WEIGHTS_FILE, LORA_CONFIG_FILE, LORA_WEIGHTS_FILE

PEFT_PREFIX = "base_model.model."
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_LORA_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_GM_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.gated_memory\.(w[1-4])")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes of a Llama-family model that adapter shapes depend on."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelGeometry":
        heads = int(config["num_attention_heads"])
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "ModelGeometry":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config = config.get("text_config", config)
        return cls.from_config(config)

    def lora_dims(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }[target]

    def gated_memory_shapes(self, hidden_factor: int = 2) -> dict[str, tuple[int, ...]]:
        h, d, s = self.num_heads, self.head_dim, math.isqrt(self.head_dim)
        e = hidden_factor * d
        return {"w1": (h, e, d), "w2": (h, d, e), "w3": (h, s, d), "w4": (h, 1, s)}


@dataclass(frozen=True)
class AdapterSummary:
    kind: str  # "lora" | "gated-memory"
    rank: int  # LoRA r; 1 for Gated Memory (vLLM needs some rank)
    targets: tuple[str, ...] = ()


def _fail(path: Path, message: str) -> AdapterError:
    return AdapterError(f"adapter {path.name!r} is unusable: {message}")


def _read_json(path: Path, adapter: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(adapter, f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(adapter, f"cannot parse {path.name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(data, dict):
        raise _fail(adapter, f"{path.name} is not a JSON object")
    return data


def _load_tensors(path: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise _fail(adapter, f"{path.name} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, …
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(adapter, f"cannot read {path.name}: {text}") from None


def _check_tensor(adapter: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise _fail(adapter, f"tensor {name} has dtype {tensor.dtype}, expected a float type")
    if tuple(tensor.shape) != tuple(shape):
        raise _fail(adapter, f"tensor {name} has shape {list(tensor.shape)}, this model needs {list(shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise _fail(adapter, f"tensor {name} holds NaN or infinite values")


def validate_adapter_dir(
    path: str | os.PathLike,
    geometry: ModelGeometry,
    fingerprint: str | None = None,
    max_lora_rank: int | None = None,
    allow_gated_memory: bool = True,
) -> AdapterSummary:
    """Validate the adapter at `path` for a model of `geometry`; raise AdapterError if unusable.

    fingerprint: the served base model's lift fingerprint (None: not checked).
    max_lora_rank: the server's --max-lora-rank (None: not checked).
    """
    from lift_engine.adapters.io import read_manifest

    path = Path(path)
    try:
        manifest = read_manifest(path)
    except AdapterError as exc:
        raise _fail(path, str(exc).replace(f"adapter {str(path)!r}", "").strip(" :") or str(exc)) from None
    kind = manifest["kind"]
    recorded = manifest["base_model"].get("fingerprint")
    if fingerprint is not None and recorded != fingerprint:
        raise _fail(path, f"it was tuned for base model {manifest['base_model'].get('id')!r} "
                          f"(fingerprint {recorded}), this server runs fingerprint {fingerprint}")
    if kind == "lora":
        return _validate_lora(path, geometry, max_lora_rank)
    if not allow_gated_memory:
        raise _fail(path, "Gated Memory adapters need the Gated Memory architecture (this server runs without it)")
    read_gated_memory_tensors(path, geometry)
    return AdapterSummary("gated-memory", 1)


def _validate_lora(path: Path, geometry: ModelGeometry, max_lora_rank: int | None) -> AdapterSummary:
    config = _read_json(path / LORA_CONFIG_FILE, path)
    if config.get("peft_type") != "LORA":
        raise _fail(path, f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise _fail(path, f"{flag} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise _fail(path, "LoRA bias is not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise _fail(path, "per-module rank/alpha patterns are not supported")
    if config.get("modules_to_save"):
        raise _fail(path, "modules_to_save is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(path, f"adapter_config.json r={r!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(path, f"adapter_config.json lora_alpha={alpha!r} is not a number")
    if max_lora_rank is not None and r > max_lora_rank:
        raise _fail(path, f"rank {r} exceeds this server's --max-lora-rank {max_lora_rank}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(ATTENTION_TARGETS + MLP_TARGETS))
    if unknown:
        raise _fail(path, f"target module {unknown[0]!r} is not supported (use {', '.join(ATTENTION_TARGETS + MLP_TARGETS)})")
    tensors = _load_tensors(path / LORA_WEIGHTS_FILE, path)
    if not tensors:
        raise _fail(path, f"{LORA_WEIGHTS_FILE} holds no tensors")
    seen: dict[tuple[int, str], set[str]] = {}
    for full_name, tensor in tensors.items():
        name = full_name[len(PEFT_PREFIX):] if full_name.startswith(PEFT_PREFIX) else None
        match = _LORA_NAME.fullmatch(name) if name else None
        if match is None:
            raise _fail(path, f"unexpected tensor {full_name!r}")
        layer, block, target, ab = int(match[1]), match[2], match[3], match[4]
        if layer >= geometry.num_layers:
            raise _fail(path, f"tensor {full_name} is for layer {layer}; this model has {geometry.num_layers} layers")
        if target not in (ATTENTION_TARGETS if block == "self_attn" else MLP_TARGETS):
            raise _fail(path, f"unexpected tensor {full_name!r}")
        if targets and target not in targets:
            raise _fail(path, f"tensor {full_name} is for {target}, which adapter_config.json does not target")
        fan_in, fan_out = geometry.lora_dims(target)
        _check_tensor(path, full_name, tensor, (r, fan_in) if ab == "A" else (fan_out, r))
        seen.setdefault((layer, target), set()).add(ab)
    for (layer, target), parts in sorted(seen.items()):
        if parts != {"A", "B"}:
            missing = ({"A", "B"} - parts).pop()
            raise _fail(path, f"layer {layer} {target} has lora_{'B' if missing == 'B' else 'A'} missing")
    return AdapterSummary("lora", r, tuple(sorted({t for _, t in seen})))


def read_gated_memory_tensors(path: Path, geometry: ModelGeometry) -> dict[str, torch.Tensor]:
    """Validate the Gated Memory adapter at `path` for `geometry` and return its tensors, read once:
    name "model.layers.{i}.self_attn.gated_memory.w{1..4}" → tensor of the shape the geometry needs.

    Raises the same clear AdapterError as `validate_adapter_dir` for anything malformed."""
    config = _read_json(path / GM_CONFIG_FILE, path)
    hidden = config.get("hidden")
    factor = hidden // geometry.head_dim if isinstance(hidden, int) and hidden % geometry.head_dim == 0 else 2
    want = {"num_layers": geometry.num_layers, "num_heads": geometry.num_heads, "head_dim": geometry.head_dim,
            "gate_dim": math.isqrt(geometry.head_dim), "hidden": 2 * geometry.head_dim}
    for key, value in want.items():
        if config.get(key) != value:
            raise _fail(path, f"{GM_CONFIG_FILE} says {key}={config.get(key)!r}, this model needs {value}")
    if config.get("gate_scale", GATE_SCALE) != GATE_SCALE:
        raise _fail(path, f"gate_scale {config.get('gate_scale')!r} is not supported ({GATE_SCALE})")
    tensors = _load_tensors(path / GM_WEIGHTS_FILE, path)
    shapes = geometry.gated_memory_shapes(factor)
    expected = {f"model.layers.{i}.self_attn.gated_memory.{w}": shape
                for i in range(geometry.num_layers) for w, shape in shapes.items()}
    for name, tensor in tensors.items():
        if name not in expected:
            raise _fail(path, f"unexpected tensor {name!r}")
        _check_tensor(path, name, tensor, expected[name])
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise _fail(path, f"tensor {missing[0]} is missing")
    return tensors
