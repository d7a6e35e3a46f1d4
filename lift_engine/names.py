"""The one name rule for tenants, adapters and documents (docs/DESIGN.md §6.2).

A name becomes a directory: of a tuned adapter (`lift tune -o`), of a batch job's document
(its adapter directory), of a tenant or adapter in the store (store.py). One rule serves
the CLI, the batch job, its queue and the store, so an adapter tuned under a name can
always be published under it:

    1–64 ASCII letters, digits, '.', '_' or '-', starting and ending with a letter or digit

So no '/', no '..', no absolute path, no hidden entry, no NUL, newline or space can ever
reach the file system. `validate_name` checks a given name; `sanitize_name` makes one
out of a file stem or a .jsonl name field (batch/inputs.py).
"""
from __future__ import annotations

import hashlib
import re

from lift_engine.errors import InputError

MAX_NAME_LENGTH = 64
NAME_RULE = (f"1-{MAX_NAME_LENGTH} ASCII letters, digits, '.', '_' or '-', "
             "starting and ending with a letter or digit")
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,%d}[A-Za-z0-9])?" % (MAX_NAME_LENGTH - 2), re.ASCII)
_OUTSIDE = re.compile(r"[^A-Za-z0-9._-]+")
_EDGES = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")


class InvalidName(InputError, ValueError):
    """A tenant, adapter or document name that is not allowed (path tricks, bad characters, length)."""


def validate_name(name: object, what: str = "adapter") -> str:
    """Return `name` if it follows the rule above, else raise InvalidName saying which `what`
    (e.g. "tenant", "adapter", "document") was checked and what the rule is."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidName(f"{what} name is empty (use {NAME_RULE})")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} name {name[:20]!r}… is {len(name)} characters long, more than {MAX_NAME_LENGTH} "
                          f"(use {NAME_RULE})")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(f"{what} name {name!r} is invalid: use {NAME_RULE}")
    return name


def is_valid_name(name: object) -> bool:
    try:
        validate_name(name)
        return True
    except InvalidName:
        return False


def sanitize_name(raw: object, default: str = "doc", suffix: str = "") -> str:
    """A valid name made from `raw` (a file stem, a .jsonl "name"/"id" field), ending in
    `suffix` (e.g. "-3"; itself made of allowed characters, ending in a letter or digit).

    Every run of characters outside [A-Za-z0-9._-] (unicode, '/', spaces …) becomes '-',
    characters that are not letters or digits are stripped from both ends; a result longer
    than the limit keeps its first characters plus '-' and 8 hex digits of a hash of `raw`
    (so long names that differ only at the end stay distinct); `default` when nothing is left.
    """
    raw = str(raw)
    limit = MAX_NAME_LENGTH - len(suffix)
    cleaned = _EDGES.sub("", _OUTSIDE.sub("-", raw))
    if len(cleaned) > limit:
        digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        head = _EDGES.sub("", cleaned[: limit - len(digest) - 1])
        cleaned = f"{head}-{digest}" if head else digest
    return validate_name((cleaned or default) + suffix, "sanitized")
