"""A deterministic, window-dependent stand-in denoiser for scheduler tests (elementwise, so batch-invariant)."""

import torch


def toy_problem(num_frames: int, steps: int = 4):
    gen = torch.Generator().manual_seed(num_frames)
    latents = torch.randn(1, num_frames, 2, 3, 3, generator=gen)
    sigmas = torch.linspace(10.0, 0.0, steps + 1)
    timesteps = torch.linspace(1.0, 0.1, steps)
    return latents, sigmas, timesteps


def toy_denoise(x: torch.Tensor, windows) -> torch.Tensor:
    """v depends on the window's latents, its frame indices and the step (so a swapped or lost window shows)."""
    index = torch.stack([w.index for w in windows]).to(x.dtype)  # [g, T]
    return torch.tanh(x * 0.7 + index[:, :, None, None, None] * 0.01 + windows[0].step * 0.1)


def toy_sample(num_frames: int, config=None, denoise=toy_denoise, steps: int = 4, **kw) -> torch.Tensor:
    """``sample()`` on :func:`toy_problem` with a CPU ``WindowScheduler`` of ``config`` (default settings when
    None); ``kw`` goes to ``sample`` (``on_final_frames``, ``on_window``)."""
    from sonic_rt.sampling import SamplingConfig, sample
    from sonic_rt.scheduler import SchedulerConfig, WindowScheduler

    latents, sigmas, timesteps = toy_problem(num_frames, steps)
    scheduler = WindowScheduler(config or SchedulerConfig(), "cpu")
    try:
        return sample(latents, sigmas, timesteps, SamplingConfig(steps=steps), denoise, scheduler=scheduler, **kw)
    finally:
        scheduler.close()
