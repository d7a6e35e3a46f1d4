"""Training samples of one document (DESIGN.md §2.1–2.4).

Two kinds of sample, both placed behind a head/tail context of the document:

    segment:  prompt(context, recite instruction) + segment ids          loss on the segment
    qa:       question_prompt(context, question) + answer + end of turn  loss on the answer

Samples are planned as light (kind, index) references and built only when a step needs
them, so a 1M-token document never materialises thousands of token lists at once. The
head/tail split of the context is drawn afresh for every sample of every epoch (variety);
everything is deterministic for a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lift_engine.config import LiftConfig
from lift_engine.data.extractive import QAItem
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


@dataclass
class Sample:
    """One training sequence. input_ids, labels: [S] (labels IGNORE_INDEX where no loss);
    doc: the document's adapter slot."""

    input_ids: list[int]
    labels: list[int]
    kind: str
    doc: int = 0


@dataclass(frozen=True)
class SampleRef:
    """A planned sample: kind ("segment" | "qa"), its index, and the seed of its context split."""

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
    spans: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        seg = self.cfg.segment
        self.spans = segment_spans(len(self.doc_ids), seg.length, seg.stride)
        self._qa_answers = [self.prompts.answer_ids(item.answer) for item in self.qa_items]

    # --- planning -----------------------------------------------------------------
    def epoch_plan(self, stage: int, epoch: int) -> list[SampleRef]:
        """Shuffled sample refs of one epoch: stage 1 segments only, stage 2 segments + QA."""
        rng = random.Random(f"{self.cfg.train.seed}-{self.doc}-{stage}-{epoch}")
        refs = [SampleRef("segment", i, rng.randrange(2**31)) for i in range(len(self.spans))]
        if stage == 2:
            refs += [SampleRef("qa", i, rng.randrange(2**31)) for i in range(len(self.qa_items))]
        rng.shuffle(refs)
        return refs

    def full_plan(self) -> list[SampleRef]:
        """All epochs of both stages in order (DESIGN.md §2.4)."""
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
        if ref.kind == "segment":
            start, end = self.spans[ref.index]
            response = list(self.doc_ids[start:end])
            if context is None:  # plain segment, loss on every token
                return Sample(response, list(response), "segment", self.doc)
            prompt = self.prompts.prompt(context, self.cfg.context.recite_instruction)
        elif ref.kind == "qa":
            prompt = self.prompts.question_prompt(context, self.qa_items[ref.index].question)
            response = self._qa_answers[ref.index]
        else:
            raise ValueError(f"unknown sample kind {ref.kind!r}")
        return Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response, ref.kind, self.doc)

    def loss_tokens(self, ref: SampleRef) -> int:
        """Tokens that carry a loss in this sample (for time estimates), without building it."""
        if ref.kind == "segment":
            start, end = self.spans[ref.index]
            return end - start
        return len(self._qa_answers[ref.index])

    def approx_length(self, ref: SampleRef) -> int:
        """Approximate sequence length of a sample (context + template + response)."""
        context = self.cfg.context.length if self.cfg.context.enabled else 0
        return min(context, len(self.doc_ids)) + 48 + self.loss_tokens(ref)
