"""bench_quality's question sets: the oracle passage holds the answer, and the in-window split
says whether the truncated window shows it. No model runs here."""
from __future__ import annotations

from bench.bench_quality import ORACLE_TOKENS, oracle_records, window_split
from lift_engine.data.documents import tokenize_long
from lift_engine.data.records import EvalRecord
from helpers_tokenizer import make_tokenizer

FILLER = "The quick brown fox jumps over the lazy dog. "


def _record(answer_at: float, answer: str = "QX-7731", paragraphs: int = 400) -> EvalRecord:
    """A long document with `answer` stated once, at fraction `answer_at` of its length."""
    cut = int(paragraphs * answer_at)
    text = FILLER * cut + f"Its code was {answer}. " + FILLER * (paragraphs - cut)
    return EvalRecord(f"q{answer_at}", text, "What was its code?", [answer], "test")


def test_the_oracle_passage_holds_the_answer_wherever_it_is():
    tokenizer = make_tokenizer()
    records = [_record(at) for at in (0.0, 0.02, 0.5, 0.98, 1.0)]
    assert all(len(tokenize_long(r.context, tokenizer)) > 4 * ORACLE_TOKENS for r in records)
    passages, found = oracle_records(records, tokenizer)
    assert found == len(records)
    for r, p in zip(records, passages):
        assert "QX-7731" in p.context, f"answer at {r.id}: not in its oracle passage"
        assert len(tokenize_long(p.context, tokenizer)) <= ORACLE_TOKENS + 2  # re-tokenising the decoded text
        assert len(tokenize_long(p.context, tokenizer)) >= ORACLE_TOKENS // 2
    # mid-document the passage has text on both sides of the answer
    middle = passages[2].context
    assert middle.index("QX-7731") > len(middle) // 4 and len(middle) - middle.index("QX-7731") > len(middle) // 4


def test_an_answer_absent_from_the_document_gets_an_empty_passage():
    tokenizer = make_tokenizer()
    record = EvalRecord("none", FILLER * 10, "What was its code?", ["ZZ-0000"], "test")
    passages, found = oracle_records([record], tokenizer)
    assert found == 0 and passages[0].context.strip() == ""


def test_window_split_sees_the_head_and_the_tail_not_the_middle():
    tokenizer = make_tokenizer()
    records = [_record(0.0), _record(0.5), _record(1.0)]
    split = window_split(records, tokenizer, 256)
    assert [split[r.id] for r in records] == ["in-window", "outside", "in-window"]
