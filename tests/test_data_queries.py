"""Queries about chunks of a document (lift_engine.data.queries, docs/DESIGN.md §2.6).

Generators here are test doubles, a tiny random Llama, and a real HTTP server on
127.0.0.1 speaking the OpenAI chat-completions protocol; nothing leaves the machine.
"""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers_pipeline import DOCUMENT
from helpers_tokenizer import make_tokenizer
from lift_engine.config import QUERY_KINDS, QAConfig, QueryConfig
from lift_engine.data.extractive import QAItem
from lift_engine.data.qa_synthesis import HFGenerator, OpenAIGenerator
from lift_engine.data.queries import (
    Query,
    QueryGenerator,
    document_chunks,
    generate_queries,
    make_query_generator,
    parse_query,
)
from lift_engine.data.synthetic import make_document


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def doc():
    text, _ = make_document(3, n_facts=6, filler_paragraphs=6)
    return DOCUMENT + "\n" + text


@pytest.fixture(scope="module")
def chunks(tok, doc):
    # this test tokenizer spends ~1 token per 2 characters: let a cut move back half a chunk
    return document_chunks(tok(doc, add_special_tokens=False)["input_ids"], tok, 160, snap_fraction=0.5)


def _norm(s):
    return " ".join(s.split())


# ----------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("size", [1, 7, 64, 160, 100_000])
def test_chunks_cover_every_token_once(tok, doc, size):
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    chunks = document_chunks(ids, tok, size)
    assert chunks[0].start == 0 and chunks[-1].end == len(ids)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.end == nxt.start  # contiguous: no gap, no overlap
    assert all(0 < c.end - c.start <= size for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    covered = [t for c in chunks for t in ids[c.start:c.end]]
    assert covered == ids  # every token exactly once, in order
    assert "".join(c.text for c in chunks) == doc  # byte-level BPE decodes back exactly
    assert document_chunks(doc, tok, size) == chunks  # text in: tokenised the same way


def test_chunks_end_at_sentence_or_line_ends(tok, doc, chunks):
    snapped = chunks
    ends = [c.text.rstrip(" ") for c in snapped[:-1]]
    assert len(snapped) > 5
    at_sentence = [e.endswith((".", "\n", ":")) for e in ends]
    assert sum(at_sentence) >= 0.75 * len(ends), [e[-20:] for e in ends]  # else a long sentence: a word boundary
    for c, nxt in zip(snapped, snapped[1:]):
        assert c.text[-1:].isspace() or nxt.text[:1].isspace()
        assert not c.text.rstrip("\n").splitlines()[-1].startswith("#")  # a heading stays with its text
    assert chunks[0].heading == "The Quenwick Report"
    assert {c.heading for c in chunks} > {"The Quenwick Report", "Industry"}
    assert document_chunks([], tok, 10) == []
    with pytest.raises(ValueError):
        document_chunks([1, 2], tok, 0)


# ----------------------------------------------------------------------------- parsing


def test_parse_query_forms():
    obj = 'Sure!\n```json\n{"question": "Who founded Quenwick Labs?", "answer": "Ilsa Marrow", "evidence": "x"}\n```'
    assert parse_query(obj) == ("Who founded Quenwick Labs?", "Ilsa Marrow", "x")
    assert parse_query("{'Question': 'When did Oskarby grow?'}") == ("When did Oskarby grow?", None, None)
    assert parse_query('["What is QX-7731?", "Who is Tomas Brell?"]') == ("What is QX-7731?", None, None)
    assert parse_query('[{"question": "Where is Harlow Point?"}]') == ("Where is Harlow Point?", None, None)
    numbered = "Here are questions:\n1. What did the Varnell Institute buy?\n2. Who closed the lab?"
    assert parse_query(numbered) == ("What did the Varnell Institute buy?", None, None)
    assert parse_query("Question: Summarize the history of Quenwick Labs.")[0] == "Summarize the history of Quenwick Labs."
    assert parse_query("I cannot help with that.") is None
    assert parse_query('{"answer": "no question key"}') is None


# ----------------------------------------------------------------------------- generate_queries


def test_extractive_queries_come_with_their_chunk(chunks):
    cfg = QueryConfig(queries_per_chunk=0, extractive_per_chunk=3)
    qs = generate_queries(chunks, None, cfg, seed=0)
    ex = [q for q in qs.queries if q.source == "extractive"]
    assert len(ex) >= len(chunks)
    assert len({q.chunk for q in ex}) > len(chunks) // 2  # spread over the document
    for q in ex:
        assert q.kind == "extractive" and q.answer and q.evidence
        assert _norm(q.evidence) in _norm(chunks[q.chunk].text)
    # a caller's own extractive items are placed the same way
    item = QAItem("Who closed the lab?", "Anouk Seldt", "The final director, Anouk Seldt, closed the lab on 3 March 2011.", "fact")
    own = generate_queries(chunks, None, cfg, extractive=[item, QAItem("Q?", "a", "not in the document", "fact")])
    (q,) = own.queries
    assert q.question == "Who closed the lab?" and item.evidence in chunks[q.chunk].text
    assert own.supervised() == [QAItem(item.question, item.answer, item.evidence, "extractive")]


def test_no_generator_gives_anchored_templates(chunks):
    cfg = QueryConfig(queries_per_chunk=3, extractive_per_chunk=0)
    qs = generate_queries(chunks, None, cfg, seed=1)
    assert len(qs.queries) == 3 * len(chunks) and not qs.warnings
    assert all(q.source == "template" and q.kind in QUERY_KINDS for q in qs.queries)
    for q in qs.queries:  # each names its chunk: its first words, and its heading when it has one
        first = " ".join(chunks[q.chunk].text.split("\n# ")[0].split()[:3]).lstrip("# ")
        assert "the part of the document" in q.question
        if chunks[q.chunk].heading:
            assert chunks[q.chunk].heading in q.question
    kinds = [q.kind for q in qs.queries]
    assert set(kinds) == set(QUERY_KINDS)  # kinds rotate over chunks
    assert generate_queries(chunks, None, cfg, seed=1) == qs  # deterministic for a seed
    assert [q.kind for q in generate_queries(chunks, None, cfg, seed=2).queries] != kinds
    assert generate_queries([], None, cfg).queries == []


class ScriptedGenerator:
    """Replies from a script, cycled: a QueryGenerator test double that records prompts."""

    label = "scripted generator"

    def __init__(self, script):
        self.script = script
        self.prompts = []
        self.last_errors = []

    def generate_many(self, prompts, max_new_tokens=256):
        self.prompts.extend(prompts)
        out = [self.script[i % len(self.script)] for i in range(len(prompts))]
        self.last_errors = ["boom"] * sum(r is None for r in out)
        return out


def _subject(prompt):
    """A distinctive capitalised word of the prompt's passage."""
    passage = prompt.split("Passage:\n", 1)[1].split("\n\nWrite ONE", 1)[0]
    words = [w.strip(".,;:'\"()") for w in passage.split()]
    return next((w for w in words[3:] if w[:1].isupper() and len(w) > 4), words[-1])


def test_dedup_and_drop_counts(chunks):
    good = 'Sure: {"question": "Who founded Quenwick Labs?", "answer": "Ilsa Marrow", "evidence": "Professor Ilsa Marrow founded Quenwick Labs in 1987 in the town of Oskarby."}'
    script = [
        good,
        good,  # duplicate of the first
        "",  # empty
        "   \n",  # empty
        None,  # failed
        "I am sorry, I cannot write questions.",  # malformed
        '{"question": "ok"}',  # malformed: too short to be a question
        "1. What is the main idea of the passage?",  # vague: names nothing of the chunk
        "- When did Professor Ilsa Marrow found Quenwick Labs?",  # a bulleted list is fine
    ]
    gen = ScriptedGenerator(script)
    cfg = QueryConfig(queries_per_chunk=len(script), extractive_per_chunk=0, template_queries=False)
    qs = generate_queries(chunks[:1], gen, cfg, seed=0)
    assert len(gen.prompts) == len(script)
    assert qs.dropped == {"failed": 1, "empty": 2, "malformed": 2, "vague": 1, "duplicate": 1, "split": 0}
    assert [q.question for q in qs.queries] == [
        "Who founded Quenwick Labs?", "When did Professor Ilsa Marrow found Quenwick Labs?"
    ]
    first = qs.queries[0]
    assert first.source == "model" and first.chunk == 0 and first.answer == "Ilsa Marrow"  # evidence verified
    assert qs.queries[1].answer is None
    assert qs.supervised() == [QAItem(first.question, "Ilsa Marrow", first.evidence, "generated")]
    assert any("scripted generator failed 1 of 9 requests: boom" in w for w in qs.warnings)
    assert any("5 of 8 replies gave no usable query (empty 2, malformed 2, vague 1)" in w for w in qs.warnings)
    # an unverifiable evidence keeps the question and drops the answer
    fake = '{"question": "Who bought the Telmo mine in 1991?", "answer": "x", "evidence": "Invented sentence."}'
    (q,) = generate_queries(chunks[1:2], ScriptedGenerator([fake]), QueryConfig(queries_per_chunk=1, extractive_per_chunk=0)).queries
    assert q.answer is None and q.evidence is None and q.chunk == 1


def test_prompts_ask_each_kind_and_templates_fill_in(chunks):
    gen = ScriptedGenerator([None, "garbage"])
    cfg = QueryConfig(queries_per_chunk=4, extractive_per_chunk=0)
    qs = generate_queries(chunks[:3], gen, cfg, seed=0)
    assert len(gen.prompts) == 12
    assert all("Passage:\n" in p and "WITHOUT the passage" in p for p in gen.prompts)
    assert chunks[1].text.strip() in gen.prompts[4]
    assert qs.dropped["failed"] == 6 and qs.dropped["malformed"] == 6
    assert len(qs.queries) == 12 and {q.source for q in qs.queries} == {"template"}
    # more queries than kinds: a repeated kind is pointed at a sentence of the chunk
    many = ScriptedGenerator(["x"])
    generate_queries(chunks[:1], many, QueryConfig(queries_per_chunk=len(QUERY_KINDS) + 2, extractive_per_chunk=0))
    assert sum("Ask about this sentence" in p for p in many.prompts) == 2


def test_generator_kinds_of_failure_are_never_fatal(chunks):
    class Raising:
        label = "broken generator"

        def generate_many(self, prompts, max_new_tokens=256):
            raise RuntimeError("CUDA out of memory")

    class Short:
        def generate_many(self, prompts, max_new_tokens=256):
            return ["What is QX-7731?"]

    class OneAtATime:  # a qa_synthesis Generator: generate only
        calls = 0

        def generate(self, prompt, max_new_tokens=256):
            self.calls += 1
            if self.calls % 2:
                raise ConnectionError("reset by peer")
            return json.dumps({"question": f"What does the document say about {_subject(prompt)}?"})

    cfg = QueryConfig(queries_per_chunk=2, extractive_per_chunk=1)
    for gen in (Raising(), Short()):
        qs = generate_queries(chunks[:2], gen, cfg)
        assert qs.dropped["failed"] == 4 and len(qs.warnings) == 1
        assert "tuning on extractive and template queries only" in qs.warnings[0]
    assert "broken generator failed 4 of 4 requests: RuntimeError: CUDA out of memory" in generate_queries(chunks[:2], Raising(), cfg).warnings[0]
    assert not isinstance(OneAtATime(), QueryGenerator)
    qs = generate_queries(chunks[:2], OneAtATime(), cfg)
    assert qs.dropped["failed"] == 2
    assert sum(q.source == "model" for q in qs.queries) == 2
    assert "ConnectionError: reset by peer" in qs.warnings[0]


# ----------------------------------------------------------------------------- base model, batched


@pytest.fixture(scope="module")
def tiny_lm(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.15,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


PROMPTS = [
    "The quick brown fox",
    "In 1987 the Varnell Institute in Oskarby measured 42 kilograms of zircon at the Telmo mine.",
    "Question?",
    "Recite the following passage of the document.",
    "a",
]


@pytest.mark.parametrize("chat", [True, False])
def test_hf_batched_generation_matches_one_at_a_time(tok, tiny_lm, chat):
    tokenizer = make_tokenizer()
    if not chat:
        tokenizer.chat_template = None
    gen = HFGenerator(tiny_lm, tokenizer, batch_size=3)
    assert isinstance(gen, QueryGenerator)
    single = [gen.generate(p, max_new_tokens=10) for p in PROMPTS]
    batched = gen.generate_many(PROMPTS, max_new_tokens=10)
    assert batched == single  # left padding and the attention mask change nothing for greedy
    assert len(set(single)) > 1 and gen.last_errors == []
    assert gen.generate_many([], max_new_tokens=4) == []


def test_hf_rows_stop_at_eos_and_sampling_is_seeded(tok, tiny_lm):
    class Finished:
        """model.generate's output for two rows: row 0 ends at EOS (then filler), row 1 runs on."""

        device = torch.device("cpu")
        generation_config = None

        def generate(self, input_ids, attention_mask, **kwargs):
            assert attention_mask[0].tolist() == [0] * (input_ids.shape[1] - 2) + [1, 1]  # left padded
            tail = torch.tensor([[40, tok.eos_token_id, 41, 41], [40, 42, 43, 44]])
            return torch.cat([input_ids, tail], dim=1)

    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    out = HFGenerator(Finished(), tokenizer).generate_many(["ab", "The quick brown fox jumps"], max_new_tokens=4)
    assert out == [tok.decode([40]), tok.decode([40, 42, 43, 44])]
    sampled = HFGenerator(tiny_lm, tok, do_sample=True, temperature=1.0, batch_size=2, seed=5)
    before = torch.random.get_rng_state()
    first = sampled.generate_many(PROMPTS, max_new_tokens=8)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone
    assert sampled.generate_many(PROMPTS, max_new_tokens=8) == first


def test_generate_queries_with_the_base_model(tok, tiny_lm, chunks):
    from types import SimpleNamespace

    cfg = QueryConfig(queries_per_chunk=2, extractive_per_chunk=1, max_new_tokens=8, generator_batch_size=4)
    base = SimpleNamespace(model=tiny_lm, tokenizer=tok)
    gen = make_query_generator(QAConfig(), cfg, base, seed=0)
    assert isinstance(gen, HFGenerator) and gen.batch_size == 4
    assert make_query_generator(QAConfig(use_generator=False), cfg, base) is None
    qs = generate_queries(chunks[:2], gen, cfg, seed=0)
    # a random model writes no usable question: every reply dropped and counted, none fatal
    assert sum(qs.dropped[k] for k in ("empty", "malformed", "vague")) == 4
    assert {q.source for q in qs.queries} == {"extractive", "template"}
    assert any("the base model: 4 of 4 replies gave no usable query" in w for w in qs.warnings)


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint


class Endpoint:
    """A chat-completions server on 127.0.0.1 in a thread. mode: "ok" (a question naming the
    chunk's subject), "garbage" (200, not JSON), "prose" (200, a completion that is no
    question), "500", "slow" (sleeps `delay` s before answering), "trickle" (sends headers,
    then one byte every 0.1 s for `delay` s)."""

    def __init__(self, mode, delay=0.0):
        self.mode = mode
        self.delay = delay
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    outer.reply(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def reply(self, handler, body):
        status, ctype = 200, "application/json"
        if self.mode in ("ok", "slow"):
            time.sleep(self.delay)
            prompt = body["messages"][0]["content"]
            ask = " ".join(prompt.split("Write ONE ", 1)[1].split()[:5])  # differs per kind
            question = f"What does the document say about {_subject(prompt)}, {ask}?"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps({"question": question})}}]})
        elif self.mode == "garbage":
            data, ctype = "<html>not json</html>", "text/html"
        elif self.mode == "prose":
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Nice passage!"}}]})
        elif self.mode == "500":
            status, data = 500, json.dumps({"error": {"message": "model crashed"}})
        else:  # trickle
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "100000")
            handler.end_headers()
            end = time.monotonic() + self.delay
            while time.monotonic() < end:
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.1)
            return
        raw = data.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


