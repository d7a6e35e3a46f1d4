"""The tuning engine (docs/DESIGN.md §4): one adapter bank, mixed batches, continuous admission.
Every tuning — one document, many, eval, demo, the service's Ray actors — is a BatchTuneJob.

    BatchTuneJob    lift_engine.batch.job      submit / progress / collect, resumable
    plain_token_loss, collate  lift_engine.batch.forward   a batch through the model
    JobProgressDisplay  lift_engine.batch.progress  progress bars per document and overall
    SlotAdamW       lift_engine.batch.optim    AdamW stepping only the active slots
    MemoryPlanner   lift_engine.batch.planner  micro-batches and checkpointing within a budget
"""
from __future__ import annotations


def __getattr__(name):
    if name == "BatchTuneJob":
        from lift_engine.batch.job import BatchTuneJob

        return BatchTuneJob
    if name == "SlotAdamW":
        from lift_engine.batch.optim import SlotAdamW

        return SlotAdamW
    if name == "MemoryPlanner":
        from lift_engine.batch.planner import MemoryPlanner

        return MemoryPlanner
    raise AttributeError(name)
