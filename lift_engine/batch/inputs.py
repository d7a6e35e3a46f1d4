"""The documents of a batched `lift tune`: files, directories and .jsonl files.

    collect_documents(["a.md", "docs/", "set.jsonl"]) -> [(name, text, source), …]

A file's name is its stem; a directory contributes its .txt/.md/… files (sorted, not
recursive, hidden files skipped); a .jsonl line is an object with the text under "text",
"document" or "context" (LongBench) and an optional name under "name", "id" or "_id"
(default <stem>-<line number>). Names are made valid (lift_engine.names.sanitize_name:
the one rule of the store and the job) and must be unique.
"""
from __future__ import annotations

import os
from pathlib import Path

from lift_engine.data.jsonl import iter_json_objects
from lift_engine.errors import InputError
from lift_engine.names import sanitize_name

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")  # what counts as a document file (also `lift tune-service`)

_TEXT_KEYS = ("text", "document", "context")
_NAME_KEYS = ("name", "id", "_id")


def collect_documents(sources: list[str]) -> list[tuple[str, str, str]]:
    from lift_engine.data.documents import read_document

    out: list[tuple[str, str, str]] = []
    for source in sources:
        if source == "-":
            raise InputError("stdin (-) can only be tuned alone; give files, a directory or a .jsonl for a batched job")
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in DOC_SUFFIXES)
            if not files:
                raise InputError(f"{source}: no documents ({', '.join(DOC_SUFFIXES)}) in this directory")
            out += [(sanitize_name(p.stem), read_document(p), str(p)) for p in files]
        elif path.suffix.lower() == ".jsonl":
            out += _read_jsonl(path)
        else:
            out.append((sanitize_name(path.stem), read_document(path), str(path)))
    seen: dict[str, str] = {}
    for name, _, source in out:
        if name in seen:
            raise InputError(f"two documents would both be written to {name!r}: {seen[name]} and {source}")
        seen[name] = source
    return out


def _read_jsonl(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for number, row in iter_json_objects(path):
        text = next((row[k] for k in _TEXT_KEYS if isinstance(row.get(k), str)), None)
        if text is None or not text.strip():
            raise InputError(f"{path}:{number}: no document text (keys {', '.join(_TEXT_KEYS)})")
        raw = next((row[k] for k in _NAME_KEYS if row.get(k) not in (None, "")), None)
        name = sanitize_name(raw) if raw is not None else sanitize_name(path.stem, suffix=f"-{number}")
        out.append((name, text.replace("\r\n", "\n"), f"{os.fspath(path)}:{number}"))
    return out
