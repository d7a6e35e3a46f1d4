"""`lift tune-service` as a front end of the document service's Ray pool (issue 19), the one
queue-directory service: files dropped into QUEUE/incoming become documents of one
tenant, tuned by the pool (a file arriving while others tune joins the running job),
published into the store, and filed into done/ or failed/ (with the reason); a front end
killed with SIGKILL mid-tuning and started again resumes its half-tuned document from its
checkpoint, re-tunes nothing already done, and hands over what it had claimed but not
yet handed to the service."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, make_tiny_model_dir, wait_until
from lift_engine.config import BatchConfig
from lift_engine.cli import main
from lift_engine.service.config import ServiceConfig
from lift_engine.service.documents import DocumentService
from lift_engine.service.queue_front import QueueFrontEnd
from lift_engine.store import AdapterStore
from test_batch_job import tiny_config

LONG = DOCUMENT * 2  # ~950 tokens, far over the window (32): tuned

# The front end as `lift tune-service` runs it, in a process of its own (joining the session's Ray cluster).
RUNNER = """
import sys
from lift_engine.service.config import ServiceConfig
from lift_engine.service.documents import DocumentService
from lift_engine.service.queue_front import QueueFrontEnd
service = DocumentService(ServiceConfig.from_json(sys.argv[1]))
try:
    service.start()
    QueueFrontEnd(service, sys.argv[2], "acme", log=print).run(poll_seconds=0.1, exit_when_idle=True, max_seconds=400)
finally:
    service.close()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("queue") / "model")


def service_config(store: Path, model_dir: Path, workers: int = 1, **kw) -> ServiceConfig:
    cfg = tiny_config("lora")
    cfg.train.stage2_epochs = 3
    return ServiceConfig(store=str(store), base_model=str(model_dir), tune_workers=workers, tune_config=cfg.to_dict(),
                         tuning=BatchConfig(max_active=4), **kw)


def drop(queue: Path, name: str, text: str) -> None:
    """As a user should: write under a hidden name, then rename into incoming/."""
    tmp = queue / "incoming" / f".{name}.tmp"
    tmp.write_text(text)
    os.rename(tmp, queue / "incoming" / name)


def test_queue_directory_feeds_the_pool_admits_while_running_and_files_results(ray_runtime, model_dir, tmp_path):
    queue, store_root = tmp_path / "queue", tmp_path / "store"
    (queue / "incoming").mkdir(parents=True)
    drop(queue, "report.txt", LONG)
    drop(queue, "memo.md", "Seldt closed it.")
    (queue / "incoming" / "blob.txt").write_bytes(b"\x00\x01binary")
    (queue / "incoming" / "image.png").write_bytes(b"png")
    (queue / "incoming" / "bad name!.txt").write_text(DOCUMENT)
    (queue / "incoming" / ".partial.tmp").write_text("not yet")
    cfg = service_config(store_root, model_dir)
    service = DocumentService(cfg)
    try:
        service.start()
        front = QueueFrontEnd(service, queue, "acme")
        assert front.scan() == 2
        front.write_status()
        status = json.loads((queue / "status.json").read_text())["documents"]
        assert status["report"]["state"] in ("queued", "tuning") and status["memo"]["state"] == "ready"
        report = service.find_by_name("acme", "report")
        wait_until(lambda: (service.pool.progress(report.id) or {}).get("step", 0) >= 1, 240, "report to tune")
        drop(queue, "late.txt", LONG + " A later copy.")  # arrives while the pool's job runs
        assert front.scan() == 1
        late = service.find_by_name("acme", "late")
        # it joins the running job: both documents tune at the same time in the one actor
        wait_until(lambda: service.get("acme", late.id).state == "tuning"
                   and service.get("acme", report.id).state == "tuning", 240, "late to join the running job")
        front.run(poll_seconds=0.2, exit_when_idle=True, max_seconds=300)
        assert front.idle()
    finally:
        service.close()
    assert sorted(p.name for p in (queue / "done").iterdir()) == ["late.txt", "memo.md", "report.txt"]
    assert sorted(p.name for p in (queue / "failed").iterdir()) == [
        "bad name!.error", "bad name!.txt", "blob.error", "blob.txt", "image.error", "image.png"]
    assert "binary" in (queue / "failed" / "blob.error").read_text()
    assert "not a document" in (queue / "failed" / "image.error").read_text()
    assert "invalid" in (queue / "failed" / "bad name!.error").read_text()
    assert [p.name for p in (queue / "incoming").iterdir()] == [".partial.tmp"]
    assert list((queue / "processing").iterdir()) == []
    store = AdapterStore(store_root)
    assert [a.name for a in store.list("acme")] == ["late", "report"]  # memo fits the window: hybrid, no adapter
    status = json.loads((queue / "status.json").read_text())["documents"]
    assert status["report"]["state"] == "ready" and status["memo"]["mode"] == "hybrid"
    # a restarted front end: nothing is claimed twice, the records are the same
    service = DocumentService(cfg)
    try:
        assert service.start() == 0
        assert QueueFrontEnd(service, queue, "acme").scan() == 0
        assert sorted(r.name for r in service.list("acme")) == ["late", "memo", "report"]
    finally:
        service.close()


