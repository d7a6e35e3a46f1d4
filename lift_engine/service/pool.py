"""A pool of Ray actors that tune documents (docs/DESIGN.md §7.4).

Each actor (`TuneWorker`) loads the base model once and runs one `BatchTuneJob` in a
background thread (continuous admission: a document joins the running batch at the next
step). `TuningPool.submit` hands a document to the least-loaded live actor (fewest
documents in flight); the actor tunes it, publishes the adapter atomically into the store
and returns. Every actor writes to the same work dir beside the store, so checkpoints
(`.<id>.lift-partial/`) are visible to all of them:

- an actor that dies (SIGKILL, node lost) fails its calls with RayActorError; the pool
  starts a replacement and hands each of its documents to the least-loaded live actor,
  where it resumes from its last checkpoint (at most `checkpoint_every` steps lost);
- a document finished but not yet published is published, not tuned again (the job sees
  the finished adapter in the work dir; one already published is recognised by the store
  manifest's `source`, which is the document id);
- `TuningPool.cancel(doc_id)` (a document deleted while queued or tuning) drops it from
  the pool's queue, or tells its actor to take it out of the running job (the others go
  on, exactly); it is never handed to another actor again. Whatever the timing, it is
  never left published: the actor checks the document's tombstone (records.py) before
  it publishes and right after, and removes what it published when the delete came
  in between.

Ray is imported here only: a server without tuning never needs it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lift_engine.batch.job import DocumentCancelled
from lift_engine.checkpoint import partial_dir_for, remove_work_dir
from lift_engine.errors import LiftError
from lift_engine.service.config import ServiceConfig
from lift_engine.service.records import remove_document_adapter

logger = logging.getLogger("lift_engine.service")

POLL_S = 0.25  # how often the dispatcher looks at finished calls
PROGRESS_EVERY_S = 1.0  # how often it asks the actors for progress
ACTOR_PREFIX = "lift-tune"  # actor names: "lift-tune-<random>-<index>"


class TuneWorker:
    """One Ray actor: the base model, loaded once, and one continuously running BatchTuneJob.

    Methods run in threads of the actor (it is created with max_concurrency > 1): `tune`
    blocks until its document is done, while `progress` and `pid` answer at once.
    """

    def __init__(self, base_model: str, cfg_dict: dict, work_dir: str, store: str, job_options: dict,
                 device: str | None = None, threads: int | None = None) -> None:
        import torch

        from lift_engine.batch.job import BatchTuneJob
        from lift_engine.config import LiftConfig
        from lift_engine.models.loading import load_base_model
        from lift_engine.store import AdapterStore

        if threads:  # the CPUs it reserved in Ray (ServiceConfig.actor_cpus): its tuning computes on that many
            torch.set_num_threads(threads)
        self.store = AdapterStore(store, create=True)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        base = load_base_model(base_model, progress=False, device=device)
        self.job = BatchTuneJob(base, LiftConfig.from_dict(cfg_dict), self.work_dir, log=self._log, **job_options)
        self._lock = threading.RLock()
        self._cancelled: set[str] = set()  # cancel() may run before its tune() call has submitted
        self.job.start()

    @staticmethod
    def _log(message: str) -> None:
        print(f"lift tune worker {os.getpid()}: {message}", file=sys.stderr, flush=True)

    def pid(self) -> int:
        return os.getpid()

    def threads(self) -> int:
        """The torch threads its tuning computes on."""
        import torch

        return torch.get_num_threads()

    @staticmethod
    def node() -> str:
        """The Ray node (machine) this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def progress(self) -> dict:
        return self.job.progress()

    def cancel(self, doc_id: str) -> bool:
        """Take the document out of this actor's job (its `tune` call then answers "cancelled")."""
        with self._lock:
            self._cancelled.add(doc_id)
            return self.job.cancel(doc_id)

    def tune(self, doc_id: str, text: str, tenant: str, name: str, record_path: str, tombstone: str) -> dict:
        """Tune one document and publish it as `name` of `tenant`; returns {"ok", "version"|"error", …},
        or {"ok": False, "cancelled": True} when the document was cancelled or deleted.

        record_path, tombstone: the document's record file and its tombstone (records.py);
        a document whose record is gone or whose tombstone exists is deleted: nothing of it
        is published, and an adapter published just before the delete is removed again.
        """
        def deleted() -> bool:
            return os.path.exists(tombstone) or not os.path.exists(record_path)

        with self._lock:
            if doc_id in self._cancelled or deleted():
                return self._cancelled_result(doc_id)
            published = self._already_published(doc_id, tenant, name)
            if published is not None:
                return {"ok": True, "version": published, "resumed_from": 0, "steps": 0, "pid": os.getpid(),
                        "node": self.node()}
            self.job.submit(text, doc_id, source=doc_id)
        try:
            out = self.job.collect(doc_id)
        except DocumentCancelled:
            return self._cancelled_result(doc_id)
        except Exception:  # the job says why in its progress
            info = self.job.progress().get(doc_id) or {}
            return {"ok": False, "error": info.get("error") or "tuning failed", "pid": os.getpid()}
        info = self.job.progress().get(doc_id) or {}
        if doc_id in self._cancelled or deleted():
            return self._cancelled_result(doc_id)
        published = self.store.publish(tenant, name, out)
        shutil.rmtree(out, ignore_errors=True)
        if doc_id in self._cancelled or deleted():  # deleted while it was being published
            remove_document_adapter(self.store, tenant, name, doc_id)
            return self._cancelled_result(doc_id)
        return {"ok": True, "version": published.version, "resumed_from": int(info.get("resumed_from") or 0),
                "steps": int(info.get("steps") or 0), "pid": os.getpid(), "node": self.node()}

    def _cancelled_result(self, doc_id: str) -> dict:
        """Forget a cancelled document: its finished adapter and checkpoints leave the work dir."""
        self.job.cancel(doc_id)
        remove_work_dir(self.work_dir / doc_id)
        remove_work_dir(partial_dir_for(self.work_dir / doc_id))
        with self._lock:
            self._cancelled.discard(doc_id)
        return {"ok": False, "cancelled": True, "error": "deleted", "pid": os.getpid()}

    def _already_published(self, doc_id: str, tenant: str, name: str) -> str | None:
        """The version in the store when this very document was published there already."""
        info = self.store.get(tenant, name)
        if info is None:
            return None
        if (info.manifest().get("extra") or {}).get("source") == doc_id and not (self.work_dir / doc_id).exists():
            return info.version
        return None


