""":class:`LocalRunner`: the :class:`~sonic_rt.serving.jobs.Runner` over one :class:`~sonic_rt.Runtime` in this
process.

A job runs ``Runtime.animate`` on a worker thread (the runtime serialises its calls with its own lock); its
``events`` callback forwards progress to the event loop and, once the job is cancelled, raises
:class:`Cancelled`, which stops the runtime at its next window (after the current UNet call). The runtime writes
the mp4 under a temporary name and renames it only at the end, so a stopped job leaves no file; the live HLS stream
it writes meanwhile (``job.options.hls``) is removed by the runtime when it stops, and its folder by the job layer.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .jobs import JobResult, JobSpec


class Cancelled(Exception):
    """Raised in the runtime's ``events`` callback to stop a cancelled job."""


class LocalRunner:
    """Jobs on one Runtime, in threads of this process.

    Args:
        runtime: a loaded :class:`~sonic_rt.Runtime`, or None to load one in :meth:`setup` with ``load``.
        load: builds the Runtime (called once, in a thread, while health says ``STARTING``).
        threads: worker threads (jobs that may be inside ``animate`` at once; the runtime runs one at a time).
        name: the model's name for health (default: the runtime's source folder name).
    """

    def __init__(
        self, runtime=None, *, load: Callable[[], Any] | None = None, threads: int = 1, name: str | None = None
    ):
        if runtime is None and load is None:
            raise ValueError("LocalRunner needs a runtime or a load function")
        self.runtime, self._load, self._name = runtime, load, name
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="sonic-job")
        self.calls = 0  # Runtime.animate calls started (tests count them)

    def setup(self) -> None:
        if self.runtime is None:
            self.runtime = self._load()

    def describe(self) -> dict[str, Any]:
        rt = self.runtime
        if rt is None:
            return {"model": self._name}
        return {
            "model": self._name or Path(rt.source).name,
            "demo": bool(rt.is_demo),
            "device": str(rt.device),
            "backend": rt.backend,
            "default_min_resolution": rt.default_min_resolution,
        }

    async def run(self, job: JobSpec, report: Callable[[str, dict], None]) -> JobResult:
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def events(kind: str, info: dict) -> None:
            if stop.is_set():
                raise Cancelled("canceled")
            loop.call_soon_threadsafe(report, kind, dict(info))

        future = loop.run_in_executor(self._executor, self._animate, job, events)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the runtime raises at its next window; wait for it to clean up
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved (Cancelled, the stop): asyncio does not report it as lost
            job.out.unlink(missing_ok=True)  # it finished just before the stop: its file goes too
            raise

    def _animate(self, job: JobSpec, events: Callable[[str, dict], None]) -> JobResult:
        from ..audio_features import num_generated_frames
        from ..sampling import window_starts

        options, windows = job.options, 0
        if options.frames_per_window >= 1:  # otherwise animate() refuses the options with its one line
            frames = max(num_generated_frames(job.audio_samples), 1)
            per_step = len(window_starts(frames, options.frames_per_window, 0, options.shift_offset))
            windows = options.steps * per_step
            events("plan", {"windows_total": windows})
        self.calls += 1
        device = str(getattr(self.runtime, "device", "cpu"))
        reset_peak_memory(device)
        result = self.runtime.animate(job.image, job.audio, job.out, options, events=events)
        return JobResult(
            num_frames=result.num_frames,
            fps=result.fps,
            width=result.width,
            height=result.height,
            timings=dict(result.timings),
            notes=tuple(result.notes),
            peak_memory_bytes=peak_memory(device),
            device=device.split(":")[0],
            windows=windows,
        )

    def close(self) -> None:
        """Stop the threads; a runtime this runner loaded is closed too."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._load is not None and self.runtime is not None:
            self.runtime.close()


def reset_peak_memory(device: str) -> None:
    """Start measuring a job's peak memory: the GPU's peak allocated memory (cuda), or the process's peak
    resident set (Linux, ``/proc/self/clear_refs``; elsewhere nothing is measured)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0, proc(5))
    except OSError:
        pass


def peak_memory(device: str) -> int | None:
    """Bytes: the peak since :func:`reset_peak_memory` (``torch.cuda.max_memory_allocated``, or ``VmHWM`` of
    ``/proc/self/status``), or None where it cannot be read."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


__all__ = ["LocalRunner", "Cancelled", "reset_peak_memory", "peak_memory"]
