"""Serving without an engine: adapter validation, the store catalog, tenants and the tenant
middleware (driven as a plain ASGI app). Fast; needs no vLLM."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from helpers_pipeline import make_tiny_model_dir
from lift_engine.errors import AdapterError
from lift_engine.models.loading import load_base_model
from lift_engine.store import AdapterStore
from lift_engine.vllm_plugin.auth import Tenants, TenantMiddleware, TenantsFileError, public_model_name
from lift_engine.vllm_plugin.resolver import (AdapterCatalog, NotFound, RETIRE_AFTER_S, Settings,
                                              parse_internal_name)
from vllm_harness import make_adapter
from lift_engine.vllm_plugin.validate import ModelGeometry, validate_adapter_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_tiny_model_dir(root / "model")
    base = load_base_model(model_dir, progress=False)
    src = {}
    for i, kind in enumerate(["lora", "gated-memory", "lora"]):
        src[i] = make_adapter(base, kind, root / f"src{i}", seed=i + 1, rank=4)
    return {"root": root, "model": model_dir, "base": base, "src": src}


def settings_for(world, tmp_path, **kw) -> Settings:
    values = dict(store=tmp_path / "store", cache=tmp_path / "cache", base_model=world["model"],
                  fingerprint=world["base"].fingerprint, max_lora_rank=16, gated_memory=True)
    values.update(kw)
    return Settings(**values)


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------------- validation
def test_good_adapters_validate(world):
    geometry = ModelGeometry.from_model_dir(world["model"])
    lora = validate_adapter_dir(world["src"][0], geometry, fingerprint=world["base"].fingerprint, max_lora_rank=16)
    assert (lora.kind, lora.rank) == ("lora", 4)
    assert set(lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gm = validate_adapter_dir(world["src"][1], geometry, fingerprint=world["base"].fingerprint)
    assert gm.kind == "gated-memory"


def _corrupt(path: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how in ("nan", "shape", "extra", "missing", "int"):
        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        if how == "nan":
            tensors[name][0].view(-1)[0] = float("nan")
        elif how == "shape":
            tensors[name] = torch.zeros(3, 3)
        elif how == "extra":
            tensors[name.replace("layers.0.", "layers.99.")] = tensors[name].clone()
        elif how == "missing":
            del tensors[name]
        else:
            tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, str(weights))
    elif how == "manifest":
        (path / "lift_adapter.json").write_text("{ not json")
    elif how == "no_manifest":
        (path / "lift_adapter.json").unlink()
    elif how == "fingerprint":
        manifest = json.loads((path / "lift_adapter.json").read_text())
        manifest["base_model"]["fingerprint"] = "0" * 16
        (path / "lift_adapter.json").write_text(json.dumps(manifest))
    elif how == "config":
        cfg = next(p for p in path.iterdir() if p.name.endswith("config.json"))
        cfg.write_text("[]")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("kind", [0, 1], ids=["lora", "gated-memory"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "nan", "shape", "extra", "missing", "int", "manifest",
                                 "no_manifest", "fingerprint", "config"])
def test_corrupt_adapters_are_refused_with_one_line(world, tmp_path, kind, how):
    bad = copy_adapter(world["src"][kind], tmp_path / "bad")
    _corrupt(bad, how)
    geometry = ModelGeometry.from_model_dir(world["model"])
    with pytest.raises(AdapterError) as info:
        validate_adapter_dir(bad, geometry, fingerprint=world["base"].fingerprint, max_lora_rank=16)
    message = str(info.value)
    assert "\n" not in message and "bad" in message


def test_rank_and_architecture_limits(world):
    geometry = ModelGeometry.from_model_dir(world["model"])
    with pytest.raises(AdapterError, match="max-lora-rank"):
        validate_adapter_dir(world["src"][0], geometry, max_lora_rank=2)
    with pytest.raises(AdapterError, match="Gated Memory"):
        validate_adapter_dir(world["src"][1], geometry, allow_gated_memory=False)
    other = ModelGeometry(geometry.num_layers, geometry.hidden, geometry.intermediate * 2, geometry.num_heads,
                          geometry.num_kv_heads, geometry.head_dim)
    with pytest.raises(AdapterError, match="shape"):
        validate_adapter_dir(world["src"][0], other)


# ---------------------------------------------------------------------------------- catalog
def test_catalog_snapshots_validates_and_versions(world, tmp_path):
    settings = settings_for(world, tmp_path)
    store = AdapterStore(settings.store, create=True)
    store.publish("acme", "doc", world["src"][0])
    catalog = AdapterCatalog(settings)
    first = catalog.prepare("acme", "doc")
    assert first.kind == "lora" and first.internal_name == f"acme/doc@{first.version}"
    assert first.path.is_dir() and catalog.cache in first.path.parents
    assert catalog.prepare("acme", "doc") is first  # cached
    assert catalog.prepare_internal(first.internal_name) is first
    assert catalog.prepare_internal("acme/doc").version == first.version
    # Republished: a new version, a new internal name, the new content.
    store.publish("acme", "doc", world["src"][1])
    second = catalog.prepare("acme", "doc")
    assert second.version != first.version and second.kind == "gated-memory"
    assert catalog.lookup(first.internal_name) is first  # kept for requests in flight
    store.publish("acme", "doc", world["src"][2])
    third = catalog.prepare("acme", "doc")
    assert catalog.lookup(first.internal_name) is first  # superseded, but within the grace period
    with catalog._lock:
        catalog._drop_retired(now=time.monotonic() + RETIRE_AFTER_S + 1)
    assert catalog.lookup(first.internal_name) is None and not first.path.exists()  # retired
    assert catalog.lookup(second.internal_name) is second  # the last two versions are always kept
    assert catalog.lookup(third.internal_name) is third
    for missing in [("acme", "nope"), ("globex", "doc"), ("acme", "../acme/doc"), ("..", "doc")]:
        with pytest.raises(NotFound):
            catalog.prepare(*missing)
    for bad in ["doc", "a/b/c", "acme/doc@../x", "/abs/x", "acme/doc@" + "f" * 65]:
        with pytest.raises(NotFound):
            catalog.prepare_internal(bad)


def test_catalog_refuses_a_corrupt_adapter_once_and_remembers(world, tmp_path):
    settings = settings_for(world, tmp_path)
    store = AdapterStore(settings.store, create=True)
    bad = copy_adapter(world["src"][0], tmp_path / "bad")
    _corrupt(bad, "nan")
    store.publish("acme", "doc", bad)
    catalog = AdapterCatalog(settings)
    with pytest.raises(AdapterError, match="NaN") as info:
        catalog.prepare("acme", "doc")
    assert "'doc'" in str(info.value)
    assert list((catalog.cache / "acme").iterdir()) == []  # the bad snapshot is not kept
    with pytest.raises(AdapterError, match="NaN"):
        catalog.prepare("acme", "doc")
    store.publish("acme", "doc", world["src"][0])  # fixed by republishing: served at once
    assert catalog.prepare("acme", "doc").kind == "lora"


def test_parse_internal_name():
    assert parse_internal_name("acme/doc@abc123") == ("acme", "doc", "abc123")
    assert parse_internal_name("acme/doc") == ("acme", "doc", None)


# ---------------------------------------------------------------------------------- tenants file
def test_tenants_file(tmp_path):
    path = tmp_path / "t.json"
    digest = hashlib.sha256(b"secret-g").hexdigest()
    path.write_text(json.dumps({"tenants": {"acme": {"api_keys": ["k-a1", "k-a2"]},
                                            "globex": {"api_keys": [f"sha256:{digest}"]}},
                                "admin_api_keys": ["k-admin"]}))
    tenants = Tenants.load(path)
    assert tenants.identify("Bearer k-a1") == (True, "acme")
    assert tenants.identify("bearer k-a2") == (True, "acme")
    assert tenants.identify("Bearer secret-g") == (True, "globex")
    assert tenants.identify("Bearer k-admin") == (True, None)
    for header in [None, "", "Bearer", "Bearer ", "Basic k-a1", "Bearer k-a", "Bearer k-a1x", f"Bearer sha256:{digest}"]:
        assert tenants.identify(header) == (False, None)
    assert Tenants.load(None).identify(None) == (True, "default")


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"tenants": []}', '{"tenants": {"../x": {"api_keys": ["k"]}}}',
    '{"tenants": {"a": {"api_keys": []}}}', '{"tenants": {"a": {"api_keys": [""]}}}',
    '{"tenants": {"a": {"api_keys": ["k"]}, "b": {"api_keys": ["k"]}}}',
    '{"tenants": {"a": {"api_keys": ["sha256:zz"]}}}',
])
def test_bad_tenants_files(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TenantsFileError):
        Tenants.load(path)
    with pytest.raises(TenantsFileError, match="does not exist"):
        Tenants.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------- middleware
class FakeVLLM:
    """Stands in for vLLM's app: answers with the model it was asked for (JSON or SSE),
    named as vLLM names it in its responses — through OpenAIServingModels.model_name, which
    the plugin routes through auth.public_model_name (tests/test_vllm_punica.py checks that
    on vLLM's own class)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict | None]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body) if body else None
        self.seen.append((scope["path"], request))
        model = (request or {}).get("model")
        if isinstance(model, str):
            model = public_model_name(model)
        if request and request.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(3):
                chunk = f'data: {json.dumps({"model": model, "i": i})}\n\n'.encode()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        out = json.dumps({"model": model, "path": scope["path"], "note": f"served {model}"}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out, "more_body": False})


