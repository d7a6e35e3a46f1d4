"""Queries about chunks of a document, for context distillation (docs/DESIGN.md §2.6).

The document's tokens are cut into contiguous chunks (one teacher prompt each); per
chunk come several queries of different kinds, each naming what it asks about so that
it still makes sense once the chunk is gone:

    chunks = document_chunks(doc_ids, tokenizer, cfg.chunk_tokens)
    generator = make_query_generator(lift_cfg.qa, cfg, base, seed)     # or None
    qs = generate_queries(chunks, generator, cfg, seed)
    qs.queries   -> [Query(question, kind, chunk, source, answer, evidence), ...]
    qs.dropped   -> {"failed": n, "empty": n, "malformed": n, "vague": n, "duplicate": n}
    qs.warnings  -> ["qa endpoint http://... failed 12 of 12 requests: connection refused; ..."]

Sources: "extractive" (lift_engine.data.extractive, the questions whose sentence lies
in the chunk), "model" (the base model, batched generation), "endpoint" (an
OpenAI-compatible server) and "template" (an anchored stand-in for a kind the generator
did not deliver). A failing generator never stops a document: its prompts are counted
and the document tunes on what it has.
"""
from __future__ import annotations

import bisect
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from lift_engine.config import QUERY_KINDS, QueryConfig
from lift_engine.data.extractive import QAItem, extract_tasks, split_sentences
from lift_engine.data.qa_synthesis import iter_json_values, passes_evidence_check

DROP_REASONS: tuple[str, ...] = ("failed", "empty", "malformed", "vague", "duplicate", "split")


# ----------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of the document, their text, and the markdown heading in force
    where the chunk starts (None without one)."""

    index: int
    start: int
    end: int
    text: str
    heading: str | None = None


_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+(\S.*?)[ \t#]*$", re.M)
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s*$")


def _token_pieces(tokenizer, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """(decoded text, raw vocabulary string) of each token, for boundary tests."""
    texts = [tokenizer.decode([t]) for t in ids]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    raws = [str(r) for r in convert(list(ids))] if convert is not None else texts
    return texts, raws


def _boundary_rank(prev_text: str, prev_raw: str, next_text: str, next_raw: str) -> int:
    """How good a cut between two tokens is: 0 after a line end, 1 after a sentence end,
    2 between words, 3 anywhere else (e.g. inside a word or a character)."""
    if prev_text.endswith("\n") or prev_raw.endswith(("Ċ", "<0x0A>")):
        return 0
    starts_word = next_text[:1].isspace() or next_raw[:1] in ("Ġ", "▁", "Ċ")
    if starts_word and _SENTENCE_END.search(prev_text):
        return 1
    if starts_word:
        return 2
    return 3


def document_chunks(
    document: str | Sequence[int],
    tokenizer,
    chunk_tokens: int = 512,
    *,
    snap_fraction: float = 0.25,
) -> list[Chunk]:
    """Contiguous chunks of at most `chunk_tokens` tokens covering the whole document.

    document: its token ids (as the tuning engine has them), or its text (tokenised
    with `tokenize_long`, no special tokens). Each cut is moved back by at most
    `snap_fraction` of a chunk to the best nearby boundary: a line end, else a
    sentence end, else a word start; a hard cut when there is none. So the spans
    tile [0, L) exactly: chunk k+1 starts where chunk k ends, no token twice, none left
    out. `text` is `tokenizer.decode` of the chunk's ids; `heading` is the last
    markdown heading ("# ...") at or before the chunk's first words.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if isinstance(document, str):
        from lift_engine.data.documents import tokenize_long

        ids = tokenize_long(document, tokenizer)
    else:
        ids = [int(t) for t in document]
    n = len(ids)
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n:
        end = start + chunk_tokens
        if end < n:
            lo = max(start + 1, end - int(chunk_tokens * snap_fraction))
            texts, raws = _token_pieces(tokenizer, ids[lo - 1:end + 1])
            before = tokenizer.decode(ids[max(start, lo - 65):lo - 1])  # the line the window starts in
            window = before + "".join(texts)
            cuts = [len(before)]
            for t in texts:
                cuts.append(cuts[-1] + len(t))
            best_rank, best = 3, end
            for j in range(end, lo - 1, -1):  # cut before token j
                k = j - (lo - 1)
                rank = _boundary_rank(texts[k - 1], raws[k - 1], texts[k], raws[k])
                if rank == 0:  # a line end, unless that line is a heading: keep it with its text
                    line = window[:cuts[k]].rstrip().rsplit("\n", 1)[-1]  # the last non-blank line
                    if _HEADING.match(line):
                        rank = 3
                if rank < best_rank:
                    best_rank, best = rank, j
                    if rank == 0:
                        break
            end = best
        else:
            end = n
        spans.append((start, end))
        start = end
    chunks: list[Chunk] = []
    offset = 0
    texts = [tokenizer.decode(ids[a:b]) for a, b in spans]
    full = "".join(texts)
    headings = [(m.start(), m.group(1).strip()) for m in _HEADING.finditer(full)]
    for k, ((a, b), text) in enumerate(zip(spans, texts)):
        first_words = offset + (len(text) - len(text.lstrip()))
        heading = None
        for pos, title in headings:
            if pos > first_words:
                break
            heading = title
        chunks.append(Chunk(k, a, b, text, heading))
        offset += len(text)
    return chunks


