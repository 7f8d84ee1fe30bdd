"""Window scheduler: where, in what order and how the shift-fusion units are executed.

The sampler (:mod:`sonic_rt.sampling`) owns the algorithm: the (step, window) units, what each computes (its
latents, the guided UNet, one Euler step) and the per-frame average. This module owns execution only, and never
changes the result.

**Order.** Every unit runs once its inputs are final, the earliest in the run's priority order first
(:attr:`~sonic_rt.sampling.ShiftFusionRun.plan`: ``"wavefront"``, the default, puts the earliest output frames
first, so they are written after a fixed cone of work whatever the length; ``"steps"`` is the official step by
step order). Ready units of one step are batched into UNet calls of up to ``windows_per_call`` windows.

**Workers.** A call runs on a worker: one per device and lane (:class:`Worker`). Several devices
(``devices=["cuda:0", "cuda:1"]``) hold a UNet replica each; a device named twice, or ``lanes`` > 1, gives it
several workers sharing its replica (CUDA streams on a GPU; on the CPU, threads that split the cores, so two CPU
workers run one intra-op thread each on two cores). A unit goes to whichever worker is free. When fewer windows are
ready than workers are free (the tip of the first frames' cone, a short video, many devices), each ready window takes
an equal share of the free workers and its three guidance rows (unconditional, image-only, full) run on up to three
of them, gathered before the combine (``split_rows``; xDiT calls this CFG parallelism): the critical path of 25
windows in a row gets shorter. The latents live on the first device; a worker on another device
receives a window's inputs and returns its v (a few MB per call).

**Ranks.** Under ``torchrun`` each rank owns a contiguous range of frames, runs the units centred in it with its
own workers, and exchanges only the frames at its range's edges with its neighbours (:mod:`sonic_rt.ranks`).

**Same latents.** A frame's mean over the windows holding it is accumulated from zero with at most two terms, so
the order units finish in does not matter; the CPU UNet computes each guidance row the same way whatever shares its
call (:mod:`sonic_rt.models.batch_invariant`). So on the CPU in fp32 the latents do not depend on lanes, windows per
call, devices, row splits or ranks, bit for bit, given the same intra-op threads per worker (tested; oneDNN may
round a convolution differently on another thread count). On a GPU the same holds up to fp16 rounding of batched
kernels (a few uint8 levels, ``tests/test_gpu.py``).

A failure on any worker or rank is raised to the caller once the running calls have finished; no later call starts
and no partial result is used.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import InputError
from .pipeline.options import SCHEDULER_ORDERS
from .sampling import ShiftFusionRun, ShiftFusionWork, Unit, Window

ORDERS = SCHEDULER_ORDERS
RANK_TIMEOUT_S = float(os.environ.get("SONIC_RT_RANK_TIMEOUT", "1800"))  # torch's own default process group timeout
POLL_S = 0.05  # how often the loop looks at a rank's messages while its workers compute


@dataclass(frozen=True)
class SchedulerConfig:
    """How the units are executed (never what they compute).

    Attributes:
        windows_per_call: windows batched into one UNet call (UNet batch = 3 x this).
        lanes: workers per device: CUDA streams on a GPU, threads splitting the cores on the CPU.
        order: ``"wavefront"`` (units as soon as their inputs are final, earliest output first) or ``"steps"``
            (step by step, the official order); same latents either way.
        split_rows: run a window's guidance rows on several free workers when fewer windows are ready than workers
            are free (same latents; off: one worker per window).
    """

    windows_per_call: int = 1
    lanes: int = 1
    order: str = SCHEDULER_ORDERS[0]
    split_rows: bool = True

    def __post_init__(self):
        if self.windows_per_call < 1 or self.lanes < 1:
            raise InputError(f"windows_per_call and lanes must be >= 1, got {self.windows_per_call}, {self.lanes}")
        if self.order not in ORDERS:
            raise InputError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torch.distributed`` job (rank 0 of 1 when not distributed).

    Attributes:
        rank, world_size: as torchrun sets them (``RANK``, ``WORLD_SIZE``).
        timeout_s: how long a rank waits for a message before it gives up (the process group's timeout; env
            ``SONIC_RT_RANK_TIMEOUT``, default 1800 s as torch's own).
    """

    rank: int = 0
    world_size: int = 1
    timeout_s: float = RANK_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        """Join the job ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else a single process.

        Initialises the default process group once: NCCL on CUDA, gloo on CPU, with :data:`RANK_TIMEOUT_S`.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=RANK_TIMEOUT_S))
        return cls(dist.get_rank(), dist.get_world_size())

    def shutdown(self) -> None:
        """Leave the job cleanly (barrier, then destroy the process group); call once at the end."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