def call(app, method: str, path: str, body: dict | bytes | None = None, key: str | None = None):
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}
    pieces = [raw[:5], raw[5:]]  # a body that arrives in two chunks
    sent: list[dict] = []

    async def receive():
        if pieces:
            chunk = pieces.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = dict(start["headers"])
    if b"content-length" in headers:
        assert int(headers[b"content-length"]) == len(data)
    return start["status"], data


@pytest.fixture()
def served(world, tmp_path):
    settings = settings_for(world, tmp_path)
    store = AdapterStore(settings.store, create=True)
    store.publish("acme", "contract", world["src"][0])
    store.publish("acme", "book", world["src"][1])
    store.publish("globex", "secret", world["src"][2])
    store.publish("globex", "contract", world["src"][2])
    tenants_file = tmp_path / "tenants.json"
    tenants_file.write_text(json.dumps({"tenants": {"acme": {"api_keys": ["k-acme"]}, "globex": {"api_keys": ["k-globex"]}},
                                        "admin_api_keys": ["k-admin"]}))
    fake = FakeVLLM()
    catalog = AdapterCatalog(settings)
    app = TenantMiddleware(fake, tenants=Tenants.load(tenants_file), catalog=catalog, served_names=["base"])
    return app, fake, store, catalog


def test_auth_and_routes(served):
    app, fake, _, _ = served
    assert call(app, "GET", "/health")[0] == 200  # open
    assert call(app, "GET", "/v1/models")[0] == 401
    assert call(app, "GET", "/v1/models", key="wrong")[0] == 401
    assert call(app, "POST", "/v1/completions", {"model": "base"}, key="wrong")[0] == 401
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics", "/tokenize", "/v1/embeddings"]:
        assert call(app, "POST", path, {}, key="k-acme")[0] == 403, path
    assert call(app, "POST", "/v1/load_lora_adapter", {}, key="k-admin")[0] == 200  # admins reach vLLM
    status, data = call(app, "GET", "/v1/models", key="k-acme")
    assert status == 200
    assert [m["id"] for m in json.loads(data)["data"]] == ["base", "book", "contract"]
    status, data = call(app, "GET", "/v1/models", key="k-globex")
    assert [m["id"] for m in json.loads(data)["data"]] == ["base", "contract", "secret"]


