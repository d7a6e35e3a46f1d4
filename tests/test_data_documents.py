import builtins
import io
import sys
import tracemalloc

import pytest

from lift_engine.data.documents import read_document, tokenize_long
from lift_engine.errors import InputError


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_reads_text_and_normalises(tmp_path):
    p = _write(tmp_path, "doc.md", "\ufeff# Title\r\nline one\rline two\nTschüß €\r\n".encode())
    assert read_document(p) == "# Title\nline one\nline two\nTschüß €\n"
    assert read_document(str(p)) == read_document(p)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_small_chunks_split_multibyte_and_crlf(tmp_path, chunk):
    text = "\ufeffa\r\nb€\r\n\r\nc😀d\re"
    p = _write(tmp_path, "doc.txt", text.encode())
    assert read_document(p, chunk_bytes=chunk) == "a\nb€\n\nc😀d\ne"


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_document(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="directory"):
        read_document(tmp_path)


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n  ", b"\xef\xbb\xbf"])
def test_empty_or_whitespace(tmp_path, data):
    p = _write(tmp_path, "empty.txt", data)
    with pytest.raises(InputError, match="empty") as exc:
        read_document(p)
    assert str(p) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_binary_nul(tmp_path):
    p = _write(tmp_path, "img.bin", b"PNG\x00\x01\x02 some bytes")
    with pytest.raises(InputError, match="binary"):
        read_document(p)


def test_binary_control_characters(tmp_path):
    p = _write(tmp_path, "ctl.dat", bytes(range(1, 32)) * 40 + b"text")
    with pytest.raises(InputError, match="binary"):
        read_document(p)
    # a few control characters in real text are fine
    ok = _write(tmp_path, "ok.txt", b"hello\x1b[0m world " * 3 + b"plain text " * 200)
    assert read_document(ok).startswith("hello")


@pytest.mark.parametrize("chunk", [4, 1 << 20])
def test_non_utf8_reports_offset(tmp_path, chunk):
    data = "héllo wörld ".encode() * 3 + b"\xff tail"
    p = _write(tmp_path, "latin.txt", data)
    bad = data.index(b"\xff")
    with pytest.raises(InputError, match=rf"offset {bad}\b") as exc:
        read_document(p, chunk_bytes=chunk)
    assert "UTF-8" in str(exc.value)


def test_truncated_multibyte_at_end(tmp_path):
    data = b"ok text " + "€".encode()[:2]
    p = _write(tmp_path, "cut.txt", data)
    with pytest.raises(InputError, match="offset 8"):
        read_document(p, chunk_bytes=3)


def test_stdin(monkeypatch):
    fake = io.TextIOWrapper(io.BytesIO(b"from stdin\r\n"))
    monkeypatch.setattr(sys, "stdin", fake)
    assert read_document("-") == "from stdin\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(InputError, match="<stdin>"):
        read_document("-")


def test_huge_file_reads_in_chunks_with_bounded_memory(tmp_path, monkeypatch):
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    data = line * (40_000_000 // len(line))
    p = _write(tmp_path, "huge.txt", data)
    size = len(data)
    del data

    reads = []
    real_open = builtins.open

    class CountingFile(io.FileIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    def counting_open(path, mode="r", *a, **k):
        if mode == "rb" and str(path) == str(p):
            return CountingFile(str(path), "rb")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", counting_open)
    tracemalloc.start()
    try:
        text = read_document(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    assert len(text) == size - size // len(line)  # every \r\n became \n
    assert text.count("\r") == 0
    assert len(reads) >= size // (1 << 20)  # streamed in ~1 MiB chunks, never read whole
    assert all(0 < n <= (1 << 20) for n in reads)
    assert peak < 3 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# ----------------------------------------------------------------------------- tokenize_long


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog.", "Velbrunn is a city of 88,300 people.",
              "Long documents need long tokenisation.\n\nNew paragraph here."] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _long_text(n_para=60):
    paras = []
    for i in range(n_para):
        paras.append(f"Paragraph {i}: the quick brown fox  jumps over the lazy dog.\tVelbrunn has {i * 37} people. "
                     + "Long documents need long tokenisation. " * (i % 4))
    return "\n\n".join(paras) + "\n"


@pytest.mark.parametrize("chunk_chars", [50, 97, 1000, 10**6])
def test_tokenize_long_matches_whole_text(bpe_tokenizer, chunk_chars):
    text = _long_text()
    expected = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_long(text, bpe_tokenizer, chunk_chars=chunk_chars) == expected


def test_tokenize_long_no_whitespace_falls_back_to_hard_cut(bpe_tokenizer):
    text = "x" * 1000
    ids = tokenize_long(text, bpe_tokenizer, chunk_chars=64)
    assert bpe_tokenizer.decode(ids) == text


def test_tokenize_long_progress_and_encode_api(capsys):
    class WordTok:  # a minimal tokenizer exposing only encode()
        def __init__(self):
            self.vocab = {}
            self.calls = 0

        def encode(self, text, add_special_tokens=False):
            assert add_special_tokens is False
            self.calls += 1
            return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    tok = WordTok()
    text = " ".join(f"w{i % 50}" for i in range(3000))
    ids = tokenize_long(text, tok, chunk_chars=200, progress=True)
    assert len(ids) == 3000 and ids[:3] == [0, 1, 2]
    assert tok.calls > 10
    assert "tokenizing" in capsys.readouterr().err
