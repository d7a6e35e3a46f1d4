"""Auxiliary QA written by a generator model (docs/DESIGN.md §2.3).

A generator (the base model through `HFGenerator`, or any OpenAI-compatible endpoint
through `OpenAIGenerator`) is shown a random chunk of a few sentences and asked for one
JSON triple {"question", "answer", "evidence"}; a triple is kept only when its evidence
(or answer) occurs verbatim in the chunk (`passes_evidence_check`).
"""
from __future__ import annotations

import ast
import json
import random
import time
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
    """A Hugging Face causal LM as a `Generator` (and a batched `QueryGenerator`).

    The prompt goes through the tokenizer's chat template as one user message when the
    tokenizer has a template (with the generation prompt appended), else it is used
    as is. Greedy by default; `do_sample=True` samples with `temperature`/`top_p`
    (with `seed` set, `generate_many` draws from its own seeded RNG stream, so a
    batch's samples repeat for a seed and the global RNG is left alone).
    `batch_size` prompts go through `model.generate` at once in `generate_many`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.95,
        *,
        batch_size: int = 8,
        seed: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.label = "the base model"
        self.source = "model"  # Query.source of what it writes (lift_engine.data.queries)
        self.last_errors: list[str] = []

    def prompt_text(self, prompt: str) -> str:
        """The exact text fed to the tokenizer for `prompt`."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _prompt_ids(self, prompt: str) -> list[int]:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(self.prompt_text(prompt), add_special_tokens=not has_template)
        return list(enc["input_ids"])

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        return pad

    def _generate_kwargs(self, max_new_tokens: int) -> dict:
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=self.do_sample, pad_token_id=self._pad_id())
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def _device(self):
        return getattr(self.model, "device", None) or next(self.model.parameters()).device

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str:
        import torch

        device = self._device()
        input_ids = torch.tensor([self._prompt_ids(prompt)], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **self._generate_kwargs(max_new_tokens)
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    def generate_many(self, prompts: list[str], max_new_tokens: int = 256) -> list[str | None]:
        """Completions of `prompts`, in order, `batch_size` at a time.

        Each batch is left-padded (pad id, attention mask 0) so that every row's last
        prompt token sits at the same position and generation continues right after
        it; prompts are grouped by length to keep padding small. A row's output is cut
        at its first end-of-sequence token. Greedy decoding gives the same text as
        `generate` one prompt at a time. A batch that fails (e.g. out of memory) is
        retried one prompt at a time; a prompt that still fails gives None, its reason
        in `last_errors`."""
        import contextlib

        import torch

        self.last_errors = []
        out: list[str | None] = [None] * len(prompts)
        if not prompts:
            return out
        ids = [self._prompt_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
        rng = contextlib.nullcontext()
        if self.do_sample and self.seed is not None:
            devices = [self._device()] if self._device().type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        with rng:
            if self.do_sample and self.seed is not None:
                torch.manual_seed(self.seed)
            for b in range(0, len(order), self.batch_size):
                rows = order[b:b + self.batch_size]
                try:
                    texts = self._generate_batch([ids[i] for i in rows], max_new_tokens)
                except (RuntimeError, ValueError) as exc:
                    if len(rows) == 1:
                        self.last_errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                        continue
                    texts = []
                    for i in rows:
                        try:
                            texts.append(self._generate_batch([ids[i]], max_new_tokens)[0])
                        except (RuntimeError, ValueError) as exc1:
                            self.last_errors.append(f"{type(exc1).__name__}: {' '.join(str(exc1).split())[:200]}")
                            texts.append(None)
                for i, text in zip(rows, texts):
                    out[i] = text
        return out

    def _generate_batch(self, rows: list[list[int]], max_new_tokens: int) -> list[str]:
        import torch

        pad = self._pad_id()
        width = max(len(r) for r in rows)
        device = self._device()
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            input_ids[k, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[k, width - len(r):] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                **self._generate_kwargs(max_new_tokens),
            )
        eos = self.tokenizer.eos_token_id
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = {eos} if eos is not None else set()
        stops |= set(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]) - {None}
        texts = []
        for k in range(len(rows)):
            new = out[k, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stops), None)
            if cut is not None:
                new = new[:cut + 1]  # keep the stop token: decode drops it as a special token
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return texts


