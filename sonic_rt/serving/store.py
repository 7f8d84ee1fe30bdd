"""The prediction record (Cog's prediction object) and the small SQLite file that keeps it.

A record is written when a prediction is created and at each change of status, so it outlives the HTTP connection
that made it and the process that ran it: a client that disconnects reads it later by id, and a server that starts
on a work directory whose records say ``starting`` or ``processing`` runs those again under the same ids
(:meth:`JobStore.unfinished`; the record keeps the job's input folder, which stays until the job ends). One server
owns a store at a time (SQLite's exclusive locking mode): a second server on the same work directory stops with a
one-line error instead of running the first one's jobs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SonicError

# Cog's statuses (docs/http.md): a prediction is `starting` while it waits (queued, fetching its inputs), then
# `processing`, then one of the three terminal ones.
STARTING, PROCESSING = "starting", "processing"
SUCCEEDED, FAILED, CANCELED = "succeeded", "failed", "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
# Cog's webhook event types (docs/http.md "Webhooks"), in the order a prediction sends them.
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds (``2025-01-01T00:00:05.123456+00:00``, as Cog writes)."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


@dataclass
class Prediction:
    """One prediction: Cog's prediction object plus what the server needs to run it again after a restart.

    Attributes:
        id: the client's id (``PUT /predictions/{id}``) or one the server drew (``POST``).
        status: ``starting``, ``processing``, ``succeeded``, ``failed`` or ``canceled``.
        input: the input as the client sent it, with file contents shortened (``data:image/png;base64,... (12345
            bytes)``), so the record stays small.
        output: the mp4: a URL on this server (``output_as="url"``) or a ``data:video/mp4;base64,`` URL
            (``output_as="data_url"``, rendered when the prediction is read); None until it succeeded and after
            the file was deleted (``data_removed``).
        error: the one-line reason of a ``failed`` prediction.
        logs: progress lines (inputs ready, seconds of video written), newline-terminated.
        metrics: ``predict_time`` (seconds from ``processing`` to the end, Cog's metric) and, when it succeeded,
            ``video_seconds``, ``frames``, ``fps``, ``width``, ``height``.
        created_at, started_at, completed_at: ISO 8601 UTC timestamps (None until reached).
        webhook, webhook_events_filter: Cog's webhook fields.
        output_as: ``"url"`` or ``"data_url"``.
        progress: ``windows_done``, ``windows_total`` (denoised windows of steps x windows), ``video_seconds``
            (seconds of video already in the file), ``eta_seconds``; empty until it runs.
        attempts: times a runner started it (a Ray ingress re-submits a job whose worker died).
        data_removed: the output file was deleted after ``--keep-outputs`` (Replicate's field name).
        stream: the live stream while the video is made (:mod:`sonic_rt.serving.jobs`): ``playlist`` (the HLS
            playlist's URL), ``segments`` (each finished segment so far: ``index``, ``url`` of a self-contained mp4,
            ``start_seconds``, ``end_seconds`` of video it covers) and ``ended`` (the playlist is complete); None
            before the first segment, and once the segments are deleted (with the output, or at once when the
            prediction failed or was canceled).
        options: the :class:`~sonic_rt.AnimateOptions` overrides it runs with (canonical names).
        files: per file input (``image``, ``audio``): ``{"path": ...}`` (stored on this server) or ``{"url": ...}``
            (fetched when it starts).
        base_url: the URL prefix its output URL is built on (the request's, or ``--public-url``).
        output_token: the unguessable name of its output file (``/outputs/{token}.mp4``).
        expires_at: when its output file is deleted, seconds since the epoch (None while it has none).
        input_folder: the folder under ``workdir/inputs`` holding its stored file inputs until it ends (None: none).
        webhooks_done: the webhook events among ``start`` and ``completed`` that were delivered or given up, so
            that a restarted server sends each of them once.
        last_event_id: the SSE id of its ``completed`` event (a client resuming after it gets 204: nothing more).
    """

    id: str
    status: str = STARTING
    input: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] = field(default_factory=lambda: list(WEBHOOK_EVENTS))
    output_as: str = "url"
    progress: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    data_removed: bool = False
    stream: dict[str, Any] | None = None
    # server-side only (never in the JSON a client sees)
    options: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    base_url: str = ""
    output_token: str | None = None
    expires_at: float | None = None
    input_folder: str | None = None
    webhooks_done: list[str] = field(default_factory=list)
    last_event_id: str | None = None

    PUBLIC = (
        "id",
        "status",
        "input",
        "output",
        "error",
        "logs",
        "metrics",
        "created_at",
        "started_at",
        "completed_at",
        "webhook",
        "webhook_events_filter",
        "progress",
        "attempts",
        "data_removed",
        "stream",
    )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict[str, Any]:
        """The prediction object a client sees (Cog's fields, plus ``progress``, ``attempts``, ``data_removed``,
        ``stream`` and ``urls``), without rendering a ``data:`` output (see :func:`sonic_rt.serving.jobs.render`)."""
        out = {name: getattr(self, name) for name in self.PUBLIC}
        out["urls"] = {
            "get": f"{self.base_url}predictions/{self.id}",
            "cancel": f"{self.base_url}predictions/{self.id}/cancel",
        }
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Prediction:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names})


class JobStore:
    """Prediction records in one SQLite file (``jobs.sqlite`` in the work directory).

    Thread-safe (one connection behind a lock); every call is one short transaction (a few per prediction, never
    one per window).

    Args:
        path: the database file (created with its folder).

    Raises:
        SonicError: the file is in use by another server, or is not a database.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=0.5, isolation_level=None, check_same_thread=False)
            # exclusive: the first write takes a lock this connection keeps until it closes (one server per file)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (id TEXT PRIMARY KEY, status TEXT NOT NULL, "
                "created REAL NOT NULL, record TEXT NOT NULL)"
            )
            self._db.execute("BEGIN EXCLUSIVE")  # take the lock now, not at the first prediction
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise SonicError(
                    "the job records are in use by another server; give each server its own --workdir", self.path
                ) from None
            raise SonicError(f"cannot open the job records: {exc}", self.path) from None
        except sqlite3.DatabaseError as exc:
            raise SonicError(
                f"not a job-record database ({exc}); move it away or use another --workdir", self.path
            ) from None

    def add(self, prediction: Prediction) -> tuple[Prediction, bool]:
        """Insert ``prediction`` unless its id exists. Returns the stored record and whether it was inserted."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO predictions (id, status, created, record) VALUES (?, ?, julianday('now'), ?)",
                (prediction.id, prediction.status, prediction.to_json()),
            )
            if cur.rowcount == 1:
                return prediction, True
            (record,) = self._db.execute("SELECT record FROM predictions WHERE id = ?", (prediction.id,)).fetchone()
        return Prediction.from_json(record), False

    def get(self, prediction_id: str) -> Prediction | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        return Prediction.from_json(row[0]) if row else None

    def put(self, prediction: Prediction) -> None:
        """Write ``prediction`` over its record."""
        with self._lock:
            self._db.execute(
                "UPDATE predictions SET status = ?, record = ? WHERE id = ?",
                (prediction.status, prediction.to_json(), prediction.id),
            )

    def unfinished(self) -> list[Prediction]:
        """The ``starting`` and ``processing`` records (what a server that stopped left to do), oldest first."""
        return self._select(f"status IN ('{STARTING}', '{PROCESSING}') ORDER BY created, rowid")

    def pending_completed_webhooks(self) -> list[Prediction]:
        """Ended records whose ``completed`` webhook is due and was neither delivered nor given up (the server
        stopped first). Only records that say so: those of servers that kept ``webhooks_done`` (they have a
        ``last_event_id``); an older record's webhook is not sent again."""
        ended = self._select("status IN ({}) ORDER BY created, rowid".format(",".join(f"'{s}'" for s in TERMINAL)))
        return [
            p
            for p in ended
            if p.webhook
            and p.last_event_id is not None
            and "completed" in p.webhook_events_filter
            and "completed" not in p.webhooks_done
        ]

    def _select(self, where: str) -> list[Prediction]:
        with self._lock:
            rows = self._db.execute(f"SELECT record FROM predictions WHERE {where}").fetchall()
        return [Prediction.from_json(record) for (record,) in rows]

    def with_output_before(self, when: float) -> list[Prediction]:
        """Records whose output file expires before ``when`` (seconds since the epoch)."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM predictions WHERE status = ?", (SUCCEEDED,)).fetchall()
        found = (Prediction.from_json(r) for (r,) in rows)
        return [p for p in found if p.expires_at is not None and p.expires_at <= when and not p.data_removed]

    def delete_older_than(self, days: float) -> int:
        """Delete finished records created more than ``days`` ago; returns how many."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM predictions WHERE status IN (?, ?, ?) AND created < julianday('now') - ?",
                (*sorted(TERMINAL), days),
            )
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = [
    "Prediction",
    "JobStore",
    "STARTING",
    "PROCESSING",
    "SUCCEEDED",
    "FAILED",
    "CANCELED",
    "TERMINAL",
    "WEBHOOK_EVENTS",
    "now_iso",
]
