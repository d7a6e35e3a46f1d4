"""The tuning engine: one adapter bank, mixed batches, continuous admission (docs/DESIGN.md §4).

Every tuning in lift_engine runs here: `lift tune` on one document is a job of one
(pipeline.tune_document), several documents, `lift eval` and `lift demo` share one job
each, and every tuning actor of the document service (service/pool.py: `lift serve` and
`lift tune-service`) runs one.

    job = BatchTuneJob(base, cfg, out_root, BatchConfig(max_active=16))
    job.submit(text, name="contract-a")          # any time, from any thread
    job.run()                                    # or job.start() … job.collect(name)
    job.progress()                               # {name: {status, step, steps, loss, …}}
    job.cancel("contract-a")                     # drop one document; the others go on exactly

Each document gets a slot of the bank while it trains. A global step takes the next
`batch_size` planned samples of EVERY active document — the same chunks, in the same
order, whatever else is in the job — runs them through the model together (one forward
and backward per micro-batch; one micro-batch unless the memory plan splits the step),
normalises each document's loss over its own loss tokens in the step, clips per slot and
steps AdamW for exactly the active slots (SlotAdamW: per-slot step counts, no decay or
moment update for absent slots). So a document's adapter is the one it would get alone,
to float tolerance, whatever else shares its steps, joins or leaves.

A job entry need not be one document: `submit_prepared(name, PreparedSource(...))` trains
any sample source in one slot as one entry, with the same steps, checkpoints, resume and
publication (pre-LIFT SFT trains one shared adapter on a whole corpus this way,
lift_engine.presft).

A document joins at the next step after it is submitted (if a slot is free); when its
last step is done its adapter is written atomically to out_root/<name>/ and its slot is
freed for the next document, without stopping the others. Every `checkpoint_every` steps
each active document's slot and optimizer state are checkpointed atomically in its own
work dir (`.<name>.lift-partial/` beside the adapter), so a job killed with kill -9 and
started again resumes every document from its last checkpoint, and an adapter directory
only ever appears complete.

`cancel(name)` takes one document out of the job: a queued one at once, a training one at
the end of the step in flight (its slot is freed as if it had finished, so the others'
steps, optimizer states and adapters are unchanged); its work dir and checkpoints are
removed and it is never published.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lift_engine.adapters.io import read_manifest, save_adapter
from lift_engine.adapters.patching import attach_adapters
from lift_engine.batch.estimate import format_duration, plan_summary
from lift_engine.batch.forward import pad_token_id, plain_token_loss
from lift_engine.batch.optim import SlotAdamW, clip_per_slot
from lift_engine.batch.planner import MemoryPlanner, pass_limits
from lift_engine.batch.prefix import prefix_shared_token_loss, shared_context_refs
from lift_engine.batch.teacher import stored_teacher_answers, teacher_answers
from lift_engine.checkpoint import (load_checkpoint, partial_dir_for, remove_work_dir, reset_stale_work_dir,
                                    save_checkpoint)
from lift_engine.config import BatchConfig, LiftConfig
from lift_engine.data.documents import document_sha256, tokenize_long
from lift_engine.data.queries import document_chunks, generate_queries, make_query_generator
from lift_engine.data.tasks import stored_qa_items
from lift_engine.errors import InputError, LiftError
from lift_engine.fsutil import atomic_write_json
from lift_engine.models.loading import model_device
from lift_engine.names import validate_name
from lift_engine.precision import compute_dtype, training_precision
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import (IGNORE_INDEX, RECIPE_VERSION, DocumentSamples, Sample, SampleRef, TeacherAnswer,
                                 teacher_passage)

STATUS_FILE = ".lift-batch-status.json"
# The engine's identity in every job key and adapter manifest: the optimizer path and the
# task/sample recipe (samples.RECIPE_VERSION). A checkpoint or adapter made by another
# trainer or recipe is never resumed or reused.
TRAINER_ID = f"batch-slot-adamw-v1+{RECIPE_VERSION}"


@dataclass
class PreparedSource:
    """A sample source trained in one slot as one job entry, instead of a document's text.

    content_sha256: a hash of everything its samples are made of (the job key's
    "document" field: a checkpoint or adapter of other content is never resumed or kept).
    build(work_dir): called at admission, once `work_dir` is this entry's work dir (so it
    may keep its tasks there for a resumed job); returns an object with DocumentSamples'
    planning interface: full_plan(), build(ref), approx_length(ref), spans, qa_items, cfg.
    tokens: the tokens it is made of (reported as document_tokens).
    """

    content_sha256: str
    build: Callable[[Path], object]
    tokens: int = 0


@dataclass
class DocState:
    name: str
    text: str
    source: str
    prepared: PreparedSource | None = None
    status: str = "queued"  # queued → training → done | failed | cancelled
    slot: int | None = None
    out_dir: Path | None = None
    key: dict | None = None
    samples: DocumentSamples | None = None
    steps: list[list[SampleRef]] = field(default_factory=list)
    next_step: int = 0
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    doc_hash: str = ""
    doc_tokens: int = 0
    qa_items: int = 0
    error: str | None = None
    exception: BaseException | None = None  # what made it fail (pipeline.tune_document re-raises it)
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    train_tokens: int = 0
    cancel_requested: bool = False  # cancel() was called; the stepping thread takes it out

    def summary(self) -> dict:
        """A JSON-able snapshot: status, step/steps, slot, resumed_from, first/last loss,
        adapter_dir (when done), document_tokens, qa_items, error, source."""
        return {
            "status": self.status, "step": self.next_step, "steps": len(self.steps), "slot": self.slot,
            "resumed_from": self.resumed_from, "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None, "adapter_dir": str(self.out_dir) if self.status == "done" else None,
            "document_tokens": self.doc_tokens, "qa_items": self.qa_items, "error": self.error, "source": self.source,
        }


class DocumentCancelled(LiftError):
    """collect() of a document that was cancelled."""


@dataclass
class StepReport:
    step: int
    documents: list[str]
    samples: int
    tokens: int  # padded tokens that went through the model
    loss_tokens: int
    passes: int
    gradient_checkpointing: bool
    seconds: float
    finished: list[str]
    max_len: int = 0  # longest sample of the step


class BatchTuneJob:
    """A long-lived tuning job over one base model.

    base: LoadedModel; cfg: the LiftConfig every document is tuned with (adapter kind,
    schedule, batch_size = samples per document per step); out_root: adapters go to
    out_root/<name>/. settings: the engine's BatchConfig (bank size, memory budget,
    prefix sharing, checkpoint frequency); keyword overrides of its fields are accepted
    too (`BatchTuneJob(base, cfg, out, max_active=2)`). log: one-line messages
    (admission, plan and time estimate, completion). on_finished(name, adapter_dir): called
    right after each adapter is written (from the stepping thread). status_file: where
    every step rewrites the job's progress (default out_root/.lift-batch-status.json; None:
    nowhere, e.g. for a shared cache directory).
    """

    def __init__(self, base, cfg: LiftConfig, out_root, settings: BatchConfig | None = None, *, log=None,
                 planner_probe: bool = True, on_finished: Callable[[str, Path], None] | None = None,
                 status_file: Path | str | None = STATUS_FILE, **overrides):
        settings = dataclasses.replace(settings or BatchConfig(), **overrides).validate()
        self.base, self.cfg, self.settings = base, cfg, settings
        self.out_root = Path(out_root)
        self.status_path = None if status_file is None else self.out_root / status_file
        self.max_active = settings.max_active
        self.checkpoint_every = settings.checkpoint_every
        self.model = base.model
        self.prefix_sharing = settings.prefix_sharing_on(model_device(self.model).type)
        self.logits_chunk = settings.logits_chunk
        self.log = log or (lambda *a: None)
        self.on_finished = on_finished
        self.prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
        self.pad_id = pad_token_id(base.tokenizer)
        self.compute_dtype = compute_dtype(cfg.train.compute_dtype)
        self._cast_cache: dict = {}  # the frozen base in compute_dtype, cast at the first step (precision.py)
        self.handle = attach_adapters(self.model, cfg.adapter, cfg, num_adapters=self.max_active, seed=cfg.train.seed)
        lr = cfg.train.lr_lora if cfg.adapter == "lora" else cfg.train.lr_gated_memory
        self.optimizer = SlotAdamW(self.handle.trainable_parameters(), lr=lr, betas=cfg.train.betas,
                                   weight_decay=cfg.train.weight_decay)
        self.planner = MemoryPlanner(self.model, self.handle, settings.memory_budget, logits_chunk=self.logits_chunk,
                                     probe=planner_probe, compute_dtype=self.compute_dtype, cast_cache=self._cast_cache)
        self.docs: dict[str, DocState] = {}
        self._pending: list[str] = []
        self._free_slots = list(range(self.max_active))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # held by step(): cancellations wait for a step boundary
        self._thread: threading.Thread | None = None
        self._stop = False
        self.global_step = 0
        self.history: list[StepReport] = []
        self.closed = False

    # ================================================================ public API
    def submit(self, text: str, name: str, source: str = "") -> str:
        """Queue a document; it joins the running job at the next step with a free slot."""
        return self._enqueue(DocState(name=name, text=text, source=source))

    def submit_prepared(self, name: str, prepared: PreparedSource, source: str = "") -> str:
        """Queue a prepared sample source (PreparedSource) as one entry: one slot, one adapter
        written to out_root/<name>/ when its plan is done, checkpointed and resumed like a
        document."""
        return self._enqueue(DocState(name=name, text="", source=source, prepared=prepared))

    def _enqueue(self, doc: DocState) -> str:
        validate_name(doc.name, "document")
        with self._lock:
            if doc.name in self.docs and self.docs[doc.name].status not in ("done", "failed", "cancelled"):
                raise InputError(f"document {doc.name!r} is already in the job")
            self.docs[doc.name] = doc
            self._pending.append(doc.name)
            self._changed.notify_all()
        return doc.name

    def progress(self) -> dict[str, dict]:
        with self._lock:
            return {name: d.summary() for name, d in self.docs.items()}

    def cancel(self, name: str) -> bool:
        """Take `name` out of the job; True when it was queued or training (now "cancelled").

        A queued document leaves at once. A training one leaves at the next step boundary:
        at once when no step is running, else when the step in flight ends (its update of
        this document is discarded; the other documents' updates are those of a step
        without it, as when a document finishes). Its work dir (checkpoints, stored tasks)
        is removed and it is never published; collect(name) raises DocumentCancelled.
        A done or failed document is left as it is (False).
        """
        with self._lock:
            doc = self.docs.get(name)
            if doc is None or doc.status not in ("queued", "training"):
                return False
            doc.cancel_requested = True
            if name in self._pending:  # not admitted yet: no slot, no step uses it
                self._pending.remove(name)
                self._mark_cancelled(doc)
                immediate = True
            else:
                immediate = False
        if immediate:
            remove_work_dir(partial_dir_for(self.out_root / name))
            self.log(f"{name}: cancelled")
            self._write_status()
        elif self._step_lock.acquire(blocking=False):  # no step in flight: take it out now
            try:
                self._apply_cancels()
            finally:
                self._step_lock.release()
            self._write_status()
        return True

    def collect(self, name: str, timeout: float | None = None) -> Path:
        """Wait for `name` to finish; returns its adapter dir (raises if it failed or timed out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                doc = self.docs.get(name)
                if doc is None:
                    raise KeyError(f"no document {name!r} in the job")
                if doc.status == "done":
                    return doc.out_dir
                if doc.status == "failed":
                    raise InputError(f"document {name!r} failed: {doc.error}")
                if doc.status == "cancelled":
                    raise DocumentCancelled(f"document {name!r} was cancelled")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"document {name!r} is not done yet ({doc.next_step}/{len(doc.steps)} steps)")
                self._changed.wait(timeout=left if left is not None else 1.0)

    def idle(self) -> bool:
        with self._lock:
            return not self._pending and all(d.slot is None for d in self.docs.values())

    def run(self, until_idle: bool = True, on_step: Callable[["StepReport"], None] | None = None) -> None:
        """Step until nothing is queued or training (until_idle) or until stop();
        on_step(report) after every step (e.g. a JobProgressDisplay's update)."""
        while not self._stop:
            report = self.step()
            if report is not None and on_step is not None:
                on_step(report)
            if report is None:
                if until_idle and self.idle():
                    return
                with self._changed:
                    self._changed.wait(timeout=0.2)

    def start(self) -> None:
        """Run the job in a background thread (submit/collect from others)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self.run, kwargs={"until_idle": False}, name="lift-batch-job", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        if not self.closed:
            self.handle.remove()
            self.closed = True

    # ================================================================ cancellation
    def _mark_cancelled(self, doc: DocState) -> None:
        """(under self._lock) the document's slot goes back to the bank; it is out of the job."""
        if doc.slot is not None:
            self._free_slots.append(doc.slot)
        doc.status, doc.slot, doc.finished_at = "cancelled", None, time.time()
        doc.samples, doc.text = None, ""
        self._changed.notify_all()

    def _apply_cancels(self) -> None:
        """(holding self._step_lock) take out every admitted document whose cancel() was called."""
        with self._lock:
            gone = [d for d in self.docs.values() if d.cancel_requested and d.status == "training"]
            for doc in gone:
                self._mark_cancelled(doc)
        for doc in gone:
            remove_work_dir(partial_dir_for(self.out_root / doc.name))
            self.log(f"{doc.name}: cancelled at step {doc.next_step}/{len(doc.steps)}")

    # ================================================================ admission
    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._pending or not self._free_slots:
                    return
                name = self._pending.pop(0)
                doc = self.docs[name]
                slot = self._free_slots.pop(0)
            try:
                self._prepare(doc, slot)
            except Exception as exc:  # one bad document must not stop the others
                with self._lock:
                    doc.status, doc.error, doc.slot = "failed", f"{type(exc).__name__}: {exc}", None
                    doc.exception = exc
                    self._free_slots.insert(0, slot)
                    self._changed.notify_all()
                self.log(f"{name}: failed: {doc.error}")

    def _prepare(self, doc: DocState, slot: int) -> None:
        cfg = self.cfg
        doc.out_dir = self.out_root / doc.name
        ids = None
        if doc.prepared is not None:
            doc.doc_hash, doc.doc_tokens = doc.prepared.content_sha256, doc.prepared.tokens
        else:
            ids = tokenize_long(doc.text, self.base.tokenizer)
            if not ids:
                raise InputError(f"document {doc.name!r} has no tokens")
            doc.doc_hash, doc.doc_tokens = document_sha256(ids), len(ids)
        doc.key = {"document": doc.doc_hash, "config": cfg.fingerprint(), "model": self.base.fingerprint,
                   "kind": cfg.adapter, "trainer": TRAINER_ID, "prefix_sharing": self.prefix_sharing}
        if self._already_done(doc):
            remove_work_dir(partial_dir_for(doc.out_dir))  # killed between publish and cleanup
            with self._lock:
                doc.status, doc.finished_at = "done", time.time()
                self._free_slots.insert(0, slot)
                self._changed.notify_all()
            self.log(f"{doc.name}: adapter already in {doc.out_dir}")
            return
        work_dir = partial_dir_for(doc.out_dir)
        reset_stale_work_dir(work_dir, doc.key)
        if doc.prepared is not None:
            doc.samples = doc.prepared.build(work_dir)
            doc.qa_items = len(doc.samples.qa_items)
        else:
            qa = stored_qa_items(work_dir, doc.text, cfg, self.base, False)
            doc.qa_items = len(qa)
            teacher = (stored_teacher_answers(work_dir, lambda: self.teacher_targets(doc.name, ids, qa))
                       if cfg.distill.enabled else [])
            # doc=0: the plan is seeded alike whatever the slot; rows get the slot when built.
            doc.samples = DocumentSamples(ids, qa, cfg, self.prompts, teacher_answers=teacher)
        plan = plan_summary(doc.samples, self.model)
        self.log(f"{doc.name}: {doc.doc_tokens} tokens, {plan['segments']} segments, {plan['qa_items']} auxiliary tasks, "
                 f"{plan['samples']} samples (~{plan['train_tokens']} tokens); "
                 f"expected time ~{format_duration(plan['estimated_seconds'])} alone (rough estimate)")
        refs = doc.samples.full_plan()
        batch = max(1, cfg.train.batch_size)
        doc.steps = [refs[i : i + batch] for i in range(0, len(refs), batch)]
        # approx_length estimates the template at 48 tokens: keep a margin, so that a
        # document that cannot fit fails here, alone, and never inside a shared step.
        longest = max(doc.samples.approx_length(r) for r in refs) + 64 if refs else 0
        self.planner.check_sample(longest)
        self.handle.reset_slot(slot, seed=cfg.train.seed)
        self.optimizer.reset_slot(slot)
        state = load_checkpoint(work_dir, doc.key)
        if state is not None:
            self.handle.load_slot(slot, state["adapter"])
            self.optimizer.load_slot_state(slot, state["optimizer"])
            doc.next_step = doc.resumed_from = int(state["step"])
            doc.losses = list(state.get("losses", [])) if isinstance(state.get("losses"), list) else []
        with self._lock:
            doc.slot, doc.status = slot, "training"
            self._changed.notify_all()
        self.log(f"{doc.name}: slot {slot}, {len(doc.steps)} steps" + (f" (resumed at {doc.next_step})" if doc.next_step else ""))
        if doc.next_step >= len(doc.steps) and not doc.cancel_requested:
            self._publish(doc)

    def teacher_targets(self, name: str, ids: list[int], qa) -> list[TeacherAnswer]:
        """Context-distillation targets of one document (token ids `ids`, its extractive
        tasks `qa`; `name` for log lines) (batch/teacher.py): queries about
        every chunk (data/queries.py: extractive, generated, templates), then the base
        model, adapters off, answers each with its chunk in the prompt."""
        cfg = self.cfg
        chunks = document_chunks(ids, self.base.tokenizer, cfg.queries.chunk_tokens)
        generator = make_query_generator(dataclasses.replace(cfg.qa, use_generator=cfg.distill.generate_queries),
                                         cfg.queries, self.base, seed=cfg.train.seed)
        query_set = generate_queries(chunks, generator, cfg.queries, seed=cfg.train.seed, extractive=qa)
        for warning in query_set.warnings:
            self.log(f"{name}: warning: {warning}")
        queries = [(q.chunk, q.question) for q in query_set.queries]
        passages = [teacher_passage(ids, c, cfg, self.prompts.separator_ids) for c in chunks]
        targets, empty = teacher_answers(self.model, self.handle, self.base.tokenizer, self.prompts,
                                         passages, queries, cfg.distill)
        dropped = {reason: n for reason, n in {**query_set.dropped, "empty answer": empty}.items() if n}
        self.log(f"{name}: {len(targets)} distillation targets over {len(chunks)} chunks"
                 + (f" (dropped: {', '.join(f'{n} {r}' for r, n in dropped.items())})" if dropped else ""))
        return targets

    def _already_done(self, doc: DocState) -> bool:
        try:
            manifest = read_manifest(doc.out_dir)
        except Exception:
            return False
        extra = manifest.get("extra") or {}
        try:
            same_cfg = LiftConfig.from_dict(manifest.get("lift_config") or {}).fingerprint() == self.cfg.fingerprint()
        except Exception:
            same_cfg = False
        return (extra.get("document_sha256") == doc.doc_hash and same_cfg
                and manifest.get("base_model", {}).get("fingerprint") == self.base.fingerprint
                and manifest.get("kind") == self.cfg.adapter and extra.get("trainer") == TRAINER_ID
                and bool(extra.get("prefix_sharing", False)) == self.prefix_sharing)

    # ================================================================ one step
    def step(self) -> StepReport | None:
        """Admit waiting documents, then one optimizer step for every active document."""
        with self._step_lock:
            report = self._step()
            self._apply_cancels()
        if report is not None:
            self._write_status()
        return report

    def _step(self) -> StepReport | None:
        began = time.monotonic()
        self._admit()
        self._apply_cancels()
        with self._lock:
            active = sorted((d for d in self.docs.values() if d.status == "training" and d.slot is not None),
                            key=lambda d: d.slot)
        if not active:
            return None
        samples: list[Sample] = []
        for doc in active:
            refs = doc.steps[doc.next_step]
            if self.prefix_sharing:
                refs = shared_context_refs(refs)
            for ref in refs:
                sample = doc.samples.build(ref)
                sample.doc = doc.slot
                samples.append(sample)
        stats = self._forward_backward(samples)
        clip_per_slot(self.handle.trainable_parameters(), self.cfg.train.grad_clip)
        self.optimizer.step([d.slot for d in active])
        self.optimizer.zero_grad()
        self.global_step += 1
        finished = []
        for doc in active:
            if doc.cancel_requested:  # cancelled during the step: its update is dropped with its slot
                continue
            doc.losses.append(float(stats["losses"][doc.slot]))
            doc.train_tokens += stats["doc_tokens"].get(doc.slot, 0)
            doc.next_step += 1
            if doc.next_step >= len(doc.steps):
                self._publish(doc)
                finished.append(doc.name)
            elif doc.next_step % self.checkpoint_every == 0:
                save_checkpoint(partial_dir_for(doc.out_dir), doc.key, doc.next_step, self.handle.state_for_slot(doc.slot),
                                self.optimizer.slot_state(doc.slot))
        report = StepReport(self.global_step, [d.name for d in active], len(samples), stats["tokens"], stats["loss_tokens"],
                            stats["passes"], stats["checkpointing"], time.monotonic() - began, finished,
                            max(len(s.input_ids) for s in samples))
        self.history.append(report)
        return report

    def _forward_backward(self, samples: list[Sample]) -> dict:
        """Accumulate Σ_doc (Σ token losses of doc) / (doc's loss tokens in the step) over the memory plan's passes."""
        n = self.handle.num_adapters
        counts = torch.zeros(n, dtype=torch.float64)
        for s in samples:
            counts[s.doc] += sum(1 for lab in s.labels[1:] if lab != IGNORE_INDEX)
        device = model_device(self.model)
        denom = counts.clamp(min=1).to(device, torch.float32)
        plan = self.planner.plan([len(s.input_ids) for s in samples], *pass_limits(device.type, self.prefix_sharing))
        self._set_checkpointing(plan.gradient_checkpointing)
        self.model.train()
        loss_sums = torch.zeros(n, dtype=torch.float32, device=device)
        doc_tokens: dict[int, int] = {}
        try:
            with training_precision(self.model, self.compute_dtype, self._cast_cache):
                tokens = self._passes(plan, samples, denom, loss_sums)
            for s in samples:
                doc_tokens[s.doc] = doc_tokens.get(s.doc, 0) + len(s.input_ids)
        finally:
            self.handle.set_indices(None)
            self.model.eval()
        return {"losses": (loss_sums / denom).cpu(), "tokens": tokens, "loss_tokens": int(counts.sum()),
                "passes": len(plan.batches), "checkpointing": plan.gradient_checkpointing, "doc_tokens": doc_tokens}

    def _passes(self, plan, samples: list[Sample], denom: torch.Tensor, loss_sums: torch.Tensor) -> int:
        """The memory plan's forward+backward passes; adds each slot's summed loss to loss_sums.
        Returns the padded tokens that went through the model."""
        n = self.handle.num_adapters
        tokens = 0
        for batch_idx in plan.batches:
            mb = [samples[i] for i in batch_idx]
            token_loss_of = prefix_shared_token_loss if self.prefix_sharing else plain_token_loss
            token_loss, token_docs, used = token_loss_of(self.model, self.handle, mb, self.pad_id, self.logits_chunk)
            tokens += used
            sums = token_loss.new_zeros(n).index_add(0, token_docs, token_loss)
            (sums / denom).sum().backward()
            loss_sums += sums.detach()
        return tokens

    def _set_checkpointing(self, on: bool) -> None:
        if on == getattr(self, "_gc_on", False):
            return
        if on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()
        self._gc_on = on

    # ================================================================ completion
    def _publish(self, doc: DocState) -> None:
        cfg = self.cfg
        extra = {"document_sha256": doc.doc_hash, "document_tokens": doc.doc_tokens, "source": doc.source,
                 "qa_items": doc.qa_items, "first_loss": doc.losses[0] if doc.losses else None,
                 "last_loss": doc.losses[-1] if doc.losses else None, "trainer": TRAINER_ID,
                 "prefix_sharing": self.prefix_sharing, "steps": len(doc.steps)}
        save_adapter(self.handle, doc.slot, doc.out_dir, base=self.base, lift_config=cfg, extra=extra)
        remove_work_dir(partial_dir_for(doc.out_dir))
        with self._lock:
            slot = doc.slot
            doc.status, doc.slot, doc.finished_at = "done", None, time.time()
            doc.samples, doc.text, doc.prepared = None, "", None  # free the document's memory
            self._free_slots.append(slot)
            self._changed.notify_all()
        self.log(f"{doc.name}: adapter written to {doc.out_dir} ({len(doc.steps)} steps)")
        if self.on_finished is not None:
            self.on_finished(doc.name, doc.out_dir)

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            atomic_write_json(self.status_path, {"global_step": self.global_step, "documents": self.progress()})
        except OSError:
            pass


def read_status(out_root) -> dict | None:
    path = Path(out_root) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
