"""Sonic's sampler: Euler (Karras sigmas, v-prediction), 3-way CFG and time-aware position shift fusion.

Everything here is the algorithm of official ``SonicPipeline.__call__`` (docs/official_algorithm.md sections 3-5).
:func:`sample` owns the math (which windows run at each step, the Euler step, the per-frame averaging); the
model call is the ``denoise`` callable it is given (guided v-prediction for a group of windows), and how the
windows are grouped and executed (order, batches, lanes, devices, ranks) is its ``scheduler``'s job
(:class:`sonic_rt.scheduler.WindowScheduler`), which never changes the result.

The loop is described as (step, window) :class:`Unit` s with their dependencies (:class:`ShiftFusionWork`: a
window of step s+1 needs the step-s windows that hold any of its frames, circular wrap included), and every unit
runs once its inputs are final, in one of two priority orders (:class:`ShiftFusionRun`):

- **wavefront**: the units the earliest output frames need first, so the first frames are final after a cone of
  about 50 windows per step back, whatever the video's length (:meth:`ShiftFusionWork.plan`);
- **steps**: every window of step 0, then every window of step 1, ... (the official order).

Any valid order gives the same latents bit for bit on the CPU in fp32 (:class:`FrameLatents`): each unit's
arithmetic is unchanged, and a frame's mean over the windows holding it is accumulated from zero, with at most two
windows per frame when N >= T, so the order of the two additions does not matter. Per frame, the loop keeps its
latents at its current step and the sum being built for the next one: two latent tensors in all, as the official
step order keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from .pipeline.options import AnimateOptions

if TYPE_CHECKING:
    from .scheduler import WindowScheduler


@dataclass(frozen=True)
class SamplingConfig:
    """The sampler's settings; defaults are official ``config/inference/sonic.yaml`` values.

    ``steps``, ``frames_per_window`` and ``shift_offset`` are user options: their defaults are those of
    :class:`~sonic_rt.pipeline.options.AnimateOptions` (one home), and ``Runtime.animate`` builds this object
    from the options. The rest are model constants.

    Attributes:
        steps: ``num_inference_steps`` (25).
        frames_per_window: ``n_sample_frames`` = window length T (25 frames at 12.5 fps).
        shift_offset: alpha, frames the window starts move per step (7).
        image_guidance_scale: g1 = ``min/max_appearance_guidance_scale`` (2.0).
        audio_guidance_scale: g2 = ``audio_guidance_scale`` (7.5).
        fps: UNet fps conditioning, first ``added_time_id`` (12.5; not decremented).

    Raises:
        ValueError: ``steps`` or ``frames_per_window`` < 1, or ``shift_offset`` < 0.
    """

    steps: int = AnimateOptions.steps
    frames_per_window: int = AnimateOptions.frames_per_window
    shift_offset: int = AnimateOptions.shift_offset
    image_guidance_scale: float = 2.0
    audio_guidance_scale: float = 7.5
    fps: float = 12.5

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.frames_per_window < 1:
            raise ValueError(f"frames_per_window must be >= 1, got {self.frames_per_window}")
        if self.shift_offset < 0:
            raise ValueError(f"shift_offset must be >= 0, got {self.shift_offset}")


def karras_schedule(noise_schedule_config: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas and UNet timesteps of the SVD-xt ``EulerDiscreteScheduler`` for ``steps`` steps.

    Uses diffusers' own scheduler on ``noise_schedule_config``, the official ``scheduler_config.json``
    (Karras, rho 7, sigma_min 0.002, sigma_max 700, continuous timesteps ``0.25 * ln(sigma)``).

    Returns:
        sigmas [steps + 1] float32 (last is 0), timesteps [steps] float32.
    """
    from diffusers import EulerDiscreteScheduler

    noise_scheduler = EulerDiscreteScheduler.from_config(noise_schedule_config)
    noise_scheduler.set_timesteps(steps, device="cpu")
    return noise_scheduler.sigmas.to(torch.float32), noise_scheduler.timesteps.to(torch.float32)


def window_starts(num_frames: int, frames_per_window: int, step: int, shift_offset: int) -> list[int]:
    """Window start frames at denoising step ``step``: ``range(0, N, T)`` shifted by ``-step * alpha``.

    The shift is not reduced modulo T (official behaviour); indices wrap modulo N in :func:`window_indices`.
    """
    return [start - step * shift_offset for start in range(0, num_frames, frames_per_window)]


