"""The project's synthetic long-document QA set: invented facts the model cannot know.

`make_document` writes a long markdown document about an invented land — people,
cities, companies, compounds, rivers and ships with made-up names, numbers, dates and
codes — with filler prose between the facts, and returns one question per fact with a
short exact answer and the evidence sentence. A configurable share of the facts sits in
the middle third of the document, where middle truncation (docs/DESIGN.md §2.5) cuts, so a
model answering from a truncated context must have stored the document to score.

`make_dataset` turns documents into LongBench-format records; `write_jsonl` writes them
atomically. `python -m lift_engine.data.synthetic --demo-assets` regenerates the bundled
demo files in lift_engine/data/assets/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from importlib import resources
from typing import Callable, Iterable

# ----------------------------------------------------------------------------- invented names

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z",
           "th", "sh", "h", "j", "w", "c", "ph", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "y", "ia")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x", "sk", "v")
_PLACE_SUFFIXES = ("holm", "bury", "ford", "vik", "stad", "port", "mere", "wick", "grad", "dun", "heim", "ora")
_COMPANY_KINDS = ("Industries", "Holdings", "Works", "Instruments", "Foundry", "Shipping", "Laboratories",
                  "Textiles", "Mining Company", "Optics")
_COMPOUND_SUFFIXES = ("ine", "ol", "ate", "ide", "ium", "ene", "ite", "azole")
_COLOURS = ("crimson", "ochre", "teal", "violet", "amber", "slate grey", "emerald", "saffron", "indigo", "ivory")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


class _Names:
    """Fresh invented names; never the same word twice in one document."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syl: int = 2, max_syl: int = 3) -> str:
        for _ in range(1000):
            n = self.rng.randint(min_syl, max_syl)
            # open syllables, one optional coda at the end: pronounceable, rarely real words
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w = (w + self.rng.choice(_CODAS)).capitalize()
            if 4 <= len(w) <= 12 and w not in self.used:
                self.used.add(w)
                return w
        raise RuntimeError("ran out of invented names")

    def person(self) -> str:
        return f"{self.word(2, 2)} {self.word(2, 3)}"

    def city(self) -> str:
        return self.word(1, 2) + self.rng.choice(_PLACE_SUFFIXES)

    def company(self) -> str:
        return f"{self.word(2, 2)} {self.rng.choice(_COMPANY_KINDS)}"

    def compound(self) -> str:
        return self.word(2, 2) + self.rng.choice(_COMPOUND_SUFFIXES)

    def code(self) -> str:
        letters = "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))
        return f"{letters}-{self.rng.randint(1000, 9999)}"

    def date(self) -> str:
        return f"{self.rng.randint(1, 28)} {self.rng.choice(_MONTHS)} {self.rng.randint(1650, 1990)}"

    def year(self) -> str:
        return str(self.rng.randint(1600, 1990))


# ----------------------------------------------------------------------------- fact templates
# Each returns (evidence sentence, question, answers); the first answer is the canonical
# short one and occurs verbatim in the sentence.

_Fact = tuple[str, str, list[str]]


def _f_headquarters(n: _Names) -> _Fact:
    c, city = n.company(), n.city()
    return f"The headquarters of {c} is in {city}.", f"In which city is the headquarters of {c}?", [city]


def _f_founder(n: _Names) -> _Fact:
    c, p, y = n.company(), n.person(), n.year()
    return f"{c} was founded in {y} by {p}.", f"Who founded {c}?", [p]


def _f_melting(n: _Names) -> _Fact:
    x, v = n.compound(), n.rng.randint(120, 980)
    return (f"The melting point of {x} is {v} degrees Celsius.", f"What is the melting point of {x}?",
            [f"{v} degrees Celsius", str(v)])


def _f_code(n: _Names) -> _Fact:
    city, code = n.city(), n.code()
    return (f"The access code for the {city} archive is {code}.", f"What is the access code for the {city} archive?",
            [code])


def _f_engineer(n: _Names) -> _Fact:
    c, p = n.company(), n.person()
    return f"The chief engineer of {c} is {p}.", f"Who is the chief engineer of {c}?", [p]


def _f_population(n: _Names) -> _Fact:
    city, v = n.city(), n.rng.randint(12, 940) * 1000 + n.rng.randint(1, 9) * 100
    return f"The population of {city} is {v:,} people.", f"What is the population of {city}?", [f"{v:,}"]


def _f_synthesis(n: _Names) -> _Fact:
    x, p, city = n.compound(), n.person(), n.city()
    return f"{x} was first synthesised by {p} in {city}.", f"Who first synthesised {x}?", [p]


