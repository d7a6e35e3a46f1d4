import pytest

from lift_engine.data.extractive import QAItem, extract_tasks, split_sentences
from lift_engine.data.synthetic import make_document

PROSE = """# Annual Report

## Overview

Dr. Amelia Rostova founded Kestrel Dynamics in 1987 in the town of Port Harrow. The company employs 4,512 people
across three sites. Its main product, the KD-7740 turbine, delivers 12 MW at full load.

The chairman of Kestrel Dynamics is Tomas Ilvane. Mr. Ilvane joined the board on 3 March 2015, after a career in
shipping. Revenue grew by 14% in the last year.

- The Port Harrow plant was opened by Governor Lisbet Aran.
- Product code QX-19 was retired.

The capital of Norvania is Eskeldorf. Weather is often wet. It rained.
"""


def _assert_verbatim(text, items):
    for it in items:
        assert isinstance(it, QAItem)
        assert it.answer and it.evidence and it.question
        assert it.answer in text, it
        assert it.evidence in text, it
        assert it.answer in it.evidence, it


def test_split_sentences_verbatim_and_abbreviations():
    spans = split_sentences(PROSE)
    sents = [PROSE[a:b] for a, b in spans]
    assert "Dr. Amelia Rostova founded Kestrel Dynamics in 1987 in the town of Port Harrow." in sents
    assert any(s.startswith("Mr. Ilvane joined the board on 3 March 2015") for s in sents)
    assert "The Port Harrow plant was opened by Governor Lisbet Aran." in sents  # list marker dropped
    assert not any(s.startswith("#") for s in sents)  # headings are not sentences
    assert "It rained." in sents
    for a, b in spans:
        assert PROSE[a:b] == PROSE[a:b].strip()


def test_tasks_on_prose_are_verbatim_and_of_all_kinds():
    items = extract_tasks(PROSE, 30, seed=0)
    _assert_verbatim(PROSE, items)
    kinds = {it.kind for it in items}
    assert {"entity", "cloze", "fact"} <= kinds
    facts = {(it.question, it.answer) for it in items if it.kind == "fact"}
    assert ("What is the capital of Norvania?", "Eskeldorf") in facts
    assert ("Who is the chairman of Kestrel Dynamics?", "Tomas Ilvane") in facts
    for it in items:
        if it.kind == "cloze":
            quoted = it.question.split("'", 1)[1].rsplit("'", 1)[0]
            assert quoted.count("___") == 1
            assert quoted.replace("___", " ".join(it.answer.split())) == " ".join(it.evidence.split())
            assert "\n" not in it.question
        if it.kind == "entity":
            assert it.question.startswith("What does the document say about ")
            assert it.answer == it.evidence


def test_deterministic_and_bounded():
    doc, _ = make_document(3, n_facts=30, filler_paragraphs=60)
    a = extract_tasks(doc, 20, seed=5)
    b = extract_tasks(doc, 20, seed=5)
    assert a == b
    assert len(a) == 20
    c = extract_tasks(doc, 20, seed=6)
    assert c != a
    assert len(extract_tasks(PROSE, 1000)) < 1000
    assert extract_tasks(PROSE, 0) == []
    assert extract_tasks("no sentences here", 5) == []


def test_spread_over_document():
    doc, _ = make_document(11, n_facts=45, filler_paragraphs=90, middle_fraction=1 / 3)
    items = extract_tasks(doc, 24, seed=0)
    _assert_verbatim(doc, items)
    thirds = [0, 0, 0]
    for it in items:
        thirds[min(2, 3 * doc.index(it.evidence) // len(doc))] += 1
    assert min(thirds) >= 5, thirds


def test_prefers_distinctive_spans():
    common = " ".join(f"The Velbrunn Council met again in week {i}." for i in range(12))
    text = common + " Nobody expected that Ottoline Graves would sign the Marrow Accord on 9 May 1901. " + common
    items = extract_tasks(text, 10, seed=0)
    _assert_verbatim(text, items)
    assert items, "expected tasks about the distinctive sentence"
    assert all("Velbrunn Council" not in it.question for it in items)
    assert any("Ottoline Graves" in it.question or it.answer == "Ottoline Graves" for it in items)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_document_tasks_verbatim(seed):
    doc, _ = make_document(seed, n_facts=20, filler_paragraphs=30)
    _assert_verbatim(doc, extract_tasks(doc, 40, seed=seed))


FACTS = """The Tophocys River is 1684 kilometres long. Weather is often wet in the valleys.
Ciastaevol was first synthesised by Piahan Wozigiath in Feixora. Children swim in the cold lakes.
The Treaty of Toundstad was signed in 1643. The post arrives twice a week in the hamlets.
The headquarters of Beistin Optics is in Drianmere. The mayor of Droulstad is Keipeim Ziasto.
"""


def test_wh_questions_ask_in_place():
    items = extract_tasks(FACTS, 60, seed=0)
    _assert_verbatim(FACTS, items)
    wh = {(it.question, it.answer) for it in items if it.kind == "wh"}
    assert ("The Tophocys River is how many kilometres long?", "1684 kilometres") in wh
    assert ("Ciastaevol was first synthesised by whom in Feixora?", "Piahan Wozigiath") in wh
    assert ("The Treaty of Toundstad was signed in what year?", "1643") in wh
    assert ("The headquarters of Beistin Optics is where?", "Drianmere") in wh
    for question, answer in wh:
        assert question.endswith("?") and answer not in question


def test_passive_clauses_become_fronted_questions():
    facts = {(it.question, it.answer) for it in extract_tasks(FACTS, 60, seed=0) if it.kind == "fact"}
    assert ("Who first synthesised Ciastaevol?", "Piahan Wozigiath") in facts
    assert ("In what year was the Treaty of Toundstad signed?", "1643") in facts
    assert ("Who is the mayor of Droulstad?", "Keipeim Ziasto") in facts


def test_one_fact_in_several_forms_before_repeats():
    text = "Filler words are here today. The keeper of the Stendford lighthouse is Trogoth Kemos. More filler is here."
    items = extract_tasks(text, 4, seed=0)
    _assert_verbatim(text, items)
    assert len(items) == 4
    assert len({it.kind for it in items}) == 4, [(it.kind, it.question) for it in items]


@pytest.mark.parametrize("sentence", [
    "The count rose to 1,643 people last week.", "The ratio was 1643.5 at the end.", "It weighs 1643kg in all.",
])
def test_years_are_whole_four_digit_numbers(sentence):
    for it in extract_tasks(sentence, 10, seed=0):
        assert it.answer != "1643" and it.answer != "643"


def test_passive_agent_after_another_phrase():
    text = "Filler words are here today. Kelmor Works was founded in 1877 by Avel Droun. More filler is here."
    facts = {(it.question, it.answer) for it in extract_tasks(text, 20, seed=0, max_per_sentence=8) if it.kind == "fact"}
    assert ("Who founded Kelmor Works?", "Avel Droun") in facts
    assert ("In what year was Kelmor Works founded?", "1877") in facts


def test_wh_question_across_a_soft_line_wrap():
    text = "Filler words are here today. The Treaty of Toundstad was signed\nin 1643. More filler is here."
    wh = {(it.question, it.answer) for it in extract_tasks(text, 20, seed=0, max_per_sentence=8) if it.kind == "wh"}
    assert ("The Treaty of Toundstad was signed in what year?", "1643") in wh
