"""`lift tune-service` as a front end of the document service's Ray pool (issue 19): files
dropped into QUEUE/incoming become documents of one tenant, tuned by the pool, published
into the store, and filed into done/ or failed/ (with the reason); a restarted front end
picks up what it had claimed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_pipeline import DOCUMENT, make_tiny_model_dir
from lift_engine.config import BatchConfig
from lift_engine.cli import main
from lift_engine.service.config import ServiceConfig
from lift_engine.service.documents import DocumentService
from lift_engine.service.queue_front import QueueFrontEnd
from lift_engine.store import AdapterStore
from test_batch_job import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("queue") / "model")


def test_queue_directory_feeds_the_pool_and_files_results(ray_runtime, model_dir, tmp_path):
    queue, store_root = tmp_path / "queue", tmp_path / "store"
    (queue / "incoming").mkdir(parents=True)
    (queue / "incoming" / "report.txt").write_text(DOCUMENT * 2)
    (queue / "incoming" / "memo.md").write_text("Seldt closed it.")
    (queue / "incoming" / "blob.txt").write_bytes(b"\x00\x01binary")
    (queue / "incoming" / "image.png").write_bytes(b"png")
    (queue / "incoming" / ".partial.tmp").write_text("not yet")
    cfg = ServiceConfig(store=str(store_root), base_model=str(model_dir), tune_workers=1,
                        tune_config=tiny_config("lora").to_dict(), tuning=BatchConfig(max_active=4))
    service = DocumentService(cfg)
    try:
        service.start()
        front = QueueFrontEnd(service, queue, "acme")
        assert front.scan() == 2
        front.run(poll_seconds=0.2, exit_when_idle=True, max_seconds=240)
        assert front.idle()
    finally:
        service.close()
    assert sorted(p.name for p in (queue / "done").iterdir()) == ["memo.md", "report.txt"]
    assert sorted(p.name for p in (queue / "failed").iterdir()) == ["blob.error", "blob.txt", "image.error", "image.png"]
    assert "binary" in (queue / "failed" / "blob.error").read_text()
    assert [p.name for p in (queue / "incoming").iterdir()] == [".partial.tmp"]
    store = AdapterStore(store_root)
    assert [a.name for a in store.list("acme")] == ["report"]  # memo fits the window: hybrid, no adapter
    status = json.loads((queue / "status.json").read_text())["documents"]
    assert status["report"]["state"] == "ready" and status["memo"]["mode"] == "hybrid"
    # a restarted front end: nothing is claimed twice, the records are the same
    service = DocumentService(cfg)
    try:
        assert service.start() == 0
        assert QueueFrontEnd(service, queue, "acme").scan() == 0
        assert sorted(r.name for r in service.list("acme")) == ["memo", "report"]
    finally:
        service.close()


def test_tune_service_command_line_errors_are_one_line(tmp_path, capsys):
    assert main(["tune-service", "--queue", str(tmp_path / "q"), "--store", str(tmp_path / "s"),
                 "--tenant", "../x", "--model", str(tmp_path)]) != 0
    assert "tenant name" in capsys.readouterr().err
