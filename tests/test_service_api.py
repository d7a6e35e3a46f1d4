"""The document API through the tenant middleware, driven as a plain ASGI app in front of a
stand-in for vLLM (as tests/test_vllm_tenants.py), with a real tuning pool on the session's
Ray runtime: upload checks (4xx, nothing stored), 429 for a flood, 409 while tuning,
`wait`, answering by name with the `lift ask` prompt (hybrid: the base model; tuned: the
document's adapter), tenant isolation and DELETE (store and engine)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, HUGE, make_tiny_model_dir
from lift_engine.config import BatchConfig
from lift_engine.models.loading import load_base_model
from lift_engine.prompts import PromptBuilder
from lift_engine.service import runtime
from lift_engine.service.config import ServiceConfig
from lift_engine.store import AdapterStore
from lift_engine.vllm_plugin.auth import Tenants, TenantMiddleware
from lift_engine.vllm_plugin.resolver import AdapterCatalog, Settings
from test_batch_job import tiny_config
from test_vllm_tenants import FakeVLLM, call

LONG = DOCUMENT * 2
SHORT = "Anouk Seldt closed the lab."
KEYS = {"acme": "k-acme", "globex": "k-globex"}


@pytest.fixture(scope="module")
def server(ray_runtime, tmp_path_factory):
    root = tmp_path_factory.mktemp("docapi")
    model_dir = make_tiny_model_dir(root / "model")
    base = load_base_model(model_dir, progress=False)
    cfg = tiny_config("lora")
    service_cfg = ServiceConfig(store=str(root / "store"), base_model=str(model_dir), tune_workers=1,
                                tune_config=cfg.to_dict(), tuning=BatchConfig(max_active=4), max_document_bytes=20_000,
                                max_queued_per_tenant=2, max_wait_s=120, served_names=["base"])
    assert runtime.start_in_background(service_cfg)
    deadline = time.monotonic() + 120
    while runtime.status()[0] == "starting" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.status() == ("up", None)
    runtime.current().pool.wait_actors(timeout=180)
    tenants = root / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {t: {"api_keys": [k]} for t, k in KEYS.items()},
                                   "admin_api_keys": ["k-admin"]}))
    settings = Settings(store=root / "store", cache=root / "cache", base_model=model_dir, fingerprint=base.fingerprint,
                        max_lora_rank=16, gated_memory=True)
    fake = FakeVLLM()
    app = TenantMiddleware(fake, tenants=Tenants.load(tenants), catalog=AdapterCatalog(settings), served_names=["base"])
    try:
        yield {"app": app, "fake": fake, "root": root, "store": AdapterStore(root / "store"), "base": base,
               "prompts": PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)}
    finally:
        runtime.stop()


def post_doc(app, key, text=None, name=None, raw: bytes | None = None):
    body = raw if raw is not None else {"text": text, **({"name": name} if name is not None else {})}
    status, data = call(app, "POST", "/v1/documents", body, key=key)
    return status, json.loads(data)


def records(root: Path) -> list[Path]:
    return sorted((root / "store" / ".lift-documents" / "records").rglob("*.*"))


def test_bad_uploads_answer_4xx_and_store_nothing(server):
    app, root = server["app"], server["root"]
    before = records(root)
    cases = [
        ({"text": ""}, 400, "empty"),
        ({"text": "  \n\t"}, 400, "empty"),
        ({"text": "abc\u0000def"}, 400, "binary"),
        ({"text": "x" * 20_001}, 413, "limit"),
        ({"text": SHORT, "name": "../../etc/passwd"}, 400, "invalid"),
        ({"text": SHORT, "name": ".hidden"}, 400, "invalid"),
        ({"text": SHORT, "name": 7}, 400, "name"),
        ({"text": SHORT, "name": "base"}, 409, "base model"),
        ({"nope": 1}, 400, "text"),
    ]
    for body, status, word in cases:
        got, data = call(app, "POST", "/v1/documents", body, key="k-acme")
        assert got == status, (body, data)
        message = json.loads(data)["error"]["message"]
        assert word in message and "Traceback" not in message
    assert call(app, "POST", "/v1/documents", b"{not json", key="k-acme")[0] == 400
    assert call(app, "POST", "/v1/documents", b"x" * (20_000 + (1 << 20) + 1), key="k-acme")[0] == 413
    assert call(app, "POST", "/v1/documents", {"text": SHORT}, key="wrong")[0] == 401
    assert call(app, "POST", "/v1/documents", {"text": SHORT}, key="k-admin")[0] == 403
    assert call(app, "GET", "/v1/documents/doc-0000000000000000", key="k-acme")[0] == 404
    assert call(app, "DELETE", "/v1/documents/..%2F..%2Fx", key="k-acme")[0] == 404
    for method, path, status in [("PUT", "/v1/documents", 405), ("GET", "/v1/documents/a/b", 404),
                                 ("POST", "/v1/documents/doc-0000000000000000", 405)]:
        got, data = call(app, method, path, {"text": SHORT}, key="k-acme")
        assert got == status and json.loads(data)["error"]["code"] == status
    assert records(root) == before


def test_hybrid_document_is_ready_at_once_and_answered_in_context(server):
    app, fake, prompts = server["app"], server["fake"], server["prompts"]
    status, doc = post_doc(app, "k-acme", SHORT, name="note")
    assert status == 201 and doc["state"] == "ready" and doc["mode"] == "hybrid"
    assert call(app, "POST", "/v1/documents", {"text": SHORT, "name": "note"}, key="k-acme")[0] == 409
    status, data = call(app, "POST", "/v1/completions", {"model": "note", "prompt": "Who closed the lab?"}, key="k-acme")
    assert status == 200
    sent = fake.seen[-1][1]
    ids = server["base"].tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    assert sent["model"] == "base" and sent["prompt"] == prompts.question_prompt(ids, "Who closed the lab?")
    call(app, "POST", "/v1/chat/completions", {"model": "note", "messages": [
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "Who closed the lab?"}]}, key="k-acme")
    sent = fake.seen[-1][1]
    assert sent["messages"][0] == {"role": "system", "content": "Be nice."}
    assert SHORT in sent["messages"][1]["content"] and "Question: Who closed the lab?" in sent["messages"][1]["content"]
    models = json.loads(call(app, "GET", "/v1/models", key="k-acme")[1])["data"]
    assert "note" in [m["id"] for m in models]
    # another tenant sees nothing of it
    assert call(app, "POST", "/v1/completions", {"model": "note", "prompt": "x"}, key="k-globex")[0] == 404
    assert call(app, "GET", f"/v1/documents/{doc['id']}", key="k-globex")[0] == 404
    assert json.loads(call(app, "GET", "/v1/documents", key="k-globex")[1])["data"] == []
    assert call(app, "DELETE", f"/v1/documents/{doc['id']}", key="k-globex")[0] == 404


def test_long_document_is_tuned_then_answered_with_its_adapter_and_deleted(server):
    app, fake, store = server["app"], server["fake"], server["store"]
    status, doc = post_doc(app, "k-globex", LONG, name="report")
    assert status == 202 and doc["state"] in ("queued", "tuning") and doc["status_url"] == f"/v1/documents/{doc['id']}"
    # a flood: the tenant's queue holds 2 documents waiting or tuning
    status, second = post_doc(app, "k-globex", LONG + " Second.", name="report2")
    assert status == 202
    status, third = post_doc(app, "k-globex", LONG + " Third.", name="report3")
    assert status == 429 and "limit" in third["error"]["message"]
    assert call(app, "POST", "/v1/documents", {"text": LONG + " Mine."}, key="k-acme")[0] == 202  # others unaffected
    # not ready yet: 409 with its state
    status, data = call(app, "POST", "/v1/completions", {"model": "report", "prompt": "Who founded the lab?"},
                        key="k-globex")
    assert status == 409, data
    err = json.loads(data)["error"]
    assert err["type"] == "DocumentNotReadyError" and err["document"]["state"] in ("queued", "tuning")
    assert call(app, "POST", "/v1/completions", {"model": "report", "prompt": "x", "wait": -1}, key="k-globex")[0] == 400
    # wait (bounded) until it is ready, then it is answered with its adapter
    status, data = call(app, "POST", "/v1/completions", {"model": "report", "prompt": "Who founded the lab?",
                                                         "wait": 120}, key="k-globex")
    assert status == 200, data
    sent = fake.seen[-1][1]
    info = store.get("globex", "report")
    assert info is not None and sent["model"] == f"globex/report@{info.version}" and "wait" not in sent
    assert json.loads(data)["model"] == "report"  # the internal name never leaks
    got = json.loads(call(app, "GET", f"/v1/documents/{doc['id']}", key="k-globex")[1])
    assert got["state"] == "ready" and got["mode"] == "adapter"
    listed = json.loads(call(app, "GET", "/v1/documents", key="k-globex")[1])["data"]
    assert [d["name"] for d in listed] == ["report", "report2"]
    # DELETE: the adapter leaves the store and vLLM is told to unload it
    status, data = call(app, "DELETE", f"/v1/documents/{doc['id']}", key="k-globex")
    assert status == 200 and json.loads(data)["deleted"] is True
    assert store.get("globex", "report") is None
    assert fake.seen[-1] == ("/v1/unload_lora_adapter", {"lora_name": f"globex/report@{info.version}"})
    assert call(app, "POST", "/v1/completions", {"model": "report", "prompt": "x"}, key="k-globex")[0] == 404
    assert call(app, "GET", f"/v1/documents/{doc['id']}", key="k-globex")[0] == 404


def call_raw(app, method: str, path: str, raw: bytes, content_type: str, key: str):
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(raw)).encode()),
               (b"authorization", f"Bearer {key}".encode())]
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers,
             "query_string": b"name=plain-note"}
    sent, pieces = [], [raw]

    async def receive():
        return {"type": "http.request", "body": pieces.pop(0), "more_body": False} if pieces else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    import asyncio

    asyncio.run(app(scope, receive, send))
    status = next(m for m in sent if m["type"] == "http.response.start")["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_multipart_and_plain_text_uploads(server):
    app = server["app"]
    boundary = "lift-test-boundary"
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nmulti-note\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"n.txt\"\r\n"
           f"Content-Type: text/plain\r\n\r\n{SHORT}\r\n--{boundary}--\r\n").encode()
    status, doc = call_raw(app, "POST", "/v1/documents", raw, f"multipart/form-data; boundary={boundary}", "k-acme")
    assert status == 201 and doc["name"] == "multi-note" and doc["mode"] == "hybrid"
    binary = raw.replace(SHORT.encode(), b"\x00\x01\x02binary")
    status, err = call_raw(app, "POST", "/v1/documents", binary.replace(b"multi-note", b"multi-2"),
                           f"multipart/form-data; boundary={boundary}", "k-acme")
    assert status == 400 and "binary" in err["error"]["message"]
    status, doc = call_raw(app, "POST", "/v1/documents", SHORT.encode(), "text/plain", "k-acme")
    assert status == 201 and doc["name"] == "plain-note"


def test_serve_passes_the_document_service_settings(tmp_path):
    from lift_engine import serve
    from lift_engine.errors import LiftError
    from test_vllm_tenants import serve_args

    model_dir = make_tiny_model_dir(tmp_path / "model")
    _, env = serve.build_command(serve_args(model=model_dir, store=tmp_path / "s", tune_workers=3,
                                            ray_address="10.0.0.1:6379", tune_adapter="gated-memory", tune_cpus=4))
    cfg = ServiceConfig.from_json(env[serve.SERVICE_ENV])
    assert (cfg.tune_workers, cfg.ray_address, cfg.lift_config().adapter) == (3, "10.0.0.1:6379", "gated-memory")
    assert cfg.actor_cpus == 4
    assert cfg.served_names == [model_dir.name] and cfg.store == str((tmp_path / "s").absolute())
    bad = tmp_path / "bad.json"
    bad.write_text('{"nonsense": 1}')
    with pytest.raises(LiftError, match="tune-config"):
        serve.build_command(serve_args(model=model_dir, store=tmp_path / "s", tune_config=str(bad)))
    with pytest.raises(LiftError, match="tune-workers"):
        serve.build_command(serve_args(model=model_dir, store=tmp_path / "s", tune_workers=-1))
    with pytest.raises(LiftError, match="tune-cpus"):
        serve.build_command(serve_args(model=model_dir, store=tmp_path / "s", tune_cpus=0))


def test_a_document_deleted_while_tuning_leaves_nothing_behind(server):
    """DELETE of a queued and of a tuning document cancels their tuning: they leave the
    actor's job (not tuned to the end), nothing is published, their work dirs go."""
    import ray

    app, store = server["app"], server["store"]
    status, queued = post_doc(app, "k-acme", LONG + " Gone at once.", name="gone-now")
    assert status == 202
    assert call(app, "DELETE", f"/v1/documents/{queued['id']}", key="k-acme")[0] == 200
    status, doc = post_doc(app, "k-acme", HUGE + " Gone.", name="gone")
    assert status == 202
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        got = json.loads(call(app, "GET", f"/v1/documents/{doc['id']}", key="k-acme")[1])
        if got["state"] == "tuning" and got.get("progress", {}).get("step", 0) >= 1:
            break
        time.sleep(0.05)
    assert got["state"] == "tuning" and got["progress"]["step"] < got["progress"]["steps"] - 3, got
    assert call(app, "DELETE", f"/v1/documents/{doc['id']}", key="k-acme")[0] == 200
    pool = runtime.current().pool
    deadline = time.monotonic() + 60
    while pool.load() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.load() == 0
    actor = pool.actors()[0]
    jobs = ray.get(ray.get_actor(f"{pool.name_prefix}-{actor['index']}").progress.remote(), timeout=30)
    assert jobs[doc["id"]]["status"] == "cancelled" and jobs[doc["id"]]["step"] < jobs[doc["id"]]["steps"]
    assert queued["id"] not in jobs or jobs[queued["id"]]["status"] == "cancelled"
    for name, d in (("gone", doc), ("gone-now", queued)):
        assert store.get("acme", name) is None
        assert call(app, "POST", "/v1/completions", {"model": name, "prompt": "x"}, key="k-acme")[0] == 404
        assert call(app, "GET", f"/v1/documents/{d['id']}", key="k-acme")[0] == 404
        work = server["root"] / "store" / ".lift-documents" / "work"
        assert not [p.name for p in work.iterdir() if d["id"] in p.name]
        assert not list((server["root"] / "store" / ".lift-documents" / "records").rglob(f"{d['id']}.*"))
