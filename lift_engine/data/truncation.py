"""Head + tail windows of a token sequence (docs/DESIGN.md §2.2 and §2.5)."""
from __future__ import annotations


def middle_truncate(ids: list[int], window: int, sep_ids: list[int]) -> list[int]:
    """Keep the first window//2 and last window - window//2 tokens, `sep_ids` between.

    If len(ids) <= window the sequence is returned unchanged (a copy). Otherwise the
    result is ids[:window//2] + sep_ids + ids[-(window - window//2):], whose length is
    window + len(sep_ids): the separator (e.g. the tokens of "...") does NOT count
    toward the window.

    Args:
        ids: token ids, length L.
        window: W, tokens of the document kept (> 0).
        sep_ids: token ids placed where the middle was cut.
    """
    return head_tail_context(ids, window, sep_ids, head_fraction=0.5)


def head_tail_context(ids: list[int], length: int, sep_ids: list[int], head_fraction: float = 0.5) -> list[int]:
    """A window from the head and one from the tail of `ids`, joined by `sep_ids`.

    With h = int(length * head_fraction) and t = length - h, the result is
    ids[:h] + sep_ids + ids[L - t:] when L = len(ids) > length, else ids unchanged (a
    copy: the whole document fits). The separator does not count toward `length`.
    head_fraction = 0.5 gives exactly `middle_truncate`; training draws a random
    head_fraction per sample for variety (docs/DESIGN.md §2.2).

    Args:
        ids: token ids, length L.
        length: C, tokens of the document kept (> 0).
        sep_ids: token ids between the two windows.
        head_fraction: share of `length` taken from the head, in [0, 1].
    """
    if length <= 0:
        raise ValueError(f"window length must be positive, got {length}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction}")
    n = len(ids)
    if n <= length:
        return list(ids)
    head = int(length * head_fraction)
    tail = length - head
    return list(ids[:head]) + list(sep_ids) + list(ids[n - tail:])
