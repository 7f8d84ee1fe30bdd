"""Stage timing of one animation: the stage names (:data:`STAGES`) and :class:`StageTimer`.

This module owns the stage names, so the pipeline, the eager baseline (``bench/eager.py``) and the
benchmarks read them from one place without importing the runtime.
"""

from __future__ import annotations

import time

import torch

# Stages of AnimateResult.timings, in pipeline order: input checks + face crop; Whisper; CLIP + VAE encoder;
# audio2token + audio2bucket; the UNet steps; VAE decode; RIFE; mp4 encode; wall time of the whole call.
STAGES = (
    "preprocess",
    "audio_features",
    "image_encode",
    "audio_adapters",
    "denoise",
    "decode",
    "interpolate",
    "encode",
    "total",
)


class StageTimer:
    """Seconds per stage of one animation.

    Args:
        device: the working device. On CUDA a stage is timed by events recorded on the current stream (the
            stream doing the work; window lanes join it before sampling returns), and the end of a stage is
            the only synchronisation added; on CPU by ``time.perf_counter``.
    """

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (a stage may be timed in several pieces, e.g. decode per chunk)."""
        self.times[stage] = self.times.get(stage, 0.0) + seconds

    def ordered(self) -> dict[str, float]:
        """Seconds per stage in :data:`STAGES` order (decode work done during the last step is counted as
        decode), then any other stage in the order it was first timed."""
        return {k: self.times[k] for k in STAGES if k in self.times} | {
            k: v for k, v in self.times.items() if k not in STAGES
        }

    def stage(self, name: str) -> _Stage:
        """A context manager that adds the time spent inside it to stage ``name``."""
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t = time.perf_counter()
        if self.timer.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()

    def __exit__(self, *exc):
        if self.timer.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.timer.add(self.name, self.start.elapsed_time(end) / 1000.0)
        else:
            self.timer.add(self.name, time.perf_counter() - self.t)


__all__ = ["STAGES", "StageTimer"]
