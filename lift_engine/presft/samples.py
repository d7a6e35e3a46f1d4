"""Every corpus document's LIFT samples as one plan, for one shared adapter.

A CorpusSamples has DocumentSamples' planning interface (full_plan, build, approx_length,
loss_tokens, spans, qa_items, cfg), so the tuning engine trains it as one job entry in
one slot (batch/job.PreparedSource): each step takes the next `batch_size` refs of a plan
that mixes the documents.

    plan = for epoch e < epochs: shuffle(⋃_d  document d's stage-2 epoch plan (e))
           (segments + QA + distillation, samples.DocumentSamples.epoch_plan)

A ref of the corpus is a SampleRef whose index is global within its kind: document d's
local index i is offset[kind][d] + i. So the engine's helpers that rewrite refs (prefix
sharing's one context split per step) keep working, and a ref stays a small frozen value.
Everything is deterministic for the seed.
"""
from __future__ import annotations

import bisect
import random

from lift_engine.config import LiftConfig
from lift_engine.data.extractive import QAItem
from lift_engine.samples import DocumentSamples, Sample, SampleRef

KINDS = ("segment", "qa", "distill")


class CorpusSamples:
    """documents: one DocumentSamples per corpus document (each built with doc=its index,
    so their shuffles and context splits differ); epochs: passes over the corpus; seed:
    the corpus shuffle's seed."""

    def __init__(self, documents: list[DocumentSamples], epochs: int, seed: int = 0):
        if not documents:
            raise ValueError("a corpus needs at least one document")
        self.documents = documents
        self.epochs = int(epochs)
        self.seed = seed
        self.cfg: LiftConfig = documents[0].cfg
        counts = {"segment": [len(d.spans) for d in documents], "qa": [len(d.qa_items) for d in documents],
                  "distill": [len(d.teacher_answers) for d in documents]}
        self._offsets = {kind: _prefix_sums(n) for kind, n in counts.items()}  # [D + 1] per kind

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Every document's segment spans, in document order (counts and estimates)."""
        return [span for d in self.documents for span in d.spans]

    @property
    def qa_items(self) -> list[QAItem]:
        """Every document's auxiliary tasks (extractive and gold), in document order."""
        return [item for d in self.documents for item in d.qa_items]

    # --- planning -----------------------------------------------------------------
    def full_plan(self) -> list[SampleRef]:
        """All epochs in order; each epoch every document's stage-2 samples shuffled together."""
        plan: list[SampleRef] = []
        for epoch in range(self.epochs):
            refs = [SampleRef(r.kind, self._offsets[r.kind][d] + r.index, r.seed)
                    for d, doc in enumerate(self.documents) for r in doc.epoch_plan(2, epoch)]
            random.Random(f"{self.seed}-corpus-{epoch}").shuffle(refs)
            plan += refs
        return plan

    def locate(self, ref: SampleRef) -> tuple[int, SampleRef]:
        """(document index, the ref local to that document) of a corpus ref."""
        offsets = self._offsets[ref.kind]
        if not 0 <= ref.index < offsets[-1]:
            raise IndexError(f"{ref.kind} sample {ref.index} out of range for a corpus of {offsets[-1]}")
        d = bisect.bisect_right(offsets, ref.index) - 1
        return d, SampleRef(ref.kind, ref.index - offsets[d], ref.seed)

    # --- building -----------------------------------------------------------------
    def build(self, ref: SampleRef) -> Sample:
        d, local = self.locate(ref)
        return self.documents[d].build(local)

    def loss_tokens(self, ref: SampleRef) -> int:
        d, local = self.locate(ref)
        return self.documents[d].loss_tokens(local)

    def approx_length(self, ref: SampleRef) -> int:
        d, local = self.locate(ref)
        return self.documents[d].approx_length(local)


def _prefix_sums(counts: list[int]) -> list[int]:
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out
