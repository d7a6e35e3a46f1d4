"""Documents in, answers out, end to end (issue 19): `lift serve` (vLLM on CPU + the plugin)
with a tuning pool of two actors on the session's real two-node Ray cluster
(--ray-address; one actor per node), driven over loopback. Uploads are tuned by a Ray actor, published into the store, and answered by
name with the `lift ask` prompt — checked token for token against lift's own HF path —
then deleted; a bounded load run has 3 tenants upload 6 documents at once while others
chat: no errors, no cross-tenant answers, every document settles, memory stays flat.

Skipped without vllm, openai or ray. One server for the module (~60-90 s to start).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

for _mod in ("vllm", "openai", "ray", "httpx"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is needed for the document serving tests", allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from helpers_pipeline import DOCUMENT  # noqa: E402
from helpers_tokenizer import make_tokenizer  # noqa: E402
from lift_engine.inference import context_for_window  # noqa: E402
from lift_engine.models.loading import load_base_model  # noqa: E402
from lift_engine.prompts import PromptBuilder  # noqa: E402
from lift_engine.store import AdapterStore  # noqa: E402
import vllm_harness  # noqa: E402
from test_batch_job import tiny_config  # noqa: E402

KEYS = {"acme": "sk-acme-doc", "globex": "sk-globex-doc", "initech": "sk-initech-doc"}
START_TIMEOUT = 420
NEW_TOKENS = 8
LONG = DOCUMENT * 2
SHORT = "Anouk Seldt closed the lab."
QUESTION = "Who founded Quenwick Labs?"


@pytest.fixture(scope="module")
def server(ray_runtime, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_docs")
    tokenizer = make_tokenizer()
    model_dir = vllm_harness.tiny_llama_dir(root / "model", tokenizer, logit_scale=50.0)
    store = AdapterStore(root / "store", create=True)
    tenants = root / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {t: {"api_keys": [k]} for t, k in KEYS.items()}}))
    cfg = tiny_config("lora")
    (root / "tune.json").write_text(json.dumps(cfg.to_dict()))
    port = vllm_harness.free_port()
    log = root / "server.log"
    cmd = vllm_harness.serve_command(model_dir, store.root, port, tenants, extra=[
        "--enforce-eager", "--max-loras", "4", "--max-model-len", "512", "--cache-dir", str(root / "cache"),
        "--tune-workers", "2", "--ray-address", ray_runtime, "--tune-config", str(root / "tune.json"),
        "--max-queued-documents", "4",
        "--", "--max-num-seqs", "16", "--distributed-executor-backend", "uni", "--seed", "0",
    ])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_harness.server_env(),
                                start_new_session=True)
    try:
        base = load_base_model(model_dir, progress=False)
        url = f"http://127.0.0.1:{port}"
        vllm_harness.wait_for_server(url, proc, START_TIMEOUT, log)
        yield {"root": root, "url": url, "proc": proc, "store": store, "base": base, "log": log,
               "prompts": PromptBuilder(base.tokenizer, cfg.inference.use_chat_template),
               "window": cfg.inference.window, "served": model_dir.name}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def http(server, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=300)


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=300)


def upload(server, tenant: str, text: str, name: str) -> tuple[int, dict]:
    for _ in range(600):  # the document service starts beside the server: 503 until it is up
        with http(server, tenant) as h:
            r = h.post("/v1/documents", json={"text": text, "name": name})
        if r.status_code != 503 or "starting" not in r.text:
            return r.status_code, r.json()
        time.sleep(0.5)
    raise AssertionError(r.text)


def answer_ids(server, tenant: str, model: str, question: str = QUESTION, **extra) -> list[int]:
    out = client(server, tenant).completions.create(
        model=model, prompt=question, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
    assert out.model in (model, server["served"])
    return list(out.choices[0].token_ids)


def expected_ids(server, text: str, adapter_dir: Path | None, question: str = QUESTION) -> list[int]:
    """lift's own HF path: the document middle-truncated to the window + the question, greedy."""
    base, prompts = server["base"], server["prompts"]
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = prompts.question_prompt(context_for_window(ids, server["window"], prompts), question)
    return vllm_harness.hf_greedy_ids(base, adapter_dir, prompt, NEW_TOKENS)


