"""Window scheduler: in what order, and how, the shift-fusion windows are executed.

The sampler (:func:`sonic_rt.sampling.sample`) owns the algorithm: which windows a step has, the Euler step
and the per-frame average. This module owns order and concurrency only.

**Order** (:attr:`SchedulerConfig.order`): ``"wavefront"`` (the default) runs (step, window) units as soon as
their inputs are final, in the sampler's priority order (the earliest output frames first), so the first
frames are written after a fixed amount of work whatever the video's length (:meth:`WindowScheduler.run_units`:
ready units of one step are batched into UNet calls of up to ``windows_per_call`` windows and spread over the
lanes). ``"steps"`` runs every window of a step before the next step. Under ``torchrun`` (several ranks) the
order is always ``"steps"``: the ranks shard each step's windows and all-reduce once per step, which a
wavefront would turn into many small exchanges.

For one step in step order it

1. groups the windows into UNet calls of up to ``windows_per_call`` windows (batch = 3 x windows),
2. shards the groups over the ranks of a ``torch.distributed`` job (group j runs on rank j mod world),
3. runs this rank's groups over ``lanes`` parallel lanes: worker threads on CPU (ONNX Runtime sessions and
   torch ops release the GIL), one CUDA stream per lane on GPU, joined with events, so nothing waits on the
   host inside the step,
4. hands the results back **in window order**, and all-reduces the accumulated latents once per step when
   there are several ranks.

Because results are accumulated in window order, and a frame belongs to at most two windows (the wrap-around
window; a sum of two fp32 values does not depend on the order), the latents do not depend on the number of
lanes or ranks: bit for bit on CPU in fp32. Batching several windows into one call changes the shapes the
kernels see; the torch backend's UNet on CPU uses batch-invariant linear layers
(:mod:`sonic_rt.models.batch_invariant`), so batched windows are bit-identical as well.

A failure in any lane or rank is raised to the caller (the other lanes finish or are cancelled first); no
partial result is used.
"""

from __future__ import annotations

import heapq
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from .errors import InputError
from .pipeline.options import SCHEDULER_ORDERS

ORDERS = SCHEDULER_ORDERS