CFG = QueryConfig(queries_per_chunk=3, extractive_per_chunk=1)


def test_endpoint_answers_concurrently(chunks):
    with Endpoint("ok", delay=0.2) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=5, retries=1, backoff=0, concurrency=3)
        start = time.monotonic()
        qs = generate_queries(chunks[:3], gen, CFG, seed=0)
        wall = time.monotonic() - start
    gen_q = [q for q in qs.queries if q.source == "endpoint"]
    assert len(gen_q) == 9 and qs.dropped["duplicate"] == 0
    assert all(q.question.startswith("What does the document say about") for q in gen_q)
    assert srv.requests == 9 and srv.max_in_flight == 3  # bounded concurrency, used
    assert wall < 9 * 0.2  # faster than one at a time
    assert qs.dropped["failed"] == 0 and not qs.warnings


@pytest.mark.parametrize("mode", ["garbage", "prose", "500"])
def test_endpoint_bad_replies_are_counted(chunks, mode):
    with Endpoint(mode) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=5, retries=2, backoff=0, concurrency=2)
        start = time.monotonic()
        qs = generate_queries(chunks[:4], gen, CFG, seed=0)
        wall = time.monotonic() - start
    assert wall < 5
    assert not [q for q in qs.queries if q.source == "endpoint"]
    assert {q.source for q in qs.queries} == {"extractive", "template"}
    if mode == "prose":  # answered, but no question in it
        assert qs.dropped["malformed"] == 12 and qs.dropped["failed"] == 0
        assert "12 of 12 replies gave no usable query (malformed 12)" in qs.warnings[0]
        return
    assert qs.dropped["failed"] == 12
    (warning,) = qs.warnings
    assert warning.startswith(f"qa endpoint {srv.url} failed 12 of 12 requests: ")
    assert warning.endswith("tuning on extractive and template queries only")
    if mode == "garbage":
        assert "gave a reply that is not a chat completion (" in warning  # (n not sent after 2 failures in a row)
        assert "not sent after 2 failures in a row)" in warning and srv.requests < 6  # a bad body is not retried
    else:
        assert "HTTP 500 (model crashed)" in warning
        assert srv.requests <= (2 * 2 - 1) * 3  # two in flight, one more before the 2nd failure; 3 tries each


