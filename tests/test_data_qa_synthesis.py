import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lift_engine.data.extractive import QAItem, split_sentences
from lift_engine.data.qa_synthesis import (
    Generator,
    HFGenerator,
    OpenAIGenerator,
    chunk_text,
    parse_triple,
    passes_evidence_check,
    synthesize_qa,
)
from lift_engine.data.synthetic import make_document
from lift_engine.errors import InputError

CHUNK = "The Velbrunn archive opened in 1901.  Its keeper,\nOttoline Graves, catalogued 40,000 maps."


# ----------------------------------------------------------------------------- parsing and checking


def test_parse_triple_tolerant():
    fenced = 'Sure!\n```json\n{"question": "Who kept it?", "answer": "Ottoline Graves", "evidence": "x"}\n```'
    assert parse_triple(fenced) == QAItem("Who kept it?", "Ottoline Graves", "x", "generated")
    single = "Here: {'Question': 'Q?', 'ANSWER': 1901, 'evidence': 'opened in 1901'} done"
    assert parse_triple(single) == QAItem("Q?", "1901", "opened in 1901", "generated")
    first_lacks_keys = '{"note": "ignore {me}"} then {"question": "a {b}?", "answer": "c", "evidence": "d"}'
    assert parse_triple(first_lacks_keys).question == "a {b}?"
    assert parse_triple("no json here") is None
    assert parse_triple('{"question": "q", "answer": "a"}') is None
    assert parse_triple('{"question": "q", "answer": {"x": 1}, "evidence": "e"}') is None
    assert parse_triple("{broken: ") is None


def test_evidence_check():
    ok = QAItem("When did it open?", "1901", "The Velbrunn archive  opened in 1901.", "generated")
    assert passes_evidence_check(ok, CHUNK)
    wrapped = QAItem("Who?", "Ottoline Graves", "Its keeper, Ottoline Graves, catalogued", "generated")
    assert passes_evidence_check(wrapped, CHUNK)  # newline in the chunk vs space in the evidence
    answer_only = QAItem("How many maps?", "40,000 maps", "The keeper catalogued many maps.", "generated")
    assert passes_evidence_check(answer_only, CHUNK)
    invented = QAItem("Who?", "Ada Byron", "Ada Byron kept the archive.", "generated")
    assert not passes_evidence_check(invented, CHUNK)
    assert not passes_evidence_check(QAItem("", "1901", "opened in 1901", "generated"), CHUNK)
    assert not passes_evidence_check(QAItem("Q?", "  ", "opened in 1901", "generated"), CHUNK)
    assert not passes_evidence_check(QAItem("Q?", "Ada", ".", "generated"), CHUNK)


