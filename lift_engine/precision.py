"""Training precision: the frozen base in bf16 while adapters train in fp32.

LIFT trains only the adapter; the base model is frozen. On a CPU with AMX (and on GPUs'
tensor cores; this path has not run on a GPU yet) a bf16 GEMM runs several times faster
than an fp32 one, so `train.compute_dtype = "bfloat16"` casts the frozen base's
*parameters* to bf16 for the duration of tuning:

    frozen Linear / embedding / norm weights    bf16 (cast once, originals kept)
    adapter banks (master weights, AdamW)       fp32, untouched
    activations                                 bf16 (norms, softmax and the loss in fp32)
    attention (sdpa, on CPU)                    bf16 on AMX (`training_attention`: the C++
                                                brgemm kernel, fp32 softmax); fp32 sdpa
                                                where it cannot run (torch's CPU flash
                                                kernels are slower in bf16 than in fp32)
    LoRA term                                   lift_engine.ops.lora_linear_rows: the fp32
                                                bank is cast per step to the activations'
                                                dtype (tiny), gradients land in fp32

`training_precision` is the one entry point the trainers use. Buffers (rotary inv_freq)
stay as they are, so positions keep fp32 precision. When the context exits, every cast
parameter gets back its original tensor, bit for bit, so the model answers exactly as
before (inference runs in the model's own dtype).

This is mixed-precision training as HF Trainer's `bf16=True` does it on CPU, except that
autocast re-casts frozen weights at every call (its cast cache keeps only leaf tensors
that require grad); casting them once is where the speed comes from.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from lift_engine.models.fused_blocks import fused_blocks
from lift_engine.models.loading import model_device

#: train.compute_dtype values and the torch dtype each means.
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `train.compute_dtype` name (ValueError for anything else)."""
    try:
        return COMPUTE_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"train.compute_dtype={name!r} is not one of {sorted(COMPUTE_DTYPES)}") from None


@contextlib.contextmanager
def frozen_base_in(model: nn.Module, dtype: torch.dtype, cache: dict | None = None) -> Iterator[int]:
    """Cast every frozen floating-point parameter of `model` to `dtype` inside the block.

    Trainable parameters (adapter banks) and buffers are left alone. `cache` (a dict the
    caller keeps) holds the cast copies between blocks, so that a job entering this once
    per step casts the weights only the first time (it then holds a copy of the base in
    `dtype`); it is keyed by parameter identity and checked against the original's
    storage, so a parameter given a new tensor is cast again (an in-place edit of a frozen
    weight is not noticed: clear the cache then). Yields the number of parameters cast; on
    exit (also on error) each gets its original tensor back.
    """
    cache = {} if cache is None else cache
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for param in model.parameters():  # tied weights are one Parameter: yielded once
                if param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                    continue
                original = param.data
                hit = cache.get(id(param))
                if hit is None or hit[0].data_ptr() != original.data_ptr() or hit[0].shape != original.shape:
                    hit = cache[id(param)] = (original, original.to(dtype))
                saved[id(param)] = (param, original)
                param.data = hit[1]
        yield len(saved)
    finally:
        for param, original in saved.values():
            param.data = original


#: HF attention implementation name under which `training_attention` registers itself.
TRAINING_ATTENTION = "lift_training_attention"

#: HF attention options the C++ kernel does not implement: calls that set them go to sdpa.
_SDPA_ONLY_KWARGS = ("sliding_window", "softcap", "position_bias", "cache", "s_aux")


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """HF's sdpa attention on fp32 copies of q/k/v; output back in q's dtype.

    On CPU, torch's flash-attention kernels are slower in bf16 than in fp32 (measured here,
    [64, 9, 204, 64] forward+backward: 286 vs 160 ms causal, 319 vs 220 ms with a mask), so
    the casts there and back pay for themselves.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _lift_attention_call(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """HF's sdpa semantics as the arguments of `ops.attention` — (q, k, v, mask [B, Lq, Lk]
    or None, causal, scale) — or None when the call needs something the op does not do
    (dropout, a float or per-head mask, sliding windows, soft-capping, attention weights)."""
    if dropout or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in _SDPA_ONLY_KWARGS):
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and kv_len > q_len:  # sdpa's top-left causal alignment: HF crops the keys (empty static cache)
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        return query, key, value, None, bool(causal), scale
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return None
    return query, key, value, attention_mask[:, 0], False, scale


def _training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """HF attention for low-precision tuning on CPU: `ops.attention` (the C++ bf16 AMX kernel)
    where a backend kernel takes the call, else sdpa on fp32 copies (`_sdpa_in_fp32`).
    Returns (attn_output [B, Lq, Hq, D], None) as HF's attention functions do."""
    from lift_engine import ops

    call = _lift_attention_call(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if call is not None and ops.resolve("attention", query.device)[0] != "reference":
        return ops.attention(*call).transpose(1, 2).contiguous(), None
    return _sdpa_in_fp32(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)


@functools.cache
def _register_training_attention() -> None:
    """Register `_training_attention` (and sdpa's mask function: bool masks) once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _training_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TRAINING_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def training_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Inside the block, a model that uses HF "sdpa" attention runs `_training_attention`
    instead (the bf16 AMX kernel, or sdpa in fp32); other implementations are left alone.
    Yields whether it switched."""
    config = getattr(model, "config", None)
    if not enabled or config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register_training_attention()
    config._attn_implementation = TRAINING_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


@contextlib.contextmanager
def training_precision(model: nn.Module, dtype: torch.dtype, cache: dict | None = None) -> Iterator[None]:
    """What tuning in `dtype` means (the one entry point for the trainers): the frozen base
    cast to it (`frozen_base_in`, with the caller's cache); for low precision on CPU, sdpa
    attention replaced by `training_attention` (the bf16 AMX kernel, else fp32 sdpa); and
    on CPU, in every dtype, the model's norms, SwiGLU MLPs and RoPE on the fused ops
    (models/fused_blocks.py; exact to rounding). On a GPU those ops have no fused kernel
    (only their pure-PyTorch reference), so the model's own modules and sdpa run."""
    on_cpu = model_device(model).type == "cpu"
    with frozen_base_in(model, dtype, cache), training_attention(model, dtype != torch.float32 and on_cpu), \
            fused_blocks(model, enabled=on_cpu):
        yield
