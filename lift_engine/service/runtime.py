"""The document service of this server process (vLLM's API server), built once.

`start_in_background()` is called when the server starts (ASGI lifespan, through the
tenant middleware): it builds the DocumentService from the environment (LIFT_DOCUMENT_SERVICE,
set by `lift serve`) in a thread — starting or joining Ray and the tuning actors takes
seconds — and recovers the documents a previous server left queued or half-tuned.
Until it is up, `current()` says why not (`status()`), and the document routes answer 503.
"""
from __future__ import annotations

import logging
import threading

from lift_engine.service.config import ServiceConfig

logger = logging.getLogger("lift_engine.service")

_lock = threading.Lock()
_service = None
_state = "off"  # off → starting → up | failed
_error: str | None = None
_thread: threading.Thread | None = None
_stopping = threading.Event()


def _build(cfg: ServiceConfig) -> None:
    """Build the service, then keep this thread alive until stop(), and close it here.

    The thread must outlive the service: a local Ray runtime started from it (ray.init)
    runs its GCS and raylet as children that Linux signals when the *thread* that spawned
    them exits (PR_SET_PDEATHSIG), which would take Ray down a minute later.
    """
    _start(cfg)
    _stopping.wait()
    _close()


def _start(cfg: ServiceConfig) -> None:
    global _service, _state, _error
    try:
        from lift_engine.service.documents import DocumentService

        service = DocumentService(cfg)
        recovered = service.start()
        if recovered:
            logger.info("lift: %d documents from before the restart are being tuned again", recovered)
        with _lock:
            _service, _state = service, "up"
    except Exception as exc:  # the server keeps serving adapters; the document routes say why
        logger.exception("lift: the document service did not start")
        with _lock:
            _state, _error = "failed", f"{type(exc).__name__}: {exc}"


def start_in_background(cfg: ServiceConfig | None = None) -> bool:
    """Start the service once (from `cfg` or the environment); False when it is not configured."""
    global _state, _thread
    cfg = cfg or ServiceConfig.from_env()
    with _lock:
        if cfg is None or _state != "off":
            return cfg is not None
        _state = "starting"
        _thread = threading.Thread(target=_build, args=(cfg,), name="lift-document-service", daemon=True)
        _thread.start()
    return True


def current():
    """The running DocumentService, or None (see status())."""
    with _lock:
        return _service


def status() -> tuple[str, str | None]:
    """("off" | "starting" | "up" | "failed", error)."""
    with _lock:
        return _state, _error


def stop() -> None:
    """Close the service (its actors are killed; their documents resume after a restart)."""
    global _thread, _state
    thread = _thread
    if thread is None:
        return
    _stopping.set()
    thread.join(timeout=120)
    with _lock:
        _thread, _state = None, "off"
    _stopping.clear()


def _close() -> None:
    global _service
    with _lock:
        service, _service = _service, None
    if service is not None:
        try:
            service.close()
        except Exception:
            logger.exception("lift: closing the document service failed")