class OpenAIGenerator:
    """An OpenAI-compatible endpoint as a `Generator`, through the `openai` package.

    `endpoint` is the server's base URL with or without a trailing "/v1" (or the full
    ".../chat/completions" URL). Requests go to chat completions; a server without a
    chat route (HTTP 404) or without a chat template for its model is asked through
    plain completions instead, from then on. The client (its `max_retries`, `timeout`)
    retries connection failures, timeouts, HTTP 408/409/429 and 5xx `retries` times,
    waiting `backoff`, 2·backoff, ... seconds (at most 8) between tries (None: the
    client's own schedule, which honours Retry-After); each try may wait `timeout`
    seconds for the server. Other HTTP errors and malformed replies fail at once.

    `generate` raises `InputError` with a one-line message naming the URL on failure.
    `generate_many` never raises (see there). `api_key` None sends "EMPTY" (what local
    OpenAI-compatible servers expect); OPENAI_API_KEY is never read.
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
        backoff: float | None = 1.0,
        concurrency: int = 4,
        max_consecutive_failures: int | None = None,
    ):
        if not endpoint or not endpoint.startswith(("http://", "https://")):
            raise InputError(f"QA endpoint must be an http(s) URL, got {endpoint!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = self.completions_url(endpoint)
        self.base_url = self.url[: -len("/chat/completions")]
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.temperature = temperature
        self.retries = int(retries)
        self.backoff = backoff
        self.concurrency = max(1, int(concurrency))
        # failures in a row, before any success, after which generate_many stops sending
        self.max_consecutive_failures = (
            max(2, self.concurrency) if max_consecutive_failures is None else max(1, int(max_consecutive_failures))
        )
        self.label = f"qa endpoint {self.base_url}"
        self.source = "endpoint"  # Query.source of what it writes (lift_engine.data.queries)
        self.last_errors: list[str] = []  # why each failed prompt of the last generate_many failed
        self._chat = True  # False once the server turned out to have no chat route
        self._client = _openai_client(self.base_url, api_key, self.timeout, self.retries, backoff)

    @staticmethod
    def completions_url(endpoint: str) -> str:
        base = endpoint.rstrip("/")
        if base.endswith("/chat/completions"):
            return base
        if not base.endswith("/v1"):
            base += "/v1"
        return base + "/chat/completions"

    def generate(self, prompt: str, max_new_tokens: int = 256) -> str:
        text, error = self._attempt(prompt, max_new_tokens)
        if error is not None:
            raise InputError(f"QA endpoint {self.url} {error}")
        return text

    def _attempt(self, prompt: str, max_new_tokens: int) -> tuple[str, str | None]:
        """(completion, None), or ("", why it failed: a phrase that follows the URL)."""
        import openai

        attempts = f"unreachable after {self.retries + 1} attempts"
        try:
            return self._complete(prompt, max_new_tokens), None
        except openai.APIStatusError as exc:
            last = f"HTTP {exc.status_code}{_status_detail(exc)}"
            if exc.status_code in _RETRIED_STATUSES or exc.status_code >= 500:
                return "", f"{attempts} ({last})"
            return "", f"refused the request: {last}"
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            return "", f"{attempts} ({_connection_detail(exc)})"
        except Exception:  # noqa: BLE001 - whatever the client makes of a body that is not JSON
            return "", "gave a reply that is not a chat completion"

    def _complete(self, prompt: str, max_new_tokens: int) -> str:
        import openai

        if self._chat:
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_new_tokens, temperature=self.temperature,
                )
            except openai.APIStatusError as exc:
                if not _no_chat_route(exc):
                    raise
                self._chat = False
            else:
                return _reply_text(reply, chat=True)
        reply = self._client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_new_tokens, temperature=self.temperature,
        )
        return _reply_text(reply, chat=False)

    def request_bound(self) -> float:
        """Seconds one prompt may take with all its retries: (retries + 1) · timeout plus
        the waits between tries."""
        waits = [_MAX_BACKOFF if self.backoff is None else min(self.backoff * 2 ** k, _MAX_BACKOFF)
                 for k in range(self.retries)]
        return (self.retries + 1) * self.timeout + sum(waits)

    def generate_many(self, prompts: list[str], max_new_tokens: int = 256) -> list[str | None]:
        """Completions of `prompts`, in order; None where a prompt failed. Never raises.

        Up to `concurrency` requests are in flight at once. The reason of each failure
        is kept in `last_errors`. After `max_consecutive_failures` failures in a row with
        no success yet, the remaining prompts are not sent (a down endpoint costs a few
        requests, not all). The call returns by a wall-clock deadline of
        ceil(len / concurrency) · `request_bound()` + 2 s even when a server trickles
        bytes (`timeout` bounds each read, not a whole reply); a request still running
        then counts as failed and is abandoned to its own timeout.
        """
        import threading
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        n = len(prompts)
        self.last_errors = []
        if n == 0:
            return []
        lock = threading.Lock()
        state = {"in_a_row": 0, "ok": 0}
        tripped = threading.Event()

        def one(prompt: str) -> tuple[str | None, str | None]:
            if tripped.is_set():
                return None, f"not sent after {self.max_consecutive_failures} failures in a row"
            text, error = self._attempt(prompt, max_new_tokens)
            with lock:
                if error is None:
                    state["in_a_row"], state["ok"] = 0, state["ok"] + 1
                else:
                    state["in_a_row"] += 1
                    if state["ok"] == 0 and state["in_a_row"] >= self.max_consecutive_failures:
                        tripped.set()
            return (text, None) if error is None else (None, error)

        budget = -(-n // self.concurrency) * self.request_bound() + 2.0
        deadline = time.monotonic() + budget
        results: list[tuple[str | None, str | None]] = [(None, f"no reply within {budget:.0f} s")] * n
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="lift-qa")
        try:
            futures = {pool.submit(one, p): i for i, p in enumerate(prompts)}
            pending = set(futures)
            while pending and (left := deadline - time.monotonic()) > 0:
                done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[futures[fut]] = fut.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self.last_errors = [error for text, error in results if text is None]
        return [text for text, _ in results]


_RETRIED_STATUSES = (408, 409, 429)
_MAX_BACKOFF = 8.0


def _openai_client(base_url: str, api_key: str | None, timeout: float, retries: int, backoff: float | None):
    """An `openai.OpenAI` client for `base_url`; with `backoff` set, its retry waits are
    backoff · 2^k seconds (k = 0, 1, ...; at most 8) instead of the library's schedule."""
    import openai

    class _Client(openai.OpenAI):
        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):  # noqa: D401
            if backoff is None:
                return super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            done = max(0, self.max_retries - remaining_retries)
            return min(backoff * 2 ** done, _MAX_BACKOFF)

    return _Client(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=retries)


