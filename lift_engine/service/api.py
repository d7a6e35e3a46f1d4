"""The document API on `lift serve` (issue 19), as a Starlette app the tenant middleware
mounts after authentication (lift_engine.vllm_plugin.auth), and the rewrite of a
completion request that names a document.

    POST   /v1/documents          JSON {"text": …, "name": …?}, multipart (file + name?),
                                  or a text/plain body (?name=…)   → 202 (201 when ready at once)
    GET    /v1/documents          the tenant's own documents
    GET    /v1/documents/{id}     queued / tuning (with progress) / ready / failed (with its error)
    DELETE /v1/documents/{id}     the record goes, the adapter leaves the store and the engine

Errors are OpenAI-style JSON ({"error": {"message", "type", "code"}}) with a status the
client can act on: 400 bad input, 404 unknown (or another tenant's) id, 409 name taken,
413 too large, 429 the tenant's tuning queue is full, 503 the service is not up.

A completion request whose `model` is a ready document is answered as `lift ask` does:
the document's middle-truncated context (its window's tokens) goes in front of the
question, laid out by PromptBuilder, and the document's adapter (none for a hybrid
document) is applied. /v1/completions with a text prompt gets the exact token ids;
/v1/chat/completions gets the context text in the last user message (the chat template
then gives the same layout; the context is decoded and re-tokenised by vLLM).
"""
from __future__ import annotations

import asyncio
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lift_engine.prompts import QA_INSTRUCTION
from lift_engine.service import runtime
from lift_engine.service.documents import DocumentError

TENANT_KEY = "lift.tenant"  # the middleware puts the authenticated tenant in the ASGI scope
UPLOAD_OVERHEAD = 1 << 20  # JSON escapes / multipart framing allowed beyond the document limit


def error_response(status: int, message: str, err_type: str = "BadRequestError", **extra) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "code": status, **extra}}
    return JSONResponse(body, status_code=status)


_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError", 413: "PayloadTooLargeError",
          429: "RateLimitError", 503: "ServiceUnavailableError"}


def _service_or_error():
    service = runtime.current()
    if service is not None:
        return service, None
    state, error = runtime.status()
    message = {"starting": "the document service is starting; try again in a few seconds",
               "failed": f"the document service is unavailable: {error}"}.get(state, "this server has no document service")
    return None, error_response(503, message, "ServiceUnavailableError")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DocumentError(413, f"the upload is larger than the limit of {limit - UPLOAD_OVERHEAD} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """(document bytes, name or None) from a JSON, multipart or plain-text upload."""
    body = await _read_body(request, limit + UPLOAD_OVERHEAD)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        except Exception as exc:
            raise DocumentError(400, f"unreadable multipart upload: {exc}") from None
        upload, name = form.get("file"), form.get("name")
        if upload is None or isinstance(upload, str):
            raise DocumentError(400, "a multipart upload needs its document in a file field named 'file'")
        data = await upload.read()
        await form.close()
        if name is not None and not isinstance(name, str):
            raise DocumentError(400, "name must be text")
        return data, name
    if ctype in ("text/plain", "text/markdown"):
        return body, request.query_params.get("name")
    try:
        payload = json.loads(body)
    except ValueError:
        raise DocumentError(400, "send JSON {\"text\": …, \"name\": …}, multipart with a 'file' field, "
                                 "or a text/plain body") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise DocumentError(400, "the JSON body needs a string field 'text'")
    name = payload.get("name")
    if name is not None and not isinstance(name, str):
        raise DocumentError(400, "name must be a string")
    return payload["text"].encode("utf-8", errors="surrogatepass"), name


def _public(service, record) -> dict:
    return record.public(service.progress(record))


async def create_document(request: Request):
    service, err = _service_or_error()
    if err is not None:
        return err
    try:
        data, name = await _upload(request, service.cfg.max_document_bytes)
        record = await asyncio.to_thread(service.create, request.scope[TENANT_KEY], data, name)
    except DocumentError as exc:
        return error_response(exc.status, str(exc), _TYPES.get(exc.status, "BadRequestError"))
    return JSONResponse(_public(service, record), status_code=201 if record.state == "ready" else 202)


async def list_documents(request: Request):
    service, err = _service_or_error()
    if err is not None:
        return err
    records = service.list(request.scope[TENANT_KEY])
    return JSONResponse({"object": "list", "data": [_public(service, r) for r in records]})


def _not_found(doc_id: str) -> JSONResponse:
    return error_response(404, f"no document {doc_id!r}", "NotFoundError")


async def get_document(request: Request):
    service, err = _service_or_error()
    if err is not None:
        return err
    doc_id = request.path_params["doc_id"]
    record = service.get(request.scope[TENANT_KEY], doc_id)
    return _not_found(doc_id) if record is None else JSONResponse(_public(service, record))


async def delete_document(request: Request):
    service, err = _service_or_error()
    if err is not None:
        return err
    doc_id = request.path_params["doc_id"]
    record = await asyncio.to_thread(service.delete, request.scope[TENANT_KEY], doc_id)
    if record is None:
        return _not_found(doc_id)
    unload = request.scope.get("lift.unload")
    if unload is not None and record.mode == "adapter" and record.adapter_version:
        await unload(record)
    return JSONResponse({"id": record.id, "object": "document", "name": record.name, "deleted": True})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown sub-paths (404) and methods (405) answer in the same JSON shape as the rest."""
    what = "no such route" if exc.status_code == 404 else f"{request.method} is not allowed here"
    return error_response(exc.status_code, f"{what}: {request.url.path}", _TYPES.get(exc.status_code, "BadRequestError"))


def build_app() -> Starlette:
    return Starlette(exception_handlers={HTTPException: _http_error}, routes=[
        Route("/v1/documents", create_document, methods=["POST"]),
        Route("/v1/documents", list_documents, methods=["GET"]),
        Route("/v1/documents/{doc_id}", get_document, methods=["GET"]),
        Route("/v1/documents/{doc_id}", delete_document, methods=["DELETE"]),
    ])


# ---------------------------------------------------------------------- answering
def _question_text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    return None


def rewrite_for_document(path: str, request: dict, record, service) -> dict:
    """The completion request with the document's context in front of the question(s).

    /v1/completions: a text prompt (or a list of them) becomes the `lift ask` prompt ids;
    token-id prompts are the client's own and stay as they are. /v1/chat/completions: the
    last user message becomes "<context>\\n\\n<QA instruction with the question>".
    Raises DocumentError(400) for a request with nothing to answer.
    """
    out = dict(request)
    context = list(record.context_ids)
    if path.endswith("/chat/completions"):
        messages = out.get("messages")
        if not isinstance(messages, list):
            raise DocumentError(400, "messages must be a list")
        messages = [dict(m) if isinstance(m, dict) else m for m in messages]
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                question = _question_text(message.get("content"))
                if question is None:
                    raise DocumentError(400, "the last user message must be text to ask a document")
                context_text = service.tokenizer.decode(context)
                message["content"] = f"{context_text}\n\n" + QA_INSTRUCTION.format(question=question.strip())
                break
        else:
            raise DocumentError(400, "ask a document with a user message")
        out["messages"] = messages
        return out
    prompt = out.get("prompt")
    if isinstance(prompt, str):
        out["prompt"] = service.prompts.question_prompt(context, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out["prompt"] = [service.prompts.question_prompt(context, p) for p in prompt]
    elif not (isinstance(prompt, list) and prompt):
        raise DocumentError(400, "prompt must be the question (text) or token ids")
    return out