class RankFailed(RuntimeError):
    """Another rank of the distributed job failed, died, or sent nothing for the process group's timeout."""


class Placeable(Protocol):
    """A denoiser the scheduler can place on each of its devices and split by guidance rows (the runtime's
    :class:`~sonic_rt.pipeline.guidance.GuidedDenoiser`). A plain ``denoise(x, windows)`` callable runs on the
    first device only, whole.

    Attributes:
        replicas: how many devices it holds a UNet on (the scheduler's devices, in order).
        guidance_rows: rows per window (3: unconditional, image-only, full).
    """

    replicas: int
    guidance_rows: int

    def guided(self, x: torch.Tensor, windows: list[Window], replica: int) -> torch.Tensor:
        """The guided v of ``windows`` computed on device ``replica``: ``[g, T, C, h, w]`` on the first device."""

    def partial(self, x: torch.Tensor, windows: list[Window], rows: range, replica: int) -> torch.Tensor:
        """The v of guidance rows ``rows`` only, on device ``replica``: ``[len(rows) g, T, C, h, w]``, first device."""

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The guided v from every row's v, in row order (:meth:`partial` results concatenated)."""


class Worker:
    """One executor of UNet calls: a device (a replica's index), and a lane on it.

    The only worker of a scheduler runs calls on the calling thread. Otherwise each worker has a thread of its own,
    running ``threads`` intra-op threads (CPU), and CUDA streams: one on its device and, when that is not the first
    device (where the latents live), one there for reading inputs and writing results. A call waits for the work
    queued on the first device's current stream (which wrote its inputs) and returns an event the caller joins on.

    Args:
        replica: index of its device in the scheduler's devices; device: that device; home: the first device;
        lane: its lane on the device; threads: intra-op threads of its thread (None: unchanged); inline: run on
            the calling thread.
    """

    def __init__(
        self, replica: int, device: torch.device, home: torch.device, lane: int, threads: int | None, inline: bool
    ):
        self.replica, self.device, self.home, self.lane, self.threads = replica, device, home, lane, threads
        cuda = not inline and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device) if cuda and device.type == "cuda" else None
        self.home_stream = torch.cuda.Stream(home) if cuda and home.type == "cuda" and home != device else None
        self._pool = (
            None
            if inline
            else ThreadPoolExecutor(
                1,
                thread_name_prefix=f"sonic-worker{replica}-{device}-lane{lane}",
                initializer=_set_threads,
                initargs=(threads,),
            )
        )

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on this worker; the future's result is ``(out, event or None)``."""
        if self._pool is not None:
            return self._pool.submit(self._on_streams, fn, *args)
        future: Future = Future()
        try:
            future.set_result((fn(*args), None))
        except BaseException as exc:  # noqa: BLE001 - handed over through the future
            future.set_exception(exc)
        return future

    def _on_streams(self, fn: Callable, *args) -> tuple[Any, torch.cuda.Event | None]:
        streams = [s for s in (self.home_stream, self.stream) if s is not None]
        if not streams:
            return fn(*args), None
        main = torch.cuda.current_stream(self.home)
        (self.home_stream or self.stream).wait_stream(main)  # its inputs were written there
        with ExitStack() as stack:
            for stream in streams:
                stack.enter_context(torch.cuda.stream(stream))
            out = fn(*args)
            done = torch.cuda.Event()
            done.record(self.home_stream or self.stream)
        return out, done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"Worker(replica {self.replica}, {self.device}, lane {self.lane}, threads {self.threads})"


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)  # this thread's OpenMP / MKL threads