def _reply_text(reply, chat: bool) -> str:
    """The text of a (chat) completion; InputError-free: a malformed reply raises ValueError."""
    try:
        choice = reply.choices[0]
        content = choice.message.content if chat else choice.text
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError("not a completion") from None
    return content if isinstance(content, str) else ""


def _no_chat_route(exc) -> bool:
    """True when an HTTP error says the server has no chat completions for this model."""
    message = str(getattr(exc, "message", "") or exc).lower()
    return exc.status_code == 404 or (exc.status_code == 400 and "chat template" in message)


def _status_detail(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("message", body)
    text = " ".join(str(body if body is not None else "").split())
    return f" ({text[:200]})" if text else ""


def _connection_detail(exc) -> str:
    """One phrase for a connection failure or timeout: the underlying cause when known."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    text = str(cause) if cause is not None else str(exc)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    text = " ".join(text.split())
    return f"{type(cause).__name__}: {text[:200]}" if cause is not None else text[:200]


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


def _balanced_end(text: str, start: int, opener: str = "{", closer: str = "}") -> int:
    """Index just past the `closer` closing the `opener` at `start`, honouring quoted strings; -1 if none."""
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
        elif ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def iter_json_values(text: str, opener: str = "{"):
    """Every JSON value opening with `opener` ("{" or "[") found in `text`, in order:
    strict JSON first, else a Python-style literal (single quotes) up to the balanced
    closing bracket. Prose, code fences and broken pieces around them are skipped."""
    closer = {"{": "}", "[": "]"}[opener]
    decoder = json.JSONDecoder()
    i = text.find(opener)
    while i >= 0:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except ValueError:
            obj = None
            end = _balanced_end(text, i, opener, closer)
            if end > 0:
                try:
                    obj = ast.literal_eval(text[i:end])
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                    obj = None
        if obj is not None:
            yield obj
        i = text.find(opener, i + 1)


def parse_triple(text: str) -> QAItem | None:
    """The first {...} object in `text` with keys question/answer/evidence, else None.

    Tolerant of prose or code fences around the object, key case, and Python-style
    single-quoted dicts. Values must be strings (numbers are turned into strings).
    """
    for obj in iter_json_values(text):
        item = _as_triple(obj)
        if item is not None:
            return item
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
