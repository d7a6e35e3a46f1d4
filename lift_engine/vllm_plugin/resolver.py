"""The adapter store, as vLLM's API server sees it: a catalog of validated snapshots and a
`LoRAResolver` over it (vLLM's runtime LoRA resolution, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`).

An adapter is served under an internal name that pins one published version:

    "<tenant>/<adapter>@<version>"      e.g. "acme/contract-2024@3f9a0c1d22e4"

`AdapterCatalog.prepare(tenant, adapter)` (API-server process, once per version):
  1. looks the adapter up in the store (None → NotFound),
  2. snapshots that version into the server's private cache dir (consistent even while
     it is being republished; the engine may evict and reload it at any time later, so
     it must not change under it),
  3. validates the snapshot against the served model (validate.py) — a bad adapter is
     refused here with one line, and never reaches the engine,
  4. remembers the result (and a failure, per version, so a corrupt adapter is not
     re-read on every request).

A republished adapter gets a new version, hence a new internal name, hence a fresh
resolution and load by vLLM: no restart. A superseded version's snapshot is kept for
RETIRE_AFTER_S seconds (requests in flight may still use it, and vLLM may evict and
reload it from disk meanwhile), and always for the last KEEP_VERSIONS versions.

`StoreResolver.resolve_lora(base, "<tenant>/<adapter>[@<version>]")` answers vLLM with a
LoRARequest pointing to the snapshot. The tenant middleware (auth.py) is what turns a
tenant's plain adapter name into the internal name; without it (plain `vllm serve`
with this plugin), clients address adapters as "<tenant>/<adapter>".

Settings come from the environment (set by `lift serve`), so that every process vLLM
starts sees them: LIFT_STORE, LIFT_SERVE_CACHE, LIFT_BASE_MODEL, LIFT_BASE_FINGERPRINT,
LIFT_MAX_LORA_RANK, LIFT_GATED_MEMORY.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lift_engine.errors import AdapterError
from lift_engine.store import AdapterStore, InvalidName, validate_name
from lift_engine.vllm_plugin.validate import ModelGeometry, validate_adapter_dir

logger = logging.getLogger("lift_engine.serve")

KEEP_VERSIONS = 2
RETIRE_AFTER_S = 600.0
MAX_REMEMBERED_FAILURES = 1024


class NotFound(LookupError):
    """No such adapter for this tenant (also for invalid names: names must not leak)."""


@dataclass(frozen=True)
class Settings:
    store: Path
    cache: Path
    base_model: Path
    fingerprint: str | None
    max_lora_rank: int | None
    gated_memory: bool

    @classmethod
    def from_env(cls) -> "Settings | None":
        store = os.environ.get("LIFT_STORE")
        base = os.environ.get("LIFT_BASE_MODEL")
        if not store or not base:
            return None
        cache = os.environ.get("LIFT_SERVE_CACHE") or os.path.join(tempfile.gettempdir(), f"lift-serve-{os.getuid()}")
        rank = os.environ.get("LIFT_MAX_LORA_RANK")
        return cls(
            store=Path(store), cache=Path(cache), base_model=Path(base),
            fingerprint=os.environ.get("LIFT_BASE_FINGERPRINT") or None,
            max_lora_rank=int(rank) if rank else None,
            gated_memory=os.environ.get("LIFT_GATED_MEMORY", "1") not in ("0", "", "false"),
        )


@dataclass(frozen=True)
class Prepared:
    tenant: str
    name: str
    version: str
    internal_name: str
    path: Path
    kind: str
    rank: int


def internal_name(tenant: str, name: str, version: str) -> str:
    return f"{tenant}/{name}@{version}"


def parse_internal_name(value: str) -> tuple[str, str, str | None]:
    """"t/a@v" or "t/a" → (tenant, adapter, version | None); InvalidName otherwise."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise InvalidName(f"{value!r} is not of the form <tenant>/<adapter>[@<version>]")
    tenant, rest = value.split("/")
    name, _, version = rest.partition("@")
    validate_name(tenant, "tenant")
    validate_name(name, "adapter")
    if version and not (len(version) <= 64 and version.isalnum()):
        raise InvalidName(f"bad version in {value!r}")
    return tenant, name, version or None