def test_model_names_are_rewritten_per_tenant_and_back(served):
    app, fake, _, catalog = served
    status, data = call(app, "POST", "/v1/completions", {"model": "contract", "prompt": "x"}, key="k-acme")
    assert status == 200
    acme_internal = fake.seen[-1][1]["model"]
    assert acme_internal.startswith("acme/contract@") and catalog.lookup(acme_internal) is not None
    out = json.loads(data)
    assert out["model"] == "contract" and out["note"] == "served contract"  # the internal name never leaks
    call(app, "POST", "/v1/chat/completions", {"model": "contract", "messages": []}, key="k-globex")
    assert fake.seen[-1][1]["model"].startswith("globex/contract@")
    status, data = call(app, "POST", "/v1/completions", {"model": "book", "prompt": "x", "stream": True}, key="k-acme")
    assert status == 200 and b"acme/" not in data and data.count(b'"model": "book"') == 3
    # The base model passes through untouched; so does a request without a model.
    call(app, "POST", "/v1/completions", {"model": "base", "prompt": "x"}, key="k-acme")
    assert fake.seen[-1][1]["model"] == "base"
    call(app, "POST", "/v1/completions", {"prompt": "x"}, key="k-acme")
    assert "model" not in fake.seen[-1][1]
    # Admins may name any tenant's adapter.
    call(app, "POST", "/v1/completions", {"model": "globex/secret", "prompt": "x"}, key="k-admin")
    assert fake.seen[-1][1]["model"].startswith("globex/secret@")


