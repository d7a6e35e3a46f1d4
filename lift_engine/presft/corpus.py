"""The corpus of a pre-LIFT SFT run (`lift pre-sft CORPUS...`).

    documents = read_corpus(sources, presft)     [CorpusDocument(name, text, gold, source), …]
    corpus_sha256(documents, presft)             the hash that keys the run's work dir

Sources:
    a directory          its documents (.txt/.md/…) and .jsonl files (sorted, not recursive,
                         hidden files skipped)
    a .jsonl file        one JSON object per line: a LongBench record (context + input +
                         answers) or a LooGLE record (input + qa_pairs) — its questions become
                         gold QA of its document — or a plain document {"text" | "document" |
                         "context", optional "name"} without questions, which still gives
                         segment and extractive samples. Records that share a context are one
                         document with all their questions.
    a document file      .txt/.md/… : one document without gold QA
    presft.synthetic N   N documents of the project's generator (data/synthetic.py), with
                         their questions as gold QA

Anything else (another file type, a line that is not JSON, a record with a malformed
question) is an InputError naming the file and line; an empty corpus is one too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lift_engine.batch.inputs import DOC_SUFFIXES
from lift_engine.config import PreSftConfig
from lift_engine.data.extractive import QAItem
from lift_engine.data.records import EvalRecord, has_qa_layout, parse_record
from lift_engine.data.jsonl import iter_json_objects
from lift_engine.errors import InputError

# Version of how a corpus becomes samples (this package): part of the corpus hash, so a
# work dir of an older recipe is never resumed.
CORPUS_RECIPE = "presft-corpus-1"
_TEXT_KEYS = ("text", "document", "context")
_NAME_KEYS = ("name", "id", "_id", "title")
GOLD_KIND = "gold"


@dataclass
class CorpusDocument:
    """One training document: name (for messages), text, gold QA (question, first accepted
    answer; kind "gold", no evidence) and where it came from."""

    name: str
    text: str
    gold: list[QAItem] = field(default_factory=list)
    source: str = ""


class _Collector:
    """Documents in first-seen order; the same text from two places is one document."""

    def __init__(self) -> None:
        self.docs: dict[str, CorpusDocument] = {}

    def add(self, name: str, text: str, source: str, records: list[EvalRecord] = ()) -> None:
        doc = self.docs.get(text)
        if doc is None:
            doc = self.docs[text] = CorpusDocument(name=name, text=text, source=source)
        seen = {item.question for item in doc.gold}
        for r in records:
            if r.question not in seen:
                doc.gold.append(QAItem(question=r.question, answer=r.answers[0], evidence="", kind=GOLD_KIND))
                seen.add(r.question)


def read_corpus(sources: list[str], presft: PreSftConfig) -> list[CorpusDocument]:
    """Every document of `sources` and presft.synthetic generated ones (see the module doc).
    Raises InputError (one line) for an unusable source or an empty corpus."""
    collector = _Collector()
    for source in sources:
        _read_source(Path(source), collector, top=True)
    if presft.synthetic:
        from lift_engine.data.synthetic import make_dataset

        rows = make_dataset(presft.synthetic, seed=presft.synthetic_seed, filler_paragraphs=presft.synthetic_paragraphs)
        for number, row in enumerate(rows, start=1):
            records = parse_record(row, "synthetic", number)
            name = f"synthetic-{row['_id'].rsplit('-', 2)[-2]}"
            collector.add(name, row["context"], f"synthetic (seed {presft.synthetic_seed})", records)
    if not collector.docs:
        raise InputError("the corpus is empty: give directories, .jsonl files or documents, or --synthetic N")
    return list(collector.docs.values())


def _read_source(path: Path, collector: _Collector, top: bool) -> None:
    from lift_engine.data.documents import read_document

    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if not top:
            return
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                         and (p.suffix.lower() in DOC_SUFFIXES or p.suffix.lower() == ".jsonl"))
        if not entries:
            raise InputError(f"{path}: no documents ({', '.join(DOC_SUFFIXES)}) or .jsonl files in this directory")
        for entry in entries:
            _read_source(entry, collector, top=False)
    elif path.suffix.lower() == ".jsonl":
        _read_jsonl(path, collector)
    elif path.suffix.lower() in DOC_SUFFIXES:
        collector.add(path.stem, read_document(path), str(path))
    else:
        raise InputError(f"{path}: not a corpus file (expected a directory, a .jsonl file or a "
                         f"{'/'.join(DOC_SUFFIXES)} document)")


def _read_jsonl(path: Path, collector: _Collector) -> None:
    name = os.fspath(path)
    for number, obj in iter_json_objects(path, hint="a corpus file must hold one JSON object per line"):
        label = next((str(obj[k]) for k in _NAME_KEYS if obj.get(k) not in (None, "")), f"{path.stem}-{number}")
        if has_qa_layout(obj):
            records = parse_record(obj, name, number)
            collector.add(label, records[0].context, f"{name}:{number}", records)
            continue
        text = next((obj[k] for k in _TEXT_KEYS if isinstance(obj.get(k), str)), None)
        if text is None or not text.strip():
            raise InputError(f"{name}:{number}: no document text (keys {', '.join(_TEXT_KEYS)}) and no "
                             "LongBench/LooGLE layout")
        collector.add(label, text.replace("\r\n", "\n"), f"{name}:{number}")


def corpus_sha256(documents: list[CorpusDocument], presft: PreSftConfig) -> str:
    """Hex SHA-256 of what the run's samples are made of: every document's text and gold QA
    in order, the number of epochs and the corpus recipe. (The LiftConfig, the base model
    and the engine are in the job key beside it.)"""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": CORPUS_RECIPE, "epochs": presft.epochs}, sort_keys=True).encode())
    for doc in documents:
        digest.update(hashlib.sha256(doc.text.encode()).digest())
        digest.update(json.dumps([[q.question, q.answer] for q in doc.gold]).encode())
    return digest.hexdigest()
