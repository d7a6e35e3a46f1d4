import pytest

from lift_engine.data.segmentation import segment_spans
from lift_engine.errors import InputError


def _check_cover(spans, n, length, stride):
    assert spans[0][0] == 0
    assert spans[-1][1] == n
    covered = set()
    for a, b in spans:
        assert 0 <= a < b <= n
        assert b - a <= length
        covered.update(range(a, b))
    assert covered == set(range(n))


@pytest.mark.parametrize("n", [1, 5, 8, 9, 10, 11, 16, 17, 100, 2048, 2049, 10_000])
@pytest.mark.parametrize("length,stride", [(8, 3), (8, 8), (2048, 768), (4, 1)])
def test_spans_cover_document_with_stride(n, length, stride):
    spans = segment_spans(n, length, stride)
    _check_cover(spans, n, length, stride)
    starts = [a for a, _ in spans]
    assert starts == [k * stride for k in range(len(spans))]
    # all but the last are full-length; no duplicate or empty final span
    assert all(b - a == length for a, b in spans[:-1])
    assert len(set(spans)) == len(spans)
    if len(spans) > 1:
        assert spans[-2][1] < n  # the previous span did not already reach the end
        assert spans[-1][1] - spans[-1][0] > length - stride


def test_exact_example_and_exact_fit():
    assert segment_spans(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    # the second span ends exactly at n: no extra clipped span after it
    assert segment_spans(11, 8, 3) == [(0, 8), (3, 11)]
    assert segment_spans(2048 + 768, 2048, 768) == [(0, 2048), (768, 2816)]


def test_short_document_single_span():
    assert segment_spans(5, 2048, 768) == [(0, 5)]
    assert segment_spans(2048, 2048, 768) == [(0, 2048)]


def test_errors():
    with pytest.raises(InputError):
        segment_spans(0, 8, 3)
    for length, stride in [(0, 1), (-1, 1), (8, 0), (8, -2)]:
        with pytest.raises(ValueError):
            segment_spans(10, length, stride)
    with pytest.raises(ValueError):
        segment_spans(10, 4, 5)  # stride > length would skip tokens
