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

While it runs, the runtime also writes a live HLS stream into ``streams/<token>/`` (:mod:`sonic_rt.serving.live`);
each segment is announced (SSE and webhook ``output`` events, the record's ``stream``) once it is complete, is
deleted with the output after ``keep_outputs_s``, and at once when the job fails or is canceled.

Everything here runs on one asyncio event loop; the runner may use threads or processes behind its ``run``.
"""

from __future__ import annotations

import asyncio
import base64
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
from .store import (
    CANCELED,
    FAILED,
    PROCESSING,
    STARTING,
    SUCCEEDED,
    TERMINAL,
    WEBHOOK_EVENTS,
    JobStore,
    Prediction,
    now_iso,
)
from .webhooks import WebhookSender

SAMPLE_RATE = 16000  # Hz: the runtime's audio rate (sonic_rt.media.load_audio's default)
LOST_REASON = "the server stopped (restart or crash)"
SHUTDOWN_REASON = "the server shut down"


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
    """

    id: str
    image: Path
    audio: Path
    out: Path
    options: AnimateOptions
    audio_samples: int


@dataclass(frozen=True)
class JobResult:
    """What a finished job produced: ``num_frames`` frames at ``fps`` (25.0, or 12.5 without interpolation),
    ``width`` x ``height`` pixels, the runtime's stage ``timings`` in seconds, and its ``notes``."""

    num_frames: int
    fps: float
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


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
    started: float = 0.0
    stream: live_stream.LiveStream | None = None


class Jobs:
    """Predictions over one :class:`Runner`, with their records in ``workdir/jobs.sqlite``.

    Args:
        runner: what runs a job.
        workdir: the work directory (``jobs.sqlite``, ``outputs/``, ``inputs/``); one server per directory.
        settings: limits and policies.
        outputs: where the output files go (None: ``workdir/outputs``); on a Ray cluster a directory every node
            can reach. The live streams go to ``workdir/streams``, or ``outputs/.streams`` when this is given.

    Records a previous server left ``starting`` or ``processing`` are marked ``failed`` (:data:`LOST_REASON`) when
    this one opens the directory. Call :meth:`start` on the event loop before use and :meth:`close` at the end.

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
    ):
        self.runner, self.settings = runner, settings or Settings()
        self.workdir = Path(workdir)
        self.outputs = Path(outputs) if outputs is not None else self.workdir / "outputs"
        self.inputs = self.workdir / "inputs"
        # the runner writes the live streams, so with shared outputs storage (Ray) they go there too
        self.streams = self.workdir / "streams" if outputs is None else self.outputs / ".streams"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.workdir / "jobs.sqlite")
        self.lost = self.store.fail_unfinished(LOST_REASON)
        shutil.rmtree(self.inputs, ignore_errors=True)  # the inputs of the jobs a previous server lost
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(exist_ok=True)
        self.streams.mkdir(parents=True, exist_ok=True)
        self._sweep_streams()
        self.setup_info: dict[str, Any] = {"started_at": None, "completed_at": None, "status": STARTING, "logs": ""}
        self.running = self.done = self.waiting = 0
        self.unhealthy: str | None = None
        self._live: dict[str, _Live] = {}
        self._recent: deque[tuple[float, Path]] = deque(maxlen=64)
        self._durations: deque[float] = deque(maxlen=20)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._senders: set[WebhookSender] = set()

    # ---------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Set the runner up (in a thread: health says ``STARTING`` meanwhile), start the workers and the
        janitor that deletes expired outputs and records."""
        self._tasks.append(asyncio.create_task(self._setup(), name="sonic-setup"))
        self._tasks += [
            asyncio.create_task(self._work(), name=f"sonic-worker-{i}")
            for i in range(max(1, self.settings.concurrency))
        ]
        self._tasks.append(asyncio.create_task(self._janitor(), name="sonic-janitor"))

    async def close(self, webhook_grace_s: float = 5.0) -> None:
        """Stop: running jobs are cancelled and recorded ``failed`` (:data:`SHUTDOWN_REASON`), waiting ones too;
        webhooks still queued get ``webhook_grace_s`` seconds; then the runner and the store close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for live in list(self._live.values()):
            if live.task is not None:
                live.task.cancel()
                await asyncio.wait([live.task])
            elif not live.pred.terminal:
                self._end(live, FAILED, f"{SHUTDOWN_REASON} while this prediction was waiting")
        if self._senders:
            await asyncio.wait([asyncio.create_task(s.drain()) for s in self._senders], timeout=webhook_grace_s)
        await asyncio.to_thread(self.runner.close)
        self.store.close()

    async def _setup(self) -> None:
        self.setup_info["started_at"] = now_iso()
        try:
            await asyncio.to_thread(self.runner.setup)
        except Exception as exc:  # a model that does not load: SETUP_FAILED with its one line
            message = one_line(exc)
            self.setup_info.update(status=FAILED, completed_at=now_iso(), logs=message + "\n")
            print(f"sonic_rt serve: setup failed: {message}", file=sys.stderr, flush=True)
        else:
            self.setup_info.update(status=SUCCEEDED, completed_at=now_iso())
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
            Unavailable: the runner failed to set up.
            QueueFull: ``max_queue`` predictions are waiting.
        """
        if new.id is not None:
            existing = self.get(new.id)
            if existing is not None:
                self._discard(new.folder)
                return existing, False
        if self.setup_info["status"] == FAILED:
            self._discard(new.folder)
            raise Unavailable(f"the model could not be loaded: {self.setup_info['logs'].strip()}")
        if self.waiting >= self.settings.max_queue:
            self._discard(new.folder)
            raise QueueFull(self.waiting, self.retry_after_s())
        events = new.webhook_events_filter
        pred = Prediction(
            id=new.id or new_id(),
            input=new.parsed.echo,
            options=new.parsed.options,
            files=new.parsed.files,
            webhook=new.webhook,
            webhook_events_filter=list(events if events is not None else WEBHOOK_EVENTS),
            output_as=new.output_as,
            base_url=self.settings.public_url or new.base_url,
            logs="".join(f"{line}\n" for line in new.parsed.notes),
        )
        pred, created = self.store.add(pred)
        if not created:  # the same id, created by a request that got here first
            self._discard(new.folder)
            return self.get(pred.id) or pred, False
        live = _Live(pred, new.folder)
        if pred.webhook:
            live.webhook = WebhookSender(
                pred.webhook, set(pred.webhook_events_filter), allow_private=self.settings.allow_private_urls
            )
            self._senders.add(live.webhook)
        self._live[pred.id] = live
        self.waiting += 1
        self._emit(live, "start", {"id": pred.id, "status": pred.status})
        self._queue.put_nowait(pred.id)
        return pred, True

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

    async def events(self, prediction_id: str) -> AsyncIterator[tuple[str, Any]]:
        """Server-sent events of one prediction: ``start``, then ``progress`` (windows done of the total, seconds
        of video written, ETA), ``log`` lines, ``output`` events and ``completed`` (the prediction). ``output`` is
        each finished segment of the live stream as it is announced (``{"chunk": url, "index": n, "kind":
        "segment", "start_seconds", "end_seconds", "playlist"}``, :func:`sonic_rt.serving.live.event`), then the
        finished video (``{"chunk": url, "index": 0, "kind": "video"}``). A late subscriber gets ``start``, the
        latest progress and the segments announced so far first; an ended prediction gives ``start``, its segments
        (while they are kept), ``output`` (if any) and ``completed`` at once."""
        live = self._live.get(prediction_id)
        if live is None:
            pred = self.store.get(prediction_id)
            if pred is None:
                return
            yield "start", {"id": pred.id, "status": pred.status}
            for data in self._segment_events(pred):
                yield "output", data
            rendered = self.render(pred)
            if rendered["output"] is not None:
                yield "output", {"chunk": rendered["output"], "index": 0, "kind": "video"}
            yield "completed", rendered
            return
        queue: asyncio.Queue = asyncio.Queue()
        live.subscribers.add(queue)  # before the first await: no event can slip between snapshot and queue
        segments = self._segment_events(live.pred)
        try:
            yield "start", {"id": live.pred.id, "status": live.pred.status}
            if live.pred.progress:
                yield "progress", dict(live.pred.progress)
            for data in segments:
                yield "output", data
            while True:
                event, data = await queue.get()
                yield event, data
                if event == "completed":
                    return
        finally:
            live.subscribers.discard(queue)

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
        ``UNHEALTHY``), ``setup`` (``started_at``, ``completed_at``, ``status``, ``logs``), plus ``queue``
        (running, waiting, max_waiting) and ``model`` (the runner's description)."""
        from .. import __version__

        setup = self.setup_info["status"]
        if setup == STARTING:
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
        pred, settings = live.pred, self.settings
        pred.status, pred.started_at, pred.attempts = PROCESSING, now_iso(), pred.attempts + 1
        live.started = time.monotonic()
        self.store.put(pred)
        self.running += 1
        status, error, out = FAILED, None, None
        try:
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
            out = self.outputs / f"{token}.mp4"
            live.stream = live_stream.LiveStream(self.streams / token, f"{pred.base_url}streams/{token}/")
            overrides = {**pred.options, "progress": False, "hls": str(live.stream.playlist)}
            options = AnimateOptions.resolve(None, overrides, "input")
            spec = JobSpec(pred.id, paths["image"], paths["audio"], out, options, samples)
            result = await self.runner.run(spec, lambda kind, info: self._progress(live, kind, info))
            self._announce(live, final=True)  # the last segments: the stream is closed after the last chunk
            pred.output_token = token
            pred.output = f"{pred.base_url}outputs/{token}.mp4"
            pred.expires_at = time.time() + settings.keep_outputs_s
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
            status = SUCCEEDED
            self._recent.append((time.time(), out))
            self.unhealthy = None
        except asyncio.CancelledError:
            if live.cancel_requested:
                status = CANCELED
            else:
                error = f"{SHUTDOWN_REASON} while this prediction was running"
        except SonicError as exc:
            error = one_line(exc)
        except Exception as exc:  # a fault of the runner or the device, not of the input: say it, keep serving
            error = f"internal error: {type(exc).__name__}: {one_line(exc)}"
            self.unhealthy = error
            traceback.print_exc(file=sys.stderr)
        finally:
            self.running -= 1
            if status != SUCCEEDED and out is not None:
                out.unlink(missing_ok=True)
            if status != SUCCEEDED and live.stream is not None:
                live.stream.remove()  # after the runner stopped: nothing writes there any more
            self._durations.append(time.monotonic() - live.started)
            self._end(live, status, error)

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
        """Send ``event`` to the prediction's SSE subscribers and, mapped onto Cog's webhook events (``start``,
        ``logs`` for log lines and progress, ``output``, ``completed``), to its webhook."""
        pred = live.pred
        finished = event == "output" and data is None  # the video itself (else: a live segment)
        if finished:
            data = {"chunk": self.render(pred)["output"], "index": 0, "kind": "video"}
        for queue in live.subscribers:
            queue.put_nowait((event, data))
        if live.webhook is not None:
            hook = {"start": "start", "log": "logs", "progress": "logs", "output": "output", "completed": "completed"}
            # the finished video's output event is never throttled away by a segment's sent just before it
            live.webhook.offer(hook[event], lambda: self.render(pred), force=finished)

    def _end(self, live: _Live, status: str, error: str | None = None) -> None:
        pred = live.pred
        pred.status, pred.error, pred.completed_at = status, error, now_iso()
        if status != SUCCEEDED:
            pred.output = pred.output_token = pred.expires_at = None
            pred.stream = None
        if pred.started_at is not None:
            pred.metrics["predict_time"] = round(time.monotonic() - live.started, 3)
        self.store.put(pred)
        self._discard(live.folder)
        self._live.pop(pred.id, None)
        if status in TERMINAL:
            self.done += 1
        self._emit(live, "completed", self.render(pred))
        if live.webhook is not None:
            live.webhook.close()
            live.webhook.on_drained(lambda s=live.webhook: self._senders.discard(s))
        live.done.set()

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

    def _sweep_streams(self) -> None:
        """Remove the stream folders no kept output owns (the jobs a previous server lost while they ran)."""
        kept = {pred.output_token for pred in self.store.with_output_before(math.inf)}
        for folder in self.streams.iterdir():
            if folder.name in kept:
                continue
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)


__all__ = [
    "Jobs",
    "Runner",
    "JobSpec",
    "JobResult",
    "Settings",
    "NewPrediction",
    "QueueFull",
    "Unavailable",
    "new_id",
    "one_line",
    "LOST_REASON",
    "SHUTDOWN_REASON",
]
