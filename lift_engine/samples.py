"""Training samples of one document (docs/DESIGN.md §2.1–2.4).

Three kinds of sample, all placed behind a head/tail context of the document:

    segment:  prompt(context, recite instruction) + segment ids          loss on the segment
    qa:       question_prompt(context, question) + answer + end of turn  loss on the answer
    distill:  question_prompt(context, query) + teacher's answer         KL to the teacher's
              (docs/DESIGN.md §2.6; the teacher read the query's chunk)        top-k at each answer token
    anchor:   question_prompt(chunk, query) + teacher's answer           the same KL, with the
              (distill.anchor_fraction of the targets; the student sees   passage in view
              exactly the teacher's prompt: `teacher_passage`)

Each kind's per-token loss is scaled by its weight in the config (train.segment_weight,
qa_weight, distill_weight); a kind of weight 0 is left out of the plan.

Samples are planned as light (kind, index) references and built only when a step needs
them, so a 1M-token document never materialises thousands of token lists at once. The
head/tail split of the context is drawn afresh for every sample of every epoch (variety);
everything is deterministic for a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lift_engine.config import LiftConfig
from lift_engine.data.extractive import QAItem
from lift_engine.data.queries import Chunk, document_chunks
from lift_engine.data.segmentation import segment_spans
from lift_engine.data.truncation import head_tail_context
from lift_engine.prompts import PromptBuilder

IGNORE_INDEX = -100
# Version of the task set and sample layout (this module, data/extractive.py, data/tasks.py,
# prompts.py). Bump it whenever a change makes the same document and config train on other
# samples: it is part of every job key and adapter-cache key, so nothing tuned before the
# change is resumed or reused after it.
RECIPE_VERSION = "recipe-1"
HEAD_FRACTION_RANGE = (0.25, 0.75)


def teacher_passage(doc_ids: list[int], chunk: Chunk, cfg: LiftConfig, sep_ids: list[int]) -> list[int]:
    """The context the distillation teacher reads for a query about `chunk`, and an anchor
    sample's student with it (docs/DESIGN.md §2.6): the chunk's tokens; with
    cfg.distill.teacher_context, also the document's head and tail (context.length tokens,
    half each) around it, in document order, `sep_ids` wherever tokens are skipped."""
    ctx = cfg.context
    if not (cfg.distill.teacher_context and ctx.enabled and ctx.length > 0):
        return list(doc_ids[chunk.start : chunk.end])
    n, head = len(doc_ids), ctx.length // 2
    spans: list[tuple[int, int]] = []
    for a, b in sorted([(0, min(head, n)), (chunk.start, chunk.end), (max(0, n - (ctx.length - head)), n)]):
        if a >= b:
            continue
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    out: list[int] = []
    for i, (a, b) in enumerate(spans):
        out += (list(sep_ids) if i else []) + list(doc_ids[a:b])
    return out


@dataclass
class Sample:
    """One training sequence. input_ids, labels: [S] (labels IGNORE_INDEX where no loss);
    doc: the document's adapter slot; weight: scale of its token losses. soft: for a
    distill sample, the teacher's (top_ids [n, k], top_logprobs [n, k]) at its n labelled
    positions, in order (the labels hold the teacher's answer tokens)."""

    input_ids: list[int]
    labels: list[int]
    kind: str
    doc: int = 0
    weight: float = 1.0
    soft: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class TeacherAnswer:
    """A context-distillation target: a query about chunk `chunk` of the document, the
    frozen base's answer with that chunk in its prompt (answer_ids: its tokens, end of turn
    included) and its next-token distribution at each answer position, cut to the top k:
    top_ids [n, k] (long), top_logprobs [n, k] (float32), n = len(answer_ids)."""

    question: str
    answer_ids: list[int]
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    chunk: int = 0


@dataclass(frozen=True)
class SampleRef:
    """A planned sample: kind ("segment" | "qa" | "distill" | "anchor"), its index, and the seed of its context split."""

    kind: str
    index: int
    seed: int


@dataclass
class DocumentSamples:
    """Everything needed to build any sample of one document on demand."""

    doc_ids: list[int]
    qa_items: list[QAItem]
    cfg: LiftConfig
    prompts: PromptBuilder
    doc: int = 0
    teacher_answers: list[TeacherAnswer] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        seg = self.cfg.segment
        self.spans = segment_spans(len(self.doc_ids), seg.length, seg.stride)
        self._qa_answers = [self.prompts.answer_ids(item.answer) for item in self.qa_items]
        self._chunks: list[Chunk] | None = None

    # --- planning -----------------------------------------------------------------
    @property
    def chunks(self) -> list[Chunk]:
        """The document's chunks as the teacher read them (data/queries.document_chunks)."""
        if self._chunks is None:
            self._chunks = document_chunks(self.doc_ids, self.prompts.tokenizer, self.cfg.queries.chunk_tokens)
        return self._chunks

    def anchor_indices(self) -> list[int]:
        """Teacher answers that also train as anchors: distill.anchor_fraction of them, evenly spread."""
        fraction = self.cfg.distill.anchor_fraction
        n = len(self.teacher_answers)
        return [i for i in range(n) if int((i + 1) * fraction) > int(i * fraction)]

    def epoch_plan(self, stage: int, epoch: int) -> list[SampleRef]:
        """Shuffled sample refs of one epoch: stage 1 segments only, stage 2 segments + QA +
        distillation + anchors (kinds of weight 0 left out)."""
        train = self.cfg.train
        rng = random.Random(f"{train.seed}-{self.doc}-{stage}-{epoch}")
        refs = []
        if train.segment_weight:
            refs += [SampleRef("segment", i, rng.randrange(2**31)) for i in range(len(self.spans))]
        if stage == 2:
            if train.qa_weight:
                refs += [SampleRef("qa", i, rng.randrange(2**31)) for i in range(len(self.qa_items))]
            if train.distill_weight:
                refs += [SampleRef("distill", i, rng.randrange(2**31)) for i in range(len(self.teacher_answers))]
                refs += [SampleRef("anchor", i, rng.randrange(2**31)) for i in self.anchor_indices()]
        rng.shuffle(refs)
        return refs

    def full_plan(self) -> list[SampleRef]:
        """All epochs of both stages in order (docs/DESIGN.md §2.4)."""
        plan: list[SampleRef] = []
        for epoch in range(self.cfg.train.stage1_epochs):
            plan += self.epoch_plan(1, epoch)
        for epoch in range(self.cfg.train.stage2_epochs):
            plan += self.epoch_plan(2, epoch)
        return plan

    # --- building -----------------------------------------------------------------
    def _context(self, seed: int) -> list[int] | None:
        ctx = self.cfg.context
        if not ctx.enabled or ctx.length <= 0:
            return None
        head_fraction = random.Random(seed).uniform(*HEAD_FRACTION_RANGE)
        return head_tail_context(self.doc_ids, ctx.length, self.prompts.separator_ids, head_fraction)

    def build(self, ref: SampleRef) -> Sample:
        context = self._context(ref.seed)
        train, soft = self.cfg.train, None
        if ref.kind == "segment":
            start, end = self.spans[ref.index]
            response = list(self.doc_ids[start:end])
            if context is None:  # plain segment, loss on every token
                return Sample(response, list(response), "segment", self.doc, train.segment_weight)
            prompt = self.prompts.prompt(context, self.cfg.context.recite_instruction)
            weight = train.segment_weight
        elif ref.kind == "qa":
            prompt = self.prompts.question_prompt(context, self.qa_items[ref.index].question)
            response, weight = self._qa_answers[ref.index], train.qa_weight
        elif ref.kind in ("distill", "anchor"):
            target = self.teacher_answers[ref.index]
            if ref.kind == "anchor":
                context = teacher_passage(self.doc_ids, self.chunks[target.chunk], self.cfg, self.prompts.separator_ids)
            prompt = self.prompts.question_prompt(context, target.question)
            response, weight = list(target.answer_ids), train.distill_weight
            soft = (target.top_ids, target.top_logprobs)
        else:
            raise ValueError(f"unknown sample kind {ref.kind!r}")
        return Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, ref.kind, self.doc, weight, soft)

    def loss_tokens(self, ref: SampleRef) -> int:
        """Tokens that carry a loss in this sample (for time estimates), without building it."""
        if ref.kind == "segment":
            start, end = self.spans[ref.index]
            return end - start
        if ref.kind in ("distill", "anchor"):
            return len(self.teacher_answers[ref.index].answer_ids)
        return len(self._qa_answers[ref.index])

    def approx_length(self, ref: SampleRef) -> int:
        """Approximate sequence length of a sample (context + template + response)."""
        context = self.cfg.context.length if self.cfg.context.enabled else 0
        if ref.kind == "anchor":
            around = context if self.cfg.distill.teacher_context else 0
            return self.cfg.queries.chunk_tokens + around + 48 + self.loss_tokens(ref)
        return min(context, len(self.doc_ids)) + 48 + self.loss_tokens(ref)
