"""Answer-quality metrics for long-document QA (LongBench conventions).

Every metric compares a prediction with one reference and returns a float in [0, 1].
qa_f1, exact_match and contains_answer compare after `normalize_answer` (lower case,
punctuation and the articles a/an/the removed, whitespace collapsed; contains_answer also
drops Unicode punctuation such as curly quotes, which LongBench's ASCII set keeps); rouge_l
is Google's `rouge-score` ROUGE-L with its own tokenizer. `score` takes the best over several
references, `aggregate` averages.
"""
from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lower, drop punctuation, drop articles, squash spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between normalised prediction and reference (LongBench's qa_f1_score).

    precision = |common| / |pred tokens|, recall = |common| / |ref tokens|, with common
    the multiset intersection; 0 when nothing is shared.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(ground_truth).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure from the `rouge-score` package (Google's reference implementation).

    Its tokenizer lower-cases and splits on every character outside [a-z0-9] (articles
    count; no stemming), then F = 2PR / (P + R) with P = LCS / |prediction tokens| and
    R = LCS / |reference tokens|. 0.0 when either side has no tokens.
    """
    return float(_rouge_l_scorer().score(ground_truth, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _without_unicode_punctuation(s: str) -> str:
    """`s` without the characters Unicode classes as punctuation (‘’ “” – — … and ASCII's)."""
    return "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))


def contains_answer(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction (on word
    boundaries; Unicode punctuation dropped too, so that a verbatim quote of a document's
    ‘config-failed’ contains config-failed), else 0.0. A reference that normalises to
    nothing counts only as an exact match."""
    ref = normalize_answer(_without_unicode_punctuation(ground_truth))
    pred = normalize_answer(_without_unicode_punctuation(prediction))
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


METRICS = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "contains_answer": contains_answer,
}


def score(prediction: str, answers: list[str]) -> dict[str, float]:
    """Every metric in METRICS, each the max over `answers`.

    Returns {"qa_f1", "rouge_l", "exact_match", "contains_answer"} -> float in [0, 1].
    Raises ValueError when `answers` is empty.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("score() needs at least one reference answer")
    return {name: max(fn(prediction, ref) for ref in answers) for name, fn in METRICS.items()}


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the dicts that have it ({} for an empty list)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in scores:
        for key, value in row.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
