"""Memory planning for a batched tuning step (issue 4, "memory planning").

The step's samples (every active document's next `batch_size` samples) are packed into
micro-batches whose estimated peak memory fits the budget; gradients accumulate over
the micro-batches and the optimizer steps once, so the result is the same as one big
batch (each document's loss is normalised by its loss tokens over the whole step). A
document whose samples do not fit in one pass therefore trains over more passes, never
out of memory. Gradient checkpointing is switched on only when a single sample does not
fit without it; a sample that does not fit even then is refused up front with a clear
message (raised at admission), never by the allocator.

Memory model of one micro-batch of `rows` sequences padded to `seq` tokens:

    fixed        base weights + adapter banks × 4 (value, grad, two AdamW moments)
    activations  rows · (c + a · seq + b · seq²)          without checkpointing
                 rows · seq · hidden · bytes · (layers + 2) + activations / layers   with it
    loss         chunk · vocab · 4 · 3                    (chunked logits, softmax, grad)

c, a and b (bytes per sequence — e.g. the per-row adapter weights the bf16 LoRA path
gathers —, per token and per attention cell) are measured on the model itself by a
probe: a forward pass on three small shapes under `saved_tensors_hooks`, counting the
bytes autograd keeps for backward (parameters excluded); the estimate then takes
`safety` × that for the transient gradients of backward. The probe runs the way the
steps do, inside `precision.training_precision` (compute dtype, fused ops, attention
kernel): in bf16 with the fused ops a token keeps about half the bytes of the fp32 model
with HF's own modules. With a compute dtype other than the model's, the fixed part also
counts the cast copy of the base the job keeps between steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lift_engine.batch.loss import DEFAULT_CHUNK
from lift_engine.errors import InputError
from lift_engine.models.loading import model_device
from lift_engine.precision import training_precision


def default_budget_bytes(device: torch.device | str = "cpu") -> int:
    """80% of the free device memory (CUDA) or of MemAvailable (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


def measure_saved_bytes(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """Bytes autograd saves for backward in one decoder forward (unique storages, parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    del hidden
    return sum(seen.values())


@dataclass
class MicroBatchPlan:
    gradient_checkpointing: bool
    batches: list[list[int]]  # indices into the step's samples, one list per forward/backward pass
    estimated_peak_bytes: int


MAX_PADDING = 0.2  # padding share of a pass's cells above which a full-enough pass is closed
MIN_PASS_TOKENS = 1024  # real tokens a pass holds before padding may close it
# Padded tokens (rows × longest) above which a pass is closed for speed even when memory
# allows more: measured on this CPU (bf16, 16 documents × 4 samples × 204 tokens), one
# 13k-token pass per step ran ~13% slower than two (23.0 vs 19.9 s per step, 4 of 4 pairs).
MAX_PASS_TOKENS = 8192


def pass_limits(device_type: str, prefix_sharing: bool) -> tuple[float | None, int | None]:
    """(max_padding, max_tokens) for `MemoryPlanner.plan`: the speed rules for a job on
    this device type. Prefix sharing computes a document's context once per pass, so its
    samples stay together: neither rule applies. MAX_PASS_TOKENS is a CPU measurement
    (oneDNN's GEMMs at 13k rows); on a GPU, where this model's steps are bound by launches,
    fewer and bigger passes are faster, so it is off there."""
    if prefix_sharing:
        return None, None
    return MAX_PADDING, MAX_PASS_TOKENS if device_type == "cpu" else None


class MemoryPlanner:
    """Packs a step's samples into passes that fit `budget_bytes`.

    model: the patched causal LM (adapters attached); handle: its AdapterHandle (active
    indices are needed for the probe to include the adapters' activations);
    compute_dtype / cast_cache: the job's `train.compute_dtype` and its cache of the cast
    base (precision.frozen_base_in), so that the probe measures what a step keeps.
    """

    def __init__(self, model: torch.nn.Module, handle, budget_bytes: int | None = None, *, logits_chunk: int = DEFAULT_CHUNK,
                 safety: float = 1.5, probe: bool = True, compute_dtype: torch.dtype | None = None,
                 cast_cache: dict | None = None):
        self.model, self.handle = model, handle
        self.budget = int(budget_bytes if budget_bytes is not None else default_budget_bytes(model_device(model)))
        self.logits_chunk, self.safety = logits_chunk, safety
        config = model.config
        self.layers = int(config.num_hidden_layers)
        self.hidden = int(config.hidden_size)
        self.vocab = int(config.vocab_size)
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        self.cast_cache = cast_cache
        self.act_bytes = self.compute_dtype.itemsize
        banks = {id(p) for p in handle.trainable_parameters()}
        frozen = [p for p in model.parameters() if id(p) not in banks]
        base = sum(p.numel() * p.element_size() for p in frozen)
        cast_copy = sum(p.numel() * self.compute_dtype.itemsize for p in frozen
                        if p.is_floating_point() and p.dtype != self.compute_dtype)
        bank = sum(p.numel() * p.element_size() for p in handle.trainable_parameters())
        self.fixed_bytes = base + cast_copy + 4 * bank
        self.loss_bytes = logits_chunk * self.vocab * 4 * 3
        self.per_row, self.per_token, self.per_cell = self._probe() if probe else self._analytic()

    # ------------------------------------------------------------ the model
    def _analytic(self) -> tuple[float, float, float]:
        config = self.model.config
        inter = int(getattr(config, "intermediate_size", 4 * self.hidden))
        heads = int(config.num_attention_heads)
        per_token = self.layers * (10 * self.hidden + 5 * inter) * self.act_bytes
        per_cell = self.layers * heads * 3 * self.act_bytes
        return 0.0, float(per_token), float(per_cell)

    def _probe(self) -> tuple[float, float, float]:
        """Fit saved = rows·(c + a·S + b·S²) through three probe lengths (+10% for what the
        points miss: shape-dependent kernels), never below zero (a: one byte)."""
        device = model_device(self.model)
        was_training = self.model.training
        self.model.train()
        lengths = (32, 64, 128)
        try:
            with self.handle.use(torch.zeros(2, dtype=torch.long, device=device)), \
                    training_precision(self.model, self.compute_dtype, self.cast_cache):
                saved = [measure_saved_bytes(self.model, torch.ones(2, s, dtype=torch.long, device=device)) / 2
                         for s in lengths]
        finally:
            self.model.train(was_training)
        system = torch.tensor([[1.0, s, s * s] for s in lengths], dtype=torch.float64)
        c, a, b = torch.linalg.solve(system, torch.tensor(saved, dtype=torch.float64)).tolist()
        if b < 0:  # no quadratic term: the least-squares line through the three points
            (c, a), b = torch.linalg.lstsq(system[:, :2], torch.tensor(saved, dtype=torch.float64)[:, None]
                                           ).solution.flatten().tolist(), 0.0
        if c < 0:  # no per-row constant: proportional to the tokens (and cells)
            c, a = 0.0, max(saved[0] / lengths[0] - b * lengths[0], 0.0)
        return 1.1 * c, 1.1 * max(a, 1.0), 1.1 * max(b, 0.0)

    def activation_bytes(self, rows: int, seq: int, checkpointing: bool) -> float:
        full = rows * (self.per_row + self.per_token * seq + self.per_cell * seq * seq)
        if not checkpointing:
            return full
        return rows * seq * self.hidden * self.act_bytes * (self.layers + 2) + full / self.layers

    def peak_bytes(self, rows: int, seq: int, checkpointing: bool) -> int:
        return int(self.fixed_bytes + self.loss_bytes + self.safety * self.activation_bytes(rows, seq, checkpointing))

    def fits(self, rows: int, seq: int, checkpointing: bool) -> bool:
        return self.peak_bytes(rows, seq, checkpointing) <= self.budget

    def check_sample(self, length: int) -> None:
        """Raise InputError if a sample of `length` tokens cannot be trained within the budget at all."""
        if not self.fits(1, length, checkpointing=True):
            need = self.peak_bytes(1, length, checkpointing=True)
            raise InputError(
                f"a training sample of {length} tokens needs about {need / 2**20:.0f} MiB even with gradient "
                f"checkpointing; the memory budget is {self.budget / 2**20:.0f} MiB (raise it, or use shorter "
                f"segments/context)"
            )

    # ------------------------------------------------------------ packing
    def plan(self, lengths: list[int], max_padding: float | None = MAX_PADDING,
             max_tokens: int | None = MAX_PASS_TOKENS) -> MicroBatchPlan:
        """Micro-batches for samples of these lengths (first-fit decreasing by length).

        A micro-batch also ends where the next (shorter) sample would push its padding
        above `max_padding` of its cells, once it holds `MIN_PASS_TOKENS` real tokens
        (GEMMs that size run at full speed): one pass padded to the longest of a mixed
        step (long segments, short QA) computes up to twice the tokens it needs; and where
        it would exceed `max_tokens` padded tokens (a pass holds at least one sample).
        None for both: split only for memory.
        """
        if not lengths:
            return MicroBatchPlan(False, [], self.fixed_bytes)
        longest = max(lengths)
        self.check_sample(longest)
        checkpointing = not self.fits(1, longest, checkpointing=False)
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in order:
            rows, seq = len(current) + 1, max([lengths[j] for j in current] + [lengths[i]])
            too_padded = (max_padding is not None and real >= MIN_PASS_TOKENS
                          and 1.0 - (real + lengths[i]) / (rows * seq) > max_padding)
            too_big = max_tokens is not None and rows * seq > max_tokens
            if current and (too_padded or too_big or not self.fits(rows, seq, checkpointing)):
                batches.append(current)
                current, real = [], 0
            current.append(i)
            real += lengths[i]
        if current:
            batches.append(current)
        peak = max(self.peak_bytes(len(b), max(lengths[i] for i in b), checkpointing) for b in batches)
        return MicroBatchPlan(checkpointing, batches, peak)

    def describe(self) -> dict:
        return {
            "budget_bytes": self.budget, "fixed_bytes": self.fixed_bytes, "loss_bytes": self.loss_bytes,
            "activation_bytes_per_sequence": self.per_row, "activation_bytes_per_token": self.per_token, "activation_bytes_per_attention_cell": self.per_cell,
            "safety": self.safety,
        }