# ----------------------------------------------------------------------------- queries


@dataclass
class Query:
    """One query about chunk `chunk`. kind: one of QUERY_KINDS, or "extractive".
    source: "extractive", "template", "model" or "endpoint". answer/evidence: a short
    answer and the chunk's sentence holding it, only when verified (the evidence or
    answer occurs verbatim in the chunk; always for extractive queries) — such a query
    may also train as a supervised pair; otherwise None and the teacher answers."""

    question: str
    kind: str
    chunk: int
    source: str
    answer: str | None = None
    evidence: str | None = None


@dataclass
class QuerySet:
    """The queries of a document, what was dropped on the way, and what went wrong."""

    queries: list[Query] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    warnings: list[str] = field(default_factory=list)

    def for_chunk(self, index: int) -> list[Query]:
        return [q for q in self.queries if q.chunk == index]

    def supervised(self) -> list[QAItem]:
        """Queries with a verified answer, as QA items (kind "generated" unless extractive)."""
        return [
            QAItem(q.question, q.answer, q.evidence, "generated" if q.source in ("model", "endpoint") else q.kind)
            for q in self.queries
            if q.answer and q.evidence
        ]


@runtime_checkable
class QueryGenerator(Protocol):
    """Writes completions for many prompts at once; None for a prompt that failed.
    Optional attributes read by `generate_queries`: `label` (names the generator in
    warnings, e.g. "qa endpoint http://host/v1"), `source` ("model" or "endpoint", the
    Query.source of what it writes; "model" when absent) and `last_errors` (the reasons
    of the last call's failures)."""

    def generate_many(self, prompts: list[str], max_new_tokens: int = 256) -> list[str | None]: ...


class _OneByOne:
    """A single-prompt `Generator` (qa_synthesis) as a `QueryGenerator`."""

    def __init__(self, generator):
        self.generator = generator
        self.label = getattr(generator, "label", type(generator).__name__)
        self.source = getattr(generator, "source", "model")
        self.last_errors: list[str] = []

    def generate_many(self, prompts: list[str], max_new_tokens: int = 256) -> list[str | None]:
        self.last_errors = []
        out: list[str | None] = []
        for prompt in prompts:
            try:
                out.append(self.generator.generate(prompt, max_new_tokens=max_new_tokens))
            except Exception as exc:  # noqa: BLE001 - a failing generator never stops a document
                out.append(None)
                self.last_errors.append(_one_line(exc))
        return out


def make_query_generator(qa, cfg: QueryConfig, base=None, seed: int = 0):
    """The generator a config asks for: an `OpenAIGenerator` for `qa.qa_endpoint`, else the
    base model (`HFGenerator`, batched) when `base` is given, else None. qa: QAConfig
    (`use_generator` False gives None); base: a LoadedModel (model + tokenizer)."""
    from lift_engine.data.qa_synthesis import HFGenerator, OpenAIGenerator

    if not qa.use_generator:
        return None
    if qa.qa_endpoint:
        return OpenAIGenerator(
            qa.qa_endpoint, qa.qa_model or "default", timeout=cfg.request_timeout, retries=cfg.retries,
            temperature=cfg.temperature, concurrency=cfg.endpoint_concurrency,
        )
    if base is None:
        return None
    return HFGenerator(
        base.model, base.tokenizer, do_sample=cfg.do_sample, temperature=cfg.temperature,
        batch_size=cfg.generator_batch_size, seed=seed,
    )