def test_upload_ask_and_delete_end_to_end(server):
    store = server["store"]
    status, note = upload(server, "acme", SHORT, "note")
    assert status == 201 and note["mode"] == "hybrid"
    assert answer_ids(server, "acme", "note") == expected_ids(server, SHORT, None)
    status, doc = upload(server, "globex", LONG, "report")
    assert status == 202, doc
    with pytest.raises(openai.ConflictError) as info:  # still tuning: 409 with its state
        answer_ids(server, "globex", "report")
    assert info.value.body["document"]["state"] in ("queued", "tuning")
    got = answer_ids(server, "globex", "report", wait=240)  # waits (bounded) until ready
    info = store.get("globex", "report")
    assert info is not None
    assert got == expected_ids(server, LONG, info.path)
    assert got != expected_ids(server, LONG, None)  # the adapter changed the answer: the check can fail
    chat = client(server, "globex").chat.completions.create(
        model="report", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0)
    assert chat.model == "report" and chat.choices[0].message.content is not None
    with http(server, "globex") as h:
        status = h.get(f"/v1/documents/{doc['id']}").json()
        assert status["state"] == "ready" and status["mode"] == "adapter"
        assert {m["id"] for m in h.get("/v1/models").json()["data"]} == {server["served"], "report"}
        with http(server, "acme") as other:  # another tenant: the same 404 as a missing id
            assert other.get(f"/v1/documents/{doc['id']}").status_code == 404
            assert other.delete(f"/v1/documents/{doc['id']}").status_code == 404
        with pytest.raises(openai.NotFoundError):
            answer_ids(server, "acme", "report")
        assert h.delete(f"/v1/documents/{doc['id']}").json()["deleted"] is True
    assert store.get("globex", "report") is None
    assert "lift: unloading" not in server["log"].read_text()  # taken out of vLLM too (its route answered)
    with pytest.raises(openai.NotFoundError):
        answer_ids(server, "globex", "report")


def tuning_actor_of(doc_id: str):
    """(pid, progress) of the server's tuning actor that holds `doc_id`, found by its Ray name."""
    import ray

    from lift_engine.service.pool import ACTOR_PREFIX

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not entry["name"].startswith(ACTOR_PREFIX):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            progress = ray.get(actor.progress.remote(), timeout=10)
            if doc_id in progress:
                return ray.get(actor.pid.remote(), timeout=10), progress[doc_id]
        except Exception:
            continue  # a dead actor
    return None, None


def test_sigkill_of_a_tuning_actor_mid_job_server_keeps_answering(server):
    status, doc = upload(server, "initech", LONG + " Fault.", "fault")
    assert status == 202
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pid, progress = tuning_actor_of(doc["id"])
        if progress and 2 <= progress["step"] < progress["steps"] - 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the document never got mid-job")
    os.kill(pid, signal.SIGKILL)
    for i in range(6):  # the server keeps answering meanwhile
        out = client(server, "acme").completions.create(model=server["served"], prompt=f"Hello {i}", max_tokens=4)
        assert out.choices[0].text is not None
    with http(server, "initech") as h:
        while time.monotonic() < deadline + 240:
            state = h.get(f"/v1/documents/{doc['id']}").json()
            if state["state"] in ("ready", "failed"):
                break
            time.sleep(0.5)
    assert state["state"] == "ready", state
    record = json.loads((server["store"].root / ".lift-documents" / "records" / "initech" / f"{doc['id']}.json").read_text())
    assert record["attempts"] == 2 and record["resumed_from"] >= 2  # resumed from its checkpoint on another actor
    assert record["worker"].split(":")[1] != str(pid)
    info = server["store"].get("initech", "fault")
    assert answer_ids(server, "initech", "fault") == expected_ids(server, LONG + " Fault.", info.path)


