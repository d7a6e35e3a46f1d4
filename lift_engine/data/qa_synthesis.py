"""Auxiliary QA written by a generator model (DESIGN.md §2.3).

A generator (the base model through `HFGenerator`, or any OpenAI-compatible endpoint
through `OpenAIGenerator`) is shown a random chunk of a few sentences and asked for one
JSON triple {"question", "answer", "evidence"}; a triple is kept only when its evidence
(or answer) occurs verbatim in the chunk (`passes_evidence_check`).
"""
from __future__ import annotations

import ast
import json
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Protocol, runtime_checkable

from lift_engine.data.extractive import QAItem, split_sentences
from lift_engine.errors import InputError

DEFAULT_QA_PROMPT = (
    "Read the passage and write ONE question that can be answered from it alone.\n"
    "Reply with a single JSON object and nothing else, with these keys:\n"
    '  "question": the question,\n'
    '  "answer": a short answer (a few words),\n'
    '  "evidence": the sentence of the passage that contains the answer, copied exactly.\n'
    "\nPassage:\n{chunk}\n\nJSON:"
)


@runtime_checkable
class Generator(Protocol):
    """Anything that turns a prompt into a completion (text only, no prompt echo)."""

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str: ...


class HFGenerator:
    """A Hugging Face causal LM as a `Generator`.

    The prompt goes through the tokenizer's chat template as one user message when the
    tokenizer has a template (with the generation prompt appended), else it is used
    as is. Greedy by default; `do_sample=True` samples with `temperature`/`top_p`.
    """

    def __init__(self, model, tokenizer, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.95):
        self.model = model
        self.tokenizer = tokenizer
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p

    def prompt_text(self, prompt: str) -> str:
        """The exact text fed to the tokenizer for `prompt`."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str:
        import torch

        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(
            self.prompt_text(prompt), return_tensors="pt", add_special_tokens=not has_template
        )
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc.get("attention_mask")
        attention_mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=self.do_sample, pad_token_id=pad)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


class OpenAIGenerator:
    """An OpenAI-compatible chat-completions endpoint as a `Generator` (urllib only).

    `endpoint` is the server's base URL with or without a trailing "/v1" (or the full
    ".../chat/completions" URL). Connection failures, timeouts, HTTP 429 and 5xx are
    retried `retries` times with exponential backoff (`backoff`, 2·backoff, ...); other
    HTTP errors and malformed replies fail at once. Every failure is an `InputError`
    with a one-line message.
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60,
        *,
        temperature: float = 0.7,
        retries: int = 3,
        backoff: float = 1.0,
    ):
        if not endpoint or not endpoint.startswith(("http://", "https://")):
            raise InputError(f"QA endpoint must be an http(s) URL, got {endpoint!r}")
        self.url = self.completions_url(endpoint)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.temperature = temperature
        self.retries = retries
        self.backoff = backoff

    @staticmethod
    def completions_url(endpoint: str) -> str:
        base = endpoint.rstrip("/")
        if base.endswith("/chat/completions"):
            return base
        if not base.endswith("/v1"):
            base += "/v1"
        return base + "/chat/completions"

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                detail = _http_detail(exc)
                last = f"HTTP {exc.code}{detail}"
                if exc.code == 429 or exc.code >= 500:
                    continue
                raise InputError(f"QA endpoint {self.url} refused the request: {last}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                continue
            return self._content(raw)
        raise InputError(f"QA endpoint {self.url} unreachable after {self.retries + 1} attempts ({last})")

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise InputError(f"QA endpoint {self.url} gave a reply that is not a chat completion") from None
        return content if isinstance(content, str) else ""


def _http_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read(300).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        return ""
    text = " ".join(text.split())
    return f" ({text[:200]})" if text else ""


def chunk_text(text: str, sentences_per_chunk: int) -> list[str]:
    """Consecutive groups of `sentences_per_chunk` sentences, each a verbatim slice of
    `text` from its first sentence's start to its last one's end."""
    if sentences_per_chunk <= 0:
        raise ValueError(f"sentences_per_chunk must be positive, got {sentences_per_chunk}")
    spans = split_sentences(text)
    return [
        text[spans[i][0]:spans[min(i + sentences_per_chunk, len(spans)) - 1][1]]
        for i in range(0, len(spans), sentences_per_chunk)
    ]


_TRIPLE_KEYS = ("question", "answer", "evidence")


def _as_triple(obj) -> QAItem | None:
    if not isinstance(obj, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    if not all(k in lowered for k in _TRIPLE_KEYS):
        return None
    vals = []
    for k in _TRIPLE_KEYS:
        v = lowered[k]
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            return None
        vals.append(str(v).strip())
    return QAItem(vals[0], vals[1], vals[2], "generated")


def _balanced_end(text: str, start: int) -> int:
    """Index just past the "}" closing the "{" at `start`, honouring quoted strings; -1 if none."""
    depth = 0
    quote = ""
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def parse_triple(text: str) -> QAItem | None:
    """The first {...} object in `text` with keys question/answer/evidence, else None.

    Tolerant of prose or code fences around the object, key case, and Python-style
    single-quoted dicts. Values must be strings (numbers are turned into strings).
    """
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except ValueError:
            obj = None
            end = _balanced_end(text, i)
            if end > 0:
                try:
                    obj = ast.literal_eval(text[i:end])
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    obj = None
        item = _as_triple(obj)
        if item is not None:
            return item
        i = text.find("{", i + 1)
    return None


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


def passes_evidence_check(item: QAItem, chunk: str) -> bool:
    """True when question, answer and evidence are all non-empty and the evidence, or
    failing that the answer, occurs verbatim in `chunk` after whitespace normalisation
    (runs of whitespace -> one space, ends stripped). The matching field must contain
    at least one letter or digit, so a bare "." cannot pass."""
    question, answer, evidence = _norm_ws(item.question), _norm_ws(item.answer), _norm_ws(item.evidence)
    if not (question and answer and evidence):
        return False
    hay = _norm_ws(chunk)
    return any(any(ch.isalnum() for ch in field) and field in hay for field in (evidence, answer))


def synthesize_qa(
    text: str,
    generator: Generator,
    n: int,
    tries_per_item: int = 3,
    chunk_sentences: int = 4,
    seed: int = 0,
    progress: bool = False,
    *,
    prompt_template: str = DEFAULT_QA_PROMPT,
    max_new_tokens: int = 256,
) -> list[QAItem]:
    """Up to `n` generated QA triples about `text` that pass the evidence check.

    Chunks of `chunk_sentences` sentences are visited in a seeded random order (each
    once before any repeats); each try formats `prompt_template` with the chunk, asks
    the generator, parses the first triple and keeps it when it passes
    `passes_evidence_check` and its question is new. Stops after `n` kept triples or
    `n * tries_per_item` tries. A kept item's kind is "generated".
    """
    if n <= 0:
        return []
    chunks = chunk_text(text, chunk_sentences)
    if not chunks:
        return []
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    order: list[int] = []
    kept: list[QAItem] = []
    seen: set[str] = set()
    budget = n * max(1, tries_per_item)
    with tqdm(total=n, desc="synthesizing QA", unit="qa", disable=not progress) as bar:
        for attempt in range(budget):
            if not order:
                order = list(range(len(chunks)))
                rng.shuffle(order)
            chunk = chunks[order.pop()]
            reply = generator.generate(prompt_template.format(chunk=chunk), max_new_tokens=max_new_tokens)
            item = parse_triple(reply or "")
            if item is not None and passes_evidence_check(item, chunk):
                key = _norm_ws(item.question).lower()
                if key not in seen:
                    seen.add(key)
                    kept.append(item)
                    bar.update(1)
            bar.set_postfix(tries=attempt + 1)
            if len(kept) >= n:
                break
    return kept
