import pytest

from lift_engine.metrics import aggregate, contains_answer, exact_match, normalize_answer, qa_f1_score, rouge_l, score


def test_normalize_answer():
    assert normalize_answer("  The Cat, sat on   a MAT! ") == "cat sat on mat"
    assert normalize_answer("An apple-pie.") == "applepie"


def test_qa_f1_hand_computed():
    # pred tokens: [cat, sat, on, mat]; ref: [cat, sat] -> P = 2/4, R = 1 -> F1 = 2/3
    assert qa_f1_score("The cat sat on the mat", "the cat sat") == pytest.approx(2 / 3)
    # repeated tokens count as a multiset: pred [a1, a1, b], ref [a1, c] -> common 1, P 1/3, R 1/2 -> 0.4
    assert qa_f1_score("a1 a1 b", "a1 c") == pytest.approx(0.4)
    assert qa_f1_score("nothing shared", "other words") == 0.0
    assert qa_f1_score("Paris.", "paris") == 1.0


def test_rouge_l_is_rouge_score_rouge_l():
    # rouge-score's own example (its README): target "The quick brown fox jumps over the lazy
    # dog" (9 tokens), prediction "The quick brown dog jumps on the log." (8): the LCS is
    # [the, quick, brown, jumps, the] = 5 -> P = 5/8, R = 5/9 -> F = 2*5/(8+9) = 10/17.
    assert rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog") \
        == pytest.approx(10 / 17)
    # pred [police, killed, the, gunman], ref [police, kill, the, gunman]: LCS 3 -> P = R = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # pred [p, q, r, s, t], ref [p, r, t]: LCS 3 -> P 3/5, R 1 -> F = 2*0.6/1.6 = 0.75
    assert rouge_l("p q r s t", "p r t") == pytest.approx(0.75)
    # articles count (ROUGE does not drop them): [a, b, c, d, e] vs [a, c, e] -> P 3/5, R 1 -> 0.75
    assert rouge_l("a b c d e", "a c e") == pytest.approx(0.75)
    # case and punctuation are not tokens; no stemming
    assert rouge_l("Paris, France!", "paris france") == 1.0
    assert rouge_l("kills", "kill") == 0.0
    # order matters for LCS but not for F1
    assert rouge_l("z y x", "x y z") == pytest.approx(1 / 3)
    assert qa_f1_score("z y x", "x y z") == 1.0
    assert rouge_l("", "x") == 0.0
    assert rouge_l("!!!", "x") == 0.0


def test_exact_and_contains():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0
    assert contains_answer("It is the Eiffel Tower, in Paris.", "Eiffel tower") == 1.0
    assert contains_answer("It happened in 2012.", "12") == 0.0  # whole words only
    assert contains_answer("Packages in ‘config-failed’ or worse", "config-failed") == 1.0  # curly quotes
    assert contains_answer("the", "a") == 1.0  # both normalise to nothing
    assert contains_answer("something", "the") == 0.0


def test_score_takes_max_over_answers_and_aggregate():
    s = score("The answer is 1808 kilometres", ["1808 kilometres", "1808"])
    assert s["contains_answer"] == 1.0
    assert s["exact_match"] == 0.0
    # best F1 is against "1808 kilometres": pred [answer, is, 1808, kilometres] -> P 2/4, R 1 -> 2/3
    assert s["qa_f1"] == pytest.approx(2 / 3)
    # ROUGE-L keeps every token: [the, answer, is, 1808, kilometres] vs [1808, kilometres] -> P 2/5, R 1 -> 4/7
    assert s["rouge_l"] == pytest.approx(4 / 7)
    assert set(s) == {"qa_f1", "rouge_l", "exact_match", "contains_answer"}
    with pytest.raises(ValueError):
        score("x", [])
    agg = aggregate([{"qa_f1": 1.0, "exact_match": 0.0}, {"qa_f1": 0.5, "exact_match": 1.0}, {"qa_f1": 0.0}])
    assert agg == {"qa_f1": pytest.approx(0.5), "exact_match": pytest.approx(0.5)}
    assert aggregate([]) == {}