@dataclass(frozen=True)
class SchedulerConfig:
    """How windows are executed (does not change the algorithm).

    Attributes:
        windows_per_call: windows batched into one UNet call (UNet batch = 3 x this).
        lanes: parallel lanes: worker threads on CPU, CUDA streams on GPU.
        order: ``"wavefront"`` (units as soon as their inputs are final, earliest output first) or ``"steps"``
            (step by step, the official order); same latents either way. Ranks always run ``"steps"``.
    """

    windows_per_call: int = 1
    lanes: int = 1
    order: str = SCHEDULER_ORDERS[0]

    def __post_init__(self):
        if self.windows_per_call < 1 or self.lanes < 1:
            raise InputError(f"windows_per_call and lanes must be >= 1, got {self.windows_per_call}, {self.lanes}")
        if self.order not in ORDERS:
            raise InputError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torch.distributed`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        """Join the job ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else a single process.

        Initialises the default process group once: NCCL on CUDA, gloo on CPU.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (no-op for one process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def shutdown(self) -> None:
        """Leave the job cleanly (barrier, then destroy the process group); call once at the end."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    def broadcast_error(self, failed: bool) -> bool:
        """True when any rank failed this step (every rank must agree before the collective)."""
        if not self.enabled:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([1.0 if failed else 0.0])
        dist.all_reduce(flag)
        return bool(flag.item())


class RankFailed(RuntimeError):
    """Another rank of the distributed job failed during a step."""


class WindowScheduler:
    """Runs the windows of one step in groups over lanes and ranks; see the module docstring.

    Args:
        config: batching and lanes.
        device: where the work runs (CUDA: one stream per lane; CPU: one thread per lane).
        distributed: the rank/world of a ``torch.distributed`` job (default: single process).
    """

    def __init__(
        self,
        config: SchedulerConfig = SchedulerConfig(),
        device: torch.device | str = "cpu",
        distributed: Distributed = Distributed(),
    ):
        self.config, self.device, self.distributed = config, torch.device(device), distributed
        self._pool = ThreadPoolExecutor(config.lanes, thread_name_prefix="sonic-lane") if config.lanes > 1 else None
        self._streams = (
            [torch.cuda.Stream(self.device) for _ in range(config.lanes)]
            if self.device.type == "cuda" and config.lanes > 1
            else None
        )
        self._local = threading.local()

    @property
    def runs_wavefront(self) -> bool:
        """Whether :func:`~sonic_rt.sampling.sample` runs in wavefront order: asked for, and a single process."""
        return self.config.order == "wavefront" and not self.distributed.enabled

    def run_units(
        self,
        plan: Sequence[Hashable],
        dependencies: Callable[[Any], Sequence[Hashable]],
        batch_key: Callable[[Any], Hashable],
        run_group: Callable[[list], torch.Tensor],
        on_done: Callable[[list, torch.Tensor], None],
    ) -> None:
        """Run every unit of ``plan`` once, each after all of its ``dependencies``; the wavefront order.

        Among the ready units the one earliest in ``plan`` goes first; up to ``windows_per_call - 1`` more ready
        units with the same ``batch_key`` (the same step: one UNet call has one timestep) join its group, earliest
        first. Up to ``lanes`` groups run at once (``run_group(units) -> result``: worker threads on CPU, one CUDA
        stream per lane on GPU, joined on the main stream with an event); ``on_done(units, result)`` runs on the
        calling thread, one group at a time, and may make more units ready. The first failure is raised after the
        running groups finish; no later group starts.

        Args:
            plan: every unit, in priority order (a valid order: each unit after its dependencies).
            dependencies: ``dependencies(unit)``: the units it waits for (all in ``plan``).
            batch_key: units with equal keys may share a call.
            run_group, on_done: as above.
        """
        priority = {u: i for i, u in enumerate(plan)}
        waiting = {u: len(dependencies(u)) for u in plan}
        dependents: dict[Hashable, list] = {u: [] for u in plan}
        for u in plan:
            for d in dependencies(u):
                dependents[d].append(u)
        ready: dict[Hashable, list[int]] = {}  # batch key -> heap of plan positions

        def make_ready(u) -> None:
            heapq.heappush(ready.setdefault(batch_key(u), []), priority[u])

        def next_group() -> list | None:
            heaps = [h for h in ready.values() if h]
            if not heaps:
                return None
            heap = min(heaps, key=lambda h: h[0])
            return [plan[heapq.heappop(heap)] for _ in range(min(self.config.windows_per_call, len(heap)))]

        def finish(group: list, result: torch.Tensor) -> None:
            on_done(group, result)
            for u in group:
                for d in dependents[u]:
                    waiting[d] -= 1
                    if waiting[d] == 0:
                        make_ready(d)

        for u in plan:
            if waiting[u] == 0:
                make_ready(u)
        if self._pool is None:
            while (group := next_group()) is not None:
                finish(group, run_group(group))
        else:
            self._run_units_on_lanes(next_group, run_group, finish)
        if any(waiting.values()):
            raise RuntimeError("run_units: some units never became ready (their dependencies are not in the plan)")

    def _run_units_on_lanes(self, next_group, run_group, finish) -> None:
        """The lanes loop of :meth:`run_units`: keep up to ``lanes`` groups running, finish them as they end."""
        main = torch.cuda.current_stream(self.device) if self._streams is not None else None
        free = list(range(self.config.lanes))
        running: dict = {}  # future -> (group, lane)

        def on_lane(lane: int, group: list):
            return (run_group(group), None) if main is None else self._on_stream(lane, main, run_group, group)

        try:
            while True:
                while free and (group := next_group()) is not None:
                    lane = free.pop()
                    running[self._pool.submit(on_lane, lane, group)] = (group, lane)
                if not running:
                    return
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    group, lane = running.pop(future)
                    free.append(lane)
                    out, done = future.result()
                    if done is not None:
                        main.wait_event(done)  # join on the device, not on the host
                        out.record_stream(main)
                    finish(group, out)
        finally:
            _gather_quietly(list(running))

    def _on_stream(self, lane: int, main, run_group, group) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``run_group(group)`` on lane ``lane``'s CUDA stream after the work queued so far on ``main`` (which
        wrote its inputs); returns the result and an event recorded when it is done (the caller joins ``main``
        on it, on the device, not on the host)."""
        stream = self._streams[lane]
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            out = run_group(group)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    def groups(self, num_windows: int) -> list[list[int]]:
        """Window positions per UNet call: consecutive runs of ``windows_per_call``."""
        n = self.config.windows_per_call
        return [list(range(i, min(i + n, num_windows))) for i in range(0, num_windows, n)]

    def my_groups(self, num_windows: int) -> list[list[int]]:
        """The groups this rank runs (group j on rank j mod world)."""
        d = self.distributed
        return [g for j, g in enumerate(self.groups(num_windows)) if j % d.world_size == d.rank]

    def map(
        self, num_windows: int, run_group: Callable[[list[int]], torch.Tensor]
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Run ``run_group(positions) -> stepped latents [g, ...]`` for this rank's groups.

        Returns ``(positions, result)`` in window order. Raises the first failure of any lane (after the
        others have finished), and :class:`RankFailed` on every rank when another rank failed.
        """
        groups = self.my_groups(num_windows)
        results: list[tuple[list[int], torch.Tensor]] = []
        error: BaseException | None = None
        try:
            if self._pool is None:
                results = [(g, run_group(g)) for g in groups]
            else:
                results = self._run_lanes(groups, run_group)
        except BaseException as exc:  # noqa: BLE001 - re-raised below after the ranks agree
            error = exc
        if self.distributed.broadcast_error(error is not None):
            raise error if error is not None else RankFailed("another rank failed during this step")
        return results

    def imap(self, num_windows: int, run_group: Callable[[list[int]], torch.Tensor]):
        """Like :meth:`map` but yields each ``(positions, result)`` as soon as it and every earlier group are
        done (still in window order), so the caller can use finished windows while later ones run. With
        several ranks it yields after the step's groups are done on every rank (failures must be agreed)."""
        if self.distributed.enabled or self._pool is None:
            if self.distributed.enabled:
                yield from self.map(num_windows, run_group)
            else:
                for g in self.my_groups(num_windows):
                    yield g, run_group(g)
            return
        groups = self.my_groups(num_windows)
        if self._streams is not None:
            yield from self._run_lanes(groups, run_group)
            return
        futures = [self._pool.submit(run_group, g) for g in groups]
        try:
            for group, future in zip(groups, futures):
                yield group, future.result()
        finally:
            _gather_quietly(futures)

    def _run_lanes(self, groups: list[list[int]], run_group) -> list[tuple[list[int], torch.Tensor]]:
        if self._streams is None:
            futures = [self._pool.submit(run_group, g) for g in groups]
            outs = _gather(futures)
            return list(zip(groups, outs))
        main = torch.cuda.current_stream(self.device)

        def on_lane(lane: int, group: list[int]) -> tuple[torch.Tensor, torch.cuda.Event]:
            return self._on_stream(lane, main, run_group, group)

        futures = [self._pool.submit(on_lane, j % len(self._streams), g) for j, g in enumerate(groups)]
        outs = _gather(futures)
        results = []
        for group, (out, done) in zip(groups, outs):
            main.wait_event(done)  # join on the device, not on the host
            out.record_stream(main)
            results.append((group, out))
        return results

    def all_reduce_(self, acc: torch.Tensor) -> torch.Tensor:
        """Sum the per-rank accumulators (once per step; a few MB)."""
        return self.distributed.all_reduce_(acc)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _gather(futures: Sequence) -> list:
    """Results of every future in order; waits for all, then raises the first exception."""
    outs, first = [], None
    for future in futures:
        try:
            outs.append(future.result())
        except BaseException as exc:  # noqa: BLE001
            first = first or exc
            outs.append(None)
    if first is not None:
        raise first
    return outs


def _gather_quietly(futures: Sequence) -> None:
    """Wait for every future (lanes never outlive the step that started them); their errors were raised."""
    for future in futures:
        future.cancel()
    for future in futures:
        try:
            future.result()
        except BaseException:  # noqa: BLE001
            pass
