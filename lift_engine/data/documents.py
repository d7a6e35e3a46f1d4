"""Reading and tokenising long documents (docs/DESIGN.md §2.1).

`read_document` streams a file (or stdin) through an incremental UTF-8 decoder so a huge
file never needs more memory than its text plus one chunk of bytes; every way a user can
hand over an unusable file ends in `InputError` with a one-line message naming the file.

`tokenize_long` tokenises a very long text piecewise, cutting at whitespace, so that peak
memory stays bounded by one chunk of text (the token list itself aside).
"""
from __future__ import annotations

import codecs
import hashlib
import os
import sys
from typing import BinaryIO

from lift_engine.errors import InputError

# Bytes that count as "control characters" for binary detection. Tab, LF, FF and CR
# are ordinary in text; everything else below 0x20, and DEL, is not. UTF-8 multi-byte
# sequences only use bytes >= 0x80, so counting on raw bytes is exact for C0 controls.
_CONTROL_BYTES = bytes([b for b in range(0x20) if b not in (0x09, 0x0A, 0x0C, 0x0D)] + [0x7F])
_BOM = "\ufeff"


def _display_name(source: str | os.PathLike) -> str:
    return "<stdin>" if str(source) == "-" else os.fspath(source)


def read_document(
    source: str | os.PathLike,
    *,
    chunk_bytes: int = 1 << 20,
    max_control_fraction: float = 0.1,
) -> str:
    """Read a whole text document as one `str`.

    Args:
        source: a path to any text file (.txt, .md, ...), or "-" for stdin.
        chunk_bytes: bytes read and decoded per step (default 1 MiB).
        max_control_fraction: above this fraction of control bytes (other than
            tab/newline/form feed/CR) the input is taken for binary.

    Returns:
        The text, decoded as UTF-8, with a leading BOM removed and every "\\r\\n" and
        lone "\\r" turned into "\\n". Peak memory is about twice the text (the decoded
        pieces and their join) plus one chunk of bytes.

    Raises:
        InputError: missing path, a directory, unreadable file, binary content (a NUL
            byte or too many control characters), bytes that are not UTF-8 (the message
            gives the byte offset), or text that is empty or only whitespace.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    name = _display_name(source)
    if name == "<stdin>":
        return _read_stream(sys.stdin.buffer, name, chunk_bytes, max_control_fraction)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(f"{name}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{name}: is a directory, not a document")
    try:
        with open(path, "rb") as fh:
            return _read_stream(fh, name, chunk_bytes, max_control_fraction)
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None


def read_document_bytes(data: bytes, name: str = "<upload>", max_control_fraction: float = 0.1) -> str:
    """`read_document` for bytes already in memory (an upload): same checks, same errors."""
    import io

    return _read_stream(io.BytesIO(data), name, 1 << 20, max_control_fraction)


def _read_stream(fh: BinaryIO, name: str, chunk_bytes: int, max_control_fraction: float) -> str:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    parts: list[str] = []
    n_bytes = 0  # bytes handed to the decoder so far
    n_control = 0
    held_cr = False  # a "\r" that ended the previous piece: it may pair with a "\n"
    first = True
    while True:
        chunk = fh.read(chunk_bytes)
        final = not chunk
        if chunk:
            if b"\x00" in chunk:
                offset = n_bytes + chunk.index(b"\x00")
                raise InputError(f"{name}: looks like a binary file (NUL byte at offset {offset}), not text")
            n_control += len(chunk) - len(chunk.translate(None, _CONTROL_BYTES))
            if first and len(chunk) >= 512 and n_control > max_control_fraction * len(chunk):
                raise InputError(f"{name}: looks like a binary file (too many control characters), not text")
        pending = len(decoder.getstate()[0])
        try:
            piece = decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            offset = n_bytes - pending + exc.start
            raise InputError(f"{name}: not valid UTF-8 (bad byte at offset {offset})") from None
        n_bytes += len(chunk)
        if first and piece:
            if piece.startswith(_BOM):
                piece = piece[1:]
            first = False
        if held_cr:
            piece = "\r" + piece
            held_cr = False
        if piece.endswith("\r") and not final:
            piece = piece[:-1]
            held_cr = True
        if piece:
            parts.append(piece.replace("\r\n", "\n").replace("\r", "\n"))
        if final:
            break
    if n_bytes and n_control > max_control_fraction * n_bytes:
        raise InputError(f"{name}: looks like a binary file (too many control characters), not text")
    text = "".join(parts)
    del parts
    if not text or text.isspace():
        raise InputError(f"{name}: the document is empty" + (" (only whitespace)" if text else ""))
    return text


def _split_point(text: str, start: int, chunk_chars: int) -> int:
    """End of the chunk that begins at `start`: just before the last whitespace
    character of a whitespace run (so the next chunk begins with " word", as
    byte-level BPE pre-tokenisers attach a space to the following word), searched in the
    second half of the window; a hard cut when the window has no whitespace."""
    end = start + chunk_chars
    if end >= len(text):
        return len(text)
    lo = start + chunk_chars // 2
    i = end
    while i > lo:
        if text[i].isspace() and not text[i + 1].isspace():
            return i
        i -= 1
    return end


def tokenize_long(text: str, tokenizer, chunk_chars: int = 200_000, progress: bool = False) -> list[int]:
    """Token ids of a very long text, without special tokens, tokenised in chunks.

    The text is cut into pieces of at most `chunk_chars` characters, each cut placed
    just before a whitespace character that precedes a word (see `_split_point`), and
    each piece goes through `tokenizer(piece, add_special_tokens=False)`. The result
    equals `tokenizer(text, add_special_tokens=False)["input_ids"]` except possibly for a
    token or two at each seam (exactly equal for byte-level BPE tokenizers such as
    GPT-2/Llama-3/SmolLM2 on ordinary text). Peak extra memory is one piece.

    Args:
        text: the document.
        tokenizer: a Hugging Face tokenizer (callable returning "input_ids"), or any
            object with `encode(text, add_special_tokens=False) -> list[int]`.
        chunk_chars: characters per piece (>= 2).
        progress: show a tqdm bar over characters.

    Returns:
        list[int] of length L (the document's token count).
    """
    if chunk_chars < 2:
        raise ValueError(f"chunk_chars must be >= 2, got {chunk_chars}")
    from tqdm.auto import tqdm

    ids: list[int] = []
    start = 0
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        while start < len(text):
            end = _split_point(text, start, chunk_chars)
            ids.extend(_encode(tokenizer, text[start:end]))
            bar.update(end - start)
            start = end
    return ids


def _encode(tokenizer, piece: str) -> list[int]:
    if callable(tokenizer):
        out = tokenizer(piece, add_special_tokens=False)
        ids = out["input_ids"] if not isinstance(out, list) else out
    else:
        ids = tokenizer.encode(piece, add_special_tokens=False)
    return list(ids)


def document_sha256(ids: list[int]) -> str:
    """Hex SHA-256 of a tokenised document (its ids as int64): the key of its adapter."""
    import numpy as np

    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
