"""The wavefront across ``torchrun`` ranks: frames owned in contiguous ranges, edges exchanged point to point.

Rank r of R owns the frames ``[r N / R, (r + 1) N / R)`` and runs every unit (step, window) whose middle frame it
owns, in the run's priority order (:attr:`sonic_rt.sampling.ShiftFusionRun.plan`) as soon as its inputs are final,
with the lanes, devices and batching of its own :class:`~sonic_rt.scheduler.WindowScheduler`. It holds the
latents of its frames plus the edges its units read (:class:`~sonic_rt.sampling.FrameLatents`), never the whole
video's. Three kinds of message, all point to point and only about frames at the edges of a range:

- **contribution**: a unit whose window reaches into a neighbour's range sends the stepped copy of those frames to
  their owner, which adds it to their sums;
- **edge**: when the owner finalises frames a neighbour's next-step units read, it sends their latents;
- **output**: the final latents of each rank's frames go to rank 0, which decodes and writes the video in order.

A frame's sums are built by its owner alone, so every frame's latents are the one-process values bit for bit
(:class:`~sonic_rt.sampling.FrameLatents`). Instead of one all-reduce of the whole video per step, a step moves
~3 messages per range edge; and no rank waits for a step to end everywhere, so the first frames come after the
wavefront's cone of work, as on one process.

Every rank derives the same :class:`RankPlan` (ownership, placement, and each pair's messages in one order: their
order in a sequential run of the plan). Messages from a to b travel on a process group of their own and are sent
in that order (a message waits for the ones before it), and b receives them in that order on a thread of its
own, so the exchange matches on NCCL (which pairs sends and receives by order) as on gloo, and cannot deadlock:
that order follows every dependency. A rank that fails logs it and says so through the job's key-value store (the
first failure wins); the others log it and raise :class:`~sonic_rt.scheduler.RankFailed` with its message within
a second (also where its closed connections reached them first), and no rank exits before every rank has logged
it (at most :data:`ABORT_ACK_S`), so ``torchrun`` stopping the job cannot hide why. A rank that dies silently is
noticed when a receive times out (the process group's timeout, :data:`~sonic_rt.scheduler.RANK_TIMEOUT_S`;
``torchrun`` itself stops the other ranks of a job whose worker died, usually much sooner).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import queue
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

import torch

from .sampling import ShiftFusionRun, ShiftFusionWork, Unit

if TYPE_CHECKING:
    from .scheduler import Distributed, WindowScheduler

logger = logging.getLogger(__name__)
Key = tuple  # ("contribution", step, position) | ("edge", step, frames) | ("output", frames)
ABORT_POLL_S = 0.5  # how often a waiting rank looks for another rank's failure in the store
ABORT_ACK_S = 10.0  # how long a rank that failed, or learnt of a failure, waits for every rank to have said so
MAX_SENDS_IN_FLIGHT = 16  # sends not yet known to have left (gloo reports a send done only when waited on)


class RankPlan:
    """Who owns which frames, who runs which unit, and every message of one run (the same on every rank).

    Args:
        work: the units; plan: every unit in priority order (the run's); world: the number of ranks R.

    Attributes:
        starts: ``starts[r]``: rank r's first frame (``starts[R] = N``); rank r owns ``[starts[r], starts[r+1])``.
        home: ``home[f]``: the rank owning frame f.
        runner: ``runner[unit]``: the rank running it (the owner of its middle frame).
        sends, receives: ``sends[(a, b)]``: the keys a sends b, in order; ``receives[(a, b)]``: ``(key, rows)``
            in the same order (rows: frames in the message).
    """

    def __init__(self, work: ShiftFusionWork, plan: list[Unit], world: int):
        n, self.work, self.world, self.steps = work.num_frames, work, world, work.steps
        self.starts = [r * n // world for r in range(world + 1)]
        self.home = [bisect.bisect_right(self.starts, f) - 1 for f in range(n)]
        middle = len(work.frames(Unit(0, 0))) // 2
        self.runner = {u: self.home[work.frames(u)[middle]] for u in work.units()}
        self.sends: dict[tuple[int, int], list[Key]] = {}
        self.receives: dict[tuple[int, int], list[tuple[Key, int]]] = {}
        self._simulate(plan)

    def owned(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank + 1])

    def units_of(self, rank: int, plan: list[Unit]) -> list[Unit]:
        """The units ``rank`` runs, in ``plan``'s order."""
        return [u for u in plan if self.runner[u] == rank]

    def held(self, rank: int, plan: list[Unit]) -> list[int]:
        """The frames ``rank`` keeps latents of: its own and those its units read (the edges), ascending."""
        return sorted(set(self.owned(rank)).union(*(self.work.frames(u) for u in self.units_of(rank, plan))))

    def contributions(self, unit: Unit) -> dict[int, list[int]]:
        """The window positions of ``unit`` whose frames other ranks own, by owner."""
        by_owner: dict[int, list[int]] = {}
        runner = self.runner[unit]
        for p, f in enumerate(self.work.frames(unit)):
            if self.home[f] != runner:
                by_owner.setdefault(self.home[f], []).append(p)
        return by_owner

    def edges(self, step: int, frames: list[int], owner: int) -> dict[int, list[int]]:
        """Of ``frames`` (owned by ``owner``, just final at ``step``), those each other rank's step-``step`` units
        read, by rank."""
        need: dict[int, set[int]] = {}
        if step < self.steps:
            for f in frames:
                for j in self.work.owners(step, f):
                    rank = self.runner[Unit(step, j)]
                    if rank != owner:
                        need.setdefault(rank, set()).add(f)
        return {rank: sorted(fs) for rank, fs in sorted(need.items())}

    def finalised_messages(self, rank: int, step: int, frames: list[int]) -> list[tuple[int, Key, list[int]]]:
        """What ``rank`` sends when its ``frames`` become final at ``step``: ``(to, key, frames)``."""
        if step < self.steps:
            return [(to, ("edge", step, tuple(fs)), fs) for to, fs in self.edges(step, frames, rank).items()]
        return [] if rank == 0 else [(0, ("output", tuple(frames)), frames)]

    def _simulate(self, plan: list[Unit]) -> None:
        """Every message, in the order a sequential run of ``plan`` produces them (a causal order)."""
        contributed: set[Unit] = set()

        def send(a: int, b: int, key: Key, rows: int) -> None:
            self.sends.setdefault((a, b), []).append(key)
            self.receives.setdefault((a, b), []).append((key, rows))

        for u in plan:
            for owner, positions in sorted(self.contributions(u).items()):
                send(self.runner[u], owner, ("contribution", u.step, u.position), len(positions))
            contributed.add(u)
            for owners, frames in self.work.frame_groups(u):
                if all(Unit(u.step, j) in contributed for j in owners):
                    for rank in sorted({self.home[f] for f in frames}):
                        mine = sorted(f for f in frames if self.home[f] == rank)
                        for to, key, fs in self.finalised_messages(rank, u.step + 1, mine):
                            send(rank, to, key, len(fs))


class Outbox:
    """A rank's outgoing messages, each sent once every earlier message to the same rank (in :class:`RankPlan`
    order) has been: ``send(to, tensor, seq)`` is called in that order."""

    def __init__(self, plan: RankPlan, rank: int, send: Callable[[int, torch.Tensor, int], None]):
        self.plan, self.rank, self._send = plan, rank, send
        self.boxes: dict[int, dict[Key, torch.Tensor]] = {}
        self.next_send = {b: 0 for (a, b) in plan.sends if a == rank}

    def post(self, to: int, key: Key, tensor: torch.Tensor) -> None:
        """Queue a message to ``to``; it leaves once every earlier message to ``to`` has."""
        self.boxes.setdefault(to, {})[key] = tensor.contiguous()
        order = self.plan.sends[(self.rank, to)]
        box = self.boxes[to]
        while self.next_send[to] < len(order) and order[self.next_send[to]] in box:
            self._send(to, box.pop(order[self.next_send[to]]), self.next_send[to])
            self.next_send[to] += 1

    def unsent(self) -> bool:
        return any(self.next_send[to] < len(self.plan.sends[(self.rank, to)]) for to in self.next_send)


class _Channels:
    """This rank's point-to-point traffic: one process group per direction, sends in :class:`RankPlan` order
    (:class:`Outbox`), one receiving thread per peer. Received messages come out of :attr:`inbox` as
    ``(key, tensor)``."""

    def __init__(self, plan: RankPlan, distributed: Distributed, shape: tuple[int, ...], dtype, device):
        import torch.distributed as dist

        self.dist, self.plan, self.rank = dist, plan, distributed.rank
        self.groups = _pair_groups(distributed.world_size, distributed.timeout_s)
        self.outbox = Outbox(plan, self.rank, self._isend)
        self.pending: list = []  # (work, tensor) of sends in flight
        self.inbox: queue.Queue = queue.Queue()
        self.expected = sum(len(v) for (a, b), v in plan.receives.items() if b == self.rank)
        self._threads = [
            threading.Thread(
                target=self._receive,
                args=(a, plan.receives[(a, b)], shape, dtype, device),
                name=f"sonic-rank-recv-{a}",
                daemon=True,
            )
            for (a, b) in sorted(plan.receives)
            if b == self.rank
        ]
        for thread in self._threads:
            thread.start()

    def post(self, to: int, key: Key, tensor: torch.Tensor) -> None:
        self.outbox.post(to, key, tensor)

    def unsent(self) -> bool:
        return self.outbox.unsent()

    def _isend(self, to: int, tensor: torch.Tensor, seq: int) -> None:
        work = self.dist.isend(tensor, to, group=self.groups[(self.rank, to)], tag=seq)
        self.pending.append((work, tensor))
        while len(self.pending) > MAX_SENDS_IN_FLIGHT:  # each keeps its tensor alive until it has left
            self.pending.pop(0)[0].wait()

    def finish(self) -> None:
        """Wait until every send has left (raises what a failed send raised)."""
        for work, _ in self.pending:
            work.wait()
        self.pending = []

    def _receive(self, source: int, messages: list[tuple[Key, int]], shape, dtype, device) -> None:
        group = self.groups[(source, self.rank)]
        try:
            for seq, (key, rows) in enumerate(messages):
                buffer = torch.empty((1, rows, *shape), dtype=dtype, device=device)
                self.dist.irecv(buffer, source, group=group, tag=seq).wait()
                if buffer.is_cuda:  # wait() orders the stream, not the host: the message is here once it is done
                    torch.cuda.current_stream(buffer.device).synchronize()
                self.inbox.put((key, buffer))
        except BaseException as exc:  # noqa: BLE001 - handed to the rank's loop, which raises it
            self.inbox.put((("error", source), exc))


_GROUPS: dict[int, dict[tuple[int, int], object]] = {}


def _pair_groups(world: int, timeout_s: float) -> dict[tuple[int, int], object]:
    """One process group per direction (a, b), made once per job (every rank creates them, in the same order)."""
    if world not in _GROUPS:
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        _GROUPS[world] = {
            (a, b): dist.new_group([a, b], timeout=timeout) for a, b in itertools.permutations(range(world), 2)
        }
    return _GROUPS[world]


class RankExecutor:
    """This rank's part of one run (module docstring): its units on its scheduler's workers, its frames' sums, and
    the messages.

    Args:
        scheduler: this rank's scheduler (workers, order, batching); run: the run; distributed: rank and world;
        on_window, on_final_frames: as :func:`sonic_rt.sampling.sample` (the second on rank 0 only).
    """

    _runs = itertools.count()  # every rank runs the same sequence of runs: a run's number names its store keys

    def __init__(
        self,
        scheduler: WindowScheduler,
        run: ShiftFusionRun,
        distributed: Distributed,
        on_window: Callable | None,
        on_final_frames: Callable | None,
    ):
        self.scheduler, self.run, self.distributed = scheduler, run, distributed
        self.rank, self.on_window, self.on_final_frames = distributed.rank, on_window, on_final_frames
        self.plan = RankPlan(run.work, run.plan, distributed.world_size)
        self.units = self.plan.units_of(self.rank, run.plan)
        self.state = run.latents_of(self.plan.held(self.rank, run.plan), self.plan.owned(self.rank), self.units)
        run.latents = None  # the whole video's initial latents: this rank keeps its own frames and edges only
        self.abort_key = f"sonic_rt/run{next(self._runs)}/failed"
        self.final = torch.zeros(run.shape, dtype=run.dtype) if self.rank == 0 else None  # host memory
        self.is_final = torch.zeros(run.work.num_frames, dtype=torch.bool)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self._store, self._last_abort_check = _store(distributed), 0.0

    def execute(self) -> torch.Tensor | None:
        """Run this rank's units and messages to the end. Returns the final latents ``[1, N, C, h, w]`` (host memory)
        on rank 0, None on the others.

        Raises:
            RankFailed: another rank failed, or no message came for the process group's timeout.
        """
        from .scheduler import RankFailed, Readiness

        run = self.run
        self.channels = _Channels(self.plan, self.distributed, run.shape[2:], run.dtype, run.device)
        self.ready = Readiness(self.run.work, self.units)
        self.received = 0
        self._quiet_since = time.monotonic()
        try:
            self.scheduler.execute(
                self.ready,
                lambda group, denoise: self.run.step(self.state, group, denoise),
                self._on_done,
                self.run.denoise,
                poll=self._poll,
            )
            self.channels.finish()
        except Exception as exc:
            failed_elsewhere = None if isinstance(exc, RankFailed) else self._failure_elsewhere()
            if failed_elsewhere is not None:  # a peer's exit surfaced here first (a closed connection): say why
                raise _rank_failed(failed_elsewhere) from exc
            self._say_failed(exc)
            raise
        except BaseException as exc:
            self._say_failed(exc)
            raise
        return self.final

    # --- events -----------------------------------------------------------------------------------------------
    def _on_done(self, group: list[Unit], stepped: torch.Tensor) -> None:
        """This rank's units finished: send the parts other ranks own, add the rest."""
        for k, unit in enumerate(group):
            rows = stepped[k : k + 1]  # [1, T, C, h, w]
            for owner, positions in sorted(self.plan.contributions(unit).items()):
                part = rows[:, positions]
                self.channels.post(owner, ("contribution", unit.step, unit.position), part)
            self._finalised(self.state.add(unit, self.state.owned_part(unit, rows)))
            if self.on_window is not None:
                self.on_window(self.run.windows[unit])
        self._quiet_since = time.monotonic()

    def _finalised(self, finalised: list[tuple[int, list[int]]]) -> None:
        """Frames owned here became final at a step: they make this rank's units ready, go to the neighbours whose
        units read them, and at the last step to the output (rank 0)."""
        for step, frames in finalised:
            if step < self.run.steps:
                self.ready.frames_final(step, frames)
            elif self.rank == 0:
                self._output(frames, self.state.values(self._local(frames)))
            for to, key, fs in self.plan.finalised_messages(self.rank, step, frames):
                self.channels.post(to, key, self.state.values(self._local(fs)))

    def _received(self, key: Key, values: torch.Tensor) -> None:
        kind = key[0]
        if kind == "contribution":
            self._finalised(self.state.add(Unit(key[1], key[2]), values))
        elif kind == "edge":
            frames = list(key[2])
            self.state.write(self._local(frames), values)
            self.ready.frames_final(key[1], frames)
        else:  # output, on rank 0
            self._output(list(key[1]), values)

    def _output(self, frames: list[int], values: torch.Tensor) -> None:
        self.final[:, frames] = values.to(self.final.device)
        self.is_final[frames] = True
        if self.on_final_frames is not None:
            self.on_final_frames(self.final, self.is_final)

    def _local(self, frames: list[int]) -> torch.Tensor:
        key = tuple(frames)
        if key not in self._index:
            self._index[key] = self.state.index(frames)
        return self._index[key]

    # --- waiting ----------------------------------------------------------------------------------------------
    def _poll(self, block: bool) -> bool:
        """Handle the messages that came (waiting for one when ``block``); returns whether more is to come."""
        if self.received == self.channels.expected and not self.channels.unsent():
            return False
        deadline = time.monotonic() + (ABORT_POLL_S if block else 0.0)
        while True:
            try:
                key, value = self.channels.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if key[0] == "error":
                self._check_abort(force=True)
                raise _rank_failed(f"lost rank {key[1]}: {value}")
            self._received(key, value)
            self.received += 1
            self._quiet_since = time.monotonic()
            deadline = time.monotonic()  # take what else is there, then return
        self._check_abort(force=block)
        if block and time.monotonic() - self._quiet_since > self.distributed.timeout_s:
            raise _rank_failed(f"rank {self.rank} heard nothing for {self.distributed.timeout_s:.0f} s")
        return self.received < self.channels.expected or self.channels.unsent()

    def _check_abort(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._store is None or (not force and now - self._last_abort_check < ABORT_POLL_S):
            return
        self._last_abort_check = now
        failed = self._failure_elsewhere()
        if failed is not None:
            raise _rank_failed(failed)

    def _failure_elsewhere(self) -> str | None:
        """Another rank's failure message from the store (logged and acknowledged here), or None."""
        try:
            if self._store is None or not self._store.check([self.abort_key]):
                return None
            message = self._store.get(self.abort_key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store went with the job: nothing more to learn from it
            return None
        logger.error("rank %d stops: %s", self.rank, message)
        self._acknowledge()
        return message

    def _say_failed(self, exc: BaseException) -> None:
        """Tell the other ranks (through the store) that this rank failed, unless it is itself reacting to that."""
        from .scheduler import RankFailed

        if self._store is None or isinstance(exc, RankFailed):
            return
        message = f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
        logger.error("%s", message)
        try:  # the first failure is the one the other ranks report
            self._store.compare_set(self.abort_key, "", message)
        except Exception:  # noqa: BLE001 - the store may be gone with the job; the others then time out
            return
        self._acknowledge()

    def _acknowledge(self) -> None:
        """Say in the store that this rank has logged the failure, and wait (at most :data:`ABORT_ACK_S`) until
        every rank has: under ``torchrun`` the first rank to exit gets the others stopped ~0.1 s later, before
        they could have read the store or said why."""
        try:
            self._store.set(f"{self.abort_key}/seen/{self.rank}", "1")
            seen = [f"{self.abort_key}/seen/{r}" for r in range(self.distributed.world_size)]
            deadline = time.monotonic() + ABORT_ACK_S
            while not self._store.check(seen) and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - the store went with the job: nobody is left to wait for
            pass


def _rank_failed(message: str):
    from .scheduler import RankFailed

    return RankFailed(message)


def _store(distributed: Distributed):
    """A client of the job's key-value store (``MASTER_ADDR:MASTER_PORT``, hosted by torchrun), or None."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not distributed.enabled or not address or not port:
        return None
    import torch.distributed as dist

    try:
        return dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=30))
    except Exception:  # noqa: BLE001 - without a store, failures are noticed by the receive timeout instead
        return None


__all__ = ["RankPlan", "RankExecutor", "Outbox"]
