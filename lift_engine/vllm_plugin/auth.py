"""Tenants for vLLM's OpenAI-compatible server: API key → tenant, and a tenant sees only
its own adapters (docs/DESIGN.md §7.2).

The tenants file (JSON; `lift serve --tenants FILE`, env LIFT_TENANTS):

    {
      "tenants": {
        "acme":   {"api_keys": ["sk-acme-123"]},
        "globex": {"api_keys": ["sha256:9f86d081884c7d65…"]}      (hex sha256 of the key)
      },
      "admin_api_keys": ["sk-admin-…"]                             (optional)
    }

`TenantMiddleware` (a Starlette middleware class; `vllm serve --middleware
lift_engine.vllm_plugin.auth.TenantMiddleware`, which `lift serve` passes, has FastAPI
add it with `app.add_middleware`) runs before vLLM's routes:

- `/health`, `/ping`, `/version`: open. Everything else needs `Authorization: Bearer
  <key>` → 401 otherwise.
- Tenant keys may use `GET /v1/models` (answered here: the base model and the tenant's
  own adapters only) and `POST /v1/completions`, `/v1/chat/completions`. Every other
  route (load/unload adapters, metrics, tokenize, …) is for admin keys only (403).
  Websockets are refused.
- In a completion request, `model` is the base model's served name, or the name of one
  of the tenant's adapters. The adapter is looked up in the tenant's own store directory
  only; an invalid name, another tenant's adapter and a missing one all answer the same
  404 (names do not leak). A corrupt or incompatible adapter answers 422 with a one-line
  reason. Otherwise `model` is rewritten to the internal, version-pinned name
  (resolver.py) that vLLM resolves and loads.
- Admin keys may address any adapter as "<tenant>/<adapter>".

Names are resolved on the request side only; responses pass through untouched. The
response's `model` is the name the client used because vLLM takes it from one place,
`OpenAIServingModels.model_name(lora_request)`, which the middleware has answer through
`public_model_name`: the request's (internal name → client's name) pair lives in a
context variable while vLLM handles the request (`served_as`).

Documents (lift_engine.service): tenant keys may also use `/v1/documents` (upload, list,
status, delete; lift_engine/service/api.py, mounted here after authentication) and name a
ready document as `model` in a completion request: the document's truncated context is
put in front of the question and its adapter applied (409 while it is still tuning,
unless the request asks to `wait` up to N seconds). The document service starts with the
server (ASGI lifespan).

Without a tenants file the server has one open tenant, "default" (no keys). An edited
tenants file is picked up on the next request (an invalid edit is logged and ignored).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from lift_engine.errors import AdapterError, LiftError
from lift_engine.store import InvalidName, validate_name

logger = logging.getLogger("lift_engine.serve")

DEFAULT_TENANT = "default"
OPEN_PATHS = ("/health", "/ping", "/version")
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
MODELS_PATHS = ("/v1/models",)
DOCUMENTS_PATH = "/v1/documents"
MAX_BODY_BYTES = 64 << 20


class TenantsFileError(LiftError):
    """The tenants file is missing, malformed or ambiguous."""


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class Tenants:
    """API-key digests → tenant name (None: admin). open: no keys at all (single tenant)."""

    keys: dict[bytes, str | None] = field(default_factory=dict)
    open: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "Tenants":
        if not path:
            return cls(open=True)
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TenantsFileError(f"tenants file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise TenantsFileError(f"cannot read tenants file {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
            raise TenantsFileError(f"tenants file {path}: expected {{\"tenants\": {{name: {{\"api_keys\": [...]}}}}}}")
        out = cls()

        def add(key: object, tenant: str | None) -> None:
            if not isinstance(key, str) or not key:
                raise TenantsFileError(f"tenants file {path}: API keys must be non-empty strings")
            if key.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(key[len("sha256:"):])
                except ValueError:
                    raise TenantsFileError(f"tenants file {path}: bad sha256 key digest") from None
                if len(digest) != 32:
                    raise TenantsFileError(f"tenants file {path}: bad sha256 key digest")
            else:
                digest = _key_digest(key)
            if digest in out.keys and out.keys[digest] != tenant:
                raise TenantsFileError(f"tenants file {path}: one API key is given to two tenants")
            out.keys[digest] = tenant

        for tenant, entry in data["tenants"].items():
            try:
                validate_name(tenant, "tenant")
            except InvalidName as exc:
                raise TenantsFileError(f"tenants file {path}: {exc}") from None
            keys = entry.get("api_keys") if isinstance(entry, dict) else None
            if not isinstance(keys, list) or not keys:
                raise TenantsFileError(f"tenants file {path}: tenant {tenant!r} needs a non-empty api_keys list")
            for key in keys:
                add(key, tenant)
        for key in data.get("admin_api_keys") or []:
            add(key, None)
        return out

    def identify(self, authorization: str | None) -> tuple[bool, str | None]:
        """(authenticated, tenant or None for admin)."""
        if self.open:
            return True, DEFAULT_TENANT
        if not authorization:
            return False, None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False, None
        digest = _key_digest(token.strip())
        found, tenant = False, None
        for known, owner in self.keys.items():  # constant time per key
            if hmac.compare_digest(known, digest):
                found, tenant = True, owner
        return found, tenant


# ---------------------------------------------------------------------- response names
_SERVED_AS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("lift_served_as", default=None)


@contextlib.contextmanager
def served_as(internal: str | None, public: str | None):
    """While vLLM handles this request, the model it serves as `internal` is called `public`
    in what it answers (public_model_name). None for either: no renaming."""
    token = _SERVED_AS.set((internal, public) if internal is not None and public is not None else None)
    try:
        yield
    finally:
        _SERVED_AS.reset(token)


def public_model_name(name: str) -> str:
    """The name a response to the current request gives the model served as `name`: the
    client's own name for it when the middleware resolved that name to `name`, else `name`."""
    renamed = _SERVED_AS.get()
    return renamed[1] if renamed is not None and renamed[0] == name else name