def test_other_tenants_adapters_answer_404_like_missing_ones(served):
    app, fake, _, _ = served
    before = len(fake.seen)
    answers = {}
    for model in ["secret", "nope", "globex/secret", "../globex/secret", "..", "/etc/passwd", "a" * 65,
                  "secret\n", "acme/contract"]:
        status, data = call(app, "POST", "/v1/completions", {"model": model, "prompt": "x"}, key="k-acme")
        assert status == 404, model
        answers[model] = json.loads(data)["error"]
    assert answers["secret"] == {**answers["nope"], "message": answers["nope"]["message"].replace("nope", "secret")}
    assert "globex" not in json.dumps(answers["secret"])
    assert len(fake.seen) == before  # nothing reached vLLM
    assert call(app, "POST", "/v1/completions", {"model": 7, "prompt": "x"}, key="k-acme")[0] == 400


def test_corrupt_adapter_answers_422_and_others_still_work(served, tmp_path, world):
    app, fake, store, _ = served
    bad = copy_adapter(world["src"][0], tmp_path / "bad")
    _corrupt(bad, "truncated")
    store.publish("acme", "broken", bad)
    status, data = call(app, "POST", "/v1/completions", {"model": "broken", "prompt": "x"}, key="k-acme")
    assert status == 422
    message = json.loads(data)["error"]["message"]
    assert "broken" in message and "adapter_model.safetensors" in message and "\n" not in message
    assert call(app, "POST", "/v1/completions", {"model": "contract", "prompt": "x"}, key="k-acme")[0] == 200
    # A new adapter published while serving is servable at once.
    store.publish("acme", "fresh", world["src"][1])
    assert call(app, "POST", "/v1/completions", {"model": "fresh", "prompt": "x"}, key="k-acme")[0] == 200


def test_open_mode_serves_tenant_default(world, tmp_path):
    settings = settings_for(world, tmp_path)
    AdapterStore(settings.store, create=True).publish("default", "doc", world["src"][0])
    fake = FakeVLLM()
    app = TenantMiddleware(fake, tenants=Tenants.load(None), catalog=AdapterCatalog(settings), served_names=["base"])
    assert call(app, "POST", "/v1/completions", {"model": "doc", "prompt": "x"})[0] == 200
    assert fake.seen[-1][1]["model"].startswith("default/doc@")