QUERY_PROMPT = (
    "Here is a passage from a longer document{where}.\n\n"
    "Passage:\n{chunk}\n\n"
    "Write ONE {ask}{focus}\n"
    "The question will be read later WITHOUT the passage, so it must name the specific people, places, "
    'things or terms it is about; do not write "the passage", "the text" or "this section".\n'
    "Reply with a single JSON object and nothing else, with these keys:\n"
    '  "question": the question,\n'
    '  "answer": a short answer,\n'
    '  "evidence": the sentence of the passage that contains the answer, copied exactly.\n'
    "\nJSON:"
)

KIND_ASKS = {
    "facts": "question asking for a specific fact the passage states.",
    "definition": "question asking what a term, name or concept used in the passage means or is.",
    "number-date": "question whose answer is a number, an amount or a date given in the passage.",
    "who-what-when": "question asking who did what, or when or where something happened, according to the passage.",
    "summary": "request to summarise what the passage says about its main subject, naming that subject.",
    "comparison": "question comparing two things, people, places or figures that the passage mentions.",
    "how-to-use": "question about how something the passage describes is used, done or applied.",
}

_TEMPLATES = {
    "facts": "What facts does {anchor} state?",
    "definition": "Which terms or names does {anchor} explain, and what do they mean?",
    "number-date": "What numbers and dates does {anchor} give, and what do they refer to?",
    "who-what-when": "Who and what does {anchor} tell about, and when and where does it happen?",
    "summary": "Summarize {anchor}.",
    "comparison": "What does {anchor} compare or contrast?",
    "how-to-use": "How can the information in {anchor} be used?",
}

