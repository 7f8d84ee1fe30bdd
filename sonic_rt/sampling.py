"""Sonic's sampler: Euler (Karras sigmas, v-prediction), 3-way CFG and time-aware position shift fusion.

Everything here is the algorithm of official ``SonicPipeline.__call__`` (docs/official_algorithm.md sections 3-5).
:func:`sample` owns the math (which windows run at each step, the Euler step, the per-frame averaging); the
model call is the ``denoise`` callable it is given (guided v-prediction for a group of windows), and how the
windows of a step are grouped and executed (batches, lanes, ranks) is its ``scheduler``'s job
(:class:`sonic_rt.scheduler.WindowScheduler`, sequential by default), which never changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

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


def sample(
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    config: SamplingConfig,
    denoise: Callable[[torch.Tensor, list[Window]], torch.Tensor],
    on_window: Callable[[Window], None] | None = None,
    scheduler: WindowScheduler | None = None,
    on_final_frames: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Shift-fusion denoising loop over the whole video.

    Args:
        latents: [1, N, C, h, w] initial latents (reference latents + sigma_max * noise).
        sigmas: [steps + 1]; timesteps: [steps].
        denoise: ``denoise(x, windows) -> v``: the guided v-prediction [g, T, C, h, w] (CFG already combined)
            for the latents ``x`` [g, T, C, h, w] of g windows (``latents[0, window.index]`` stacked).
        on_window: called after each window (progress).
        scheduler: how the windows of a step are executed (batching, lanes, ranks); default sequential,
            one window per call. It never changes which windows run or how they are averaged.
        on_final_frames: during the last step, called as windows finish with ``(latents, ready)``:
            ``latents`` [1, N, C, h, w] holds final values where ``ready`` [N] (bool) is True. Lets the
            caller decode finished frames while the last windows still run (single process only).

    Returns:
        [1, N, C, h, w]: after every step each frame is the mean of its stepped copies over the windows
        that hold it (``acc / count``), accumulated in window order, in the latents' dtype.
    """
    from .scheduler import WindowScheduler

    scheduler = scheduler or WindowScheduler(device=latents.device)
    num_frames = latents.shape[1]
    device = latents.device
    steps = len(timesteps)
    # Built on the device once per run (one copy of the timesteps, index arithmetic by device kernels), so that
    # no step blocks the host on a host-to-device copy (on CUDA a pageable copy synchronises).
    device_timesteps = timesteps.to(device, non_blocking=True)  # staged before return; no host sync
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        step_index = step_window_indices(num_frames, config.frames_per_window, i, config.shift_offset, device)
        windows = [
            Window(step=i, index=step_index[j], timestep=device_timesteps[i], sigma=sigma, sigma_next=sigma_next)
            for j in range(step_index.shape[0])
        ]
        count = torch.zeros(1, num_frames, 1, 1, 1, dtype=latents.dtype, device=device)
        for window in windows:
            count.index_add_(1, window.index, count.new_ones(1, len(window.index), 1, 1, 1))
        current = latents

        def run_group(positions: list[int]) -> torch.Tensor:
            group = [windows[p] for p in positions]
            x = torch.cat([current[:, w.index] for w in group])  # [g, T, C, h, w]
            return euler_v_step(denoise(x, group), x, sigma, sigma_next).to(current.dtype)

        acc = torch.zeros_like(latents)
        last = i == steps - 1 and on_final_frames is not None and not scheduler.distributed.enabled
        done = torch.zeros_like(count) if last else None
        for positions, stepped in scheduler.imap(len(windows), run_group):
            for k, p in enumerate(positions):
                acc.index_add_(1, windows[p].index, stepped[k : k + 1])
                if last:
                    done.index_add_(1, windows[p].index, count.new_ones(1, len(windows[p].index), 1, 1, 1))
                if on_window is not None:
                    on_window(windows[p])
            if last:
                ready = (done == count).flatten()
                on_final_frames(acc / count, ready)
        latents = scheduler.all_reduce_(acc) / count
    return latents


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