def test_chunk_text_verbatim():
    doc, _ = make_document(1, n_facts=5, filler_paragraphs=6)
    n_sent = len(split_sentences(doc))
    chunks = chunk_text(doc, 4)
    assert len(chunks) == -(-n_sent // 4)
    assert all(c in doc for c in chunks)
    with pytest.raises(ValueError):
        chunk_text(doc, 0)


# ----------------------------------------------------------------------------- synthesize_qa


class FakeGenerator:
    """Test double for a generator model: answers from the chunk in the prompt; every
    third reply hallucinates, every fifth is not JSON."""

    def __init__(self, always_bad=False):
        self.calls = 0
        self.always_bad = always_bad

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str:
        self.calls += 1
        chunk = prompt.split("Passage:\n", 1)[1].rsplit("\n\nJSON:", 1)[0]
        first = chunk.split(". ")[0]
        if self.always_bad or self.calls % 5 == 0:
            return "I cannot do that."
        if self.calls % 3 == 0:
            return json.dumps({"question": "Q?", "answer": "unknown", "evidence": "Invented sentence."})
        return "Here you go: " + json.dumps(
            {"question": f"What is said in part {self.calls}?", "answer": first.split()[-1], "evidence": first}
        )


def test_synthesize_filters_and_stops_at_n():
    doc, _ = make_document(4, n_facts=6, filler_paragraphs=12)
    assert isinstance(FakeGenerator(), Generator)
    gen = FakeGenerator()
    items = synthesize_qa(doc, gen, n=5, tries_per_item=3, chunk_sentences=3, seed=1)
    assert len(items) == 5
    assert gen.calls < 15  # stopped once it had 5
    assert all(it.kind == "generated" and it.evidence in doc for it in items)
    assert all(it.answer != "unknown" for it in items)
    again = synthesize_qa(doc, FakeGenerator(), n=5, tries_per_item=3, chunk_sentences=3, seed=1)
    assert again == items


def test_synthesize_gives_up_after_budget(capsys):
    doc, _ = make_document(4, n_facts=3, filler_paragraphs=6)
    gen = FakeGenerator(always_bad=True)
    assert synthesize_qa(doc, gen, n=4, tries_per_item=2, progress=True) == []
    assert gen.calls == 8
    assert "synthesizing QA" in capsys.readouterr().err
    assert synthesize_qa("", FakeGenerator(), n=3) == []


# ----------------------------------------------------------------------------- OpenAIGenerator


class _Server:
    def __init__(self, statuses):
        self.statuses = list(statuses)  # HTTP status per request; the last repeats
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers, body))  # case-insensitive lookup
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                if status == 200:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hello"}}]})
                elif status == 299:  # a 200 whose body is not a chat completion
                    status, payload = 200, "<html>nope</html>"
                else:
                    payload = json.dumps({"error": {"message": "boom"}})
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_openai_success_and_url_forms(suffix):
    with _Server([200]) as srv:
        gen = OpenAIGenerator(srv.url + suffix, "tiny-model", api_key="k-123", timeout=5)
        assert gen.generate("Say hello", max_new_tokens=7) == "hello"
    (path, headers, body), = srv.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer k-123"
    assert body["model"] == "tiny-model" and body["max_tokens"] == 7
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


def test_openai_retries_then_succeeds():
    with _Server([500, 503, 200]) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=5, retries=3, backoff=0)
        assert gen.generate("x") == "hello"
    assert len(srv.requests) == 3


def test_openai_gives_up_with_clear_error():
    with _Server([500]) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=5, retries=2, backoff=0)
        with pytest.raises(InputError, match="unreachable after 3 attempts.*HTTP 500") as exc:
            gen.generate("x")
    assert len(srv.requests) == 3
    assert "\n" not in str(exc.value)


def test_openai_client_error_not_retried():
    with _Server([401]) as srv:
        gen = OpenAIGenerator(srv.url, "m", timeout=5, retries=3, backoff=0)
        with pytest.raises(InputError, match="refused the request: HTTP 401"):
            gen.generate("x")
    assert len(srv.requests) == 1


def test_openai_bad_body_and_unreachable():
    with _Server([299]) as srv:
        with pytest.raises(InputError, match="not a chat completion"):
            OpenAIGenerator(srv.url, "m", timeout=5, backoff=0).generate("x")
    closed = srv.url  # the server is shut down now: connection refused
    with pytest.raises(InputError, match="unreachable after 2 attempts"):
        OpenAIGenerator(closed, "m", timeout=2, retries=1, backoff=0).generate("x")
    with pytest.raises(InputError, match="http"):
        OpenAIGenerator("localhost:8000", "m")


# ----------------------------------------------------------------------------- HFGenerator


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, this is a tiny corpus"] * 10, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), hf_tok


def test_hf_generator_plain_and_chat_template(tiny_lm):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok)
    assert gen.prompt_text("hello") == "hello"
    out = gen.generate("hello world", max_new_tokens=4)
    assert isinstance(out, str)
    assert len(tok(out, add_special_tokens=False)["input_ids"]) <= 4
    assert gen.generate("hello world", max_new_tokens=4) == out  # greedy is deterministic

    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    try:
        assert gen.prompt_text("hello") == "<<hello>>A:"
        assert isinstance(gen.generate("hello", max_new_tokens=3), str)
    finally:
        tok.chat_template = None
