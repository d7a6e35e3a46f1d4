"""Tuning many documents at once: one adapter bank, mixed batches, continuous admission.

    job = BatchTuneJob(base, cfg, out_root, max_active=16)
    job.submit(text, name="contract-a")          # any time, from any thread
    job.run()                                    # or job.start() … job.collect(name)
    job.progress()                               # {name: {status, step, steps, loss, …}}

Each document gets a slot of the bank (DESIGN.md §4) while it trains. A global step
takes the next `batch_size` planned samples of EVERY active document — the same chunks,
in the same order, that `tune_document` would use for that document alone — runs them
through the model together (one forward and backward per micro-batch; one micro-batch
unless the memory plan splits the step), normalises each document's loss over its own
loss tokens in the step, clips per slot and steps AdamW for exactly the active slots
(SlotAdamW: per-slot step counts, no decay or moment update for absent slots). So a
document's adapter is the one it would get alone, to float tolerance, whatever else
shares its steps, joins or leaves.

A document joins at the next step after it is submitted (if a slot is free); when its
last step is done its adapter is written atomically to out_root/<name>/ and its slot is
freed for the next document, without stopping the others. After every step (by default)
each active document's slot and optimizer state are checkpointed atomically in its own
work dir (`.<name>.lift-partial/` beside the adapter), so a job killed with kill -9 and
started again resumes every document losing at most one step, and an adapter directory
only ever appears complete.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lift_engine.adapters.io import read_manifest, save_adapter
from lift_engine.adapters.patching import attach_adapters
from lift_engine.batch.loss import DEFAULT_CHUNK, chunked_token_loss, loss_positions
from lift_engine.batch.optim import SlotAdamW
from lift_engine.batch.planner import MemoryPlanner, pass_limits
from lift_engine.checkpoint import load_checkpoint, partial_dir_for, remove_work_dir, save_checkpoint
from lift_engine.config import LiftConfig
from lift_engine.errors import InputError
from lift_engine.fsutil import atomic_write_json
from lift_engine.models.loading import model_device
from lift_engine.names import validate_name
from lift_engine.precision import compute_dtype, training_precision
from lift_engine.prompts import PromptBuilder
from lift_engine.samples import IGNORE_INDEX, DocumentSamples, Sample, SampleRef
from lift_engine.trainer import clip_per_slot, collate, training_attention_mask

STATUS_FILE = ".lift-batch-status.json"
TRAINER_ID = "batch-slot-adamw-v1"


@dataclass
class DocState:
    name: str
    text: str
    source: str
    status: str = "queued"  # queued → training → done | failed
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
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    train_tokens: int = 0

    def summary(self) -> dict:
        return {
            "status": self.status, "step": self.next_step, "steps": len(self.steps), "slot": self.slot,
            "resumed_from": self.resumed_from, "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None, "adapter_dir": str(self.out_dir) if self.status == "done" else None,
            "document_tokens": self.doc_tokens, "qa_items": self.qa_items, "error": self.error, "source": self.source,
        }


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
    """A long-lived multi-document tuning job over one base model.

    base: LoadedModel; cfg: the LiftConfig every document is tuned with (adapter kind,
    schedule, batch_size = samples per document per step); out_root: adapters go to
    out_root/<name>/. max_active: bank size N (documents training at once).
    memory_budget: bytes for the step's memory plan (None: 80% of what is free).
    checkpoint_every: global steps between per-document checkpoints (1: lose ≤ 1 step).
    prefix_sharing: see lift_engine.batch.prefix (changes the samples: one context split
    per document per step instead of one per sample; off by default, so that a batched
    document matches `tune_document` exactly).
    """

    def __init__(self, base, cfg: LiftConfig, out_root, *, max_active: int = 16, memory_budget: int | None = None,
                 checkpoint_every: int = 1, prefix_sharing: bool = False, logits_chunk: int = DEFAULT_CHUNK,
                 log=None, planner_probe: bool = True):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        self.base, self.cfg = base, cfg
        self.out_root = Path(out_root)
        self.max_active = max_active
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.prefix_sharing = prefix_sharing
        self.logits_chunk = logits_chunk
        self.log = log or (lambda *a: None)
        self.model = base.model
        self.prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
        self.pad_id = _pad_id(base.tokenizer)
        self.compute_dtype = compute_dtype(cfg.train.compute_dtype)
        self._cast_cache: dict = {}  # the frozen base in compute_dtype, cast at the first step (precision.py)
        self.handle = attach_adapters(self.model, cfg.adapter, cfg, num_adapters=max_active, seed=cfg.train.seed)
        lr = cfg.train.lr_lora if cfg.adapter == "lora" else cfg.train.lr_gated_memory
        self.optimizer = SlotAdamW(self.handle.trainable_parameters(), lr=lr, betas=cfg.train.betas,
                                   weight_decay=cfg.train.weight_decay)
        self.planner = MemoryPlanner(self.model, self.handle, memory_budget, logits_chunk=logits_chunk, probe=planner_probe,
                                     compute_dtype=self.compute_dtype, cast_cache=self._cast_cache)
        self.docs: dict[str, DocState] = {}
        self._pending: list[str] = []
        self._free_slots = list(range(max_active))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.global_step = 0
        self.history: list[StepReport] = []
        self.closed = False

    # ================================================================ public API
    def submit(self, text: str, name: str, source: str = "") -> str:
        """Queue a document; it joins the running job at the next step with a free slot."""
        validate_name(name, "document")
        with self._lock:
            if name in self.docs and self.docs[name].status not in ("done", "failed"):
                raise InputError(f"document {name!r} is already in the job")
            self.docs[name] = DocState(name=name, text=text, source=source)
            self._pending.append(name)
            self._changed.notify_all()
        return name

    def progress(self) -> dict[str, dict]:
        with self._lock:
            return {name: d.summary() for name, d in self.docs.items()}

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
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"document {name!r} is not done yet ({doc.next_step}/{len(doc.steps)} steps)")
                self._changed.wait(timeout=left if left is not None else 1.0)

    def idle(self) -> bool:
        with self._lock:
            return not self._pending and all(d.slot is None for d in self.docs.values())

    def run(self, until_idle: bool = True) -> None:
        """Step until nothing is queued or training (until_idle) or until stop()."""
        while not self._stop:
            worked = self.step() is not None
            if not worked:
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
                    self._free_slots.insert(0, slot)
                    self._changed.notify_all()
                self.log(f"{name}: failed: {doc.error}")

    def _prepare(self, doc: DocState, slot: int) -> None:
        from lift_engine.data.documents import tokenize_long
        from lift_engine.pipeline import _load_or_make_qa, _reset_stale_work_dir, document_sha256

        cfg = self.cfg
        doc.out_dir = self.out_root / doc.name
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
        _reset_stale_work_dir(work_dir, doc.key)
        qa = _load_or_make_qa(work_dir, doc.text, cfg, self.base, False)
        doc.qa_items = len(qa)
        # doc=0: the plan is seeded exactly as in a one-document run; rows get the slot later.
        doc.samples = DocumentSamples(ids, qa, cfg, self.prompts)
        plan = doc.samples.full_plan()
        batch = max(1, cfg.train.batch_size)
        doc.steps = [plan[i : i + batch] for i in range(0, len(plan), batch)]
        # approx_length estimates the template at 48 tokens: keep a margin, so that a
        # document that cannot fit fails here, alone, and never inside a shared step.
        longest = max(doc.samples.approx_length(r) for r in plan) + 64 if plan else 0
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
        if doc.next_step >= len(doc.steps):
            self._publish(doc)

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
        began = time.monotonic()
        self._admit()
        with self._lock:
            active = sorted((d for d in self.docs.values() if d.status == "training" and d.slot is not None),
                            key=lambda d: d.slot)
        if not active:
            return None
        samples: list[Sample] = []
        for doc in active:
            refs = doc.steps[doc.next_step]
            if self.prefix_sharing:
                from lift_engine.batch.prefix import shared_context_refs

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
        self._write_status()
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
            if self.prefix_sharing:
                from lift_engine.batch.prefix import prefix_shared_token_loss

                token_loss, token_docs, used = prefix_shared_token_loss(self.model, self.handle, mb, self.pad_id,
                                                                         self.logits_chunk)
            else:
                token_loss, token_docs, used = plain_token_loss(self.model, self.handle, mb, self.pad_id, self.logits_chunk)
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
            doc.samples, doc.text = None, ""  # free the document's memory
            self._free_slots.append(slot)
            self._changed.notify_all()
        self.log(f"{doc.name}: adapter written to {doc.out_dir} ({len(doc.steps)} steps)")

    def _write_status(self) -> None:
        try:
            atomic_write_json(self.out_root / STATUS_FILE, {"global_step": self.global_step, "documents": self.progress()})
        except OSError:
            pass


def plain_token_loss(model, handle, samples: list[Sample], pad_id: int, chunk: int):
    """Right-padded batch through the decoder; per-token loss at loss positions only.

    Returns (token_loss [T] float32, token_docs [T] slot of each, padded tokens used).
    """
    ids, mask, labels, docs = collate(samples, pad_id, model_device(model))
    handle.set_indices(docs)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=training_attention_mask(mask)).last_hidden_state
    rows, cols, targets = loss_positions(labels)
    token_loss = chunked_token_loss(hidden[rows, cols], model.get_output_embeddings(), targets, chunk)
    return token_loss, docs[rows], int(ids.numel())


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def read_status(out_root) -> dict | None:
    path = Path(out_root) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
