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


class ToyGuidance:
    """A placeable toy denoiser (:class:`sonic_rt.scheduler.Placeable`): three guidance rows, each an elementwise
    function of the window's latents, frames, step and row, combined as Sonic's guidance combines them; it records
    every call as ``(replica, rows, step)`` (rows None for a whole guided call)."""

    guidance_rows = 3

    def __init__(self, replicas: int = 1):
        import threading

        self.replicas, self.calls, self._lock = replicas, [], threading.Lock()

    def _rows(self, x: torch.Tensor, windows, rows) -> torch.Tensor:
        index = torch.stack([w.index for w in windows]).to(x.dtype)[:, :, None, None, None]  # [g, T, 1, 1, 1]
        step = windows[0].step
        return torch.cat([torch.tanh(x * (0.5 + 0.1 * r) + index * 0.01 + step * 0.1 + r * 0.05) for r in rows])

    def _log(self, replica, rows, windows) -> None:
        with self._lock:
            self.calls.append((replica, rows, windows[0].step))

    def partial(self, x, windows, rows, replica):
        self._log(replica, tuple(rows), windows)
        return self._rows(x, windows, rows)

    def combine(self, parts):
        u, d, c = torch.cat(parts).chunk(3)
        return u + 2.0 * (d - u) + 7.5 * (c - d)

    def guided(self, x, windows, replica):
        self._log(replica, None, windows)
        return self.combine([self._rows(x, windows, range(3))])

    def __call__(self, x, windows):
        return self.guided(x, windows, 0)
