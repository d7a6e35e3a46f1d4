"""Test harness for serving: tiny models and random adapters in the real file formats
(written by lift_engine.adapters.io.save_adapter), the HF greedy reference, and starting
a `lift serve` process on a free port and waiting for it.

Nothing here imports vLLM, and nothing imports another test helper by its bare name, so
this file imports as `vllm_harness` in the tests (tests/ is on their path) and as
`tests.vllm_harness` from the repository root (e.g. `python -m bench.bench_serve`).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from lift_engine.config import make_config


def tiny_llama_dir(path: Path, tokenizer, seed: int = 0, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                   head_dim: int = 64, logit_scale: float = 1.0) -> Path:
    """Save a random Llama (head dim 64: vLLM's CPU attention wants a supported head size).

    logit_scale multiplies lm_head so that greedy decoding has clear winners (random tiny
    models otherwise have near-ties that any float reordering can flip).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(base, kind: str, out_dir: Path, seed: int, rank: int = 8, strength: float = 1.0) -> Path:
    """Write a random adapter of `kind` for `base` (a LoadedModel) with save_adapter.

    LoRA: A and B random (B is zero after a real init; random here so that the adapter
    visibly changes the output). Gated Memory: random w1..w3 and a w4 that opens the
    gates (so the memory visibly changes the output).
    """
    from lift_engine.adapters.io import save_adapter
    from lift_engine.adapters.patching import attach_adapters

    cfg = make_config("cpu", kind)
    cfg.lora.r, cfg.lora.alpha = rank, float(2 * rank)
    handle = attach_adapters(base.model, kind, cfg, num_adapters=1)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in handle.named_banks().items():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                if kind == "lora":
                    scale = strength * (0.3 if name.endswith("lora_b") else 1.0) / param.shape[-1] ** 0.5
                    param.copy_((noise * scale).to(param.dtype))
                else:
                    fan_in = param.shape[-1]
                    value = noise / fan_in ** 0.5 * strength
                    if name.endswith("w4"):
                        value = value.abs() * 2.0 + 0.5  # gate near sigmoid(3·(big − 1)): memory matters
                    param.copy_(value.to(param.dtype))
        save_adapter(handle, 0, out_dir, base=base, lift_config=cfg)
    finally:
        handle.remove()
    return out_dir


def hf_greedy(base, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """lift_engine's own HF path (load_adapter + greedy decoding with the KV cache).

    The reference for vLLM's `ignore_eos=True` greedy decoding: EOS is an ordinary token
    here too — it is chosen when it has the best logit and decoding goes on after it
    (`generate(min_new_tokens=…)` would instead *ban* EOS and pick the runner-up).

    Returns the generated ids and the smallest gap between the best and the second-best
    logit over the steps: a tiny gap is a near-tie that float reordering may flip, so a
    test compares greedy ids only where the gaps are clear.
    """
    from lift_engine.adapters.io import load_adapter

    handle = load_adapter(adapter_dir, base) if adapter_dir is not None else None
    try:
        if handle is not None:
            handle.set_indices(torch.tensor([0]))
        ids = torch.tensor([prompt_ids])
        new: list[int] = []
        gaps: list[float] = []
        past = None
        step_ids = ids
        with torch.no_grad():
            for _ in range(max_new_tokens):
                length = len(prompt_ids) + len(new)
                out = base.model(input_ids=step_ids, attention_mask=torch.ones((1, length), dtype=torch.long),
                                 past_key_values=past, use_cache=True)
                past = out.past_key_values
                top = torch.topk(out.logits[0, -1].float(), 2)
                gaps.append(float(top.values[0] - top.values[1]))
                new.append(int(top.indices[0]))
                step_ids = torch.tensor([[new[-1]]])
        return new, min(gaps)
    finally:
        if handle is not None:
            handle.remove()


def hf_greedy_ids(base, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return hf_greedy(base, adapter_dir, prompt_ids, max_new_tokens)[0]


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Poll `url`/health until it answers 200; raise (with the log's tail) if `proc` exits or time runs out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"server not ready after {timeout} s:\n{tail}")


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants (Linux /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return total


def serve_command(model_dir: Path, store: Path, port: int, tenants: Path | None = None, extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "lift_engine.serve", "--model", str(model_dir), "--store", str(store),
           "--host", "127.0.0.1", "--port", str(port)]
    if tenants is not None:
        cmd += ["--tenants", str(tenants)]
    return cmd + list(extra or [])


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env
