"""The server's log: one line per prediction event, through the standard :mod:`logging` module (logger
``sonic_rt.serving``), as JSON (``python-json-logger``) or as text (``--log-format``).

Each line carries ``event`` (:data:`EVENTS`) and, for a prediction's events, ``prediction_id``; the other fields are
the event's (``status``, ``attempt``, ``queue_wait_s``, ``run_s``, ``stages`` (seconds per stage), ``error``,
``error_type``, ``webhook_event``, ``code``, ``path``...). A JSON line::

    {"time": "2026-12-07T10:00:01.5+00:00", "level": "INFO", "message": "finished", "event": "finished",
     "prediction_id": "abc", "status": "succeeded", "attempt": 1, "queue_wait_s": 0.01, "run_s": 1.9, ...}

The same line as text::

    2026-12-07T10:00:01.5+00:00 INFO finished prediction_id=abc status=succeeded attempt=1 queue_wait_s=0.01 ...
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGER = "sonic_rt.serving"
LOG_FORMATS = ("text", "json")
# created: accepted (202/200); started: a run begins (attempt n); finished: it ended (status, timings, error);
# recovered: a restarted server queued it again; interrupted: the server stopped while it ran (it runs again at the
# next start); webhook_failed: an event was not delivered; refused: a request was refused (HTTP status);
# setup: the model loaded or failed; stopping: SIGTERM, the server drains.
EVENTS = (
    "created",
    "started",
    "finished",
    "recovered",
    "interrupted",
    "webhook_failed",
    "refused",
    "setup",
    "stopping",
)
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

log = logging.getLogger(LOGGER)


def event(name: str, prediction_id: str | None = None, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event line (``name`` from :data:`EVENTS`) with its fields; None values are left out."""
    extra = {"event": name, **({"prediction_id": prediction_id} if prediction_id else {})}
    extra.update({k: v for k, v in fields.items() if v is not None})
    log.log(level, name, extra=extra)


def refused(code: int, method: str, path: str, detail: str) -> None:
    """The ``refused`` event of a request answered ``code`` (the prediction id when the path names one)."""
    parts = path.strip("/").split("/")
    pred_id = parts[1] if len(parts) >= 2 and parts[0] == "predictions" else None
    event("refused", pred_id, level=logging.WARNING, code=code, method=method, path=path, detail=detail)


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <event> key=value ...`` (values with spaces JSON-quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        from .store import now_iso

        fields = {k: v for k, v in vars(record).items() if k not in _RESERVED and k != "event"}
        text = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return f"{now_iso()} {record.levelname} {record.getMessage()}" + (f" {text}" if text else "")


def _text(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value, separators=(",", ":"))


def configure(fmt: str = "text", stream=None) -> logging.Handler:
    """Send the ``sonic_rt.serving`` logger's lines to ``stream`` (stderr) in ``fmt`` (``text`` or ``json``),
    replacing a handler set by an earlier call. Returns the handler.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{levelname}{message}",
                style="{",
                rename_fields={"levelname": "level"},
                timestamp="time",
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    handler.set_name("sonic_rt-serving")
    for old in [h for h in log.handlers if h.get_name() == "sonic_rt-serving"]:
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


__all__ = ["event", "refused", "configure", "TextFormatter", "LOGGER", "LOG_FORMATS", "EVENTS"]