@dataclass
class TuneTask:
    """One document to tune. attempts: actors it was handed to so far."""

    doc_id: str
    tenant: str
    name: str
    text: str
    record_path: str
    attempts: int = 0
    tombstone: str = ""  # records.RecordStore.tombstone_path: present once the document is deleted


@dataclass
class _Actor:
    handle: object
    index: int
    inflight: set = field(default_factory=set)  # doc ids
    alive: bool = True
    pid: int | None = None


class TuningPool:
    """`tune_workers` TuneWorker actors on Ray, fed least-loaded first, with failover.

    on_done(task, result), on_failed(task, error), on_progress(doc_id, summary) and
    on_cancelled(task) are called from the pool's dispatcher thread (on_cancelled also
    from cancel(), for a task still in the pool's queue). on_cancelled comes once no actor
    works on the document any more: its work dir may then be removed.
    """

    def __init__(self, cfg: ServiceConfig, on_done: Callable, on_failed: Callable,
                 on_progress: Callable | None = None, on_cancelled: Callable | None = None) -> None:
        if cfg.tune_workers < 1:
            raise LiftError("a tuning pool needs at least one worker (--tune-workers)")
        import ray

        self.ray = ray
        self.cfg = cfg
        self.on_done, self.on_failed = on_done, on_failed
        self.on_progress = on_progress or (lambda doc_id, summary: None)
        self.on_cancelled = on_cancelled or (lambda task: None)
        self._owns_ray = False
        if not ray.is_initialized():
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=True)
            else:
                cpus = cfg.ray_num_cpus or max(1, int(round(cfg.tune_workers * cfg.actor_cpus)))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
                self._owns_ray = True
        gpus = 1 if (cfg.device or "cpu").startswith("cuda") else 0
        self._cls = ray.remote(TuneWorker)
        self._options = {"num_cpus": cfg.actor_cpus, "num_gpus": gpus, "max_concurrency": 1000, "max_restarts": 0}
        # Actors are named "<prefix>-<index>" (Ray named actors, in this driver's namespace), so
        # that operators and tests can find one with ray.util.list_named_actors(all_namespaces=True).
        self.name_prefix = f"{ACTOR_PREFIX}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._actors: list[_Actor] = []
        self._next_index = 0
        self._pending: list[TuneTask] = []
        self._calls: dict = {}  # ObjectRef → (task, actor)
        self._progress: dict[str, dict] = {}
        self._cancelled: set[str] = set()  # doc ids in flight whose cancel was sent to their actor
        self._closing = False
        for _ in range(cfg.tune_workers):
            self._spawn()
        self._thread = threading.Thread(target=self._loop, name="lift-tuning-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, task: TuneTask) -> None:
        """Queue a document; the dispatcher hands it to the least-loaded live actor."""
        with self._lock:
            self._pending.append(task)

    def cancel(self, doc_id: str) -> bool:
        """Stop tuning `doc_id`: out of the queue at once, or out of its actor's running job
        (at its next step boundary). False when the pool does not have it."""
        with self._lock:
            queued = [t for t in self._pending if t.doc_id == doc_id]
            self._pending = [t for t in self._pending if t.doc_id != doc_id]
            actors = [a for a in self._actors if a.alive and doc_id in a.inflight]
            if actors:
                self._cancelled.add(doc_id)
        for task in queued:
            self.on_cancelled(task)
        for actor in actors:
            actor.handle.cancel.remote(doc_id)  # its tune call then answers "cancelled"
        return bool(queued or actors)

    def progress(self, doc_id: str) -> dict | None:
        with self._lock:
            return self._progress.get(doc_id)

    def actors(self) -> list[dict]:
        """The live actors: index, pid (once known) and documents in flight."""
        with self._lock:
            return [{"index": a.index, "pid": a.pid, "inflight": sorted(a.inflight)} for a in self._actors if a.alive]

    def wait_actors(self, timeout: float = 120.0) -> list[int]:
        """Block until every live actor answers (model loaded); returns their pids."""
        with self._lock:
            actors = [a for a in self._actors if a.alive]
        pids = self.ray.get([a.handle.pid.remote() for a in actors], timeout=timeout)
        with self._lock:
            for actor, pid in zip(actors, pids):
                actor.pid = pid
        return pids

    def load(self) -> int:
        """Documents queued or in flight."""
        with self._lock:
            return len(self._pending) + sum(len(a.inflight) for a in self._actors if a.alive)

    def close(self, kill: bool = True) -> None:
        """Stop dispatching; kill the actors (their documents stay resumable from checkpoints)."""
        self._closing = True
        self._thread.join(timeout=10)
        with self._lock:
            actors, self._actors = self._actors, []
        if kill:
            for actor in actors:
                try:
                    self.ray.kill(actor.handle)
                except Exception:
                    pass
        if self._owns_ray:
            self.ray.shutdown()

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> _Actor:
        cfg = self.cfg
        job_options = dataclasses.asdict(cfg.tuning)
        handle = self._cls.options(name=f"{self.name_prefix}-{self._next_index}", **self._options).remote(cfg.base_model, cfg.lift_config().to_dict(), str(cfg.work_dir), cfg.store, job_options,
                                  cfg.device, max(1, int(cfg.actor_cpus)))
        actor = _Actor(handle=handle, index=self._next_index)
        self._next_index += 1
        self._actors.append(actor)
        return actor

    def _least_loaded(self) -> _Actor | None:
        live = [a for a in self._actors if a.alive]
        return min(live, key=lambda a: (len(a.inflight), a.index)) if live else None

    def _dispatch(self) -> None:
        with self._lock:
            while self._pending:
                actor = self._least_loaded()
                if actor is None:
                    return
                task = self._pending.pop(0)
                task.attempts += 1
                ref = actor.handle.tune.remote(task.doc_id, task.text, task.tenant, task.name, task.record_path,
                                               task.tombstone)
                self._calls[ref] = (task, actor)
                actor.inflight.add(task.doc_id)

    def _finish(self, ref) -> None:
        ray = self.ray
        task, actor = self._calls.pop(ref)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._actor_died(actor)
            result = None
        except Exception as exc:  # a bug in the worker: fail this document, keep the pool
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        retry = False
        with self._lock:  # one decision under the lock, so that cancel() finds the task queued or in flight
            actor.inflight.discard(task.doc_id)
            self._progress.pop(task.doc_id, None)
            cancelled = task.doc_id in self._cancelled
            self._cancelled.discard(task.doc_id)
            if result is None and not cancelled and task.attempts < self.cfg.max_attempts:
                self._pending.append(task)  # resumes from its checkpoint on the least-loaded live actor
                retry = True
        if cancelled or (result is not None and result.get("cancelled")):
            self.on_cancelled(task)
        elif retry:
            logger.warning("lift: tuning worker %s died; document %s goes to another worker", actor.index, task.doc_id)
        elif result is None:
            self.on_failed(task, f"its tuning worker died {task.attempts} times")
        elif result.get("ok"):
            self.on_done(task, result)
        else:
            self.on_failed(task, result.get("error") or "tuning failed")

    def _actor_died(self, actor: _Actor) -> None:
        with self._lock:
            if not actor.alive:
                return
            actor.alive = False
            if not self._closing:
                self._spawn()

    def _refresh_progress(self) -> None:
        with self._lock:
            busy = [a for a in self._actors if a.alive and a.inflight]
        for actor in busy:
            try:
                summary = self.ray.get(actor.handle.progress.remote(), timeout=5)
            except Exception:
                continue  # a dead actor shows up through its tune calls
            with self._lock:
                for doc_id in actor.inflight:
                    if doc_id in summary:
                        self._progress[doc_id] = summary[doc_id]
            for doc_id, info in summary.items():
                if doc_id in actor.inflight:
                    self.on_progress(doc_id, info)

    def _loop(self) -> None:
        last_progress = 0.0
        while not self._closing:
            try:
                self._dispatch()
                with self._lock:
                    refs = list(self._calls)
                if refs:
                    ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
                    for ref in ready:
                        self._finish(ref)
                else:
                    time.sleep(POLL_S)
                if time.monotonic() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    self._refresh_progress()
            except Exception:  # never let the dispatcher die
                logger.exception("lift: tuning pool dispatcher error")
                time.sleep(POLL_S)