def join(result: tuple[Any, torch.cuda.Event | None], device: torch.device) -> Any:
    """A worker's result, usable on ``device``'s current stream (which waits for it there, not on the host)."""
    out, done = result
    if done is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(done)
        out.record_stream(stream)
    return out


class Readiness:
    """Which units may run: each waits until every frame it reads is final at its step.

    Args:
        work: the units; units: those this process runs, in priority order.

    Attributes:
        left: units not handed out yet.
    """

    def __init__(self, work: ShiftFusionWork, units: Sequence[Unit]):
        self.work, self.units = work, list(units)
        self._priority = {u: i for i, u in enumerate(self.units)}
        self._missing: dict[Unit, int] = {}
        self._heaps: dict[int, list[int]] = {}  # step -> heap of priorities
        for u in self.units:
            count = len(set(work.frames(u))) if u.step else 0
            if count:
                self._missing[u] = count
            else:
                self._push(u)
        self.left = len(self.units)

    def _push(self, unit: Unit) -> None:
        heapq.heappush(self._heaps.setdefault(unit.step, []), self._priority[unit])

    def frames_final(self, step: int, frames: Sequence[int]) -> None:
        """``frames`` hold their final step-``step`` latents here: the units of that step reading them are closer
        to ready."""
        if step >= self.work.steps:
            return
        for f in frames:
            for j in self.work.owners(step, f):
                unit = Unit(step, j)
                if unit in self._missing:
                    self._missing[unit] -= 1
                    if not self._missing[unit]:
                        del self._missing[unit]
                        self._push(unit)

    def has_ready(self) -> bool:
        return any(self._heaps.values())

    def count(self) -> int:
        """Units ready now."""
        return sum(len(h) for h in self._heaps.values())

    def next_group(self, size: int) -> list[Unit] | None:
        """The ready unit earliest in priority and up to ``size - 1`` more ready units of its step (one UNet call has
        one timestep), earliest first; None when none is ready."""
        heaps = [h for h in self._heaps.values() if h]
        if not heaps:
            return None
        heap = min(heaps, key=lambda h: h[0])
        group = [self.units[heapq.heappop(heap)] for _ in range(min(size, len(heap)))]
        self.left -= len(group)
        return group


class LocalRun:
    """One process's part of a run: every unit, every frame (:meth:`WindowScheduler.run` without ranks).

    Attributes:
        state: the latents (:class:`~sonic_rt.sampling.FrameLatents`); ready: which units may run; final: [N] bool,
            the frames whose last-step latents are final.
    """

    def __init__(self, run: ShiftFusionRun, on_window=None, on_final_frames=None):
        self.run, self.on_window, self.on_final_frames = run, on_window, on_final_frames
        self.state = run.latents_of()
        self.ready = Readiness(run.work, run.plan)
        self.final = torch.zeros(run.work.num_frames, dtype=torch.bool)

    def compute(self, group: list[Unit], denoise) -> torch.Tensor:
        return self.run.step(self.state, group, denoise)

    def on_done(self, group: list[Unit], stepped: torch.Tensor) -> None:
        """``group`` finished (``stepped`` [g, T, C, h, w]): add, finalise, make units ready, report."""
        newly_final = False
        for k, unit in enumerate(group):
            for step, frames in self.state.add(unit, stepped[k : k + 1]):
                if step == self.run.steps:
                    self.final[frames] = True
                    newly_final = True
                else:
                    self.ready.frames_final(step, frames)
            if self.on_window is not None:
                self.on_window(self.run.windows[unit])
        if newly_final and self.on_final_frames is not None:
            self.on_final_frames(self.state.x, self.final)


