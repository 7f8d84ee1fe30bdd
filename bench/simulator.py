"""A discrete-event model of one video on several devices or ranks: sonic_rt's own scheduling code, timed.

What it runs is the runtime's code, not a copy of it: the (step, window) units and their priority plan
(``ShiftFusionWork``), the readiness of each unit (``Readiness``), the scheduler's placement rule
(``WindowScheduler.start``: ready units to free workers, guidance rows split when nothing else is ready), the
per-frame bookkeeping of one process (``LocalRun``) and, for torchrun, the frame ownership, unit placement and
messages of every rank (``RankPlan``, ``RankExecutor``'s handlers, ``Outbox``'s order), all on latents of one
element per frame. Only the durations are modelled (:class:`CostModel`): a UNet call, a guidance row, an output
chunk (VAE decode, RIFE, encode of 8 frames), the stages before the loop, and a link (latency + bytes / bandwidth)
for every message or transfer between devices.

The output stages run on the first device (rank 0 under torchrun), serially, as chunks become final. Where they
share their hardware with the UNet calls, ``output_blocks`` says which calls they hold up: ``"all"`` (one CPU: the
cores are shared by every worker, and the calling thread, which hands out the calls, is busy decoding), ``"home"`` (the first device's calls only: a GPU, or a rank's own cores), or
``"none"``.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch

from sonic_rt.ranks import Outbox, RankExecutor
from sonic_rt.sampling import SamplingConfig, make_run
from sonic_rt.scheduler import Distributed, LocalRun, Readiness, SchedulerConfig, WindowScheduler, _row_parts

CHUNK = 8  # frames per output chunk (VAE decode_chunk_size)
GUIDANCE_ROWS = 3


@dataclass(frozen=True)
class CostModel:
    """The durations the model runs on.

    Attributes:
        unit_s: one window (its 3 guidance rows) in one UNet call on one worker, seconds.
        row_s: one guidance row alone on one worker (a row split), seconds.
        chunk_s: the output stages of one 8-frame chunk on the first device or rank 0, seconds.
        before_s: the stages before the loop (preprocess, Whisper, CLIP and VAE encode, adapters), seconds.
        latency_s, bandwidth_gbs: the link between devices or ranks (per message, and GB/s).
        frame_bytes: one latent frame as sent between ranks (C x h x w x bytes per value).
        call_bytes: one window's UNet inputs and output, sent to and from a device other than the first.
        output_blocks: which UNet calls the output stages hold up: "all", "home" or "none" (module docstring).
        name: what the numbers are (for reports).
    """

    unit_s: float
    row_s: float
    chunk_s: float
    before_s: float = 0.0
    latency_s: float = 0.0
    bandwidth_gbs: float = float("inf")
    frame_bytes: int = 0
    call_bytes: int = 0
    output_blocks: str = "none"
    name: str = ""

    def link_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / (self.bandwidth_gbs * 1e9)


@dataclass
class Prediction:
    """What the model predicts for one run.

    Attributes:
        first_frame_s: from the start of the run until the first chunk is written; total_s: until the last is.
        video_s: seconds of video (N generated frames at 12.5 fps); rtf: total_s / video_s (below 1: faster than
            real time).
        busy: each worker's (or rank's) share of total_s spent in UNet calls.
        units: UNet work units run (windows x steps); splits: windows whose rows were split over workers.
    """

    first_frame_s: float
    total_s: float
    video_s: float
    busy: list[float]
    units: int
    splits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        return self.total_s / self.video_s

    def to_json(self) -> dict[str, Any]:
        return {
            "first_frame_s": round(self.first_frame_s, 3),
            "total_s": round(self.total_s, 3),
            "video_s": round(self.video_s, 3),
            "rtf": round(self.rtf, 4),
            "busy": [round(b, 3) for b in self.busy],
            "units": self.units,
            "splits": self.splits,
            **self.extra,
        }


def _tiny_run(num_frames: int, steps: int, order: str):
    """A real :class:`~sonic_rt.sampling.ShiftFusionRun` on latents of one element per frame."""
    sigmas, timesteps = torch.linspace(1.0, 0.0, steps + 1), torch.linspace(1.0, 0.1, steps)
    latents = torch.zeros(1, num_frames, 1, 1, 1)
    return make_run(latents, sigmas, timesteps, SamplingConfig(steps=steps), None, order)


class _Output:
    """The output stages on the first device / rank 0: chunks of 8 frames in order, each once all its frames are
    final, one after another."""

    def __init__(self, num_frames: int, chunk_s: float):
        self.num_frames, self.chunk_s = num_frames, chunk_s
        self.next_frame, self.free_at, self.first = 0, 0.0, None

    def advance(self, now: float, final: torch.Tensor) -> float:
        """Start the chunks that became whole at ``now``; returns the seconds of output work started."""
        work = 0.0
        while self.next_frame < self.num_frames:
            end = min(self.next_frame + CHUNK, self.num_frames)
            if not bool(final[self.next_frame : end].all()):
                break
            self.free_at = max(self.free_at, now) + self.chunk_s
            work += self.chunk_s
            self.first = self.free_at if self.first is None else self.first
            self.next_frame = end
        return work


def _call_s(group: list, assigned: list, cost: CostModel) -> float:
    """Seconds of one UNet call of ``group`` on ``assigned`` (several: its guidance rows split over them)."""
    g = len(group)
    if len(assigned) == 1:
        seconds = g * cost.unit_s
        remote = [assigned[0]]
    else:
        parts = _row_parts(GUIDANCE_ROWS, len(assigned))
        seconds = max(len(p) * g * cost.row_s for p in parts)
        remote = assigned
    if any(w.replica != 0 for w in remote):  # inputs and v cross the link
        seconds += cost.link_s(g * cost.call_bytes)
    return seconds


class _Timeline:
    """Running UNet calls of some workers, which output work may delay (``output_blocks``)."""

    def __init__(self):
        self.running: dict[int, list] = {}  # id -> [end, group, assigned, rank]
        self._ids = itertools.count()

    def add(self, end: float, group, assigned, rank: int = 0) -> None:
        self.running[next(self._ids)] = [end, group, assigned, rank]

    def delay(self, seconds: float, rank: int | None = None, home_only: bool = False) -> None:
        for call in self.running.values():
            if (rank is None or call[3] == rank) and (not home_only or any(w.replica == 0 for w in call[2])):
                call[0] += seconds

    def next_end(self) -> float | None:
        return min((c[0] for c in self.running.values()), default=None)

    def pop_next(self) -> tuple[float, list, list, int]:
        key = min(self.running, key=lambda k: (self.running[k][0], k))
        return tuple(self.running.pop(key))


def simulate_devices(
    num_frames: int, steps: int, workers: int, cost: CostModel, config: SchedulerConfig = SchedulerConfig()
) -> Prediction:
    """One process with ``workers`` workers (devices x lanes): the scheduler's placement and the per-frame
    bookkeeping of :class:`~sonic_rt.scheduler.LocalRun`, timed by ``cost``."""
    run = _tiny_run(num_frames, steps, config.order)
    scheduler = WindowScheduler(replace(config, lanes=1), devices=["cpu"] * workers)
    denoiser = SimpleNamespace(guidance_rows=GUIDANCE_ROWS)
    loop, output = LocalRun(run), _Output(num_frames, cost.chunk_s)
    free, timeline, busy = list(scheduler.workers), _Timeline(), [0.0] * workers
    clock, splits = cost.before_s, 0
    try:
        while True:
            for group, assigned in scheduler.start(free, loop.ready, denoiser):
                seconds = _call_s(group, assigned, cost)
                timeline.add(clock + seconds, group, assigned)
                splits += len(group) if len(assigned) > 1 else 0
                for w in assigned:
                    busy[w.replica] += seconds
            if not timeline.running:
                break
            clock, group, assigned, _ = timeline.pop_next()
            free = sorted(free + list(assigned), key=scheduler.workers.index)
            loop.on_done(group, torch.zeros(len(group), run.work.frames_per_window, 1, 1, 1))
            work = output.advance(clock, loop.final)
            if work and cost.output_blocks != "none":
                timeline.delay(work, home_only=cost.output_blocks == "home")
            if work and cost.output_blocks == "all":
                clock = output.free_at  # the calling thread decoded; only then does it hand out the next calls
    finally:
        scheduler.close()
    total = max(clock, output.free_at)
    return Prediction(output.first, total, num_frames / 12.5, [b / total for b in busy], len(run.work.units()), splits)


def simulate_ranks(
    num_frames: int, steps: int, ranks: int, cost: CostModel, config: SchedulerConfig = SchedulerConfig()
) -> Prediction:
    """``ranks`` torchrun ranks of one worker each: :class:`~sonic_rt.ranks.RankPlan`'s ownership and placement,
    :class:`~sonic_rt.ranks.RankExecutor`'s handlers and :class:`~sonic_rt.ranks.Outbox`'s order for every message,
    each message arriving ``cost.link_s(bytes)`` after it leaves (in order per pair), timed by ``cost``. The stages
    before the loop run on every rank at once; the output on rank 0."""
    return _RankSimulation(num_frames, steps, ranks, cost, config).run()


class _RankSimulation:
    def __init__(self, num_frames: int, steps: int, ranks: int, cost: CostModel, config: SchedulerConfig):
        self.cost, self.num_frames = cost, num_frames
        self.run_ = _tiny_run(num_frames, steps, config.order)
        self.scheduler = WindowScheduler(replace(config, lanes=1), devices=["cpu"])
        self.denoiser = SimpleNamespace(guidance_rows=1)  # a rank runs whole windows
        self.output = _Output(num_frames, cost.chunk_s)
        self.arrivals: list = []  # heap of (time, seq, to, key, values)
        self._seq = itertools.count()
        self.clock = cost.before_s
        self.pair_free: dict[tuple[int, int], float] = {}
        self.executors = []
        for r in range(ranks):
            ex = RankExecutor(None, copy.copy(self.run_), Distributed(r, ranks), None, None)  # it lets go of latents
            ex.ready = Readiness(self.run_.work, ex.units)
            ex.channels = Outbox(ex.plan, r, lambda to, tensor, number, r=r: self._send(r, to, tensor, number))
            self.executors.append(ex)
        self.free = {r: [SimpleNamespace(replica=0, rank=r)] for r in range(ranks)}
        self.timeline, self.busy = _Timeline(), [0.0] * ranks

    def _send(self, rank: int, to: int, tensor: torch.Tensor, number: int) -> None:
        """A message leaves now: it arrives after the previous one on this link, plus its own time."""
        key = self.executors[rank].plan.sends[(rank, to)][number]
        leave = max(self.clock, self.pair_free.get((rank, to), 0.0))
        arrive = leave + self.cost.link_s(tensor.shape[1] * self.cost.frame_bytes)
        self.pair_free[(rank, to)] = arrive
        heapq.heappush(self.arrivals, (arrive, next(self._seq), to, key, tensor))

    def _dispatch(self, rank: int) -> None:
        for group, assigned in self.scheduler.start(self.free[rank], self.executors[rank].ready, self.denoiser):
            seconds = _call_s(group, assigned, self.cost)
            self.timeline.add(self.clock + seconds, group, assigned, rank)
            self.busy[rank] += seconds

    def run(self) -> Prediction:
        ranks, frames = len(self.executors), self.run_.work.frames_per_window
        for r in range(ranks):
            self._dispatch(r)
        while self.timeline.running or self.arrivals:
            end = self.timeline.next_end()
            if self.arrivals and (end is None or self.arrivals[0][0] <= end):
                self.clock, _, to, key, values = heapq.heappop(self.arrivals)
                self.executors[to]._received(key, values)
                self._dispatch(to)
            else:
                self.clock, group, assigned, r = self.timeline.pop_next()
                self.free[r].extend(assigned)
                self.executors[r]._on_done(group, torch.zeros(len(group), frames, 1, 1, 1))
                self._dispatch(r)
            work = self.output.advance(self.clock, self.executors[0].is_final)
            if work and self.cost.output_blocks != "none":
                self.timeline.delay(work, rank=0)
        self.scheduler.close()
        total = max(self.clock, self.output.free_at)
        messages = sum(len(keys) for keys in self.executors[0].plan.sends.values())
        busy = [b / total for b in self.busy]
        video_s = self.num_frames / 12.5
        return Prediction(
            self.output.first, total, video_s, busy, len(self.run_.work.units()), 0, {"messages": messages}
        )


__all__ = ["CostModel", "Prediction", "simulate_devices", "simulate_ranks"]
