"""The adapter store: name validation, tenant isolation, atomic publish (pure Python, fast)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from lift_engine.errors import AdapterError
from lift_engine.store import AdapterStore, InvalidName, detect_kind, validate_name


def fake_adapter(path: Path, kind: str = "lora", payload: bytes = b"w") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "lift_adapter.json").write_text(json.dumps({"kind": kind}))
    if kind == "lora":
        (path / "adapter_config.json").write_text("{}")
        (path / "adapter_model.safetensors").write_bytes(payload)
    else:
        (path / "gated_memory_config.json").write_text("{}")
        (path / "gated_memory.safetensors").write_bytes(payload)
    return path


@pytest.fixture()
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", create=True)


@pytest.mark.parametrize("name", ["a", "contract-2024", "Doc_1.v2", "x" * 64, "0"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", "-x", "x-", "a b", "x" * 65,
     "a\nb", "ok\n", "a\x00b", "caf\u00e9", "\uff41", "~", "a:b", "..a", "name.", None, 3, b"abc"],
)
def test_invalid_names(name):
    with pytest.raises(InvalidName):
        validate_name(name)


def test_publish_get_list(store, tmp_path):
    src = fake_adapter(tmp_path / "src")
    info = store.publish("acme", "contract", src)
    assert info.path == store.root / "tenants" / "acme" / "contract"
    assert info.kind == "lora"
    assert (info.path / "adapter_model.safetensors").read_bytes() == b"w"
    assert store.get("acme", "contract") == info
    assert [i.name for i in store.list("acme")] == ["contract"]
    assert store.tenants() == ["acme"]
    gm = store.publish("acme", "book", fake_adapter(tmp_path / "gm", "gated-memory"))
    assert gm.kind == "gated-memory"
    assert [i.name for i in store.list("acme")] == ["book", "contract"]


def test_tenants_are_isolated(store, tmp_path):
    store.publish("acme", "contract", fake_adapter(tmp_path / "a", payload=b"acme"))
    store.publish("globex", "contract", fake_adapter(tmp_path / "b", payload=b"globex"))
    store.publish("globex", "secret", fake_adapter(tmp_path / "c"))
    assert store.get("acme", "secret") is None
    assert [i.name for i in store.list("acme")] == ["contract"]
    assert (store.get("acme", "contract").path / "adapter_model.safetensors").read_bytes() == b"acme"
    assert (store.get("globex", "contract").path / "adapter_model.safetensors").read_bytes() == b"globex"
    assert store.list("nobody") == []


@pytest.mark.parametrize("tenant, name", [("acme", "../globex/secret"), ("../tenants/globex", "secret"),
                                          ("acme", "/abs"), ("acme", ".."), ("..", "acme")])
def test_path_tricks_are_refused_everywhere(store, tmp_path, tenant, name):
    store.publish("globex", "secret", fake_adapter(tmp_path / "s"))
    with pytest.raises(InvalidName):
        store.get(tenant, name)
    with pytest.raises(InvalidName):
        store.publish(tenant, name, fake_adapter(tmp_path / "x"))
    with pytest.raises(InvalidName):
        store.target_dir(tenant, name)
    assert not (store.root.parent / "abs").exists()


def test_symlinks_and_hidden_entries_are_invisible(store, tmp_path):
    outside = fake_adapter(tmp_path / "outside")
    tdir = store.tenant_dir("acme")
    tdir.mkdir(parents=True)
    os.symlink(outside, tdir / "linked")
    fake_adapter(tdir / ".contract.tmp-123")  # an unfinished write
    fake_adapter(tdir / ".contract.lift-partial")  # a tuning job's work dir
    os.symlink(store.tenants_dir / "acme", store.tenants_dir / "alias")  # a symlinked tenant
    assert store.get("acme", "linked") is None
    assert store.list("acme") == []
    assert store.get("alias", "linked") is None
    assert store.tenants() == ["acme"]


def test_republish_changes_version_and_content(store, tmp_path):
    first = store.publish("acme", "doc", fake_adapter(tmp_path / "v1", payload=b"one"))
    second = store.publish("acme", "doc", fake_adapter(tmp_path / "v2", payload=b"two"))
    assert first.version != second.version
    assert (second.path / "adapter_model.safetensors").read_bytes() == b"two"
    assert [p.name for p in store.tenant_dir("acme").iterdir()] == ["doc"]  # no temp leftovers
    with pytest.raises(AdapterError, match="already exists"):
        store.publish("acme", "doc", fake_adapter(tmp_path / "v3"), replace=False)


def test_publish_refuses_non_adapters_and_leaves_nothing(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError):
        store.publish("acme", "doc", empty)
    with pytest.raises(AdapterError):
        store.publish("acme", "doc", tmp_path / "missing")
    assert store.list("acme") == []
    assert [p.name for p in store.tenant_dir("acme").iterdir()] == [] if store.tenant_dir("acme").exists() else True


def test_publish_refuses_symlinks_inside_the_adapter(store, tmp_path):
    src = fake_adapter(tmp_path / "src")
    os.symlink("/etc/passwd", src / "extra.txt")
    with pytest.raises(AdapterError, match="symlink"):
        store.publish("acme", "doc", src)
    assert store.get("acme", "doc") is None
    assert list(store.tenant_dir("acme").iterdir()) == []


def test_snapshots_see_old_or_new_never_a_mix(store, tmp_path):
    """Republishing concurrently with snapshots: each snapshot holds exactly one version.

    (Reading files by path instead does mix versions here: that is why the server serves
    snapshots.)
    """
    srcs = []
    for i in range(2):
        src = fake_adapter(tmp_path / f"v{i}", payload=str(i).encode() * 100_000)
        (src / "adapter_config.json").write_text(str(i))
        srcs.append(src)
    store.publish("acme", "doc", srcs[0])
    stop = threading.Event()
    errors: list[str] = []
    seen: set[str] = set()
    count = [0]

    def reader():
        while not stop.is_set():
            snap = store.snapshot("acme", "doc", tmp_path / "snaps" / f"s{count[0]}")
            count[0] += 1
            if snap is None:
                errors.append("vanished")
                continue
            a = (snap.path / "adapter_config.json").read_text()
            b = (snap.path / "adapter_model.safetensors").read_text()
            seen.add(a)
            if b != a * 100_000:
                errors.append(f"mixed {a} {b[:3]}")

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(40):
        store.publish("acme", "doc", srcs[i % 2])
    stop.set()
    thread.join()
    assert errors == []
    assert count[0] > 1
    assert store.snapshot("acme", "missing", tmp_path / "x") is None
    assert not (tmp_path / "x").exists()


def test_remove(store, tmp_path):
    store.publish("acme", "doc", fake_adapter(tmp_path / "a"))
    assert store.remove("acme", "doc") is True
    assert store.get("acme", "doc") is None
    assert store.remove("acme", "doc") is False
    assert list(store.tenant_dir("acme").iterdir()) == []


def test_detect_kind(tmp_path):
    assert detect_kind(fake_adapter(tmp_path / "l")) == "lora"
    bad = fake_adapter(tmp_path / "b")
    (bad / "lift_adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="unreadable"):
        detect_kind(bad)
    (bad / "lift_adapter.json").write_text(json.dumps({"kind": "prefix-tuning"}))
    with pytest.raises(AdapterError, match="unknown kind"):
        detect_kind(bad)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        AdapterStore(tmp_path / "nope")