def test_load_three_tenants_upload_while_others_chat(server):
    """6 uploads at once (2 per tenant, same names across tenants) beside chat traffic."""
    store = server["store"]
    tenants = list(KEYS)
    texts = {}
    for t in tenants:
        texts[(t, "contract")] = LONG + f" Tenant {t}."  # tuned
        texts[(t, "memo")] = f"Seldt closed it, {t}."  # fits the window: hybrid
    rss_before = vllm_harness.process_tree_rss(server["proc"].pid)
    errors: list[str] = []

    def chat_round(i: int) -> str | None:
        tenant = tenants[i % 3]
        try:
            out = client(server, tenant).chat.completions.create(
                model=server["served"], messages=[{"role": "user", "content": f"Say something {i}."}],
                max_tokens=4, temperature=0)
            return None if out.choices[0].message.content is not None else "empty chat answer"
        except Exception as exc:
            return f"chat {i}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(12) as pool:
        chats = [pool.submit(chat_round, i) for i in range(18)]
        uploads = {key: pool.submit(upload, server, key[0], text, key[1]) for key, text in texts.items()}
        chats += [pool.submit(chat_round, i) for i in range(18, 36)]
        results = {key: f.result() for key, f in uploads.items()}
        errors += [e for e in (f.result() for f in chats) if e]
    assert not errors, errors
    assert all(status in (201, 202) for status, _ in results.values()), results
    ids = {key: body["id"] for key, (_, body) in results.items()}
    deadline = time.monotonic() + 400
    states = {}
    while time.monotonic() < deadline:
        for (tenant, name), doc_id in ids.items():
            with http(server, tenant) as h:
                states[(tenant, name)] = h.get(f"/v1/documents/{doc_id}").json()
        if all(s["state"] in ("ready", "failed") for s in states.values()):
            break
        time.sleep(1.0)
    assert all(s["state"] == "ready" for s in states.values()), states
    assert {key: s["mode"] for key, s in states.items()} == {
        key: "adapter" if key[1] == "contract" else "hybrid" for key in states}
    # each tenant's "contract" is answered with its own adapter (equal to HF with that adapter), others' 404
    for tenant in tenants:
        got = answer_ids(server, tenant, "contract")
        assert got == expected_ids(server, texts[(tenant, "contract")], store.get(tenant, "contract").path), tenant
        assert answer_ids(server, tenant, "memo") == expected_ids(server, texts[(tenant, "memo")], None)
        with http(server, tenant) as h:
            names = sorted(d["name"] for d in h.get("/v1/documents").json()["data"])
            assert [n for n in names if n not in ("note", "fault")] == ["contract", "memo"]  # the tests above
            for other in tenants:
                if other != tenant:
                    assert h.get(f"/v1/documents/{ids[(other, 'contract')]}").status_code == 404
    # two tuning workers, on the two nodes of the session's Ray cluster (separate raylet processes),
    # both tuned adapters that are served above
    records = [json.loads(p.read_text()) for p in (store.root / ".lift-documents" / "records").glob("*/*.json")]
    nodes = {r["worker"].split(":")[0] for r in records if r["name"] == "contract"}
    assert len(nodes) == 2, [r["worker"] for r in records]
    # memory flat: another round of the same traffic leaves the server's resident memory where it was
    rss_loaded = vllm_harness.process_tree_rss(server["proc"].pid)
    with ThreadPoolExecutor(12) as pool:
        assert not [e for e in pool.map(chat_round, range(36)) if e]
    for tenant in tenants:
        answer_ids(server, tenant, "contract")
    rss_after = vllm_harness.process_tree_rss(server["proc"].pid)
    assert rss_after < rss_loaded * 1.05 + (64 << 20), (rss_before, rss_loaded, rss_after)
