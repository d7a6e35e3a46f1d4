"""Overlapping segmentation of a tokenised document (docs/DESIGN.md §2.1)."""
from __future__ import annotations

from lift_engine.errors import InputError


def segment_spans(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of the training segments of a document of `n_tokens`.

    Segment k covers [k·stride, k·stride + length). Segments are emitted for
    k = 0, 1, ..., K where K is the first k whose segment reaches the end
    (k·stride + length >= n_tokens); that last one is clipped to end exactly at
    n_tokens, so it is between length - stride + 1 and length tokens long. There is
    never a duplicate or empty final span. A document no longer than `length` gives the
    single span [(0, n_tokens)].

    Every token is covered (stride <= length), consecutive spans overlap by
    length - stride tokens, and all starts are multiples of `stride`.

    Example: n_tokens=10, length=4, stride=3 -> [(0, 4), (3, 7), (6, 10)].

    Raises:
        InputError: n_tokens == 0 (an empty document).
        ValueError: length <= 0, stride <= 0, stride > length (gaps), n_tokens < 0.
    """
    if length <= 0:
        raise ValueError(f"segment length must be positive, got {length}")
    if stride <= 0:
        raise ValueError(f"segment stride must be positive, got {stride}")
    if stride > length:
        raise ValueError(f"segment stride {stride} exceeds length {length}: tokens would be skipped")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        raise InputError("the document has no tokens to train on")
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = start + length
        if end >= n_tokens:
            spans.append((start, n_tokens))
            return spans
        spans.append((start, end))
        start += stride
