import pytest

from lift_engine.data.truncation import head_tail_context, middle_truncate

SEP = [-1, -2]


def test_middle_truncate_short_is_unchanged():
    ids = list(range(10))
    out = middle_truncate(ids, 10, SEP)
    assert out == ids and out is not ids
    assert middle_truncate(ids, 50, SEP) == ids


@pytest.mark.parametrize("window", [1, 2, 7, 8])
def test_middle_truncate_keeps_head_and_tail(window):
    ids = list(range(100))
    out = middle_truncate(ids, window, SEP)
    head, tail = window // 2, window - window // 2
    assert out == ids[:head] + SEP + ids[100 - tail:]
    assert len(out) == window + len(SEP)  # the separator does not count toward the window


def test_head_tail_fraction():
    ids = list(range(20))
    assert head_tail_context(ids, 10, SEP, head_fraction=0.5) == middle_truncate(ids, 10, SEP)
    assert head_tail_context(ids, 10, SEP, head_fraction=0.3) == [0, 1, 2] + SEP + list(range(13, 20))
    assert head_tail_context(ids, 10, SEP, head_fraction=0.0) == SEP + list(range(10, 20))
    assert head_tail_context(ids, 10, SEP, head_fraction=1.0) == list(range(10)) + SEP
    assert head_tail_context(ids, 25, SEP, head_fraction=0.9) == ids


def test_bad_arguments():
    with pytest.raises(ValueError):
        head_tail_context([1, 2, 3], 2, SEP, head_fraction=1.5)
    with pytest.raises(ValueError):
        middle_truncate([1, 2, 3], 0, SEP)
