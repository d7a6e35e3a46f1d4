"""Auxiliary tasks derived from the document itself, with no generator (docs/DESIGN.md §2.3).

Three kinds, all built from spans of the text so that every answer and evidence occurs
verbatim in the document:

- "entity": "What does the document say about E?" -> the sentence that mentions E,
  where E is a distinctive key span: a capitalised multi-word name, a number with its
  unit, a date, or a code such as "ZX-4471";
- "cloze": "Complete the sentence from the document: '... ___ ...'" -> the key span;
- "fact": short factual questions from simple patterns ("the X of Y is Z" ->
  "What is the X of Y?" -> "Z"; "Name is/was a short description" -> "Who/What is Name?";
  passives "S was Ved by P" -> "Who Ved S?", "S was Ved in 1643" -> "In what year was S Ved?");
- "wh": the sentence as an in-situ question, one key span replaced by a wh-phrase of its
  type ("The river is 1684 kilometres long." -> "The river is how many kilometres long?").

One fact seen in several forms (asked, completed, recalled from its subject) is what
makes a small model able to use it when asked in yet another form.

Key spans are preferred when they are rare in the document (a span seen once is
unambiguous), and tasks are drawn from bins spread evenly over the document so the
middle — which truncation cuts — gets its share.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass


@dataclass
class QAItem:
    """One auxiliary task: a question, its short answer and the evidence it rests on.

    kind: "generated" (from a generator model), "entity", "cloze", "fact" or "wh".
    """

    question: str
    answer: str
    evidence: str
    kind: str


# ----------------------------------------------------------------------------- sentences

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr inc ltd co corp vs etc no fig al gen col lt sgt rev est approx dept univ mt ft e.g i.e cf".split()
)
_BOUNDARY = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])\s+")


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Spans of paragraphs: runs of non-blank lines, with markdown headings, table rows
    and list items each on their own; leading list markers are dropped."""
    spans: list[tuple[int, int]] = []
    cur_start = cur_end = -1
    pos = 0
    for line in text.splitlines(keepends=True):
        start, end = pos, pos + len(line.rstrip("\r\n"))
        pos += len(line)
        stripped = line.strip()
        if not stripped:
            if cur_start >= 0:
                spans.append((cur_start, cur_end))
                cur_start = -1
            continue
        marker = _LIST_MARKER.match(line)
        standalone = stripped.startswith(("#", "|", ">", "```")) or marker is not None
        if standalone:
            if cur_start >= 0:
                spans.append((cur_start, cur_end))
                cur_start = -1
            if stripped.startswith(("#", "|", "```")):
                continue  # headings, tables and code fences are not sentences
            content_start = start + (marker.end() if marker else len(line) - len(line.lstrip(" >")))
            spans.append((content_start, end))
            continue
        if cur_start < 0:
            cur_start = start + (len(line) - len(line.lstrip()))
        cur_end = end
    if cur_start >= 0:
        spans.append((cur_start, cur_end))
    return spans


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text`, in order.

    Paragraphs (see `_paragraph_spans`) are split after ".", "!" or "?" (and any
    closing quotes/brackets) followed by whitespace and an upper-case letter, digit or
    opening quote, except after common abbreviations and single-letter initials. Spans
    are trimmed of surrounding whitespace, so text[start:end] is the sentence verbatim.
    """
    out: list[tuple[int, int]] = []
    for p_start, p_end in _paragraph_spans(text):
        s = p_start
        for m in _BOUNDARY.finditer(text, p_start, p_end):
            nxt = m.end()
            if nxt >= p_end:
                break
            ch = text[nxt]
            if not (ch.isupper() or ch.isdigit() or ch in "\"'\u201c\u2018(["):
                continue
            if text[m.start()] == ".":
                word_start = m.start()
                while word_start > s and not text[word_start - 1].isspace():
                    word_start -= 1
                word = text[word_start:m.start()].lower().lstrip("(\"'")
                if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                    continue
            out.append((s, m.start() + len(m.group().rstrip())))
            s = nxt
        if s < p_end:
            out.append((s, p_end))
    return [(a, b) for a, b in out if text[a:b].strip()]


# ----------------------------------------------------------------------------- key spans

_CONNECTORS = r"(?:of|de|del|da|di|von|van|der|den|la|le|du|al|bin|and|&|the)"
_CAP_WORD = r"[A-Z][\w'\u2019]*(?:-[A-Z]?[\w']+)*"
_NAME = re.compile(rf"\b{_CAP_WORD}(?:\s+(?:{_CONNECTORS}\s+)?{_CAP_WORD})+")
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(rf"\b(?:\d{{1,2}}\s+(?:{_MONTHS})\s+\d{{3,4}}|(?:{_MONTHS})\s+\d{{1,2}},\s+\d{{3,4}})\b")
_UNIT_WORDS = (
    "%|percent|per cent|kg|g|mg|t|km|m|cm|mm|nm|kWh|MWh|GWh|MW|kW|GW|W|V|kV|A|mA|Hz|kHz|MHz|GHz|°C|°F|K|Pa|kPa|"
    "bar|L|ml|mL|tonnes|tons|tonne|litres|liters|metres|meters|kilometres|kilometers|miles|feet|inches|grams|"
    "kilograms|degrees(?: Celsius| Fahrenheit)?|years|months|weeks|days|hours|minutes|seconds|people|residents|"
    "inhabitants|employees|workers|members|copies|units|pages|volumes|ships|vessels|acres|hectares|"
    "dollars|euros|pounds|crowns|florins|thalers|marks|credits"
)
_SCALE = r"\s(?:thousand|million|billion|trillion)\b"
_CURRENCY = r"(?:[$€£¥]\s?)?"
_NUMBER_UNIT = re.compile(
    # a comma-grouped number, with optional scale and unit; or a plain number with a scale and/or a unit
    rf"{_CURRENCY}\b\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?(?:{_SCALE})?(?:\s?(?:{_UNIT_WORDS})(?![\w]))?"
    rf"|{_CURRENCY}\b\d+(?:\.\d+)?(?:{_SCALE}(?:\s?(?:{_UNIT_WORDS})(?![\w]))?|\s?(?:{_UNIT_WORDS})(?![\w]))"
)
_CODE = re.compile(r"\b(?=[A-Z0-9-]*\d)(?=[A-Z0-9-]*[A-Z])[A-Z0-9]{1,8}(?:-[A-Z0-9]{1,8})+\b|\b(?=[A-Z]*\d)[A-Z]{1,4}\d[A-Z0-9]{2,}\b")
_YEAR = re.compile(r"(?<![\w,.-])(?:1[0-9]{3}|20[0-9]{2})(?![\w%-]|[.,]\d)")
_WORD_NAME = re.compile(r"\b[A-Z][a-z]{3,}\b")  # a lone capitalised word inside a sentence: a place, a compound
_SENTENCE_START_WORDS = frozenset(
    "The A An In On At By For From With After Before During When While Since Although Though "
    "This That These Those Its His Her Their Our My Your It He She They We I There Here As If "
    "According Under Over Between Near Every Each Some Many Most All No Then Later Today Yesterday".split()
)


@dataclass
class _Span:
    start: int  # absolute offsets in the text
    end: int
    kind: str  # "name", "number", "date", "code", "year"

    def text(self, doc: str) -> str:
        return doc[self.start:self.end]


def _key_spans(text: str, s_start: int, s_end: int) -> list[_Span]:
    spans: list[_Span] = []
    for kind, pattern in (("date", _DATE), ("code", _CODE), ("number", _NUMBER_UNIT), ("year", _YEAR), ("name", _NAME)):
        for m in pattern.finditer(text, s_start, s_end):
            a, b = m.start(), m.end()
            if kind == "name":
                words = m.group().split()
                # a sentence-initial function word is not part of the name
                if a == s_start and words[0] in _SENTENCE_START_WORDS:
                    a += len(words[0])
                    while a < b and text[a].isspace():
                        a += 1
                    words = words[1:]
                if len(words) < 2 or all(w in _SENTENCE_START_WORDS for w in words):
                    continue
                if text[a:b].split()[-1].lower() in ("of", "and", "the"):
                    continue
            if any(a < o.end and o.start < b for o in spans):  # overlaps a span found earlier
                continue
            spans.append(_Span(a, b, kind))
    for m in _WORD_NAME.finditer(text, s_start, s_end):
        a, b = m.start(), m.end()
        word = m.group()
        if a == s_start or word in _SENTENCE_START_WORDS or re.fullmatch(_MONTHS, word):
            continue
        if not any(a < o.end and o.start < b for o in spans):
            spans.append(_Span(a, b, "name"))
    spans.sort(key=lambda sp: sp.start)
    return spans


# ----------------------------------------------------------------------------- fact patterns

_OF_PATTERN = re.compile(
    r"^(?:The |the )?(?P<attr>[a-z][a-z -]{2,40}?) of (?P<obj>(?:the )?[A-Z][^,;:]{1,60}?) (?P<verb>is|was|are|were) "
    r"(?P<val>(?:[^,;:]|,(?=\d)){1,60}?)(?P<end>[.;,](?!\d)|$)"
)
_IS_PATTERN = re.compile(
    r"^(?P<subj>[A-Z][\w'\u2019.-]*(?:\s+(?:of\s+|de\s+|van\s+|von\s+)?[A-Z][\w'\u2019.-]*){1,4}) "
    r"(?P<verb>is|was|are|were) (?P<val>(?:a|an|the) (?:[^,;:]|,(?=\d)){2,60}?)(?P<end>[.;,](?!\d)|$)"
)
_PERSON_ROLES = re.compile(
    r"\b(?:director|founder|chief|chairman|chairwoman|chair|ceo|secretary|treasurer|owner|head|engineer|chemist|author|mayor|captain|minister|president|professor|"
    r"scientist|writer|poet|painter|architect|composer|singer|actor|actress|leader|officer|inventor|teacher|"
    r"doctor|physician|judge|lawyer|merchant|explorer|governor|king|queen|prince|princess|duke|general|"
    r"manager|curator|editor|keeper|priest|surgeon|pilot|navigator|astronomer|historian|mathematician)\b"
)


def _squash(s: str) -> str:
    """Whitespace runs (e.g. soft line wraps) -> one space; questions only, never answers."""
    return " ".join(s.split())


def _looks_like_name(s: str) -> bool:
    words = s.split()
    return 2 <= len(words) <= 5 and all(w[0].isupper() for w in words) and not any(ch.isdigit() for ch in s)


def _fact_items(text: str, s_start: int, s_end: int) -> list[tuple[QAItem, int, int]]:
    """(item, answer start, answer end) for the fact patterns matching the sentence."""
    sentence = text[s_start:s_end]
    evidence = sentence
    out = []
    m = _OF_PATTERN.match(sentence)
    if m and len(m.group("val").split()) <= 8 and len(m.group("attr").split()) <= 5:
        val = m.group("val").strip()
        a = s_start + m.start("val")
        wh = "Who" if _PERSON_ROLES.search(m.group("attr")) and _looks_like_name(val) else "What"
        q = _squash(f"{wh} {m.group('verb')} the {m.group('attr')} of {m.group('obj')}?")
        out.append((QAItem(q, val, evidence, "fact"), a, a + len(val)))
        return out
    m = _IS_PATTERN.match(sentence)
    if m and len(m.group("val").split()) <= 10:
        val = m.group("val").strip()
        a = s_start + m.start("val")
        wh = "Who" if _PERSON_ROLES.search(val) else "What"
        q = _squash(f"{wh} {m.group('verb')} {m.group('subj')}?")
        out.append((QAItem(q, val, evidence, "fact"), a, a + len(val)))
    return out


_PASSIVE = re.compile(
    r"^(?P<subj>(?:The |the )?[A-Z][^,;:]{1,60}?) (?P<aux>is|was|are|were) "
    r"(?P<adv>(?:first|originally|once|later|jointly|formally|officially) )?(?P<part>[a-z]{3,}ed)\b"
)


def _passive_items(text: str, s_start: int, s_end: int, spans: list[_Span]) -> list[tuple[QAItem, int, int]]:
    """Fronted questions from a passive clause, one per key span its participle governs
    through "by", "in" or "on": "S was (first) Ved (in 1877) by P" -> "Who (first) Ved S?";
    "... in 1643" -> "In what year was S Ved?"; "... on 3 May 1820" -> "On what date ...";
    "... in Placename" -> "Where was S Ved?". Only regular participles (-ed), whose past
    tense is the same word."""
    sentence = text[s_start:s_end]
    m = _PASSIVE.match(sentence)
    if not m:
        return []
    subj = _squash(m.group("subj"))
    if subj.startswith("The "):
        subj = "the " + subj[4:]
    verb = f"{m.group('adv') or ''}{m.group('part')}"
    aux = m.group("aux")
    out = []
    for span in spans:
        if span.start < s_start + m.end():
            continue
        prep = text[max(s_start, span.start - 4):span.start]
        if prep == " by " and span.kind == "name":
            question = f"Who {verb} {subj}?"
        elif prep == " in " and span.kind == "year":
            question = f"In what year {aux} {subj} {verb}?"
        elif prep == " on " and span.kind == "date":
            question = f"On what date {aux} {subj} {verb}?"
        elif prep == " in " and span.kind == "name":
            question = f"Where {aux} {subj} {verb}?"
        else:
            continue
        out.append((QAItem(question, span.text(text), sentence, "fact"), span.start, span.end))
    return out


_OBJECT_LEAD = frozenset(["", "by", "in", "at", "near", "is", "was", "are", "were", "to", "from", "with", "and"])
_COUNT_LEAD = re.compile(r"^[$€£¥]?\s?[\d,.]+(?:\s(?:thousand|million|billion|trillion))?\s?")


def _wh_phrase(sentence: str, rel_start: int, span_text: str, kind: str, person_context: bool) -> tuple[int, str] | None:
    """(offset in the sentence where the replaced text starts, the wh-phrase) for a key span."""
    before = sentence[:rel_start]
    words = before.split()
    prev = words[-1].lower() if words else ""
    last_word = re.search(r"\S+\s*$", before)
    prev_start = last_word.start() if last_word else rel_start
    if kind == "year":
        return (prev_start, "in what year") if prev == "in" else (rel_start, "what year")
    if kind == "date":
        return (prev_start, "on what date") if prev == "on" else (rel_start, "what date")
    if kind == "number":
        if span_text[:1] in "$€£¥":
            return rel_start, "how much money"
        unit = _COUNT_LEAD.sub("", span_text).strip()
        if unit in ("%", "percent", "per cent"):
            return rel_start, "what percentage"
        return rel_start, f"how many {unit}".rstrip()
    if kind == "code":
        return rel_start, "what"
    if kind == "name":
        if prev not in _OBJECT_LEAD:  # a name inside a noun phrase ("the ___ plant") asks nothing
            return None
        if prev == "by":
            return rel_start, "whom"
        if prev in ("in", "at", "near") and words:
            return prev_start, "where"
        return rel_start, "who" if person_context and _looks_like_name(span_text) else "what"
    return None


def _wh_item(text: str, s_start: int, s_end: int, span: _Span) -> QAItem | None:
    """The sentence asked in place: the span replaced by its wh-phrase, the span the answer."""
    sentence = text[s_start:s_end]
    rel_start, rel_end = span.start - s_start, span.end - s_start
    found = _wh_phrase(sentence, rel_start, span.text(text), span.kind, bool(_PERSON_ROLES.search(sentence.lower())))
    if found is None:
        return None
    cut, phrase = found
    rest = sentence[rel_end:].rstrip()
    rest = rest[:-1] if rest[-1:] in ".!;" else rest
    question = _squash(sentence[:cut] + phrase + rest) + "?"
    return QAItem(question[:1].upper() + question[1:], span.text(text), sentence, "wh")


# ----------------------------------------------------------------------------- tasks


@dataclass
class _Candidate:
    item: QAItem
    position: int  # character offset of the evidence
    sentence: int  # sentence index
    score: float  # higher is better


def _candidates(text: str, sentences: list[tuple[int, int]], min_words: int, max_words: int) -> list[_Candidate]:
    per_sentence: list[list[_Span]] = [_key_spans(text, a, b) for a, b in sentences]
    counts = Counter(sp.text(text) for spans in per_sentence for sp in spans)
    cands: list[_Candidate] = []
    for idx, ((a, b), spans) in enumerate(zip(sentences, per_sentence)):
        sentence = text[a:b]
        n_words = len(sentence.split())
        if n_words < min_words or n_words > max_words or "___" in sentence:
            continue
        for item, _, _ in _fact_items(text, a, b) + _passive_items(text, a, b, spans):
            if counts.get(item.answer, 1) <= 2:
                cands.append(_Candidate(item, a, idx, 3.0))
        best: tuple[float, _Span] | None = None
        for sp in spans:
            key = sp.text(text)
            count = counts[key]
            if count > 2 or len(key) < 3:
                continue
            # the sentence's subject (its first span, at most one word in) keys recall best;
            # any later span is the attribute a question would ask for
            is_subject = sp is spans[0] and len(text[a:sp.start].split()) <= 1
            rarity = 1.0 / count
            type_bonus = {"code": 0.6, "date": 0.5, "number": 0.5, "year": 0.45, "name": 0.4}[sp.kind]
            s = rarity + type_bonus + min(len(key), 30) / 100
            q = f"What does the document say about {_squash(key)}?"
            cands.append(_Candidate(QAItem(q, sentence, sentence, "entity"), a, idx, s + (0.3 if is_subject else 0.0)))
            attribute_score = s + (0.0 if is_subject else 0.3)
            wh = _wh_item(text, a, b, sp)
            if wh is not None:
                cands.append(_Candidate(wh, a, idx, attribute_score))
            if best is None or attribute_score > best[0]:
                best = (attribute_score, sp)
        if best is not None:
            s, sp = best
            rel_a, rel_b = sp.start - a, sp.end - a
            blanked = sentence[:rel_a] + "___" + sentence[rel_b:]
            q = f"Complete the sentence from the document: '{_squash(blanked)}'"
            cands.append(_Candidate(QAItem(q, sp.text(text), sentence, "cloze"), a, idx, s))
    return cands


def extract_tasks(
    text: str,
    n: int,
    seed: int = 0,
    *,
    min_words: int = 5,
    max_words: int = 60,
    max_per_sentence: int = 4,
) -> list[QAItem]:
    """Up to `n` auxiliary tasks derived from `text` without a generator.

    Sentences of `min_words`..`max_words` words are candidates. The document is cut into
    `n` bins of equal character length; tasks are drawn round-robin over the bins (in a
    seeded random order each round) and over the kinds ("fact", "wh", "entity", "cloze"),
    taking within a bin the highest-scoring candidate (rarest, most specific key span)
    whose sentence has not yet been used `max_per_sentence` times, ties broken by the
    seeded RNG. A first pass takes each kind at most once per sentence, so a fact is
    asked in different forms before any form repeats. Deterministic for a given (text, n, seed).

    Returns:
        list[QAItem] in document order, len <= n (fewer for short documents); for every
        item both `answer` and `evidence` are substrings of `text`.
    """
    if n <= 0 or not text.strip():
        return []
    rng = random.Random(seed)
    sentences = split_sentences(text)
    cands = _candidates(text, sentences, min_words, max_words)
    if not cands:
        return []
    # random tie-break key per candidate, fixed for this seed
    for c in cands:
        c.score += rng.random() * 1e-3
    n_bins = max(1, min(n, len(sentences)))
    bins: list[dict[str, list[_Candidate]]] = [{} for _ in range(n_bins)]
    for c in cands:
        b = min(n_bins - 1, c.position * n_bins // max(1, len(text)))
        bins[b].setdefault(c.item.kind, []).append(c)
    for bucket in bins:
        for lst in bucket.values():
            lst.sort(key=lambda c: -c.score)
    kinds = ["fact", "wh", "entity", "cloze"]
    kind_cursor = rng.randrange(len(kinds))
    used_sentence: Counter[int] = Counter()
    used_kind: Counter[tuple[int, str]] = Counter()
    seen_questions: set[str] = set()
    chosen: list[_Candidate] = []
    # first every sentence's kinds once each (one fact in several forms), then repeats of a kind
    for per_kind in (1, max_per_sentence):
        while len(chosen) < n:
            progressed = False
            order = list(range(n_bins))
            rng.shuffle(order)
            for b in order:
                if len(chosen) >= n:
                    break
                pick = None
                for step in range(len(kinds)):
                    kind = kinds[(kind_cursor + step) % len(kinds)]
                    for c in bins[b].get(kind, []):
                        if (used_sentence[c.sentence] < max_per_sentence and used_kind[c.sentence, kind] < per_kind
                                and c.item.question not in seen_questions):
                            pick = c
                            break
                    if pick is not None:
                        kind_cursor = (kind_cursor + step + 1) % len(kinds)
                        break
                if pick is None:
                    continue
                bins[b][pick.item.kind].remove(pick)
                used_sentence[pick.sentence] += 1
                used_kind[pick.sentence, pick.item.kind] += 1
                seen_questions.add(pick.item.question)
                chosen.append(pick)
                progressed = True
            if not progressed:
                break
    chosen.sort(key=lambda c: (c.position, c.item.kind))
    return [c.item for c in chosen]
