"""Reading JSON-lines files of objects, with one-line errors a user can act on.

The one reader behind eval records (data/records.py), the documents `lift tune` takes
(batch/inputs.py) and pre-SFT corpora (presft/corpus.py).
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from lift_engine.errors import InputError


def iter_json_objects(path: str | os.PathLike, hint: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`, in order.

    Raises InputError naming the file (and line) for a missing file, a directory, a file
    that is not UTF-8, a line that is not valid JSON or not a JSON object, and a file with
    no objects. `hint` ("a corpus file must …") is appended to the JSON errors.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"{name}: no such file")
    if os.path.isdir(name):
        raise InputError(f"{name}: is a directory, not a jsonl file")
    tail = f"; {hint}" if hint else ""
    count = 0
    try:
        with open(name, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{name}:{number}: not valid JSON ({exc.msg} at column {exc.colno}){tail}") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{name}:{number}: expected a JSON object, got {type(obj).__name__}{tail}")
                count += 1
                yield number, obj
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not valid UTF-8 ({exc.reason}){tail}") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not count:
        raise InputError(f"{name}: no records (the file is empty)")