# ---------------------------------------------------------------------------------- lift serve
def serve_args(**kw):
    import argparse

    from lift_engine import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_serve_command_line_and_environment(world, tmp_path):
    from lift_engine import serve

    store = AdapterStore(tmp_path / "store", create=True)
    store.publish("acme", "doc", world["src"][0])  # r = 4 → rank 16 (the minimum)
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"acme": {"api_keys": ["k"]}}}))
    argv, env = serve.build_command(serve_args(model=world["model"], store=store.root, tenants=tenants, port=8123))
    joined = " ".join(argv)
    slots = serve.DEFAULT_MAX_LORAS
    assert slots >= 32  # many tenants' adapters share a batch by default
    for piece in ["vllm.entrypoints.openai.api_server", f"--model {world['model'].resolve()}", "--enable-lora",
                  f"--max-loras {slots}", f"--max-cpu-loras {serve.DEFAULT_CPU_LORAS_PER_SLOT * slots}",
                  "--max-lora-rank 16", "--dtype float32", "--port 8123",
                  "--middleware lift_engine.vllm_plugin.auth.TenantMiddleware", "LiftGatedMemoryLlamaForCausalLM"]:
        assert piece in joined, piece
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert env["LIFT_STORE"] == str(store.root) and env["LIFT_TENANTS"] == str(tenants.resolve())
    assert env["LIFT_BASE_FINGERPRINT"] == world["base"].fingerprint and env["LIFT_GATED_MEMORY"] == "1"
    assert env["LIFT_SERVED_NAME"] == world["model"].name
    # A larger rank in the store raises --max-lora-rank to vLLM's next allowed value.
    cfg = json.loads((store.get("acme", "doc").path / "adapter_config.json").read_text())
    cfg["r"] = 20
    (store.target_dir("acme", "big") / "adapter_config.json").parent.mkdir(parents=True, exist_ok=True)
    (store.target_dir("acme", "big") / "adapter_config.json").write_text(json.dumps(cfg))
    argv, _ = serve.build_command(serve_args(model=world["model"], store=store.root, no_gated_memory=True))
    assert "--max-lora-rank 32" in " ".join(argv) and "LiftGatedMemory" not in " ".join(argv)
    argv, _ = serve.build_command(serve_args(model=world["model"], store=store.root, max_lora_rank=64,
                                             enforce_eager=True))
    assert "--max-lora-rank 64" in " ".join(argv) and "--enforce-eager" in argv


def test_serve_set_up_errors_are_one_line(world, tmp_path):
    from lift_engine import serve
    from lift_engine.errors import LiftError

    bad = tmp_path / "tenants.json"
    bad.write_text("{")
    with pytest.raises(TenantsFileError):
        serve.build_command(serve_args(model=world["model"], store=tmp_path / "s", tenants=bad))
    with pytest.raises(LiftError, match="config.json"):
        serve.build_command(serve_args(model=tmp_path, store=tmp_path / "s"))
    with pytest.raises(LiftError, match="max-loras"):
        serve.build_command(serve_args(model=world["model"], store=tmp_path / "s", max_loras=0))
    with pytest.raises(LiftError, match="max-cpu-loras"):
        serve.build_command(serve_args(model=world["model"], store=tmp_path / "s", max_loras=8, max_cpu_loras=4))
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert serve.main(["--store", str(tmp_path / "s")]) == 2  # "vLLM is not installed", no traceback


def test_tenants_file_edits_apply_without_restart(world, tmp_path, monkeypatch):
    settings = settings_for(world, tmp_path)
    AdapterStore(settings.store, create=True).publish("acme", "doc", world["src"][0])
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"acme": {"api_keys": ["old-key"]}}}))
    monkeypatch.setenv("LIFT_TENANTS", str(path))
    app = TenantMiddleware(FakeVLLM(), catalog=AdapterCatalog(settings), served_names=["base"])
    assert call(app, "POST", "/v1/completions", {"model": "doc"}, key="old-key")[0] == 200
    path.write_text(json.dumps({"tenants": {"acme": {"api_keys": ["new-key"]}}}))  # key rotated
    assert call(app, "POST", "/v1/completions", {"model": "doc"}, key="old-key")[0] == 401
    assert call(app, "POST", "/v1/completions", {"model": "doc"}, key="new-key")[0] == 200
    path.write_text("{ broken")  # a bad edit keeps the previous keys
    assert call(app, "POST", "/v1/completions", {"model": "doc"}, key="new-key")[0] == 200


def test_tuning_straight_into_the_store(world, tmp_path):
    """What `lift tune … --store DIR --tenant T --name N` does: save_adapter into target_dir."""
    from lift_engine.checkpoint import partial_dir_for

    store = AdapterStore(tmp_path / "store", create=True)
    out = store.target_dir("acme", "doc")
    partial_dir_for(out).mkdir()  # a tuning job's work dir beside it: invisible
    assert store.list("acme") == []
    make_adapter(world["base"], "gated-memory", out, seed=5)  # save_adapter publishes the dir atomically
    assert [i.name for i in store.list("acme")] == ["doc"] and store.get("acme", "doc").kind == "gated-memory"
    geometry = ModelGeometry.from_model_dir(world["model"])
    validate_adapter_dir(out, geometry, fingerprint=world["base"].fingerprint)
