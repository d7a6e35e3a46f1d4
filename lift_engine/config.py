"""Configuration dataclasses for lift_engine (docs/DESIGN.md §2–3).

Every size of the LIFT algorithm is a field here; presets `paper` and `cpu` build
complete configs. Nothing else in the package holds a tunable constant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

AdapterKind = Literal["lora", "gated-memory"]
ADAPTER_KINDS: tuple[str, ...] = ("lora", "gated-memory")
LORA_TARGETS_ALL: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SegmentConfig:
    """Overlapping segmentation of the document (docs/DESIGN.md §2.1)."""

    length: int = 2048  # ℓ: tokens per segment
    stride_fraction: float = 3 / 8  # s = ℓ · stride_fraction (paper: 768 for ℓ = 2048)

    @property
    def stride(self) -> int:
        return max(1, int(round(self.length * self.stride_fraction)))


@dataclass
class ContextConfig:
    """Contextualized training samples (docs/DESIGN.md §2.2)."""

    length: int = 4096  # C: tokens of head + tail context placed before each sample
    enabled: bool = True  # False: plain segments, no context (ablation)
    recite_instruction: str = "Recite the following passage of the document."


@dataclass
class QAConfig:
    """Auxiliary tasks (docs/DESIGN.md §2.3)."""

    num_generated: int = 10  # triples asked from the generator per document (kept after the evidence check)
    generator_tries_per_item: int = 3  # attempts per wanted triple before giving up
    chunk_sentences: int = 4  # sentences per chunk shown to the generator
    num_extractive: int = 24  # extractive tasks (fact, wh, entity recall, cloze) derived without a generator
    use_generator: bool = True  # False: only extractive tasks
    qa_endpoint: str | None = None  # OpenAI-compatible base URL; None = the base model itself
    qa_model: str | None = None  # model name at the endpoint


QUERY_KINDS: tuple[str, ...] = (
    "facts", "definition", "number-date", "who-what-when", "summary", "comparison", "how-to-use",
)


@dataclass
class QueryConfig:
    """Queries about chunks of a document, for context distillation (docs/DESIGN.md §2.6;
    lift_engine.data.queries). Endpoint and model name come from QAConfig."""

    chunk_tokens: int = 512  # tokens per chunk (one teacher prompt each); chunks end at sentence ends when they can
    queries_per_chunk: int = 4  # generated queries asked per chunk, kinds rotating over `kinds`
    kinds: tuple[str, ...] = QUERY_KINDS
    extractive_per_chunk: int = 2  # extractive questions (fact / wh / entity / cloze) per chunk, on average
    template_queries: bool = True  # a kind with no generated query (no generator, or its reply dropped) gets an anchored template
    max_new_tokens: int = 160  # generator tokens per query reply
    generator_batch_size: int = 8  # prompts per model.generate call (base model as generator)
    do_sample: bool = False  # base model as generator: greedy (False) or sampled with the seed
    temperature: float = 0.7  # sampling temperature (base model when sampling; always for an endpoint)
    endpoint_concurrency: int = 4  # requests in flight at once
    request_timeout: float = 60.0  # seconds one request may wait for the server
    retries: int = 2  # retries per request after the first try (the openai client's max_retries)

    def validate(self) -> "QueryConfig":
        """Raise ValueError naming the first bad field; returns self."""
        for name in ("chunk_tokens", "max_new_tokens", "generator_batch_size", "endpoint_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("queries_per_chunk", "extractive_per_chunk", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        unknown = [k for k in self.kinds if k not in QUERY_KINDS]
        if unknown or (self.queries_per_chunk and not self.kinds):
            raise ValueError(f"kinds must be some of {list(QUERY_KINDS)}, got {list(self.kinds)}")
        return self


@dataclass
class LoRAConfig:
    """LoRA adapter y = x Wᵀ + (α/r) (x Aᵀ) Bᵀ (docs/DESIGN.md §3.1)."""

    r: int = 128
    alpha: float = 256.0
    targets: tuple[str, ...] = LORA_TARGETS_ALL

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


#: Gated Memory's gate g = sigmoid(GATE_SCALE · (w4 · SiLU(W3 q) − 1)) (docs/DESIGN.md §3.2): fixed
#: by the method, the one definition every op (reference, Triton, custom ops), the adapter
#: layer and the adapter file format (its "gate_scale" entry) import. The C++ and CUDA
#: kernels (csrc/) are compiled with 3; their tests against the reference ops keep them equal.
GATE_SCALE = 3.0


@dataclass
class GatedMemoryConfig:
    """Gated Memory adapter (docs/DESIGN.md §3.2): sizes follow from the model's head dim; the gate
    scale is the constant GATE_SCALE, not a field."""

    hidden_factor: int = 2  # W1: (hidden_factor·d) × d


@dataclass
class TrainConfig:
    """Two-stage schedule and optimizer (docs/DESIGN.md §2.4)."""

    stage1_epochs: int = 3  # E1: segments only
    stage2_epochs: int = 5  # E2: segments + auxiliary tasks
    lr_lora: float = 2e-4
    lr_gated_memory: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    # Scale of each sample kind's token losses (samples.py); a kind of weight 0 is not trained.
    segment_weight: float = 1.0  # contextualized segments (recitation)
    qa_weight: float = 1.0  # auxiliary QA pairs
    distill_weight: float = 1.0  # context distillation (only with distill.enabled)
    batch_size: int = 1  # samples per optimizer step
    seed: int = 0
    # dtype of the frozen base's weights and activations while tuning (lift_engine.precision):
    # "float32", or "bfloat16" (adapters and AdamW stay fp32; bf16 GEMMs are several times
    # faster on CPUs with AMX, measured in bench/README.md, "Tuning", on an AMX CPU and a GPU)
    compute_dtype: str = "float32"


@dataclass
class DistillConfig:
    """Context distillation (docs/DESIGN.md §2.6): the frozen base reads one chunk of the
    document and answers queries about it (LiftConfig.queries says which chunks and
    queries); the adapter learns to give the same next-token distributions (top k)
    without the chunk."""

    enabled: bool = False
    generate_queries: bool = True  # the base model (or qa.qa_endpoint) writes queries; False: extractive + templates
    top_k: int = 20  # teacher tokens kept per answer position (Cartridges: 20)
    max_answer_tokens: int = 48  # longest teacher answer
    teacher_batch: int = 16  # teacher answers decoded together
    # Fraction of the targets that also train, once per stage-2 epoch, with their chunk in
    # the student's prompt exactly as the teacher saw it ("anchor" samples): where the
    # window shows the passage, the adapter learns to leave the base's in-context answer
    # alone (docs/DESIGN.md §2.6, "never worse than the window"). 0: none.
    anchor_fraction: float = 0.0
    # The teacher (and an anchor's student) also reads the document's head/tail context
    # around its chunk (ContextConfig.length tokens), as docs/DESIGN.md §2.6 specifies;
    # False: the chunk alone. On the real-prose dev set (LoRA, anchors 0.5) True answered
    # 2/26 against 3/26, within noise (bench/README.md "Quality"): off in every preset.
    teacher_context: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.anchor_fraction <= 1.0:
            raise ValueError(f"distill.anchor_fraction must be in [0, 1], got {self.anchor_fraction}")


@dataclass
class InferenceConfig:
    """Answering from a truncated context (docs/DESIGN.md §2.5)."""

    window: int = 4096  # W: context tokens kept (first W/2 and last W/2)
    max_new_tokens: int = 64
    use_chat_template: bool = True
    # Decode each adapter question over a window also with the base alone and keep the answer
    # its own model is surer of (inference.decode_answers, docs/DESIGN.md §2.5): the adapter
    # cannot overrule what the window shows with a less sure answer. About 2.5× the
    # answering time; no effect on tuning. The presets turn it off for Gated Memory
    # (it lost answers there: default_routing).
    route_by_confidence: bool = True


@dataclass
class LiftConfig:
    """A complete LIFT run: data, adapter, schedule, inference."""

    preset: str = "paper"
    adapter: AdapterKind = "lora"
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gated_memory: GatedMemoryConfig = field(default_factory=GatedMemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)  # the queries of distillation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Stable hash of every field that changes the tuned adapter (keys caches and resume).

        Window, answer length and confidence routing do not change it: left out.
        """
        data = self.to_dict()
        for (section, key), value in FINGERPRINT_DEFAULTS.items():
            if data[section].get(key) == value:
                data[section].pop(key)
        if not data["distill"]["enabled"]:  # the other distill fields and the queries change nothing then
            data.pop("distill")
            data.pop("queries")
        for key in ("window", "max_new_tokens", "route_by_confidence"):
            data["inference"].pop(key)
        data["gated_memory"]["gate_scale"] = GATE_SCALE  # hashed as when it was a field: fingerprints unchanged
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "LiftConfig":
        sub = {
            "segment": SegmentConfig,
            "context": ContextConfig,
            "qa": QAConfig,
            "lora": LoRAConfig,
            "gated_memory": GatedMemoryConfig,
            "train": TrainConfig,
            "inference": InferenceConfig,
            "distill": DistillConfig,
            "queries": QueryConfig,
        }
        kwargs = {}
        for key, value in data.items():
            if key in sub:
                value = dict(value)
                for legacy in LEGACY_FIELDS.get(key, ()):
                    value.pop(legacy, None)
                if key == "gated_memory" and "gate_scale" in value:  # a field until the constant (manifests keep it)
                    legacy = value.pop("gate_scale")
                    if legacy != GATE_SCALE:
                        raise ValueError(f"gated_memory.gate_scale={legacy!r} is not supported: the gate scale of "
                                         f"Gated Memory is fixed at {GATE_SCALE}")
                for tup in ("targets", "betas", "kinds"):
                    if tup in value and isinstance(value[tup], list):
                        value[tup] = tuple(value[tup])
                if key == "inference" and "route_by_confidence" not in value:  # a manifest from before the field
                    value["route_by_confidence"] = default_routing(data.get("adapter", "lora"))
                kwargs[key] = sub[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def default_routing(adapter: str) -> bool:
    """Confidence routing (InferenceConfig.route_by_confidence) for an adapter kind: on for
    LoRA, off for Gated Memory, as chosen on the real-prose questions (bench/README.md,
    "Quality": with routing LoRA `cpu-prose` answered 5 of 24 in-window questions, as
    truncated ICL, against 3 without; with Gated Memory it lost answers, 4 of 98 against 5
    with the cpu preset and 6 against 8 with `cpu-prose`, which answers 5 of 24 in-window
    questions unrouted)."""
    return adapter == "lora"


# Fields added after adapters were published, left out of the fingerprint while they hold
# the value every older adapter was tuned with, so that those keep their fingerprint.
FINGERPRINT_DEFAULTS = {("train", "compute_dtype"): "float32", ("train", "segment_weight"): 1.0,
                        ("train", "qa_weight"): 1.0, ("train", "distill_weight"): 1.0,
                        ("distill", "anchor_fraction"): 0.0, ("distill", "teacher_context"): False}

# Fields that older manifests carry and that moved elsewhere (dropped when read back):
# train.checkpoint_every is BatchConfig.checkpoint_every now.
LEGACY_FIELDS = {"train": ("checkpoint_every",)}


@dataclass
class BatchConfig:
    """How the tuning engine runs a job (docs/DESIGN.md §4). Apart from prefix_sharing, none of
    these change what an adapter learns; they are not part of LiftConfig's fingerprint."""

    max_active: int = 16  # documents trained at once: the adapter bank's size N
    memory_budget: int | None = None  # bytes for one step's memory plan; None: 80% of what is free
    # One head/tail context split per document per step, computed once and shared by that
    # document's samples (lift_engine.batch.prefix). None: on for CPU, where it saves
    # compute (1.2-1.4x), off on a GPU (launch-bound there; 1.6x slower measured).
    # False: every sample draws its own split.
    prefix_sharing: bool | None = None
    checkpoint_every: int = 1  # global steps between per-document checkpoints (1: a kill loses <= 1 step)
    logits_chunk: int = 1024  # loss positions per chunk of the vocabulary projection

    def validate(self) -> "BatchConfig":
        """Raise ValueError naming the first bad field; returns self."""
        if self.max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {self.max_active}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.logits_chunk < 1:
            raise ValueError(f"logits_chunk must be positive, got {self.logits_chunk}")
        return self

    def prefix_sharing_on(self, device_type: str) -> bool:
        """prefix_sharing with None resolved for a job on `device_type` ("cpu", "cuda")."""
        return (device_type == "cpu") if self.prefix_sharing is None else bool(self.prefix_sharing)


@dataclass
class PreSftConfig:
    """Pre-LIFT supervised fine-tuning (docs/DESIGN.md §2.7; lift_engine.presft): one LoRA adapter
    shared by every document of a corpus, trained on all their LIFT samples mixed, then
    merged into the base's weights. The per-document samples (segment length, context,
    extractive tasks, loss weights) come from the LiftConfig the run is given; the fields
    here override its LoRA size, learning rate, batch size and task count."""

    epochs: int = 1  # passes over the corpus; each pass: every document's segments + QA (+ distillation), shuffled together
    rank: int = 16  # LoRA r of the shared adapter
    alpha: float | None = None  # LoRA α (None: 2·rank)
    lr: float = 1e-3  # AdamW learning rate of the shared adapter
    batch_size: int = 8  # samples per optimizer step, drawn from the whole corpus
    num_extractive: int = 16  # extractive tasks per document (besides a jsonl record's gold QA)
    merge: bool = True  # merge the adapter into the weights and write a model dir (False: write the adapter)
    synthetic: int = 0  # documents from the project's synthetic generator added to the corpus
    synthetic_seed: int = 0  # their seed (data/synthetic.make_dataset)
    synthetic_paragraphs: int = 16  # filler paragraphs per synthetic document (~100 tokens each)

    def validate(self) -> "PreSftConfig":
        """Raise ValueError naming the first bad field; returns self."""
        for name in ("epochs", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_extractive", "synthetic"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.synthetic_paragraphs < 3:
            raise ValueError(f"synthetic_paragraphs must be at least 3, got {self.synthetic_paragraphs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        return self

    def lift_config(self, cfg: "LiftConfig") -> "LiftConfig":
        """`cfg` (the per-document sample recipe) with this run's adapter size, learning rate,
        batch size and task count; a copy, LoRA only."""
        out = LiftConfig.from_dict(cfg.to_dict())
        out.adapter = "lora"
        out.lora.r = self.rank
        out.lora.alpha = float(self.alpha if self.alpha is not None else 2 * self.rank)
        out.train.lr_lora = self.lr
        out.train.batch_size = self.batch_size
        out.qa.num_extractive = self.num_extractive
        return out


def paper_preset(adapter: AdapterKind = "lora") -> LiftConfig:
    """The paper's numbers (docs/DESIGN.md §2): ℓ=2048, C=4096, 10 QA, E1=3, E2=5."""
    return LiftConfig(preset="paper", adapter=adapter)


def cpu_preset(adapter: AdapterKind = "lora") -> LiftConfig:
    """Small enough that the default demo finishes in minutes on 2 CPU cores.

    Training cost grows as (L / s) · (C + ℓ) per segment epoch, so the CPU preset keeps
    the paper's stride ratio but a short context, one segment-only epoch, and leans on
    many short auxiliary tasks (what makes stored knowledge usable, docs/DESIGN.md §2.3).

    Measured on the bundled demo document (2,458 tokens, window 512, quiet 2-core CPU):
    24 tasks × E2 = 2 answered 4/12; 24 × E2 = 4 answered 10/12 (529 s of tuning);
    48 tasks (each fact asked as fact/wh/entity/cloze) × E2 = 3 answered 11/12 (352 s) and,
    with the final extractor, 9/12 in `lift demo` (342 s) — full-context ICL answers 9/12.
    Fewer stage-2 epochs leave the facts stored but unusable.
    """
    return LiftConfig(
        preset="cpu",
        adapter=adapter,
        segment=SegmentConfig(length=256),
        context=ContextConfig(length=128),
        qa=QAConfig(num_generated=0, use_generator=False, num_extractive=48),
        lora=LoRAConfig(r=16, alpha=32.0),
        train=TrainConfig(stage1_epochs=1, stage2_epochs=3, lr_lora=2e-3, lr_gated_memory=2e-3, batch_size=4),
        inference=InferenceConfig(window=512, max_new_tokens=32),
    )


def cpu_prose_preset(adapter: AdapterKind = "lora") -> LiftConfig:
    """The cpu preset plus context distillation (docs/DESIGN.md §2.6) on extractive and
    template queries, half of the targets also trained as anchors (the passage in view):
    the recipe that answered best on the real-prose development set (bench/README.md,
    "Quality": LoRA 8/98 where the cpu preset and truncated ICL answered 5/98; 9/98 with
    confidence routing; Gated Memory 8/98), at 2.6–2.9× the cpu preset's tuning time there
    and 2.8× on a 3.9k-token synthetic document (fp32, 2 cores, AVX-512). No generated
    queries: the 135M default model writes poor ones, slowly. On the
    templated synthetic documents the cpu preset is as good for a fraction of the cost, so
    it stays the default."""
    cfg = cpu_preset(adapter)
    cfg.preset = "cpu-prose"
    cfg.distill = DistillConfig(enabled=True, generate_queries=False, anchor_fraction=0.5)
    return cfg


PRESETS = {"paper": paper_preset, "cpu": cpu_preset, "cpu-prose": cpu_prose_preset}


def make_config(preset: str = "cpu", adapter: AdapterKind = "lora") -> LiftConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if adapter not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {list(ADAPTER_KINDS)}")
    cfg = PRESETS[preset](adapter)
    cfg.inference.route_by_confidence = default_routing(adapter)
    return cfg