# ---------------------------------------------------------------------- errors
def error_response(status: int, message: str, err_type: str, **extra) -> JSONResponse:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code", **extra}}."""
    body = {"error": {"message": message, "type": err_type, "param": "model" if status in (404, 409, 422) else None,
                      "code": status, **extra}}
    return JSONResponse(body, status_code=status)


def not_found(model: str) -> JSONResponse:
    return error_response(404, f"The model `{model}` does not exist.", "NotFoundError")


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"


class TenantMiddleware:
    """Starlette middleware (the pure-ASGI form Starlette documents for middleware that
    reads request bodies and streams responses). Configuration from the environment
    (LIFT_TENANTS, LIFT_SERVED_NAME, LIFT_STORE…) unless given."""

    def __init__(self, app: ASGIApp, tenants: Tenants | None = None, catalog=None,
                 served_names: list[str] | None = None) -> None:
        self.app = app
        self._tenants_path = None if tenants is not None else os.environ.get("LIFT_TENANTS") or None
        self._tenants_stamp = self._stamp()
        self.tenants = tenants if tenants is not None else Tenants.load(self._tenants_path)
        self._catalog = catalog
        names = served_names or [n for n in os.environ.get("LIFT_SERVED_NAME", "").split(",") if n]
        self.served_names = set(names)
        self._documents_app = None
        from lift_engine.vllm_plugin import install_public_model_names

        install_public_model_names()  # vLLM's responses then name adapters as the tenant does

    def _stamp(self):
        """The tenants file's content digest (a tiny file: read per request, no mtime races)."""
        if not self._tenants_path:
            return None
        try:
            with open(self._tenants_path, "rb") as fh:
                return hashlib.sha256(fh.read()).digest()
        except OSError:
            return None

    def _reload_tenants(self) -> None:
        """Pick up an edited tenants file (keys added or revoked) without a restart."""
        stamp = self._stamp()
        if stamp == self._tenants_stamp:
            return
        self._tenants_stamp = stamp
        try:
            self.tenants = Tenants.load(self._tenants_path)
            logger.info("lift: reloaded tenants file %s", self._tenants_path)
        except TenantsFileError as exc:  # keep serving with the previous keys
            logger.error("lift: tenants file not reloaded, keeping the previous one: %s", exc)

    @property
    def catalog(self):
        if self._catalog is None:
            from lift_engine.vllm_plugin.resolver import get_catalog

            self._catalog = get_catalog()
        return self._catalog

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(scope, receive, send)
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):
                response = error_response(403, "websockets are not available", "PermissionError")
            else:
                response = WebSocketClose(code=1008, reason="websockets are not available")
            return await response(scope, receive, send)
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = _path(scope)
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self._tenants_path:
            self._reload_tenants()
        request = Request(scope, receive)
        ok, tenant = self.tenants.identify(request.headers.get("authorization"))
        admin = tenant is None
        if not ok:
            response = error_response(401, "Unauthorized: a valid API key is needed (Authorization: Bearer <key>)",
                                      "AuthenticationError")
        elif path == DOCUMENTS_PATH or path.startswith(DOCUMENTS_PATH + "/"):
            if not admin:
                return await self._documents(scope, receive, send, tenant)
            response = error_response(403, "documents belong to tenants: use a tenant's key", "PermissionError")
        elif path in MODELS_PATHS and request.method == "GET" and not admin:
            response = await self._list_models(tenant)
        elif path in COMPLETION_PATHS and request.method == "POST":
            return await self._completion(request, send, tenant)
        elif admin:
            return await self.app(scope, receive, send)
        else:
            response = error_response(403, f"{path} is not available to tenant keys", "PermissionError")
        await response(scope, receive, send)

    # ------------------------------------------------------------------ documents
    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the document service with the server, close it when the server stops."""
        from lift_engine.service import runtime

        runtime.start_in_background()

        async def receive_and_watch():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(runtime.stop)
            return message

        return await self.app(scope, receive_and_watch, send)

    async def _documents(self, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        """The document API (a Starlette app) with the authenticated tenant in its scope."""
        if self._documents_app is None:
            from lift_engine.service.api import build_app

            self._documents_app = build_app()
        from lift_engine.service.api import TENANT_KEY

        scope = dict(scope)
        scope[TENANT_KEY] = tenant
        app = scope.get("app")  # the FastAPI app (Starlette sets it): vLLM's routes read request.app.state
        scope["lift.unload"] = lambda record: self._unload(record, app)
        return await self._documents_app(scope, receive, send)

    async def _unload(self, record, app=None) -> None:
        """Take a deleted document's adapter out of vLLM (its admin route, called in-process).

        `app`: the request's scope["app"]; without it vLLM's route fails (KeyError 'app')."""
        from lift_engine.vllm_plugin.resolver import internal_name

        body = json.dumps({"lora_name": internal_name(record.tenant, record.name, record.adapter_version)}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/unload_lora_adapter", "raw_path": b"/v1/unload_lora_adapter",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        if app is not None:
            scope["app"] = app
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            pass  # 404 when vLLM never loaded it: nothing to do

        try:
            await self.app(scope, receive, send)
        except Exception:
            logger.exception("lift: unloading %s/%s failed", record.tenant, record.name)

    async def _document_completion(self, tenant: str, model: str, request: dict, path: str):
        """(request for vLLM, public name, internal name) for a completion naming a document,
        an error Response, or None when `model` is not one of the tenant's documents."""
        from lift_engine.service import runtime
        from lift_engine.service.api import rewrite_for_document
        from lift_engine.service.documents import DocumentError
        from lift_engine.service.records import PENDING

        service = runtime.current()
        if service is None:
            return None
        record = service.find_by_name(tenant, model)
        if record is None:
            return None
        wait = request.pop("wait", None)
        if wait is not None:
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= service.cfg.max_wait_s:
                return error_response(400, f"wait must be a number of seconds from 0 to {service.cfg.max_wait_s:g}",
                                      "BadRequestError")
            if record.state in PENDING and wait > 0:
                record = await asyncio.to_thread(service.wait, tenant, record.id, float(wait))
                if record is None:
                    return not_found(model)
        if record.state in PENDING:
            progress = service.progress(record) or {}
            detail = f" (step {progress.get('step', 0)} of {progress.get('steps', 0)})" if progress else ""
            return error_response(409, f"document {model!r} is {record.state}{detail}; it is not ready yet",
                                  "DocumentNotReadyError", document=record.public(progress or None))
        if record.state == "failed":
            return error_response(409, f"document {model!r} failed: {record.error}", "DocumentFailedError",
                                  document=record.public())
        try:
            request = rewrite_for_document(path, request, record, service)
        except DocumentError as exc:
            return error_response(exc.status, str(exc), "BadRequestError")
        if record.mode == "hybrid":
            request["model"] = sorted(self.served_names)[0] if self.served_names else request["model"]
            return request, None, None
        internal = await self._prepare(tenant, record.name)
        if isinstance(internal, Response):
            return internal
        request["model"] = internal
        return request, model, internal

    # ------------------------------------------------------------------ routes
    async def _list_models(self, tenant: str) -> JSONResponse:
        catalog = self.catalog
        names = await asyncio.to_thread(catalog.list, tenant) if catalog is not None else []
        data = [{"id": n, "object": "model", "owned_by": "lift_engine", "created": 0} for n in sorted(self.served_names)]
        base = sorted(self.served_names)[0] if self.served_names else None
        data += [{"id": n, "object": "model", "owned_by": tenant, "created": 0, "parent": base} for n in names]
        from lift_engine.service import runtime

        service = runtime.current()
        if service is not None:  # documents answered in context (hybrid) have no adapter in the store
            data += [{"id": r.name, "object": "model", "owned_by": tenant, "created": int(r.created_at), "parent": base}
                     for r in service.list(tenant) if r.state == "ready" and r.mode == "hybrid"]
        return JSONResponse({"object": "list", "data": data})

    async def _completion(self, request: Request, send: Send, tenant: str | None) -> None:
        """Resolve the request's `model` for `tenant` (None: admin), then hand it to vLLM."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    response = error_response(413, "request body too large", "BadRequestError")
                    return await response(request.scope, request.receive, send)
                chunks.append(chunk)
        except ClientDisconnect:
            return
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        model = payload.get("model") if isinstance(payload, dict) else None
        public = internal = None
        path = _path(request.scope)
        document = None
        if tenant is not None and isinstance(model, str) and model and model not in self.served_names:
            document = await self._document_completion(tenant, model, payload, path)
        if isinstance(document, Response):
            return await document(request.scope, request.receive, send)
        if document is not None:
            payload, public, internal = document
            body = json.dumps(payload).encode()
        elif isinstance(model, str) and model and model not in self.served_names:
            prepared = await self._prepare(tenant, model)
            if isinstance(prepared, Response):
                return await prepared(request.scope, request.receive, send)
            public, internal = model, prepared
            payload["model"] = internal
            body = json.dumps(payload).encode()
        elif model is not None and not isinstance(model, str):
            response = error_response(400, "model must be a string", "BadRequestError")
            return await response(request.scope, request.receive, send)
        with served_as(internal, public):
            await self.app(self._with_body(request.scope, body), self._replay(body, request.receive), send)

    async def _prepare(self, tenant: str | None, model: str) -> str | Response:
        """Internal name for `model` as seen by `tenant` (None: admin), or an error response."""
        from lift_engine.vllm_plugin.resolver import NotFound

        catalog = self.catalog
        if catalog is None:
            return not_found(model)
        if tenant is None:  # admin: "<tenant>/<adapter>"
            owner, _, name = model.partition("/")
        else:
            owner, name = tenant, model
        try:
            validate_name(owner, "tenant")
            validate_name(name, "adapter")
        except InvalidName:
            return not_found(model)
        try:
            prepared = await asyncio.to_thread(catalog.prepare, owner, name)
        except NotFound:
            return not_found(model)
        except AdapterError as exc:
            return error_response(422, str(exc), "InvalidAdapterError")
        except Exception as exc:  # never let one adapter take the server down
            logger.exception("lift: preparing adapter %s of tenant %s failed", name, owner)
            return error_response(500, f"adapter {model!r} could not be prepared: {type(exc).__name__}",
                                  "InternalServerError")
        return prepared.internal_name

    # ------------------------------------------------------------------ request plumbing
    @staticmethod
    def _with_body(scope: Scope, body: bytes) -> Scope:
        """The request's scope with a content-length for `body` (the resolved request)."""
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(body)).encode()))
        return scope

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """A receive that gives `body` once, then the client's own messages (disconnects)."""
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
