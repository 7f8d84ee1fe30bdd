"""The job layer: predictions from creation to their end, over "something that runs a job" (:class:`Runner`).

:class:`Jobs` owns the records (:class:`~sonic_rt.serving.store.JobStore`), the waiting line (an ``asyncio.Queue``
read by ``concurrency`` workers), the inputs and outputs on disk, progress, cancellation, webhooks, retention and
health. It never touches a model: a :class:`Runner` does (:class:`~sonic_rt.serving.local.LocalRunner` over the
in-process :class:`~sonic_rt.Runtime`; a Ray deployment handle can be another). The routes of
:mod:`sonic_rt.serving.predictions` and the page of :mod:`sonic_rt.serving.page` are its clients.

A prediction's life (Cog docs/http.md statuses):

1. created (``starting``): the record is written before the answer goes out, ``start`` is sent to its webhook;
   the same id again returns this record and starts nothing (:meth:`Jobs.create`),
2. a worker takes it (``processing``): ``http(s)`` inputs are fetched, the speech is checked against
   ``max_audio_seconds``, then the runner runs it, reporting windows done and seconds of video written,
3. it ends ``succeeded`` (the mp4 at ``/outputs/<token>.mp4`` for ``keep_outputs_s``), ``failed`` (the
   one-line reason) or ``canceled`` (no output file); the record stays ``keep_records_s``.

Restarts lose nothing: a prediction's inputs stay in ``inputs/`` with its record until it ends. :meth:`Jobs.drain`
(SIGTERM) stops taking new ones (:class:`Stopping`, HTTP 503) and lets the running ones finish for a grace period;
:meth:`Jobs.close` then interrupts what still runs without ending it, so its record stays ``processing``. The next
server on the same work directory (or after a crash) queues every unfinished record again under its id, oldest
first (:meth:`Jobs.start`); each ends once, and its ``start`` and ``completed`` webhooks are sent once
(``Prediction.webhooks_done``). A run writes its mp4 under a temporary name renamed at the end, and a starting
server deletes the output files no record owns, so an interrupted run's file is never served.

Every event is logged (:mod:`sonic_rt.serving.logs`) and counted (:mod:`sonic_rt.serving.metrics`).

While it runs, the runtime also writes a live HLS stream into ``streams/<token>/`` (:mod:`sonic_rt.serving.live`);
each segment is announced (SSE and webhook ``output`` events, the record's ``stream``) once it is complete, is
deleted with the output after ``keep_outputs_s``, and at once when the job fails or is canceled.

Everything here runs on one asyncio event loop; the runner may use threads or processes behind its ``run``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import secrets
import shutil
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

from ..errors import SonicError
from ..pipeline.options import AnimateOptions
from . import inputs as input_files
from . import live as live_stream
from . import logs
from .metrics import Metrics
from .store import (
    CANCELED,
    FAILED,
    PROCESSING,
    STARTING,
    SUCCEEDED,
    WEBHOOK_EVENTS,
    JobStore,
    Prediction,
    now_iso,
)
from .webhooks import WebhookSender

SAMPLE_RATE = 16000  # Hz: the runtime's audio rate (sonic_rt.media.load_audio's default)
HEARTBEAT_S = 15.0  # seconds without an event after which an event stream sends a comment (keeps proxies open)
HISTORY = 10000  # events a running prediction keeps for clients that resume its stream (Last-Event-ID)


# ------------------------------------------------------------------------------------------- the runner interface
@dataclass(frozen=True)
class JobSpec:
    """One job as a runner sees it.

    Attributes:
        id: the prediction's id.
        image, audio: local files (fetched and checked already).
        out: the ``.mp4`` to write (atomically: a temporary name renamed at the end, as Runtime.animate does).
        options: the complete :class:`~sonic_rt.AnimateOptions` (``progress`` off).
        audio_samples: length of the speech in 16 kHz samples (for the runner's progress plan).
        attempt: the prediction's attempt (1 the first time; higher after a restart or a lost worker).
    """

    id: str
    image: Path
    audio: Path
    out: Path
    options: AnimateOptions
    audio_samples: int
    attempt: int = 1


@dataclass(frozen=True)
class JobResult:
    """What a finished job produced: ``num_frames`` frames at ``fps`` (25.0, or 12.5 without interpolation),
    ``width`` x ``height`` pixels, the runtime's stage ``timings`` in seconds, its ``notes``, its
    ``peak_memory_bytes`` on ``device`` (``cuda``: the GPU's peak allocated memory; ``cpu``: the process's peak
    resident memory during the job; None where not measured) and ``windows`` (denoised windows, steps x windows)."""

    num_frames: int
    fps: float
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    peak_memory_bytes: int | None = None
    device: str = ""
    windows: int = 0


class Runner(Protocol):
    """Something that runs a job. Implementations: :class:`~sonic_rt.serving.local.LocalRunner` (one Runtime in
    this process); a Ray Serve ingress can implement it over a deployment handle.

    ``run`` reports progress by calling ``report(kind, info)`` on the event loop: ``("plan", {"windows_total"})``
    once, then the runtime's own events (``Runtime.animate``'s ``events``: ``("window", {"step", "index"})``,
    ``("frames", {"generated", "written", "video_seconds", "elapsed_seconds"})``, ``("memory", {...})``). A runner
    that runs a job on another process may also report ``("log", {"line"})`` (a line for the prediction's logs) and
    ``("retry", {"reason"})`` before it runs the job again from the start (its worker died): the prediction's
    ``attempts`` goes up by one and its progress starts over.
    ``job.options.hls`` names the live stream's playlist: a runner that runs ``Runtime.animate`` with the options
    writes it, and each ``frames`` report makes the job layer look for finished segments there (a runner that
    writes no stream just has none to announce).
    Cancelling the task that awaits ``run`` must stop the job (after at most the current UNet call) and leave no
    file at ``job.out``; ``run`` then raises ``asyncio.CancelledError``. Bad input raises
    :class:`~sonic_rt.SonicError` (its one line becomes the prediction's ``error``).
    """

    def setup(self) -> None:
        """Load the model (blocking; called once in a thread). Raises on failure (``SETUP_FAILED``)."""

    def describe(self) -> dict[str, Any]:
        """What it runs: at least ``model``; once set up also ``demo``, ``device``, ``backend``."""

    async def run(self, job: JobSpec, report: Callable[[str, dict], None]) -> JobResult:
        """Run ``job`` to its mp4."""

    def close(self) -> None:
        """Release the model (after the last job)."""


# ----------------------------------------------------------------------------------------------- settings, errors
@dataclass(frozen=True)
class Settings:
    """The job layer's limits and policies (the ``serve`` flags of the same names).

    Attributes:
        concurrency: jobs that run at once.
        max_queue: jobs that may wait; one more is refused (:class:`QueueFull`, HTTP 429).
        max_audio_seconds: longest speech accepted, seconds.
        max_upload_bytes: largest file input, bytes (data: URL, multipart part or fetched URL).
        keep_outputs_s: seconds an output file is kept after its job ended (Replicate's API: 1 hour).
        keep_records_s: seconds a finished record is kept (how long a repeated PUT id returns it).
        fetch_timeout_s: time limit of one ``http(s)`` input download, seconds.
        allow_private_urls: let inputs and webhooks reach private, loopback and link-local addresses.
        public_url: the URL prefix of output links (None: the creating request's own base URL).
    """

    concurrency: int = 1
    max_queue: int = 64
    max_audio_seconds: float = 600.0
    max_upload_bytes: int = 50 * 1024 * 1024
    keep_outputs_s: float = 3600.0
    keep_records_s: float = 86400.0
    fetch_timeout_s: float = 30.0
    allow_private_urls: bool = False
    public_url: str | None = None


class QueueFull(Exception):
    """The waiting line is full (HTTP 429); ``retry_after_s`` estimates when a place frees up, seconds."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} predictions are waiting, the most this server queues; retry later")
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """The runner could not be set up (HTTP 503): no prediction can run."""


class Stopping(Unavailable):
    """The server is stopping (SIGTERM): new predictions are refused (HTTP 503 with ``Retry-After``,
    ``retry_after_s`` seconds: the grace period left)."""

    def __init__(self, retry_after_s: int):
        super().__init__("the server is stopping (restart or deploy); send it again in a moment")
        self.retry_after_s = retry_after_s


@dataclass
class NewPrediction:
    """A request for a prediction, checked (see :func:`sonic_rt.serving.inputs.parse_input`).

    Attributes:
        id: the client's id, or None to draw one.
        parsed: the checked input.
        folder: the folder holding this request's stored file inputs (removed when the job ends, or at once if
            the id already exists); None when the files belong to someone else (the page's uploads).
        webhook, webhook_events_filter, output_as: as in :class:`~sonic_rt.serving.store.Prediction`.
        base_url: the creating request's base URL (``http://host:port/``).
    """

    id: str | None
    parsed: input_files.ParsedInput
    folder: Path | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    output_as: str = "url"
    base_url: str = ""


def new_id() -> str:
    """A prediction id as Cog recommends (docs/http.md): a UUIDv4's bytes in lower-case base32, 26 characters."""
    import uuid

    return base64.b32encode(uuid.uuid4().bytes).decode().lower().rstrip("=")


def one_line(exc: BaseException) -> str:
    """The error as one line; a file input is named by its input name (``image.png: ...``), never by its path
    on this server."""
    reason, path = getattr(exc, "reason", None), getattr(exc, "path", None)
    text = f"{Path(path).name}: {reason}" if path and reason else str(exc)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------ the layer
@dataclass
class _Live:
    """A prediction that has not ended: what the event loop keeps beside its record."""

    pred: Prediction
    folder: Path | None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    webhook: WebhookSender | None = None
    picked: bool = False
    cancel_requested: bool = False
    task: asyncio.Task | None = None
    queued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    stream: live_stream.LiveStream | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (seq, event, data)
    seq: int = 0


class Jobs:
    """Predictions over one :class:`Runner`, with their records in ``workdir/jobs.sqlite``.

    Args:
        runner: what runs a job.
        workdir: the work directory (``jobs.sqlite``, ``outputs/``, ``inputs/``); one server per directory.
        settings: limits and policies.
        outputs: where the output files go (None: ``workdir/outputs``); on a Ray cluster a directory every node
            can reach. The live streams go to ``workdir/streams``, or ``outputs/.streams`` when this is given.
        metrics: where to count (None: a new :class:`~sonic_rt.serving.metrics.Metrics`).

    Records a previous server left ``starting`` or ``processing`` (:attr:`recovered`) are queued again by
    :meth:`start`, under their ids; output files and input folders no record owns are deleted. Call :meth:`start`
    on the event loop before use, :meth:`drain` to stop gracefully and :meth:`close` at the end.

    Raises:
        SonicError: the work directory is used by another server.
    """

    def __init__(
        self,
        runner: Runner,
        workdir: str | Path,
        settings: Settings | None = None,
        *,
        outputs: str | Path | None = None,
        metrics: Metrics | None = None,
    ):
        self.runner, self.settings = runner, settings or Settings()
        self.metrics = metrics or Metrics()
        self.workdir = Path(workdir)
        self.outputs = Path(outputs) if outputs is not None else self.workdir / "outputs"
        self.inputs = self.workdir / "inputs"
        # the runner writes the live streams, so with shared outputs storage (Ray) they go there too
        self.streams = self.workdir / "streams" if outputs is None else self.outputs / ".streams"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.workdir / "jobs.sqlite")
        self.recovered = self.store.unfinished()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(exist_ok=True)
        self.streams.mkdir(parents=True, exist_ok=True)
        self._sweep()
        self.setup_info: dict[str, Any] = {"started_at": None, "completed_at": None, "status": STARTING, "logs": ""}
        self.running = self.done = self.waiting = 0
        self.unhealthy: str | None = None
        self.stopping_until: float | None = None  # monotonic deadline of the grace period once draining
        self._live: dict[str, _Live] = {}
        self._recent: deque[tuple[float, Path]] = deque(maxlen=64)
        self._durations: deque[float] = deque(maxlen=20)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._senders: set[WebhookSender] = set()
        self._boot = secrets.token_hex(4)  # this server's prefix of SSE event ids

    # ---------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Set the runner up (in a thread: health says ``STARTING`` meanwhile), queue the predictions a previous
        server left unfinished, send the ``completed`` webhooks it had not sent, and start the workers and the
        janitor that deletes expired outputs and records."""
        self._tasks.append(asyncio.create_task(self._setup(), name="sonic-setup"))
        for pred in self.recovered:
            self._requeue(pred)
        for pred in self.store.pending_completed_webhooks():
            sender = self._sender(pred, {"completed"})
            sender.offer("completed", lambda p=pred: self.render(p))
            sender.close()
        self._workers = [
            asyncio.create_task(self._work(), name=f"sonic-worker-{i}")
            for i in range(max(1, self.settings.concurrency))
        ]
        self._tasks += self._workers
        self._tasks.append(asyncio.create_task(self._janitor(), name="sonic-janitor"))
        self._gauges()

    def _requeue(self, pred: Prediction) -> None:
        """Queue a prediction a previous server left unfinished again (its inputs are still in its folder)."""
        was = "running" if pred.status == PROCESSING else "waiting"
        folder = Path(pred.input_folder) if pred.input_folder else None
        live = _Live(pred, folder)
        pred.status, pred.progress, pred.stream, pred.started_at = STARTING, {}, None, None
        pred.output = pred.output_token = pred.expires_at = None
        self._live[pred.id] = live
        if pred.webhook:
            events = set(pred.webhook_events_filter) - set(pred.webhooks_done)
            live.webhook = self._sender(pred, events)
            if "start" in events:  # the previous server did not get it out
                self._emit(live, "start", {"id": pred.id, "status": pred.status})
        missing = [
            name for name, source in pred.files.items() if "path" in source and not Path(source["path"]).is_file()
        ]
        if missing:
            self._end(
                live,
                FAILED,
                f"the inputs ({', '.join(missing)}) of this prediction were lost while the server "
                "was stopped; send it again",
            )
            return
        # in the logs, not an event of its own: a waiting prediction's first event after `start` is its run's
        pred.logs += f"the server restarted while this prediction was {was}: it runs again\n"
        self.store.put(pred)
        logs.event("recovered", pred.id, was=was, attempts=pred.attempts)
        self.waiting += 1
        self._queue.put_nowait(pred.id)

    async def drain(self, grace_s: float) -> None:
        """Stop gracefully (SIGTERM): refuse new predictions from now on (:class:`Stopping`; health says
        ``STOPPING``), start no waiting one, and wait up to ``grace_s`` seconds for the running ones to end.
        The waiting ones stay queued in the records for the next server."""
        self.stopping_until = time.monotonic() + grace_s
        logs.event("stopping", grace_s=grace_s, running=self.running, waiting=self.waiting)
        for task in getattr(self, "_workers", []):
            task.cancel()  # a worker waiting on a running job does not cancel it (asyncio.wait)
        running = [live.task for live in self._live.values() if live.task is not None and not live.task.done()]
        if running:
            await asyncio.wait(running, timeout=grace_s)

    async def close(self, webhook_grace_s: float = 5.0) -> None:
        """Stop: a running job is interrupted (its runner stops after the current UNet call) and its record stays
        ``processing``, waiting ones stay ``starting``: the next server runs them again. Webhooks still queued get
        ``webhook_grace_s`` seconds; then the runner and the store close."""
        if self.stopping_until is None:
            self.stopping_until = time.monotonic()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for live in list(self._live.values()):
            if live.task is not None and not live.task.done():
                live.task.cancel()
                await asyncio.wait([live.task])
        if self._senders:
            await asyncio.wait([asyncio.create_task(s.drain()) for s in self._senders], timeout=webhook_grace_s)
        for sender in list(self._senders):  # not out in time: a `completed` among them is sent at the next start
            await sender.stop()
        await asyncio.to_thread(self.runner.close)
        self.store.close()

    async def _setup(self) -> None:
        self.setup_info["started_at"] = now_iso()
        try:
            await asyncio.to_thread(self.runner.setup)
        except Exception as exc:  # a model that does not load: SETUP_FAILED with its one line
            message = one_line(exc)
            self.setup_info.update(status=FAILED, completed_at=now_iso(), logs=message + "\n")
            logs.event("setup", status="failed", error=message, level=logging.ERROR)
        else:
            self.setup_info.update(status=SUCCEEDED, completed_at=now_iso())
            logs.event("setup", status="succeeded", model=self.runner.describe())
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self.setup_info["status"] == SUCCEEDED

    # ----------------------------------------------------------------------------------------------- requests
    def get(self, prediction_id: str) -> Prediction | None:
        """The prediction (live or from the store), or None."""
        live = self._live.get(prediction_id)
        return live.pred if live is not None else self.store.get(prediction_id)

    async def create(self, new: NewPrediction) -> tuple[Prediction, bool]:
        """Create and queue a prediction, or return the existing one with the same id.

        Returns:
            the prediction and whether it was created now (False: the id existed; nothing started, and the
            request's stored files were removed).

        Raises:
            Stopping: the server is stopping (SIGTERM).
            Unavailable: the runner failed to set up.
            QueueFull: ``max_queue`` predictions are waiting.
        """
        if new.id is not None:
            existing = self.get(new.id)
            if existing is not None:
                self._discard(new.folder)
                return existing, False
        if self.stopping_until is not None:
            self._discard(new.folder)
            raise Stopping(max(1, math.ceil(self.stopping_until - time.monotonic())))
        if self.setup_info["status"] == FAILED:
            self._discard(new.folder)
            raise Unavailable(f"the model could not be loaded: {self.setup_info['logs'].strip()}")
        if self.waiting >= self.settings.max_queue:
            self._discard(new.folder)
            raise QueueFull(self.waiting, self.retry_after_s())
        folder, files = new.folder, new.parsed.files
        if folder is None:  # files that belong to someone else (the page's uploads): keep a copy with the record
            folder = self.input_folder()
            files = {
                n: ({"path": str(_copy_into(Path(s["path"]), folder))} if "path" in s else s) for n, s in files.items()
            }
        events = new.webhook_events_filter
        pred = Prediction(
            id=new.id or new_id(),
            input=new.parsed.echo,
            options=new.parsed.options,
            files=files,
            webhook=new.webhook,
            webhook_events_filter=list(events if events is not None else WEBHOOK_EVENTS),
            output_as=new.output_as,
            base_url=self.settings.public_url or new.base_url,
            logs="".join(f"{line}\n" for line in new.parsed.notes),
            input_folder=str(folder),
        )
        pred, created = self.store.add(pred)
        if not created:  # the same id, created by a request that got here first
            self._discard(folder)
            return self.get(pred.id) or pred, False
        live = _Live(pred, folder)
        if pred.webhook:
            live.webhook = self._sender(pred, set(pred.webhook_events_filter))
        self._live[pred.id] = live
        self.waiting += 1
        logs.event("created", pred.id, webhook=bool(pred.webhook), waiting=self.waiting)
        self._emit(live, "start", {"id": pred.id, "status": pred.status})
        self._queue.put_nowait(pred.id)
        self._gauges()
        return pred, True

    def _sender(self, pred: Prediction, events: set[str]) -> WebhookSender:
        """A webhook sender for ``pred``: each result is counted and, for ``start`` and ``completed``, written to
        the record (``webhooks_done``), so that a restarted server sends neither again; a failure is logged."""

        def delivered(event: str, result: str, problem: str) -> None:
            self.metrics.inc("sonic_rt_webhook_deliveries_total", event=event, result=result)
            if result != "delivered":
                logs.event(
                    "webhook_failed", pred.id, level=logging.WARNING, webhook_event=event, result=result, error=problem
                )
            if event in ("start", "completed") and event not in pred.webhooks_done:
                pred.webhooks_done.append(event)
                record = self.store.get(pred.id)  # the record as it is now, with this one event added
                if record is not None and event not in record.webhooks_done:
                    record.webhooks_done.append(event)
                    self.store.put(record)

        sender = WebhookSender(
            pred.webhook, events, allow_private=self.settings.allow_private_urls, on_result=delivered
        )
        self._senders.add(sender)
        sender.on_drained(lambda: self._senders.discard(sender))
        return sender

    async def wait(self, prediction_id: str) -> Prediction | None:
        """The prediction once it has ended (None for an unknown id). Cancelling the caller does not cancel the
        job: it outlives the connection that waits for it."""
        live = self._live.get(prediction_id)
        if live is not None:
            await live.done.wait()
        return self.store.get(prediction_id)

    async def cancel(self, prediction_id: str) -> Prediction | None:
        """Cancel a waiting or running prediction; returns it once it has stopped (``canceled``; unchanged if it
        had ended already; None for an unknown id). A running job stops after its current UNet call."""
        live = self._live.get(prediction_id)
        if live is None:
            return self.store.get(prediction_id)
        live.cancel_requested = True
        if not live.picked:
            live.picked = True
            self.waiting -= 1
            self._end(live, CANCELED)
        elif live.task is not None:
            live.task.cancel()
            await asyncio.wait([live.task])
        else:  # picked, waiting for the runner's setup
            await live.done.wait()
        return self.get(prediction_id)

    async def events(
        self, prediction_id: str, last_event_id: str | None = None
    ) -> AsyncIterator[tuple[str, Any, str | None]]:
        """Server-sent events of one prediction as ``(event, data, id)``: ``start``, then ``progress`` (windows
        done of the total, seconds of video written, ETA), ``log`` lines, ``output`` events and ``completed`` (the
        prediction). ``output`` is each finished segment of the live stream as it is announced (``{"chunk": url,
        "index": n, "kind": "segment", "start_seconds", "end_seconds", "playlist"}``,
        :func:`sonic_rt.serving.live.event`), then the finished video (``{"chunk": url, "index": 0, "kind":
        "video"}``). ``("heartbeat", None, None)`` comes after :data:`HEARTBEAT_S` seconds without an event.

        ``last_event_id`` (the SSE ``Last-Event-ID`` of a client that reconnects): the events after it, when this
        server gave it out and still holds them; otherwise a late subscriber gets ``start``, the latest progress and
        the segments announced so far first; an ended prediction gives ``start``, its segments (while they are
        kept), ``output`` (if any) and ``completed`` at once, or nothing when ``last_event_id`` is its
        ``completed`` event's id (:meth:`resumed_past_end`)."""
        live = self._live.get(prediction_id)
        if live is None:
            pred = self.store.get(prediction_id)
            if pred is None or (last_event_id is not None and last_event_id == pred.last_event_id):
                return
            yield "start", {"id": pred.id, "status": pred.status}, None
            for data in self._segment_events(pred):
                yield "output", data, None
            rendered = self.render(pred)
            if rendered["output"] is not None:
                yield "output", {"chunk": rendered["output"], "index": 0, "kind": "video"}, None
            yield "completed", rendered, pred.last_event_id
            return
        queue: asyncio.Queue = asyncio.Queue()
        live.subscribers.add(queue)  # before the first await: no event can slip between snapshot and queue
        try:
            for item in self._catch_up(live, last_event_id):
                yield item
            while True:
                try:
                    event, data, event_id = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield "heartbeat", None, None
                    continue
                if event == "closed":  # the server stopped while it ran
                    return
                yield event, data, event_id
                if event == "completed":
                    return
        finally:
            live.subscribers.discard(queue)

    def _catch_up(self, live: _Live, last_event_id: str | None) -> list[tuple[str, Any, str | None]]:
        """What a new subscriber gets first: the events after ``last_event_id`` if this server holds them, else
        ``start``, the latest progress and the segments so far."""
        boot, _, number = (last_event_id or "").rpartition("-")
        if boot == self._boot and number.isdigit() and live.history and live.history[0][0] <= int(number) + 1:
            return [(event, data, f"{self._boot}-{seq}") for seq, event, data in live.history if seq > int(number)]
        items = [("start", {"id": live.pred.id, "status": live.pred.status}, None)]
        if live.pred.progress:
            items.append(("progress", dict(live.pred.progress), None))
        items += [("output", data, None) for data in self._segment_events(live.pred)]
        if live.seq:  # the snapshot stands for every event so far: a client resumes after the latest
            event, data, _ = items[-1]
            items[-1] = (event, data, f"{self._boot}-{live.seq}")
        return items

    def resumed_past_end(self, prediction_id: str, last_event_id: str | None) -> bool:
        """Whether a client resuming with ``last_event_id`` has had the prediction's ``completed`` event (its stream
        answers 204 then, which tells an ``EventSource`` to stop reconnecting)."""
        pred = None if prediction_id in self._live else self.store.get(prediction_id)
        return pred is not None and last_event_id is not None and last_event_id == pred.last_event_id

    @staticmethod
    def _segment_events(pred: Prediction) -> list[dict[str, Any]]:
        stream = pred.stream or {}
        return [live_stream.event(segment, stream["playlist"]) for segment in stream.get("segments", ())]

    # ------------------------------------------------------------------------------------------------ reading
    def render(self, pred: Prediction) -> dict[str, Any]:
        """The prediction object a client gets; with ``output_as="data_url"`` the output is the mp4 itself."""
        out = pred.public()
        if pred.output is not None and pred.output_as == "data_url":
            path = self.output_path(pred)
            if path is not None and path.is_file():
                out["output"] = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
        return out

    def output_path(self, pred: Prediction) -> Path | None:
        return self.outputs / f"{pred.output_token}.mp4" if pred.output_token else None

    def output_file(self, token: str) -> Path | None:
        """The output file named by ``token`` (``/outputs/{token}.mp4``), or None."""
        if not token or not all(c.isalnum() or c in "-_" for c in token):
            return None
        path = self.outputs / f"{token}.mp4"
        return path if path.is_file() else None

    def stream_part(self, token: str, name: str) -> tuple[str, Any] | None:
        """What ``/streams/{token}/{name}`` serves (:func:`sonic_rt.serving.live.part`: media type and body), or
        None: an unknown token or name, a segment not finished yet, or a stream already deleted."""
        if not token or not all(c.isalnum() or c in "-_" for c in token):
            return None
        folder = self.streams / token
        return live_stream.part(folder, name) if folder.is_dir() else None

    def recent_outputs(self, count: int) -> list[str]:
        """The newest ``count`` output files still on disk (the page's gallery)."""
        return [str(p) for _, p in reversed(self._recent) if p.is_file()][:count]

    def position(self, prediction_id: str) -> int | None:
        """How many predictions wait before this one (0: next), or None when it is not waiting."""
        waiting = [pid for pid, live in self._live.items() if not live.picked]
        return waiting.index(prediction_id) if prediction_id in waiting else None

    def retry_after_s(self) -> int:
        """Seconds until a place in the line frees up, estimated from the last jobs' run times (30 s before any)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 30.0
        return max(1, math.ceil(mean / max(1, self.settings.concurrency)))

    def health(self) -> dict[str, Any]:
        """Cog's ``/health-check`` body: ``status`` (``STARTING``, ``READY``, ``BUSY``, ``SETUP_FAILED``,
        ``UNHEALTHY``, and ``STOPPING`` once a SIGTERM was received: no new prediction is taken), ``setup`` (``started_at``, ``completed_at``, ``status``, ``logs``), plus ``queue``
        (running, waiting, max_waiting) and ``model`` (the runner's description)."""
        from .. import __version__

        setup = self.setup_info["status"]
        if self.stopping_until is not None:
            status = "STOPPING"
        elif setup == STARTING:
            status = "STARTING"
        elif setup == FAILED:
            status = "SETUP_FAILED"
        elif self.unhealthy:
            status = "UNHEALTHY"
        elif self.running >= max(1, self.settings.concurrency):
            status = "BUSY"
        else:
            status = "READY"
        body = {
            "status": status,
            "setup": dict(self.setup_info),
            "version": {"sonic_rt": __version__, "python": sys.version.split()[0]},
            "queue": {"running": self.running, "waiting": self.waiting, "max_waiting": self.settings.max_queue},
            "model": self.runner.describe(),
        }
        if self.unhealthy:
            body["user_healthcheck_error"] = self.unhealthy
        return body

    # ------------------------------------------------------------------------------------------------ running
    async def _work(self) -> None:
        while True:
            prediction_id = await self._queue.get()
            live = self._live.get(prediction_id)
            if live is None or live.picked:  # cancelled while it waited
                continue
            live.picked = True
            self.waiting -= 1
            await self._ready.wait()
            if live.cancel_requested:
                self._end(live, CANCELED)
                continue
            if not self.ready:
                self._end(live, FAILED, f"the model could not be loaded: {self.setup_info['logs'].strip()}")
                continue
            live.task = asyncio.create_task(self._execute(live), name=f"sonic-job-{prediction_id}")
            await asyncio.wait([live.task])  # a cancelled job ends its task, not this worker

    async def _execute(self, live: _Live) -> None:
        pred = live.pred
        pred.status, pred.started_at, pred.attempts = PROCESSING, now_iso(), pred.attempts + 1
        live.started = time.monotonic()
        wait_s = live.started - live.queued
        self.store.put(pred)
        self.running += 1
        self._gauges()
        self.metrics.observe("sonic_rt_queue_wait_seconds", wait_s)
        logs.event("started", pred.id, attempt=pred.attempts, queue_wait_s=round(wait_s, 3))
        status, error, error_type, out, interrupted = FAILED, None, None, None, False
        stages: dict[str, float] | None = None
        try:
            spec, load_s = await self._prepare(live)
            out = spec.out
            result = await self.runner.run(spec, lambda kind, info: self._progress(live, kind, info))
            self._succeeded(live, result)
            stages = {"load": round(load_s, 3), **{k: round(v, 3) for k, v in result.timings.items() if k != "total"}}
            self._observe(result, stages, time.monotonic() - live.started)
            status = SUCCEEDED
        except asyncio.CancelledError:
            if live.cancel_requested:
                status = CANCELED
            else:  # the server stops: the record stays `processing`, the next server runs it again
                interrupted = True
        except SonicError as exc:
            error, error_type = one_line(exc), type(exc).__name__
        except Exception as exc:  # a fault of the runner or the device, not of the input: say it, keep serving
            error, error_type = f"internal error: {type(exc).__name__}: {one_line(exc)}", type(exc).__name__
            self.unhealthy = error
            traceback.print_exc(file=sys.stderr)
        finally:
            self.running -= 1
            if status != SUCCEEDED and out is not None:
                out.unlink(missing_ok=True)
            if status != SUCCEEDED and live.stream is not None:
                live.stream.remove()  # after the runner stopped: nothing writes there any more
            self._durations.append(time.monotonic() - live.started)
            if interrupted:
                self._interrupted(live)
            else:
                self._end(live, status, error, error_type=error_type, stages=stages)

    async def _prepare(self, live: _Live) -> tuple[JobSpec, float]:
        """Fetch the ``http(s)`` inputs, check the speech, and name the output and the live stream. Returns the
        job and the seconds this took (the ``load`` stage)."""
        pred, settings, started = live.pred, self.settings, time.monotonic()
        folder = live.folder or (self.inputs / pred.id)
        paths = {}
        for name, source in pred.files.items():
            if "url" in source:
                live.folder = folder
                paths[name] = await input_files.fetch(
                    source["url"],
                    folder,
                    name,
                    max_bytes=settings.max_upload_bytes,
                    timeout_s=settings.fetch_timeout_s,
                    allow_private=settings.allow_private_urls,
                )
            else:
                paths[name] = Path(source["path"])
        samples = await asyncio.to_thread(self._check_audio, paths["audio"])
        self._log(live, f"inputs ready: {samples / SAMPLE_RATE:.2f} s of speech")
        token = secrets.token_urlsafe(24)
        live.stream = live_stream.LiveStream(self.streams / token, f"{pred.base_url}streams/{token}/")
        overrides = {**pred.options, "progress": False, "hls": str(live.stream.playlist)}
        options = AnimateOptions.resolve(None, overrides, "input")
        out = self.outputs / f"{token}.mp4"
        spec = JobSpec(pred.id, paths["image"], paths["audio"], out, options, samples, pred.attempts)
        return spec, time.monotonic() - started

    def _succeeded(self, live: _Live, result: JobResult) -> None:
        """Record a finished run's output (its file is in place) and announce it."""
        pred, token = live.pred, live.stream.folder.name
        self._announce(live, final=True)  # the last segments: the stream is closed after the last chunk
        pred.output_token = token
        pred.output = f"{pred.base_url}outputs/{token}.mp4"
        pred.expires_at = time.time() + self.settings.keep_outputs_s
        pred.metrics = {
            "video_seconds": round(result.num_frames / result.fps, 3),
            "frames": result.num_frames,
            "fps": result.fps,
            "width": result.width,
            "height": result.height,
        }
        for note in result.notes:
            self._log(live, note)
        self._emit(live, "output", None)
        self._recent.append((time.time(), self.outputs / f"{token}.mp4"))
        self.unhealthy = None

    def _observe(self, result: JobResult, stages: dict[str, float], run_s: float) -> None:
        """The metrics of a succeeded run: seconds per stage, windows per second, real-time factor, peak memory."""
        metrics = self.metrics
        for stage, seconds in stages.items():
            metrics.observe("sonic_rt_stage_seconds", seconds, stage=stage)
        denoise = result.timings.get("denoise", 0.0)
        if result.windows and denoise > 0:
            metrics.observe("sonic_rt_windows_per_second", result.windows / denoise)
        if run_s > 0:
            metrics.observe("sonic_rt_realtime_factor", result.num_frames / result.fps / run_s)
        if result.peak_memory_bytes is not None:
            metrics.observe("sonic_rt_peak_memory_bytes", result.peak_memory_bytes, device=result.device or "cpu")

    def _interrupted(self, live: _Live) -> None:
        """The server stopped while ``live`` ran: keep its record ``processing`` and its inputs for the next
        server; its clients' streams end without ``completed``."""
        pred = live.pred
        pred.progress, pred.stream = {}, None
        self._log(live, "the server stopped while this prediction ran: the next start runs it again")
        self.store.put(pred)
        self._live.pop(pred.id, None)
        logs.event("interrupted", pred.id, attempt=pred.attempts, run_s=round(time.monotonic() - live.started, 3))
        for queue in live.subscribers:
            queue.put_nowait(("closed", None, None))
        live.done.set()

    def _check_audio(self, audio: Path) -> int:
        """Decode the speech once: its length against ``max_audio_seconds`` (from the header first, so an hour-long
        file is refused before it is decoded). Returns its length in 16 kHz samples."""
        from .. import media
        from ..errors import AudioError

        limit = self.settings.max_audio_seconds
        header = media.probe_audio(audio)
        if header.duration_s > limit:
            raise AudioError(
                f"the speech is {header.duration_s:.0f} s long; this server accepts up to {limit:g} s", audio
            )
        samples = len(media.load_audio(audio, SAMPLE_RATE))
        if samples / SAMPLE_RATE > limit:
            raise AudioError(
                f"the speech is {samples / SAMPLE_RATE:.0f} s long; this server accepts up to {limit:g} s", audio
            )
        return samples

    def _progress(self, live: _Live, kind: str, info: dict) -> None:
        progress = live.pred.progress
        if kind == "plan":
            progress.update(windows_done=0, windows_total=int(info["windows_total"]), video_seconds=0.0)
        elif kind == "window":
            progress["windows_done"] = progress.get("windows_done", 0) + 1
        elif kind == "frames":
            progress["video_seconds"] = round(float(info["video_seconds"]), 2)
            self._log(live, f"{progress['video_seconds']:.2f} s of video written")
            self._announce(live)
        elif kind == "memory":
            self._log(live, f"out of memory: retrying with a smaller batch ({info})")
            return
        elif kind == "log":
            self._log(live, str(info["line"]))
            return
        elif kind == "retry":
            live.pred.attempts += 1
            live.pred.progress = {}
            self.store.put(live.pred)
            self._log(live, f"attempt {live.pred.attempts}: {info['reason']}")
            return
        else:
            return
        done, total = progress.get("windows_done", 0), progress.get("windows_total", 0)
        elapsed = time.monotonic() - live.started
        progress["eta_seconds"] = round(elapsed / done * max(total - done, 0), 1) if done else None
        self._emit(live, "progress", dict(progress))

    def _announce(self, live: _Live, final: bool = False) -> None:
        """Announce the live stream's newly finished segments: the record's ``stream``, an SSE ``output`` event
        each, and the webhook's ``output`` event (throttled; each carries every segment so far). ``final``: the
        runner returned (see :meth:`sonic_rt.serving.live.LiveStream.scan`)."""
        if live.stream is None or live.pred.terminal:
            return
        new = live.stream.scan(final)
        if new or (live.pred.stream is not None and live.pred.stream["ended"] != live.stream.ended):
            live.pred.stream = live.stream.describe()
        for segment in new:
            self._emit(live, "output", live_stream.event(segment, live.pred.stream["playlist"]))

    def _log(self, live: _Live, line: str) -> None:
        live.pred.logs += line + "\n"
        self._emit(live, "log", {"source": "stderr", "data": line + "\n"})

    def _emit(self, live: _Live, event: str, data: Any) -> None:
        """Send ``event`` (with the next SSE id) to the prediction's SSE subscribers and history and, mapped onto
        Cog's webhook events (``start``, ``logs`` for log lines and progress, ``output``, ``completed``), to its
        webhook."""
        pred = live.pred
        finished = event == "output" and data is None  # the video itself (else: a live segment)
        if finished:
            data = {"chunk": self.render(pred)["output"], "index": 0, "kind": "video"}
        live.seq += 1
        event_id = f"{self._boot}-{live.seq}"
        if event == "completed":
            pred.last_event_id = event_id
        live.history.append((live.seq, event, data))
        for queue in live.subscribers:
            queue.put_nowait((event, data, event_id))
        if live.webhook is not None:
            hook = {"start": "start", "log": "logs", "progress": "logs", "output": "output", "completed": "completed"}
            # the finished video's output event is never throttled away by a segment's sent just before it
            live.webhook.offer(hook[event], lambda: self.render(pred), force=finished)

    def _end(
        self,
        live: _Live,
        status: str,
        error: str | None = None,
        *,
        error_type: str | None = None,
        stages: dict[str, float] | None = None,
    ) -> None:
        pred = live.pred
        pred.status, pred.error, pred.completed_at = status, error, now_iso()
        if status != SUCCEEDED:
            pred.output = pred.output_token = pred.expires_at = None
            pred.stream = None
        run_s = None
        if pred.started_at is not None:
            run_s = pred.metrics["predict_time"] = round(time.monotonic() - live.started, 3)
            self.metrics.observe("sonic_rt_run_seconds", run_s)
        self._live.pop(pred.id, None)
        self.done += 1
        self._emit(live, "completed", self.render(pred))  # sets last_event_id before the record is written
        self.store.put(pred)
        self._discard(live.folder)
        self.metrics.inc("sonic_rt_predictions_total", status=status)
        self._gauges()
        logs.event(
            "finished",
            pred.id,
            status=status,
            attempt=pred.attempts,
            run_s=run_s,
            stages=stages,
            video_seconds=pred.metrics.get("video_seconds"),
            error=error,
            error_type=error_type,
        )
        if live.webhook is not None:
            live.webhook.close()
        live.done.set()

    def _gauges(self) -> None:
        self.metrics.set("sonic_rt_queue_depth", self.waiting)
        self.metrics.set("sonic_rt_jobs_running", self.running)

    def _discard(self, folder: Path | None) -> None:
        """Remove a request's stored inputs (only folders under ``inputs/``: the page's uploads are gradio's)."""
        if folder is not None and folder.parent == self.inputs:
            shutil.rmtree(folder, ignore_errors=True)

    def input_folder(self) -> Path:
        """A new folder for one request's file inputs (under ``workdir/inputs``)."""
        folder = self.inputs / secrets.token_hex(8)
        folder.mkdir()
        return folder

    # --------------------------------------------------------------------------------------------- retention
    async def _janitor(self) -> None:
        interval = min(60.0, max(0.2, self.settings.keep_outputs_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def expire(self, now: float | None = None) -> int:
        """Delete the output files whose time is up, with their live streams (their records say ``data_removed``),
        and the records older than ``keep_records_s``. Returns the output files deleted."""
        now = time.time() if now is None else now
        expired = self.store.with_output_before(now)
        for pred in expired:
            path = self.output_path(pred)
            if path is not None:
                path.unlink(missing_ok=True)
                shutil.rmtree(self.streams / pred.output_token, ignore_errors=True)  # its live segments
            pred.output, pred.data_removed, pred.stream = None, True, None
            self.store.put(pred)
        self.store.delete_older_than(self.settings.keep_records_s / 86400.0)
        return len(expired)

    def _sweep(self) -> None:
        """Remove what no record owns (a previous server's, after a crash or a restart): stream folders without a
        kept output, output files without a record (a run interrupted between its rename and its record, and the
        runtime's temporary ``.partial.mp4`` files), and input folders of no unfinished prediction."""
        kept = {pred.output_token for pred in self.store.with_output_before(math.inf)}
        for folder in self.streams.iterdir():
            if folder.name in kept:
                continue
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
        for path in self.outputs.iterdir():
            if path.is_file() and not (path.suffix == ".mp4" and path.stem in kept):
                path.unlink(missing_ok=True)
        owned = {pred.input_folder for pred in self.recovered}
        for folder in self.inputs.iterdir():
            if str(folder) in owned:
                continue
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)


def _copy_into(path: Path, folder: Path) -> Path:
    """Copy ``path`` into ``folder`` (same name); returns the copy."""
    target = folder / path.name
    shutil.copyfile(path, target)
    return target


__all__ = [
    "Jobs",
    "Runner",
    "JobSpec",
    "JobResult",
    "Settings",
    "NewPrediction",
    "QueueFull",
    "Unavailable",
    "Stopping",
    "new_id",
    "one_line",
    "HEARTBEAT_S",
]