def test_kill9_of_the_front_end_resumes_from_checkpoints_and_tunes_nothing_twice(ray_runtime, model_dir, tmp_path):
    queue, store_root = tmp_path / "queue", tmp_path / "store"
    (queue / "incoming").mkdir(parents=True)
    drop(queue, "quick.txt", DOCUMENT[:400])  # a few steps: done before the kill
    drop(queue, "big.txt", LONG)  # many steps: half-tuned at the kill
    cfg = service_config(store_root, model_dir, ray_address=ray_runtime)
    script = tmp_path / "front.py"
    script.write_text(RUNNER)
    args = [sys.executable, str(script), cfg.to_json(), str(queue)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def docs() -> dict:
        try:
            return json.loads((queue / "status.json").read_text())["documents"]
        except (OSError, ValueError, KeyError):
            return {}

    def mid_job():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        d = docs()
        big = (d.get("big") or {}).get("progress") or {}
        return d.get("quick", {}).get("state") == "ready" and 2 <= big.get("step", 0) < big.get("steps", 0) - 3
    try:
        wait_until(mid_job, 300, "quick to be ready and big half-tuned", every=0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    at_kill = docs()
    assert at_kill["big"]["state"] == "tuning"
    store = AdapterStore(store_root)
    quick_version = store.get("acme", "quick").version
    assert store.get("acme", "big") is None
    # claimed by the killed front end, not yet handed to the service (a crash between the two)
    (queue / "processing" / "claimed.txt").write_text(LONG + " Claimed.")
    proc = subprocess.run(args, capture_output=True, timeout=500)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    final = docs()
    assert {n: d["state"] for n, d in final.items()} == {"quick": "ready", "big": "ready", "claimed": "ready"}
    assert sorted(p.name for p in (queue / "done").iterdir()) == ["big.txt", "claimed.txt", "quick.txt"]
    assert list((queue / "processing").iterdir()) == [] and list((queue / "failed").iterdir()) == []
    service = DocumentService(service_config(store_root, model_dir, workers=0))  # reads the records
    big, quick = service.find_by_name("acme", "big"), service.find_by_name("acme", "quick")
    # big resumed from its checkpoint (not from scratch) on the new actor; quick was not tuned again
    assert big.resumed_from >= at_kill["big"]["progress"]["step"] - 1 >= 1
    assert store.get("acme", "big").version == big.adapter_version
    assert store.get("acme", "quick").version == quick_version == quick.adapter_version and quick.attempts == 1
    assert (store.get("acme", "claimed").manifest()["extra"]["source"]
            == service.find_by_name("acme", "claimed").id)
    work = store_root / ".lift-documents" / "work"
    assert not [p for p in work.iterdir() if p.name.startswith("doc-") or ".lift-partial" in p.name]


def test_tune_service_command_line_errors_are_one_line(tmp_path, capsys):
    assert main(["tune-service", "--queue", str(tmp_path / "q"), "--store", str(tmp_path / "s"),
                 "--tenant", "../x", "--model", str(tmp_path)]) != 0
    assert "tenant name" in capsys.readouterr().err
