"""JSON logs through structlog, with the request id bound per call and secrets redacted."""
from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

REDACTED = "[redacted]"
# Keys whose values never reach a log line: secrets, tokens, codes, keys.
_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|authorization|api[_-]?key|private|master[_-]?key|code|pin|dsn|database_url)",
    re.IGNORECASE,
)
# Credentials embedded in URLs (postgresql://user:pass@host).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1" + REDACTED + r"\3", value)
    if isinstance(value, Mapping):
        return redact(dict(value))
    return value


def redact(event: dict[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in event.items():
        if key != "event" and _SECRET_KEY.search(key):
            clean[key] = REDACTED
        else:
            clean[key] = _redact_value(value)
    return clean


def _redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return redact(event_dict)


def configure_logging(*, service: str, level: str = "info", stream: Any = None) -> None:
    """JSON lines on stderr, one per event, each with the service name and any bound request id."""
    log_level = logging.getLevelName(level.upper())
    if not isinstance(log_level, int):
        log_level = logging.INFO
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
        structlog.processors.format_exc_info,
    ]
    # Records from libraries that use the standard logging module (uvicorn, asyncio, grpc) go
    # through the same processors, so every line a process writes is JSON.
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        )
    )
    handler.addFilter(_drop_known_noise)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


# asyncio warns at every close of a TLS connection whose protocol asks to keep the transport half
# open (nats-py's does): a line per disconnect that says nothing an operator can act on.
_NOISE = {("asyncio", "returning true from eof_received() has no effect when using ssl")}


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return (record.name, str(record.msg)) not in _NOISE


def drop_known_noise() -> None:
    """For a command line tool that prints its own output instead of logs: the same lines dropped
    at their loggers, before Python's last-resort handler prints them on stderr."""
    for name in {name for name, _ in _NOISE}:
        logger = logging.getLogger(name)
        if _drop_known_noise not in logger.filters:
            logger.addFilter(_drop_known_noise)


def new_request_id() -> str:
    return uuid.uuid4().hex


# A caller's request id is reused only if it is short and plain, so it cannot forge log lines or
# smuggle anything into headers and gRPC metadata.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def request_id_or_new(offered: str) -> str:
    """The caller's request id when it is sane, else a new one."""
    return offered if SANE_REQUEST_ID.match(offered) else new_request_id()


def bind_request_id(request_id: str) -> None:
    structlog.contextvars.bind_contextvars(request_id=request_id)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