class AdapterCatalog:
    """Validated, snapshotted adapter versions of one server (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = AdapterStore(settings.store, create=True)
        self.geometry = ModelGeometry.from_model_dir(settings.base_model)
        settings.cache.mkdir(parents=True, exist_ok=True)
        _remove_dead_caches(settings.cache)
        self.cache = settings.cache / f"pid-{os.getpid()}"  # private: no other server swaps files in it
        self.cache.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._ready: dict[str, Prepared] = {}  # internal name → Prepared
        self._versions: dict[tuple[str, str], list[str]] = {}  # (tenant, name) → versions, oldest first
        self._retired: list[tuple[float, str]] = []  # (superseded at, internal name), oldest first
        self._failed: OrderedDict[str, str] = OrderedDict()  # internal name → error message

    def _key_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def lookup(self, internal: str) -> Prepared | None:
        with self._lock:
            return self._ready.get(internal)

    def list(self, tenant: str) -> list[str]:
        return [info.name for info in self.store.list(tenant)]

    def prepare(self, tenant: str, name: str) -> Prepared:
        """The current version of the adapter, snapshotted and validated.

        Raises NotFound (unknown tenant/adapter or invalid name) or AdapterError (corrupt
        or incompatible adapter; one line, safe to show to the tenant who owns it).
        """
        try:
            info = self.store.get(tenant, name)
        except InvalidName:
            raise NotFound(name) from None
        if info is None:
            raise NotFound(name)
        internal = internal_name(tenant, name, info.version)
        ready = self.lookup(internal)
        if ready is not None:
            return ready
        with self._key_lock((tenant, name)):
            ready = self.lookup(internal)
            if ready is not None:
                return ready
            with self._lock:
                failure = self._failed.get(internal)
            if failure is not None:
                raise AdapterError(failure)
            dest = self.cache / tenant / f"{name}@{info.version}"
            snap = self.store.snapshot(tenant, name, dest)
            if snap is None:
                raise NotFound(name)
            internal = internal_name(tenant, name, snap.version)
            if snap.path != dest:  # pragma: no cover - snapshot() always copies to dest
                raise AdapterError(f"adapter {name!r}: snapshot failed")
            final = self.cache / tenant / f"{name}@{snap.version}"
            if final != dest:  # republished between get() and snapshot(): file it under its version
                shutil.rmtree(final, ignore_errors=True)
                os.rename(dest, final)
            try:
                summary = validate_adapter_dir(
                    final, self.geometry, fingerprint=self.settings.fingerprint,
                    max_lora_rank=self.settings.max_lora_rank, allow_gated_memory=self.settings.gated_memory,
                )
            except AdapterError as exc:
                message = str(exc).replace(f"'{final.name}'", repr(name))
                shutil.rmtree(final, ignore_errors=True)
                with self._lock:
                    self._failed[internal] = message
                    while len(self._failed) > MAX_REMEMBERED_FAILURES:
                        self._failed.popitem(last=False)
                logger.warning("lift: refused adapter %s of tenant %s: %s", name, tenant, message)
                raise AdapterError(message) from None
            prepared = Prepared(tenant, name, snap.version, internal, final, summary.kind, summary.rank)
            with self._lock:
                self._ready[internal] = prepared
                versions = self._versions.setdefault((tenant, name), [])
                if versions:
                    self._retired.append((time.monotonic(), internal_name(tenant, name, versions[-1])))
                versions.append(snap.version)
                self._drop_retired()
            logger.info("lift: prepared %s adapter %s (%s)", summary.kind, internal, final)
            return prepared

    def _drop_retired(self, now: float | None = None) -> None:
        """Delete superseded snapshots older than RETIRE_AFTER_S (caller holds self._lock)."""
        now = time.monotonic() if now is None else now
        keep: list[tuple[float, str]] = []
        for since, internal in self._retired:
            tenant, name, version = parse_internal_name(internal)
            recent = self._versions.get((tenant, name), [])[-KEEP_VERSIONS:]
            if now - since < RETIRE_AFTER_S or version in recent:
                keep.append((since, internal))
                continue
            gone = self._ready.pop(internal, None)
            if gone is not None:
                shutil.rmtree(gone.path, ignore_errors=True)
        self._retired = keep

    def prepare_internal(self, value: str) -> Prepared:
        """Resolve an internal name "t/a[@v]" (the resolver's entry point)."""
        try:
            tenant, name, version = parse_internal_name(value)
        except InvalidName:
            raise NotFound(value) from None
        if version is not None:
            ready = self.lookup(internal_name(tenant, name, version))
            if ready is not None:
                return ready
        prepared = self.prepare(tenant, name)
        if version is not None and prepared.version != version:
            raise NotFound(value)  # an old version whose snapshot is gone
        return prepared


def _remove_dead_caches(root: Path) -> None:
    """Remove the snapshot dirs of servers (on this machine) that are no longer running."""
    for entry in root.glob("pid-*"):
        try:
            pid = int(entry.name[4:])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


_catalog: AdapterCatalog | None = None
_catalog_lock = threading.Lock()


def get_catalog() -> AdapterCatalog | None:
    """The process-wide catalog, built from the environment on first use (None: not serving a store)."""
    global _catalog
    with _catalog_lock:
        if _catalog is None:
            settings = Settings.from_env()
            if settings is not None:
                _catalog = AdapterCatalog(settings)
        return _catalog


def reset_catalog() -> None:
    global _catalog
    with _catalog_lock:
        _catalog = None


def make_resolver():
    """A vllm LoRAResolver over the store (imported lazily: vllm is optional for the package)."""
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            catalog = get_catalog()
            if catalog is None:
                return None
            try:
                prepared = await asyncio.to_thread(catalog.prepare_internal, lora_name)
            except NotFound:
                return None
            except AdapterError as exc:
                logger.warning("lift: cannot serve %s: %s", lora_name, exc)
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(prepared.path),
                               base_model_name=base_model_name)

    return StoreResolver()
