"""The adapter store: tuned adapters of many tenants in one directory (docs/DESIGN.md §6.2, §7.1).

Layout (nothing else is trusted or listed):

    <root>/tenants/<tenant>/<adapter-name>/     one complete adapter directory
        lift_adapter.json                        manifest (kind, base model, …)
        adapter_config.json + adapter_model.safetensors          LoRA (PEFT layout)
        gated_memory_config.json + gated_memory.safetensors      Gated Memory

Names (tenants and adapters) are validated before any path is built, by the project's
one name rule (lift_engine/names.py, also used by the CLI and the batch job): 1–64 ASCII
letters, digits, '.', '_' or '-', starting and ending with a letter or digit. So no
'/', no '..', no absolute path, no hidden entry, no NUL or newline can ever reach the
file system; entries that do not match (temp dirs of unfinished writes, `.x.lift-partial`
work dirs, symlinks) are invisible.

Publishing is atomic (fsutil.atomic_dir: temp sibling, fsync, rename or exchange): a
reader sees the old complete adapter or the new complete one, never a mix; a new
adapter is servable as soon as `publish` returns. Each published directory gets a new
inode, so `AdapterInfo.version` changes on every publish; the server keys loaded
adapters by it and picks up a republished adapter without a restart.

    store = AdapterStore("/srv/lift")
    store.publish("acme", "contract-2024", "/tmp/tuned/contract")   # copy in, atomically
    out = store.target_dir("acme", "contract-2024")   # or write there with atomic writers
    store.list("acme") → [AdapterInfo(...)];  store.get("acme", "contract-2024") → AdapterInfo | None
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lift_engine.errors import AdapterError, LiftError
from lift_engine.fsutil import TMP_MARK, fsync_dir, fsync_tree, publish_dir
from lift_engine.names import MAX_NAME_LENGTH, InvalidName, is_valid_name, validate_name  # noqa: F401 (re-exported)

MANIFEST_FILE = "lift_adapter.json"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
GM_CONFIG_FILE = "gated_memory_config.json"
GM_WEIGHTS_FILE = "gated_memory.safetensors"
KINDS = ("lora", "gated-memory")


def detect_kind(adapter_dir: str | os.PathLike) -> str:
    """"lora" or "gated-memory", from the manifest or else from the files present."""
    path = Path(adapter_dir)
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (OSError, ValueError, AttributeError) as exc:
            raise AdapterError(f"adapter {path}: unreadable {MANIFEST_FILE}: {exc}") from exc
        if kind in KINDS:
            return kind
        if kind is not None:
            raise AdapterError(f"adapter {path}: unknown kind {kind!r} in {MANIFEST_FILE}")
    if (path / GM_CONFIG_FILE).is_file():
        return "gated-memory"
    if (path / LORA_CONFIG_FILE).is_file():
        return "lora"
    raise AdapterError(f"adapter {path}: neither {LORA_CONFIG_FILE} nor {GM_CONFIG_FILE} found")


@dataclass(frozen=True)
class AdapterInfo:
    """One published adapter. version: changes on every publish (new directory inode)."""

    tenant: str
    name: str
    path: Path
    version: str

    @property
    def kind(self) -> str:
        return detect_kind(self.path)

    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return {}


def _dir_version(st: os.stat_result) -> str:
    blob = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class AdapterStore:
    """A directory of tenants' adapters. Every method validates its names first."""

    def __init__(self, root: str | os.PathLike, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.tenants_dir = self.root / "tenants"
        if create:
            self.tenants_dir.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise LiftError(f"adapter store {self.root} does not exist (create it with AdapterStore(..., create=True) "
                            "or by publishing an adapter into it)")

    # ------------------------------------------------------------------ paths
    def tenant_dir(self, tenant: str) -> Path:
        return self.tenants_dir / validate_name(tenant, "tenant")

    def target_dir(self, tenant: str, name: str) -> Path:
        """Where adapter `name` of `tenant` lives (validated; the tenant dir is created).

        Write there only with atomic directory writers (fsutil.atomic_dir, or the core's
        save_adapter, which publishes the directory only when complete).
        """
        path = self.tenant_dir(tenant) / validate_name(name, "adapter")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ reading
    def _entry(self, tenant: str, name: str) -> AdapterInfo | None:
        path = self.tenants_dir / tenant / name
        try:
            tenant_st = os.lstat(self.tenants_dir / tenant)
            st = os.lstat(path)
        except OSError:
            return None
        # Only real directories: a symlink could point anywhere on the machine.
        if not stat.S_ISDIR(tenant_st.st_mode) or not stat.S_ISDIR(st.st_mode):
            return None
        return AdapterInfo(tenant, name, path, _dir_version(st))

    def get(self, tenant: str, name: str) -> AdapterInfo | None:
        """The adapter, or None when it does not exist (invalid names raise InvalidName)."""
        validate_name(tenant, "tenant")
        validate_name(name, "adapter")
        return self._entry(tenant, name)

    def list(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's adapters, sorted by name (unfinished writes and odd entries skipped)."""
        tdir = self.tenant_dir(tenant)
        try:
            names = sorted(os.listdir(tdir))
        except OSError:
            return []
        out = []
        for name in names:
            if not is_valid_name(name):
                continue
            info = self._entry(tenant, name)
            if info is not None:
                out.append(info)
        return out

    def tenants(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.tenants_dir))
        except OSError:
            return []
        return [n for n in names if is_valid_name(n) and (self.tenants_dir / n).is_dir()
                and not (self.tenants_dir / n).is_symlink()]

    def snapshot(self, tenant: str, name: str, dest: str | os.PathLike) -> AdapterInfo | None:
        """Copy one consistent version of the adapter to `dest` (created atomically).

        The adapter directory is pinned by an open file descriptor, so every file comes
        from the same published version even while it is being republished (a plain
        reader going by path could read one file of the old and one of the new version).
        Returns the AdapterInfo of the copied version (path = `dest`), or None when the
        adapter does not exist. Adapter directories are flat: subdirectories are skipped.
        """
        validate_name(tenant, "tenant")
        validate_name(name, "adapter")
        dest = Path(dest)
        for _ in range(10):
            if self._entry(tenant, name) is None:
                return None
            flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
            try:
                dir_fd = os.open(self.tenants_dir / tenant / name, flags)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return None  # a symlink (O_NOFOLLOW) or unreadable
            try:
                version = _dir_version(os.fstat(dir_fd))
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_MARK}", dir=dest.parent))
                try:
                    os.chmod(tmp, 0o755)
                    for entry in sorted(os.listdir(dir_fd)):
                        if entry.startswith("."):
                            continue
                        try:
                            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
                        except IsADirectoryError:
                            continue
                        with os.fdopen(fd, "rb") as src_fh:
                            if not stat.S_ISREG(os.fstat(src_fh.fileno()).st_mode):
                                continue
                            with open(tmp / entry, "wb") as dst_fh:
                                shutil.copyfileobj(src_fh, dst_fh, 1 << 20)
                    fsync_tree(tmp)
                    publish_dir(tmp, dest, replace=True)
                except FileNotFoundError:
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue  # republished and removed while copying: take the new version
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            finally:
                os.close(dir_fd)
            return AdapterInfo(tenant, name, dest, version)
        raise AdapterError(f"adapter {name!r} of tenant {tenant!r} keeps changing; try again")

    # ------------------------------------------------------------------ writing
    def publish(self, tenant: str, name: str, src_dir: str | os.PathLike, replace: bool = True) -> AdapterInfo:
        """Copy the adapter directory `src_dir` in as `name` of `tenant`, atomically.

        The source must hold a recognisable adapter (see detect_kind). replace=False
        refuses to overwrite an existing adapter (AdapterError).
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise AdapterError(f"adapter directory {src} does not exist")
        detect_kind(src)
        dst = self.target_dir(tenant, name)
        if not replace and dst.exists():
            raise AdapterError(f"adapter {name!r} of tenant {tenant!r} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{TMP_MARK}", dir=dst.parent))
        try:
            os.chmod(tmp, 0o755)
            for entry in sorted(src.iterdir()):
                if entry.name.startswith("."):
                    continue  # work dirs, temp files
                if entry.is_symlink():
                    raise AdapterError(f"adapter {src}: refusing to publish symlink {entry.name}")
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=False)
                else:
                    shutil.copy2(entry, tmp / entry.name)
            fsync_tree(tmp)
            won = publish_dir(tmp, dst, replace=replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not won:
            raise AdapterError(f"adapter {name!r} of tenant {tenant!r} already exists")
        info = self._entry(tenant, name)
        assert info is not None
        return info

    def remove(self, tenant: str, name: str) -> bool:
        """Delete an adapter; True when it existed. Running servers drop it on next use."""
        info = self.get(tenant, name)
        if info is None:
            return False
        parked = info.path.with_name(f".{name}.removed-{os.getpid()}")
        os.rename(info.path, parked)  # invisible at once, then deleted
        fsync_dir(info.path.parent)
        shutil.rmtree(parked, ignore_errors=True)
        return True