def test_endpoint_slow_and_down_are_bounded(chunks):
    with Endpoint("slow", delay=3.0) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=0.4, retries=1, backoff=0, concurrency=4)
        start = time.monotonic()
        qs = generate_queries(chunks[:4], gen, CFG, seed=0)
        wall = time.monotonic() - start
    assert wall < 4  # a wave or two of 4 requests x 2 tries x 0.4 s, the rest not sent (12 x 0.8 s one by one)
    assert qs.dropped["failed"] == 12
    assert f"qa endpoint {srv.url} failed 12 of 12 requests: unreachable after 2 attempts (timed out)" in qs.warnings[0]

    url = _closed_port_url()
    gen = OpenAIGenerator(url, "m", timeout=2, retries=2, backoff=0, concurrency=4)
    start = time.monotonic()
    qs = generate_queries(chunks[:4], gen, CFG, seed=0)
    assert time.monotonic() - start < 3
    assert qs.dropped["failed"] == 12 and len(qs.queries) > 0
    (warning,) = qs.warnings  # "... (n not sent after 4 failures in a row)": n depends on thread timing
    assert warning.startswith(f"qa endpoint {url} failed 12 of 12 requests: unreachable after 3 attempts (connection refused)")
    assert warning.endswith("; tuning on extractive and template queries only")