_VAGUE_REFERENCE = re.compile(
    r"\b(?:the|this|that|above|given)\s+(?:passage|text|excerpt|paragraph|section|extract)\b", re.I
)
_GENERIC = frozenset(
    """passage text document section author article paragraph excerpt extract what which does about
    according mentioned mention described describe following summarize summarise explain compare
    main information there their this that with from have been were into used using would could should
    they them these those other some many more most such when where whom whose why how than then also
    based said says given list name named terms term mean means meaning subject point points""".split()
)
_WORD = re.compile(r"[^\W_]+", re.U)
_LEADER = re.compile(r"^\s*(?:(?:\d{1,3}|[a-z])[.)]|[-*+\u2022]|q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.I)
_IMPERATIVE = re.compile(r"^(?:summari[sz]e|describe|explain|compare|list|name|give|outline)\b", re.I)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _norm_key(question: str) -> str:
    return " ".join(_WORD.findall(question.lower()))


def _str_field(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    value = " ".join(str(value).split())
    return value or None


def _from_object(obj) -> tuple[str, str | None, str | None] | None:
    if isinstance(obj, str):
        return (obj, None, None) if obj.strip() else None
    if not isinstance(obj, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    question = _str_field(lowered, "question") or _str_field(lowered, "query")
    if question is None:
        return None
    return question, _str_field(lowered, "answer"), _str_field(lowered, "evidence")


def parse_query(reply: str) -> tuple[str, str | None, str | None] | None:
    """(question, answer or None, evidence or None) from a generator's reply, else None.

    Accepts a JSON object with a "question" (or "query") key, in prose or code fences
    or Python-style quotes; a JSON list of such objects or of strings (the first one);
    else the first line of a numbered or bulleted list, or of plain text, that ends in
    "?" or starts with an imperative such as "Summarize" (prefixes like "1.", "-" and
    "Question:" are dropped)."""
    for obj in iter_json_values(reply, "{"):
        found = _from_object(obj)
        if found is not None:
            return found
    for arr in iter_json_values(reply, "["):
        if isinstance(arr, list):
            for obj in arr:
                found = _from_object(obj)
                if found is not None:
                    return found
    for line in reply.splitlines():
        line = line.strip().strip("`")
        prev = None
        while prev != line:
            prev, line = line, _LEADER.sub("", line).strip()
        line = line.strip("\"'* ")
        if line.endswith("?") or _IMPERATIVE.match(line):
            return " ".join(line.split()), None, None
    return None


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if (len(w) >= 4 and w not in _GENERIC) or any(c.isdigit() for c in w)}


def _clean_question(question: str) -> str | None:
    """The question tidied (quotes, "the passage" -> "the document"), or None when it is
    not a question-sized string."""
    q = question.strip().strip("\"'`").strip()
    q = _VAGUE_REFERENCE.sub("the document", q)
    words = q.split()
    if not 3 <= len(words) <= 60 or len(q) > 400 or not any(c.isalpha() for c in q):
        return None
    return q[:1].upper() + q[1:]


def _anchor(chunk: Chunk) -> str:
    """Names a chunk without its content: its heading and its first words."""
    body = [ln for ln in chunk.text.splitlines() if ln.strip() and not _HEADING.match(ln)]
    words = " ".join(" ".join(body).split()[:8]).replace('"', "'").strip()
    where = "the part of the document"
    if chunk.heading:
        where += f' under the heading "{chunk.heading.replace(chr(34), chr(39))}"'
        if words:
            where += ","
    if words:
        where += f' that begins "{words} ..."'
    return where


def _prompt(chunk: Chunk, kind: str, repeat: int) -> str:
    where = f', from its section "{chunk.heading}"' if chunk.heading else ""
    focus = ""
    if repeat:
        sentences = split_sentences(chunk.text)
        if sentences:
            a, b = sentences[(repeat * 7919) % len(sentences)]
            focus = f"\nAsk about this sentence of the passage: {' '.join(chunk.text[a:b].split())}"
    return QUERY_PROMPT.format(where=where, chunk=chunk.text.strip(), ask=KIND_ASKS[kind], focus=focus)


def _chunk_kinds(n_chunks: int, cfg: QueryConfig, rng: random.Random) -> list[list[str]]:
    """The kinds asked per chunk: the configured kinds in a seeded order, rotating so
    that consecutive chunks continue where the previous one stopped."""
    kinds = list(cfg.kinds)
    if not kinds or cfg.queries_per_chunk <= 0:
        return [[] for _ in range(n_chunks)]
    rng.shuffle(kinds)
    q = cfg.queries_per_chunk
    return [[kinds[(i * q + j) % len(kinds)] for j in range(q)] for i in range(n_chunks)]


def _place_extractive(items: list[QAItem], chunks: list[Chunk]) -> tuple[list[tuple[int, QAItem]], int]:
    """(chunk index, item) for each item whose evidence (its first occurrence in the
    chunks' text) lies inside one chunk; and how many a chunk boundary cuts (a teacher
    shown one chunk would see half the sentence). Items not in the text are left out."""
    starts = []
    pos = 0
    for c in chunks:
        starts.append(pos)
        pos += len(c.text)
    full = "".join(c.text for c in chunks)
    placed = []
    split = 0
    for item in items:
        at = full.find(item.evidence)
        if at < 0 or not item.evidence:
            continue
        k = max(0, bisect.bisect_right(starts, at) - 1)
        if at + len(item.evidence) <= starts[k] + len(chunks[k].text):
            placed.append((k, item))
        else:
            split += 1
    return placed, split


def generate_queries(
    chunks: Sequence[Chunk],
    generator=None,
    cfg: QueryConfig | None = None,
    seed: int = 0,
    *,
    extractive: list[QAItem] | None = None,
) -> QuerySet:
    """The queries of a document's chunks. Never raises for a generator's sake.

    Per chunk: the extractive questions whose evidence lies in it (`extractive`, or
    `extract_tasks` on the chunks' text with cfg.extractive_per_chunk · len(chunks)
    wanted, spread over the document); then `cfg.queries_per_chunk` generated ones, one
    prompt per kind (kinds rotate over chunks in a seeded order), all chunks' prompts
    sent to `generator.generate_many` in one call (a plain `generate` generator is
    called one prompt at a time). A reply is parsed by `parse_query`; it is dropped and
    counted as "failed" (no reply), "empty", "malformed" (no question in it), "vague"
    (names nothing of its chunk: no content word or number shared with the chunk) or
    "duplicate" (same words as an earlier query); an extractive question whose sentence
    a chunk boundary cuts is left out and counted as "split". A kind left without a query gets an
    anchored template query (heading + first words of the chunk) when
    cfg.template_queries. Generated queries keep their answer and evidence only when
    `passes_evidence_check` holds in their chunk. Deterministic for (chunks, replies, seed).

    generator: a QueryGenerator, a qa_synthesis Generator, or None (extractive and
    template queries only). Its `label` (e.g. "qa endpoint http://host/v1") names it in
    `warnings`.
    """
    cfg = (cfg or QueryConfig()).validate()
    result = QuerySet()
    if not chunks:
        return result
    chunks = list(chunks)
    rng = random.Random(seed)
    seen: set[str] = set()

    def add(pos: int, question: str, kind: str, source: str, answer=None, evidence=None) -> bool:
        key = _norm_key(question)
        if not key or key in seen:
            result.dropped["duplicate"] += 1
            return False
        seen.add(key)
        per_chunk[pos].append(Query(question, kind, chunks[pos].index, source, answer, evidence))
        return True

    per_chunk: list[list[Query]] = [[] for _ in chunks]

    # extractive questions, each with the chunk its sentence lies in
    if extractive is None and cfg.extractive_per_chunk > 0:
        text = "".join(c.text for c in chunks)
        extractive = extract_tasks(text, cfg.extractive_per_chunk * len(chunks), seed=seed)
    placed, result.dropped["split"] = _place_extractive(list(extractive or []), chunks)
    for k, item in placed:
        add(k, " ".join(item.question.split()), "extractive", "extractive", item.answer, item.evidence)

    # generated questions, one prompt per (chunk, kind)
    asks: list[tuple[int, str]] = []
    prompts: list[str] = []
    for k, kinds in enumerate(_chunk_kinds(len(chunks), cfg, rng)):
        repeats: Counter[str] = Counter()
        for kind in kinds:
            asks.append((k, kind))
            prompts.append(_prompt(chunks[k], kind, repeats[kind]))
            repeats[kind] += 1
    replies: list[str | None] = [None] * len(prompts)
    errors: list[str] = []
    label = "no generator"
    kept_slots: set[int] = set()
    if generator is not None and prompts:
        gen = generator if isinstance(generator, QueryGenerator) else _OneByOne(generator)
        label = getattr(gen, "label", None) or type(generator).__name__
        source = getattr(gen, "source", None) or getattr(generator, "source", None) or "model"
        try:
            got = list(gen.generate_many(prompts, max_new_tokens=cfg.max_new_tokens))
            if len(got) != len(prompts):
                raise ValueError(f"generate_many returned {len(got)} replies for {len(prompts)} prompts")
            replies = got
            errors = list(getattr(gen, "last_errors", None) or [])
        except Exception as exc:  # noqa: BLE001 - a failing generator never stops a document
            replies = [None] * len(prompts)
            errors = [_one_line(exc)] * len(prompts)
        bad: Counter[str] = Counter()
        for slot, ((k, kind), reply) in enumerate(zip(asks, replies)):
            if reply is None:
                result.dropped["failed"] += 1
                continue
            if not isinstance(reply, str) or not reply.strip():
                result.dropped["empty"] += 1
                bad["empty"] += 1
                continue
            parsed = parse_query(reply)
            question = _clean_question(parsed[0]) if parsed else None
            if question is None:
                result.dropped["malformed"] += 1
                bad["malformed"] += 1
                continue
            if not (_content_words(question) & _content_words(chunks[k].text)):
                result.dropped["vague"] += 1
                bad["vague"] += 1
                continue
            answer, evidence = parsed[1], parsed[2]
            if not (answer and evidence and passes_evidence_check(QAItem(question, answer, evidence, "generated"), chunks[k].text)):
                answer = evidence = None
            if add(k, question, kind, source, answer, evidence):
                kept_slots.add(slot)
        n_failed = result.dropped["failed"]
        fallback = "anchored template queries stand in" if cfg.template_queries else "those chunks keep their extractive queries only"
        if n_failed:
            sent = [e for e in errors if not e.startswith("not sent")]
            reason = Counter(sent or errors).most_common(1)[0][0] if errors else "no reply"
            unsent = [e for e in errors if e.startswith("not sent")]
            if sent and unsent:  # e.g. "... (10 not sent after 2 failures in a row)"
                reason += f" ({len(unsent)} {unsent[0]})"
            scope = "extractive and template queries only" if cfg.template_queries else "extractive queries only"
            tail = f"tuning on {scope}" if not kept_slots else f"for the failed ones {fallback}"
            result.warnings.append(f"{label} failed {n_failed} of {len(prompts)} requests: {reason}; {tail}")
        answered = len(prompts) - n_failed
        if answered and sum(bad.values()) * 2 > answered:
            detail = ", ".join(f"{name} {count}" for name, count in sorted(bad.items()))
            result.warnings.append(
                f"{label}: {sum(bad.values())} of {answered} replies gave no usable query ({detail}); {fallback}"
            )

    # templates for the kinds left without a query
    if cfg.template_queries:
        for slot, (k, kind) in enumerate(asks):
            if slot not in kept_slots:
                add(k, _TEMPLATES[kind].format(anchor=_anchor(chunks[k])), kind, "template")

    result.queries = [q for qs in per_chunk for q in qs]
    return result


__all__ = [
    "Chunk", "Query", "QuerySet", "QueryGenerator", "QUERY_KINDS", "QUERY_PROMPT", "DROP_REASONS",
    "document_chunks", "generate_queries", "make_query_generator", "parse_query",
]