class WindowScheduler:
    """Runs the units of a shift-fusion run on workers and ranks; see the module docstring.

    Args:
        config: order, batching, lanes, row splits.
        device: the first device (where the latents live) when ``devices`` is None.
        distributed: the rank and world of a ``torch.distributed`` job (default: one process).
        devices: the devices holding a UNet replica, the first one holding the latents (a denoiser given to
            :meth:`run` must be :class:`Placeable` on them when they differ).
        threads: the CPU threads to split between CPU workers (None: this thread's ``torch.get_num_threads()``).
            With one worker the calls run on the calling thread with its own threads.

    Raises:
        InputError: several devices under ``torchrun`` (each rank runs one device).
    """

    def __init__(
        self,
        config: SchedulerConfig = SchedulerConfig(),
        device: torch.device | str = "cpu",
        distributed: Distributed = Distributed(),
        *,
        devices: Sequence[torch.device | str] | None = None,
        threads: int | None = None,
    ):
        self.config, self.distributed = config, distributed
        self.devices = [torch.device(d) for d in devices] if devices else [torch.device(device)]
        self.device = self.devices[0]
        if distributed.enabled and len(self.devices) > 1:
            raise InputError(
                f"under torchrun each rank runs one device; {len(self.devices)} devices were given to rank "
                f"{distributed.rank} (start one rank per device instead)"
            )
        slots = [(i, d, lane) for i, d in enumerate(self.devices) for lane in range(config.lanes)]
        cpu_slots = sum(1 for _, d, _ in slots if d.type == "cpu")
        per_worker = max(1, (threads or torch.get_num_threads()) // cpu_slots) if cpu_slots else None
        inline = len(slots) == 1
        self.workers = [
            Worker(i, d, self.device, lane, per_worker if d.type == "cpu" and not inline else None, inline)
            for i, d, lane in slots
        ]

    @property
    def runs_distributed(self) -> bool:
        return self.distributed.enabled

    def run(
        self,
        run: ShiftFusionRun,
        on_window: Callable[[Window], None] | None = None,
        on_final_frames: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | None:
        """Execute every unit of ``run`` once; returns the final latents ``[1, N, C, h, w]`` (under torchrun on
        rank 0, None on the others). ``on_window`` after each unit, ``on_final_frames(latents, ready)`` as frames
        become final (:func:`sonic_rt.sampling.sample`)."""
        self._check_placement(run.denoise)
        if self.distributed.enabled:
            from .ranks import RankExecutor

            return RankExecutor(self, run, self.distributed, on_window, on_final_frames).execute()
        loop = LocalRun(run, on_window, on_final_frames)
        self.execute(loop.ready, loop.compute, loop.on_done, run.denoise)
        return loop.state.x

    def execute(
        self,
        ready: Readiness,
        compute: Callable[[list[Unit], Callable], torch.Tensor],
        on_done: Callable[[list[Unit], torch.Tensor], None],
        denoiser: Callable | Placeable,
        poll: Callable[[bool], bool] | None = None,
    ) -> None:
        """Run every unit of ``ready`` on the workers: groups of ready units of one step (up to
        ``windows_per_call``), the earliest first, each on a free worker (or split by guidance rows over several,
        see the module docstring). ``compute(group, denoise) -> result`` runs on the worker with the ``denoise`` to
        use there; ``on_done(group, result)`` runs on the calling thread, one group at a time, and may make more
        units ready. ``poll(block)`` (a rank's messages) runs while waiting, may make units ready, and says whether
        more is to come. The first failure is raised once the running calls have finished; no later call starts."""
        free, running, error = list(self.workers), {}, None
        try:
            while True:
                for group, assigned in self.start(free, ready, denoiser) if error is None else ():
                    future = assigned[0].submit(self._call, compute, group, denoiser, assigned)
                    running[future] = (group, assigned)
                if not running:
                    if error is not None:
                        raise error
                    if poll is not None and poll(True):
                        continue
                    if ready.left:
                        raise RuntimeError("some units never became ready (their inputs are never final)")
                    return
                finished, _ = wait(list(running), timeout=POLL_S if poll else None, return_when=FIRST_COMPLETED)
                for future in finished:
                    group, assigned = running.pop(future)
                    free = sorted(free + assigned, key=self.workers.index)
                    try:
                        out = join(future.result(), self.device)
                    except BaseException as exc:  # noqa: BLE001 - raised once the running calls are done
                        error = error or exc
                        continue
                    if error is None:
                        on_done(group, out)
                if poll is not None and error is None:
                    poll(False)
        finally:
            _gather_quietly(list(running))

    def start(self, free: list, ready: Readiness, denoiser) -> list[tuple[list[Unit], list]]:
        """The placement rule: the groups to start now, each with the free workers it takes (removed from ``free``):
        groups of ready units of one step, the earliest first; when fewer groups are ready than workers are free,
        each takes an equal share of them (up to one per guidance row) to split its rows, else one.
        ``bench/simulator.py`` models the scheduler with this very rule."""
        started = []
        while free and (group := ready.next_group(self.config.windows_per_call)):
            take = self._workers_for(denoiser, len(free), ready)
            started.append((group, free[:take]))
            del free[:take]
        return started

    def _workers_for(self, denoiser, free: int, ready: Readiness) -> int:
        """How many of the ``free`` workers the group just taken gets: its share of them among the groups still
        ready (several split its guidance rows, when the denoiser can), at least one."""
        rows = getattr(denoiser, "guidance_rows", 1)
        if not self.config.split_rows or rows < 2 or free < 2:
            return 1
        groups = 1 + -(-ready.count() // self.config.windows_per_call)  # this one and those ready after it
        return max(1, min(rows, -(-free // groups)))  # ceil: every free worker gets used

    def _call(self, compute, group: list[Unit], denoiser, assigned: list[Worker]) -> torch.Tensor:
        """On ``assigned[0]``'s thread: ``compute`` with the denoise of that worker, or of a row split."""
        first = assigned[0]
        if len(assigned) > 1:
            return compute(group, lambda x, windows: self._split_rows(denoiser, x, windows, assigned))
        if hasattr(denoiser, "guided"):
            return compute(group, lambda x, windows: denoiser.guided(x, windows, first.replica))
        return compute(group, denoiser)

    def _split_rows(self, denoiser: Placeable, x, windows, assigned: list[Worker]) -> torch.Tensor:
        """A window group's guidance rows over ``assigned`` (this thread runs the first part), gathered in row
        order and combined."""
        parts = _row_parts(denoiser.guidance_rows, len(assigned))
        futures = [w.submit(denoiser.partial, x, windows, rows, w.replica) for w, rows in zip(assigned[1:], parts[1:])]
        try:
            own = denoiser.partial(x, windows, parts[0], assigned[0].replica)
            return denoiser.combine([own] + [join(f.result(), self.device) for f in futures])
        finally:
            _gather_quietly(futures)

    def _check_placement(self, denoiser) -> None:
        replicas = getattr(denoiser, "replicas", None)
        if replicas is None:
            if any(d != self.device for d in self.devices):
                raise InputError(
                    "this denoiser runs on one device; a placeable one (GuidedDenoiser) is needed for the devices "
                    + ", ".join(map(str, self.devices))
                )
        elif replicas != len(self.devices):
            raise InputError(f"the denoiser holds {replicas} UNet replicas for {len(self.devices)} devices")

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def _row_parts(rows: int, workers: int) -> list[range]:
    """``rows`` guidance rows in ``workers`` consecutive parts, the larger ones first (3 over 2: [0, 1], [2])."""
    bounds = [0]
    for w in range(workers):
        bounds.append(bounds[-1] + rows // workers + (1 if w < rows % workers else 0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _gather_quietly(futures: Sequence[Future]) -> None:
    """Wait for every future (no call outlives the run that started it); their errors were raised."""
    for future in futures:
        future.cancel()
    for future in futures:
        try:
            future.result()
        except BaseException:  # noqa: BLE001
            pass


__all__ = [
    "ORDERS",
    "SchedulerConfig",
    "Distributed",
    "RankFailed",
    "Placeable",
    "Worker",
    "Readiness",
    "LocalRun",
    "WindowScheduler",
    "join",
]
