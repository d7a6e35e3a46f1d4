"""The text/data layer of LIFT: documents, evaluation records, segmentation,
truncation, auxiliary tasks (extractive and generated), queries about chunks (context
distillation) and the synthetic QA set.

Names are imported lazily from their modules (lift_engine.data.documents, ...), so
importing one piece does not import the others.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "read_document": "documents",
    "tokenize_long": "documents",
    "document_sha256": "documents",
    "build_qa_items": "tasks",
    "stored_qa_items": "tasks",
    "EvalRecord": "records",
    "read_records": "records",
    "segment_spans": "segmentation",
    "middle_truncate": "truncation",
    "head_tail_context": "truncation",
    "QAItem": "extractive",
    "extract_tasks": "extractive",
    "split_sentences": "extractive",
    "Generator": "qa_synthesis",
    "HFGenerator": "qa_synthesis",
    "OpenAIGenerator": "qa_synthesis",
    "chunk_text": "qa_synthesis",
    "parse_triple": "qa_synthesis",
    "passes_evidence_check": "qa_synthesis",
    "synthesize_qa": "qa_synthesis",
    "Chunk": "queries",
    "Query": "queries",
    "QuerySet": "queries",
    "QueryGenerator": "queries",
    "document_chunks": "queries",
    "generate_queries": "queries",
    "make_query_generator": "queries",
    "make_document": "synthetic",
    "make_dataset": "synthetic",
    "write_jsonl": "synthetic",
    "load_demo_records": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