def _f_river(n: _Names) -> _Fact:
    r, v = n.word(2, 3), n.rng.randint(40, 1900)
    return f"The {r} River is {v} kilometres long.", f"How long is the {r} River?", [f"{v} kilometres", str(v)]


def _f_ship(n: _Names) -> _Fact:
    s, city, d = n.word(2, 3), n.city(), n.date()
    return (f"The steamship {s} left the port of {city} on {d}.",
            f"On what date did the steamship {s} leave the port of {city}?", [d])


def _f_mayor(n: _Names) -> _Fact:
    city, p = n.city(), n.person()
    return f"The mayor of {city} is {p}.", f"Who is the mayor of {city}?", [p]


def _f_mountain(n: _Names) -> _Fact:
    m, v = n.word(2, 3), n.rng.randint(900, 7900)
    return f"Mount {m} rises {v} metres above the sea.", f"How high is Mount {m}?", [f"{v} metres", str(v)]


def _f_flag(n: _Names) -> _Fact:
    city = n.city()
    c1, c2 = n.rng.sample(_COLOURS, 2)
    return f"The flag of {city} is {c1} and {c2}.", f"What colours is the flag of {city}?", [f"{c1} and {c2}"]


def _f_treaty(n: _Names) -> _Fact:
    city, y = n.city(), n.year()
    return f"The Treaty of {city} was signed in {y}.", f"In what year was the Treaty of {city} signed?", [y]


def _f_budget(n: _Names) -> _Fact:
    place, v = n.city(), n.rng.randint(3, 95)
    return (f"The annual budget of the {place} Observatory is {v} million florins.",
            f"What is the annual budget of the {place} Observatory?", [f"{v} million florins", f"{v} million"])


def _f_output(n: _Names) -> _Fact:
    c, x, v = n.company(), n.compound(), n.rng.randint(110, 9800)
    return (f"The {c} plant produces {v} tonnes of {x} every year.",
            f"How many tonnes of {x} does the {c} plant produce every year?", [f"{v} tonnes", str(v)])


def _f_lighthouse(n: _Names) -> _Fact:
    city, p = n.city(), n.person()
    return (f"The keeper of the {city} lighthouse is {p}.", f"Who is the keeper of the {city} lighthouse?", [p])


FACT_TEMPLATES: tuple[Callable[[_Names], _Fact], ...] = (
    _f_headquarters, _f_founder, _f_melting, _f_code, _f_engineer, _f_population, _f_synthesis, _f_river,
    _f_ship, _f_mayor, _f_mountain, _f_flag, _f_treaty, _f_budget, _f_output, _f_lighthouse,
)

# ----------------------------------------------------------------------------- filler prose
# Generic sentences that state nothing a question asks about. {P} is a background place.

_FILLER = (
    "The roads between the valleys are narrow, and travellers often stop to rest at the inns along the way.",
    "In spring the meadows around {P} fill with wild flowers, and the markets stay open late into the evening.",
    "Local historians disagree about many details of the early settlements, and the surviving letters are few.",
    "Most families in the region keep small gardens, where they grow beans, onions and a bitter kind of cabbage.",
    "Visitors to {P} usually remark on the bells, which ring at odd hours for reasons nobody remembers.",
    "The winters are long and dark, so people gather in the halls to tell stories and mend their nets.",
    "Trade with the coast has always depended on the weather, and a bad autumn can empty the warehouses.",
    "Several old families still argue about the boundaries of their fields, and the disputes fill whole ledgers.",
    "The council meets once a month in a plain wooden building near the square of {P}.",
    "Children learn to swim in the cold lakes, and the older ones race each other across the bays in summer.",
    "Many of the old stone bridges were rebuilt after the floods, though a few still show their original arches.",
    "The local dialect has words for a dozen kinds of rain, and travellers rarely learn more than three of them.",
    "Merchants from {P} bring salt, wool and dried fish to the autumn fair, where prices are set by custom.",
    "The forests on the northern slopes are thick with pine, and the woodcutters work there only in late summer.",
    "Festivals mark the end of each harvest, with music, long tables in the streets and too much cider.",
    "Scholars who study the region rely on parish records, tax rolls and the diaries of a few curious travellers.",
    "The railway arrived late and never reached the upper valleys, where mule tracks remain the main routes.",
    "Fishing boats leave before dawn and return by noon, and the catch is sold at once on the quay of {P}.",
    "Every town keeps a small museum, usually a single room of tools, maps and faded photographs.",
    "The climate is mild near the sea but harsh in the hills, where snow can close the passes for weeks.",
    "Newspapers in the region print the tides, the market prices and long letters from their readers.",
    "Old maps of {P} show streets that no longer exist, swallowed by later building or by the river.",
    "Craftsmen in the villages still carve wooden spoons and bowls in patterns passed down for generations.",
    "The post arrives twice a week in the remote hamlets, carried by riders who know every family by name.",
    "In the quieter months the harbours are busy with repairs, and the smell of tar hangs over the docks.",
    "Many songs of the region tell of journeys across the mountains and of lovers separated by the sea.",
    "The schools teach reading, arithmetic and the history of the valleys, with long holidays at harvest time.",
    "Shepherds move their flocks to the high pastures in June and bring them down again before the first frost.",
    "A traveller once wrote that the region has more churches than roads, which is nearly true of the hills.",
    "The cooking is simple and filling, built on bread, cheese, smoked meat and a thick soup of barley.",
)