def window_indices(num_frames: int, frames_per_window: int, step: int, shift_offset: int) -> list[list[int]]:
    """Frame indices of every window at ``step``: ``[(s + k) mod N for k in range(T)]`` per start s.

    With N not a multiple of T the last window wraps past the end to the start; with N < T a window holds
    repeated frames. A frame that appears twice in one window is counted twice when averaging.
    """
    return [
        [(s + k) % num_frames for k in range(frames_per_window)]
        for s in window_starts(num_frames, frames_per_window, step, shift_offset)
    ]


def step_window_indices(
    num_frames: int, frames_per_window: int, step: int, shift_offset: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """:func:`window_indices` as one int64 tensor ``[windows, T]`` computed on ``device`` by device kernels
    (``arange`` and ``remainder``, which is Python's modulo for the negative shifted starts), without a
    host-to-device copy. Row j is window j; the values equal :func:`window_indices`."""
    starts = torch.arange(0, num_frames, frames_per_window, device=device) - step * shift_offset  # [W]
    offsets = torch.arange(frames_per_window, device=device)  # [T]
    return torch.remainder(starts[:, None] + offsets[None, :], num_frames)


def frame_counts(step_index: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
    """How many times each frame appears in the windows of one step (a frame repeated in a window, N < T, counts
    each time): ``[1, N, 1, 1, 1]`` in ``dtype`` on ``step_index``'s device, the divisor of the step's per-frame
    mean. ``step_index``: the step's ``[W, T]`` rows (:func:`step_window_indices`), added in window order."""
    count = torch.zeros(1, num_frames, 1, 1, 1, dtype=dtype, device=step_index.device)
    for row in step_index:
        count.index_add_(1, row, count.new_ones(1, len(row), 1, 1, 1))
    return count


def euler_v_step(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of a v-prediction model, operation for operation as diffusers
    ``EulerDiscreteScheduler.step`` computes it (no churn, so ``sigma_hat == sigma``).

    ``x`` is upcast to fp32; ``x0 = v * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)`` (the product with
    ``v`` stays in ``v``'s dtype, as diffusers' does); ``x_next = x + (x - x0) / sigma * (sigma_next - sigma)``.

    Args:
        v: model output [..] (fp32, fp16 or bf16); x: latents of the same shape.
        sigma, sigma_next: the step's sigmas as 0-dim float32 tensors (diffusers keeps them as fp32 tensors, and
            the coefficients are computed in fp32, not in Python's float64).

    Returns:
        ``x_next`` in ``v.dtype``.
    """
    x = x.to(torch.float32)
    x0 = v * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    derivative = (x - x0) / sigma
    dt = sigma_next - sigma
    return (x + derivative * dt).to(v.dtype)


def combine_guidance(v: torch.Tensor, image_scale: float, audio_scale: float) -> torch.Tensor:
    """3-way classifier-free guidance over batch rows [uncond, drop_audio, cond]:
    ``u + g1 * (d - u) + g2 * (c - d)``. ``v`` [3, ...] -> [1, ...]."""
    u, d, c = v.chunk(3)
    return u + image_scale * (d - u) + audio_scale * (c - d)


@dataclass(frozen=True)
class Window:
    """One window of one step, as handed to ``denoise`` (in a list) and ``on_window``.

    Attributes:
        step: denoising step index i.
        index: frame indices [T] (int64 on the latents' device: a row of :func:`step_window_indices`).
        timestep: 0-dim float32 UNet timestep on the latents' device.
        sigma, sigma_next: the step's (sigma_i, sigma_{i+1}), 0-dim float32 CPU tensors (diffusers computes the
            step's coefficients from fp32 tensors; a 0-dim CPU tensor combines with device tensors without a copy).
    """

    step: int
    index: torch.Tensor
    timestep: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor


@dataclass(frozen=True, order=True)
class Unit:
    """One window of one step: the unit of work of the wavefront order.

    Attributes:
        step: denoising step index s (0..steps-1).
        position: the window's place j in its step (0..W-1, ``W = ceil(N / T)``), as in :func:`window_starts`.
    """

    step: int
    position: int


class ShiftFusionWork:
    """The whole shift-fusion loop as (step, window) units with their dependencies (time-aware position shift
    fusion, paper section 3.4; official ``SonicPipeline.__call__``).

    Unit (s, j) reads the step-s latents of frames ``window_indices(N, T, s, alpha)[j]`` and adds its stepped copy
    of them to their step-(s+1) sums. A frame's step-(s+1) latents are final once every step-s window that holds it
    is done (:meth:`owners`), so unit (s+1, j) depends on the step-s windows holding any of its frames
    (:meth:`dependencies`): one to three windows when ``shift_offset`` < T, the wrap-around included.

    Args:
        num_frames: N, frames at 12.5 fps; steps: denoising steps; frames_per_window: T; shift_offset: alpha.

    Attributes:
        num_frames, steps, frames_per_window: N, the steps, T.
        windows: W, windows per step.
        indices: ``indices[s][j]``: the frames of unit (s, j) (a list of T ints, a frame repeated when N < T).
    """

    def __init__(self, num_frames: int, steps: int, frames_per_window: int, shift_offset: int):
        self.num_frames, self.steps, self.frames_per_window = num_frames, steps, frames_per_window
        self.indices = [window_indices(num_frames, frames_per_window, s, shift_offset) for s in range(steps)]
        self.windows = len(self.indices[0])
        # owners[s][f]: the positions of the step-s windows holding frame f, ascending (one or two; one when N < T)
        self._owners: list[list[tuple[int, ...]]] = []
        for rows in self.indices:
            holders: list[list[int]] = [[] for _ in range(num_frames)]
            for j, row in enumerate(rows):
                for f in dict.fromkeys(row):
                    holders[f].append(j)
            self._owners.append([tuple(h) for h in holders])

    def units(self) -> list[Unit]:
        """Every unit, step by step (the official order)."""
        return [Unit(s, j) for s in range(self.steps) for j in range(self.windows)]

    def frames(self, unit: Unit) -> list[int]:
        """The frames unit ``unit`` reads and writes ([T] ints, in window order)."""
        return self.indices[unit.step][unit.position]

    def owners(self, step: int, frame: int) -> tuple[int, ...]:
        """Positions of the step-``step`` windows that hold ``frame``."""
        return self._owners[step][frame]

    def dependencies(self, unit: Unit) -> list[Unit]:
        """The step-(s-1) units whose results unit (s, j) reads (none at step 0), ascending."""
        if unit.step == 0:
            return []
        prev = unit.step - 1
        return [Unit(prev, j) for j in sorted({j for f in self.frames(unit) for j in self._owners[prev][f]})]

    def frame_groups(self, unit: Unit) -> list[tuple[tuple[int, ...], list[int]]]:
        """The frames of ``unit`` grouped by the set of step-s windows holding them: ``[(owners, frames)]``. A group
        becomes final (its step-(s+1) latents complete) when the last of its owners is done."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for f in dict.fromkeys(self.frames(unit)):
            groups.setdefault(self._owners[unit.step][f], []).append(f)
        return list(groups.items())

    def output_key(self, unit: Unit) -> int:
        """The first output frame a last-step unit finalises (its smallest frame)."""
        return min(self.frames(unit))

    def plan(self) -> list[Unit]:
        """Every unit in wavefront priority order: the last-step units in the order of the output frames they
        finalise (:meth:`output_key`), each preceded by whatever of its dependency cone is not planned yet
        (depth first, dependencies in window order). Running the units in this order is valid (each after its
        dependencies), and the first output frames are final after their cone alone: two or three windows at the
        last step and about two more per step back (alpha < T), some 650 units at the official 25 steps whatever N
        is (:meth:`cone_size`)."""
        planned: set[Unit] = set()
        order: list[Unit] = []

        def visit(unit: Unit) -> None:
            if unit in planned:
                return
            for dep in self.dependencies(unit):
                visit(dep)
            planned.add(unit)
            order.append(unit)

        last = self.steps - 1
        for unit in sorted((Unit(last, j) for j in range(self.windows)), key=lambda u: (self.output_key(u), u)):
            visit(unit)
        return order

    def cone_size(self, frames: Sequence[int]) -> int:
        """Units needed before ``frames`` are final: the last-step windows holding them and all their dependencies."""
        last = self.steps - 1
        todo = [Unit(last, j) for j in sorted({j for f in frames for j in self._owners[last][f]})]
        seen: set[Unit] = set()
        while todo:
            unit = todo.pop()
            if unit not in seen:
                seen.add(unit)
                todo.extend(self.dependencies(unit))
        return len(seen)


class FrameLatents:
    """The latents of the shift-fusion loop frame by frame, correct whatever order the units finish in.

    Per held frame f: ``x[f]``, its latents at the step it has reached (final there), and ``acc[f]``, the sum of its
    stepped copies being built for the next step. When the last step-s window holding f has added its copy, f's
    step-(s+1) latents are ``acc[f] / count_s[f]`` (:func:`frame_counts`) and its sum restarts from zero: the
    official per-step mean, bit for bit on the CPU in fp32 in any order of the units, because a frame is held by at
    most two windows of a step when N >= T (the windows tile the circle, overlapping only where the last one wraps),
    a sum of two from zero does not depend on their order, and with N < T one window holds every frame. Two latent
    tensors of the held frames in all, as the step order keeps.

    One process holds every frame. A torchrun rank (:mod:`sonic_rt.ranks`) holds the frames it owns plus the edges
    its units read: it adds the copies of the frames it owns (its own units' and those its neighbours send,
    :meth:`add`) and receives the edges' latents from their owners (:meth:`write`).

    Every index is built on the latents' device once, here (no host-to-device copy, so no host sync, in the loop).

    Args:
        work: the loop's units.
        latents: ``[1, n, C, h, w]`` initial latents of the held frames, in ``frames`` order, working dtype.
        counts: ``counts[s]``: ``[1, N, 1, 1, 1]``, how often each frame appears in the step-s windows.
        frames: the held frames, ascending (None: all N).
        owned: the frames whose sums are built here (None: every held frame).
        runs: the units run here, whose inputs :meth:`read` gathers (None: all).
    """

    def __init__(
        self,
        work: ShiftFusionWork,
        latents: torch.Tensor,
        counts: list[torch.Tensor],
        frames: Sequence[int] | None = None,
        owned: Iterable[int] | None = None,
        runs: Iterable[Unit] | None = None,
    ):
        self.work, self.counts = work, counts
        self.frames = list(range(work.num_frames)) if frames is None else sorted(frames)
        self._local = {f: i for i, f in enumerate(self.frames)}
        owned = set(self.frames) if owned is None else set(owned)
        self.x, self.acc = latents.clone(), torch.zeros_like(latents)
        self.contributed: set[Unit] = set()
        flat: list[int] = []  # every index list, copied to the device as one tensor

        def span(values: Iterable[int]) -> slice:
            start = len(flat)
            flat.extend(values)
            return slice(start, len(flat))

        reads = {u: span(self._local[f] for f in work.frames(u)) for u in (work.units() if runs is None else runs)}
        adds, groups = {}, {}
        for u in work.units():
            frames_u = work.frames(u)
            mine = [p for p, f in enumerate(frames_u) if f in owned]
            if not mine:
                continue
            positions = None if len(mine) == len(frames_u) else span(mine)
            adds[u] = (positions, span(self._local[frames_u[p]] for p in mine))
            groups[u] = []
            for owners, group in work.frame_groups(u):
                group = sorted(f for f in group if f in owned)
                if group:
                    holders = tuple(Unit(u.step, j) for j in owners)
                    groups[u].append((holders, span(self._local[f] for f in group), span(group), group))
        self._flat_cpu = torch.tensor(flat, dtype=torch.long)  # kept alive: the copy below may still read it
        device_flat = self._flat_cpu.to(latents.device, non_blocking=True)
        self._reads = {u: device_flat[s] for u, s in reads.items()}
        self._adds = {u: (None if p is None else device_flat[p], device_flat[i]) for u, (p, i) in adds.items()}
        self._groups = {
            u: [(holders, device_flat[li], device_flat[gi], group) for holders, li, gi, group in g]
            for u, g in groups.items()
        }

    def read(self, unit: Unit) -> torch.Tensor:
        """The latents of ``unit``'s frames at its step: ``[1, T, C, h, w]`` (final: call only once it is ready)."""
        return self.x.index_select(1, self._reads[unit])

    def owned_part(self, unit: Unit, stepped: torch.Tensor) -> torch.Tensor:
        """The rows of ``unit``'s stepped copy ``[1, T, C, h, w]`` whose frames are owned here (all on one process)."""
        positions = self._adds[unit][0]
        return stepped if positions is None else stepped.index_select(1, positions)

    def add(self, unit: Unit, rows: torch.Tensor) -> list[tuple[int, list[int]]]:
        """Add ``unit``'s stepped copy of the frames owned here (``rows`` = :meth:`owned_part`) to their next-step
        sums, and finalise every frame whose last holder this was.

        Returns:
            ``[(s + 1, frames)]``: the frames (ascending) whose step-(s+1) latents just became final.
        """
        self.acc.index_add_(1, self._adds[unit][1], rows)
        self.contributed.add(unit)
        finalised = []
        for holders, local, frames_index, frames in self._groups[unit]:
            if all(h in self.contributed for h in holders):
                count = self.counts[unit.step].index_select(1, frames_index)
                self.x.index_copy_(1, local, self.acc.index_select(1, local) / count)
                self.acc.index_fill_(1, local, 0)
                finalised.append((unit.step + 1, frames))
        return finalised

    def index(self, frames: Sequence[int]) -> torch.Tensor:
        """The positions of held ``frames`` in :attr:`x`, as a device tensor (built once per message by a rank)."""
        return torch.tensor([self._local[f] for f in frames], dtype=torch.long).to(self.x.device)

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Set the latents of the frames at ``index`` (:meth:`index`) to ``values`` ``[1, k, C, h, w]``, final at
        their step (an edge frame's latents received from its owner)."""
        self.x.index_copy_(1, index, values)

    def values(self, index: torch.Tensor) -> torch.Tensor:
        """The latents of the frames at ``index``: ``[1, k, C, h, w]``."""
        return self.x.index_select(1, index)


@dataclass
class ShiftFusionRun:
    """One run of the loop as the scheduler executes it (:meth:`sonic_rt.scheduler.WindowScheduler.run`): what the
    units are, the order they should go in, and the math of a group of units. Where and when each runs is the
    scheduler's choice; this never learns about devices or ranks.

    Attributes:
        work: the units and their dependencies; plan: every unit in priority order (:meth:`ShiftFusionWork.plan` for
            the wavefront, :meth:`ShiftFusionWork.units` for the step order); windows: each unit's
            :class:`Window`; counts: ``counts[s]`` [1, N, 1, 1, 1]; latents: the initial ``[1, N, C, h, w]`` (None
            once a torchrun rank has kept its own frames); shape, dtype, device: theirs;
        denoise: the guided v-prediction (``denoise(x, windows) -> v``, or a placeable denoiser, see the scheduler).
    """

    work: ShiftFusionWork
    plan: list[Unit]
    windows: dict[Unit, Window]
    counts: list[torch.Tensor]
    latents: torch.Tensor | None
    denoise: Callable[[torch.Tensor, list[Window]], torch.Tensor]

    def __post_init__(self):
        self.shape, self.dtype, self.device = tuple(self.latents.shape), self.latents.dtype, self.latents.device

    @property
    def steps(self) -> int:
        return self.work.steps

    def latents_of(
        self,
        frames: Sequence[int] | None = None,
        owned: Iterable[int] | None = None,
        runs: Iterable[Unit] | None = None,
    ) -> FrameLatents:
        """The :class:`FrameLatents` of ``frames`` (None: all), starting from the initial latents."""
        held = self.latents if frames is None else self.latents[:, sorted(frames)]
        return FrameLatents(self.work, held, self.counts, frames, owned, runs)

    def step(
        self,
        state: FrameLatents,
        group: list[Unit],
        denoise: Callable[[torch.Tensor, list[Window]], torch.Tensor],
    ) -> torch.Tensor:
        """The stepped copies of ``group`` (units of one step, all ready): their latents, ``denoise`` (the guided v
        wherever the scheduler runs it), one Euler step. Returns ``[g, T, C, h, w]`` in the latents' dtype."""
        ws = [self.windows[u] for u in group]
        xs = torch.cat([state.read(u) for u in group])  # [g, T, C, h, w]
        return euler_v_step(denoise(xs, ws), xs, ws[0].sigma, ws[0].sigma_next).to(xs.dtype)


def sample(
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    config: SamplingConfig,
    denoise: Callable[[torch.Tensor, list[Window]], torch.Tensor],
    on_window: Callable[[Window], None] | None = None,
    scheduler: WindowScheduler | None = None,
    on_final_frames: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Shift-fusion denoising loop over the whole video.

    Args:
        latents: [1, N, C, h, w] initial latents (reference latents + sigma_max * noise).
        sigmas: [steps + 1]; timesteps: [steps].
        denoise: ``denoise(x, windows) -> v``: the guided v-prediction [g, T, C, h, w] (CFG already combined)
            for the latents ``x`` [g, T, C, h, w] of g windows (``latents[0, window.index]`` stacked). The
            runtime's :class:`~sonic_rt.pipeline.guidance.GuidedDenoiser` can also run on each of the scheduler's
            devices and by guidance rows.
        on_window: called after each window (progress).
        scheduler: how the units are executed: the order (the wavefront, or step by step: see the module
            docstring), batching, lanes, devices, ranks; default one device, one window per call. It never changes
            which windows run or how they are averaged.
        on_final_frames: called as frames become final with ``(latents, ready)``: ``latents`` [1, N, C, h, w]
            holds final values where ``ready`` [N] (bool, CPU) is True. Lets the caller decode finished frames
            while other windows still run (under torchrun on rank 0, which gathers the final frames).

    Returns:
        [1, N, C, h, w]: after every step each frame is the mean of its stepped copies over the windows
        that hold it (``acc / count``), in the latents' dtype. Under torchrun: on rank 0 (the other ranks return
        None).
    """
    from .scheduler import WindowScheduler

    scheduler = scheduler or WindowScheduler(device=latents.device)
    run = make_run(latents, sigmas, timesteps, config, denoise, scheduler.config.order)
    del latents  # the run holds them (a torchrun rank lets go of the other ranks' frames)
    return scheduler.run(run, on_window, on_final_frames)


def make_run(
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    config: SamplingConfig,
    denoise: Callable[[torch.Tensor, list[Window]], torch.Tensor] | None,
    order: str = "wavefront",
) -> ShiftFusionRun:
    """The :class:`ShiftFusionRun` of :func:`sample` (its arguments; ``order``: ``"wavefront"`` or ``"steps"``). Every
    index is built on the latents' device here, once (no host-to-device copy, so no host sync, in the loop)."""
    num_frames, device, steps = latents.shape[1], latents.device, len(timesteps)
    work = ShiftFusionWork(num_frames, steps, config.frames_per_window, config.shift_offset)
    device_timesteps = timesteps.to(device, non_blocking=True)
    step_index = [
        step_window_indices(num_frames, config.frames_per_window, s, config.shift_offset, device) for s in range(steps)
    ]
    windows = {
        u: Window(u.step, step_index[u.step][u.position], device_timesteps[u.step], sigmas[u.step], sigmas[u.step + 1])
        for u in work.units()
    }
    counts = [frame_counts(index, num_frames, latents.dtype) for index in step_index]
    plan = work.plan() if order == "wavefront" else work.units()
    return ShiftFusionRun(work, plan, windows, counts, latents, denoise)


def scale_model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """diffusers ``EulerDiscreteScheduler.scale_model_input``: ``x / (sigma^2 + 1) ** 0.5`` with ``sigma`` a
    0-dim float32 tensor (the divisor is computed in fp32; the result keeps ``x``'s dtype)."""
    return x / ((sigma**2 + 1) ** 0.5)


def initial_noise(
    seed: int, image_shape: tuple[int, ...], latent_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The initial noise of a seeded run, drawn exactly as the official pipeline draws it.

    The official code seeds the global generator (``seed_everything(seed)``), then draws
    ``randn(image_shape)`` for the conditioning-image noise augmentation (multiplied by
    ``noise_aug_strength`` = 0, but drawn) and then ``randn(latent_shape)`` for the latents, both in the working
    dtype on the working device (docs/official_algorithm.md, RNG draw order). A private generator seeded
    the same way gives the same stream without touching global state.

    Args:
        seed: the seed (official default 72589).
        image_shape: ``[1, 3, H, W]`` of the reference image in pixels.
        latent_shape: ``[1, N, 4, H/8, W/8]``.
        device, dtype: the working device and dtype (the noise differs between CPU and CUDA, and between fp32
            and fp16, as the official noise does).

    Returns:
        ``[1, N, 4, H/8, W/8]`` noise in ``dtype`` on ``device``.
    """
    generator = torch.Generator(device).manual_seed(int(seed))
    torch.randn(image_shape, generator=generator, device=device, dtype=dtype)  # noise augmentation draw
    return torch.randn(latent_shape, generator=generator, device=device, dtype=dtype)