def test_endpoint_trickling_reply_hits_the_deadline():
    with Endpoint("trickle", delay=8.0) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=0.5, retries=0, backoff=0, concurrency=1)
        start = time.monotonic()
        out = gen.generate_many(["hello"], max_new_tokens=4)
        wall = time.monotonic() - start
    assert out == [None] and wall < 4  # timeout bounds each read, the deadline the whole call
    assert gen.last_errors and gen.last_errors[0].startswith("no reply within")


def test_make_query_generator_for_an_endpoint():
    cfg = QueryConfig(endpoint_concurrency=6, request_timeout=7.5, retries=1)
    gen = make_query_generator(QAConfig(qa_endpoint="http://127.0.0.1:9", qa_model="big"), cfg)
    assert isinstance(gen, OpenAIGenerator) and isinstance(gen, QueryGenerator)
    assert (gen.base_url, gen.model, gen.concurrency, gen.timeout, gen.retries) == ("http://127.0.0.1:9/v1", "big", 6, 7.5, 1)
    assert gen.label == "qa endpoint http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match="chunk_tokens"):
        QueryConfig(chunk_tokens=0).validate()
    with pytest.raises(ValueError, match="kinds"):
        QueryConfig(kinds=("gossip",)).validate()
    assert Query("q", "facts", 0, "model").answer is None


def test_endpoint_without_chat_route_falls_back_to_completions():
    paths = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            paths.append(self.path)
            if self.path.endswith("/chat/completions"):
                status, data = 404, {"error": {"message": "no such route"}}
            else:
                assert body["prompt"] == "Say hi" and body["max_tokens"] == 5
                status, data = 200, {"choices": [{"text": "hi there", "index": 0}]}
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        gen = OpenAIGenerator(f"http://127.0.0.1:{httpd.server_address[1]}", "m", timeout=5, retries=0)
        assert gen.generate_many(["Say hi", "Say hi"], max_new_tokens=5) == ["hi there", "hi there"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert paths[0] == "/v1/chat/completions" and paths[-1] == "/v1/completions"
    assert paths.count("/v1/completions") == 2 and len(paths) <= 4  # the chat route is not asked again once missing