def _filler_paragraph(rng: random.Random, places: list[str], k: int) -> list[str]:
    return [s.replace("{P}", rng.choice(places)) for s in rng.sample(_FILLER, k)]


def _fact_paragraph_slots(n_facts: int, n_paragraphs: int, middle_fraction: float, rng: random.Random) -> list[int]:
    """Paragraph index for each fact: round(n_facts·middle_fraction) of them in the middle
    third of the paragraphs, the rest alternating between the first and last thirds, each
    group spread evenly over its region."""
    third = n_paragraphs / 3
    n_mid = min(n_facts, round(n_facts * middle_fraction))
    n_rest = n_facts - n_mid
    n_head = (n_rest + 1) // 2
    n_tail = n_rest - n_head

    def spread(count: int, lo: float, hi: float) -> list[int]:
        if count == 0:
            return []
        width = (hi - lo) / count
        return [min(n_paragraphs - 1, int(lo + width * (i + rng.uniform(0.2, 0.8)))) for i in range(count)]

    return sorted(spread(n_head, 0, third) + spread(n_mid, third, 2 * third) + spread(n_tail, 2 * third, n_paragraphs))


def make_document(
    seed: int,
    n_facts: int,
    filler_paragraphs: int,
    *,
    middle_fraction: float = 0.6,
    sentences_per_paragraph: tuple[int, int] = (3, 5),
) -> tuple[str, list[dict]]:
    """A markdown document about an invented land, and one question per fact.

    Args:
        seed: everything is a function of the seed.
        n_facts: facts (and questions) in the document.
        filler_paragraphs: paragraphs of filler prose (>= 3); facts are woven into them.
        middle_fraction: share of the facts placed in the middle third.
        sentences_per_paragraph: (min, max) filler sentences per paragraph.

    Returns:
        (document, questions). Each question is a dict with "question", "answer" (short,
        verbatim in the evidence), "answers" (answer first, then accepted variants),
        "evidence" (the fact's sentence, verbatim in the document, occurring once),
        "kind" (the template) and "position" (character offset of the evidence / len).
    """
    if n_facts < 0:
        raise ValueError(f"n_facts must be >= 0, got {n_facts}")
    if filler_paragraphs < 3:
        raise ValueError(f"filler_paragraphs must be >= 3, got {filler_paragraphs}")
    if not 0.0 <= middle_fraction <= 1.0:
        raise ValueError(f"middle_fraction must be in [0, 1], got {middle_fraction}")
    rng = random.Random(seed)
    names = _Names(rng)
    region = names.word(2, 3)
    places = [names.city() for _ in range(4)]
    facts = []
    order = list(FACT_TEMPLATES)
    rng.shuffle(order)
    for i in range(n_facts):
        template = order[i % len(order)]
        sentence, question, answers = template(names)
        facts.append({"question": question, "answer": answers[0], "answers": answers, "evidence": sentence,
                      "kind": template.__name__[3:]})
    slots = _fact_paragraph_slots(n_facts, filler_paragraphs, middle_fraction, rng)
    by_paragraph: dict[int, list[dict]] = {}
    for fact, p in zip(facts, slots):
        by_paragraph.setdefault(p, []).append(fact)

    lo, hi = sentences_per_paragraph
    lines = [f"# The {region} Gazetteer", "",
             f"This gazetteer collects what is known about the land of {region}: its towns, its people, "
             f"its trades and its curiosities.", ""]
    sections = ("Towns and Roads", "People and Trades", "Rivers and Mountains", "Industry", "Customs",
                "Records and Archives")
    section_every = max(1, filler_paragraphs // len(sections))
    for p in range(filler_paragraphs):
        if p % section_every == 0 and p // section_every < len(sections):
            lines += [f"## {sections[p // section_every]}", ""]
        sentences = _filler_paragraph(rng, places, rng.randint(lo, hi))
        for fact in by_paragraph.get(p, []):
            # keep the fact sentence whole (it is the evidence), placed inside the paragraph
            at = rng.randint(1, len(sentences))
            sentences.insert(at, fact["evidence"])
        lines += [" ".join(sentences), ""]
    document = "\n".join(lines).rstrip() + "\n"
    for fact in facts:
        offset = document.index(fact["evidence"])
        fact["position"] = round(offset / len(document), 4)
    return document, facts


def make_dataset(n_docs: int, seed: int = 0, **kw) -> list[dict]:
    """LongBench-format records for `n_docs` synthetic documents (one per question).

    Each record: {"_id", "context", "input" (question), "answers", "length" (words in the
    context, as LongBench counts English), "dataset": "lift-synthetic", "language": "en",
    "all_classes": None, "evidence", "position"}. Document i uses seed·1_000_003 + i.
    Keyword arguments go to `make_document` (defaults n_facts=12, filler_paragraphs=40).
    """
    kw.setdefault("n_facts", 12)
    kw.setdefault("filler_paragraphs", 40)
    records = []
    for i in range(n_docs):
        doc_seed = seed * 1_000_003 + i
        document, questions = make_document(doc_seed, **kw)
        length = len(document.split())
        for k, q in enumerate(questions):
            records.append({
                "_id": f"lift-synthetic-{doc_seed}-{k}",
                "context": document,
                "input": q["question"],
                "answers": list(q["answers"]),
                "length": length,
                "dataset": "lift-synthetic",
                "language": "en",
                "all_classes": None,
                "evidence": q["evidence"],
                "position": q["position"],
            })
    return records


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically: a temp file in the same directory,
    flushed and fsynced, then os.replace over `path` (readers see the old file or the
    whole new one, never a part)."""
    _write_atomic((json.dumps(record, ensure_ascii=False) + "\n" for record in records), path)


def _write_atomic(pieces: Iterable[str], path: str | os.PathLike) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fchmod(fh.fileno(), mode)  # mkstemp creates 0600
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------- demo assets

DEMO_SEED = 1071  # chosen so that one fact sits in each of the head and tail windows of a 512-token window
DEMO_N_FACTS = 12
DEMO_FILLER_PARAGRAPHS = 24
DEMO_MIDDLE_FRACTION = 0.75
DEMO_DOCUMENT = "demo_document.md"
DEMO_QUESTIONS = "demo_questions.jsonl"


def make_demo() -> tuple[str, list[dict]]:
    """The bundled demo: one document (~2.5k tokens) and its 12 questions, 9 of them
    about facts in the middle third."""
    document, questions = make_document(
        DEMO_SEED, DEMO_N_FACTS, DEMO_FILLER_PARAGRAPHS, middle_fraction=DEMO_MIDDLE_FRACTION
    )
    rows = [{"id": f"demo-{k}", **q} for k, q in enumerate(questions)]
    return document, rows


def demo_asset_path(name: str) -> str:
    """Filesystem path of a bundled asset (DEMO_DOCUMENT or DEMO_QUESTIONS)."""
    return str(resources.files("lift_engine.data").joinpath("assets", name))


def load_demo_records() -> list:
    """The bundled demo as `EvalRecord`s (context = the demo document)."""
    from lift_engine.data.documents import read_document
    from lift_engine.data.records import EvalRecord

    document = read_document(demo_asset_path(DEMO_DOCUMENT))
    out = []
    with open(demo_asset_path(DEMO_QUESTIONS), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                out.append(EvalRecord(q["id"], document, q["question"], list(q["answers"]), "lift-demo"))
    return out


def write_demo_assets(directory: str | os.PathLike | None = None) -> tuple[str, str]:
    """(Re)write the demo document and questions into `directory` (default: the package's
    assets folder). Returns the two paths."""
    directory = os.fspath(directory) if directory is not None else os.path.dirname(demo_asset_path(DEMO_DOCUMENT))
    os.makedirs(directory, exist_ok=True)
    document, rows = make_demo()
    doc_path = os.path.join(directory, DEMO_DOCUMENT)
    q_path = os.path.join(directory, DEMO_QUESTIONS)
    _write_atomic([document], doc_path)
    write_jsonl(rows, q_path)
    return doc_path, q_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lift_engine.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--demo-assets", action="store_true", help="regenerate the bundled demo document and questions")
    parser.add_argument("--out", default=None, help="directory for --demo-assets (default: the package assets)")
    parser.add_argument("--dataset", metavar="PATH", help="write a LongBench-format jsonl of synthetic documents")
    parser.add_argument("--n-docs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.demo_assets and not args.dataset:
        parser.error("nothing to do: give --demo-assets and/or --dataset PATH")
    if args.demo_assets:
        for p in write_demo_assets(args.out):
            print(p)
    if args.dataset:
        write_jsonl(make_dataset(args.n_docs, args.seed), args.dataset)
        print(args.dataset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
