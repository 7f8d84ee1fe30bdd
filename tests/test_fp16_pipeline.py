"""The fp16 pipeline (the official GPU dtype) end to end on CPU: it runs, and its frames stay close to fp32's.

fp16 matmuls on CPU are ~27x slower than fp32, so this is the smallest real run: the demo checkpoint, 1 s of
real speech (12 generated frames, one window), 2 steps, no interpolation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Max |fp16 - fp32| over every pixel of every frame, in uint8 levels. Measured on this run (2-core x86 CPU,
# torch 2.13): 4 levels, mean 0.25 (3 on a longer demo run); the bound leaves one level for other CPUs' kernels.
# About 150 s on 2 cores, nearly all of it the fp16 run.
FP16_MAX_LEVELS = 5
RUN = dict(steps=2, interpolate=False, progress=False, seed=72589)


@pytest.mark.slow
def test_fp16_pipeline_runs_and_stays_within_levels_of_fp32(demo_dir, runtime, portrait, speech, monkeypatch):
    import sonic_rt
    from sonic_rt.media import load_audio
    from sonic_rt.pipeline import components

    # the numerics of the fp16 path, even where fp16 is slower than fp32 on this CPU (which would run fp32 instead)
    monkeypatch.setattr(components, "cpu_speedup_over_fp32", lambda dtype: 1.0)

    audio = load_audio(speech, 16_000)[:16_000]  # 1 s
    half = sonic_rt.Runtime(demo_dir, dtype="fp16")
    assert half.dtype == torch.float16 and runtime.dtype == torch.float32
    got = half.animate(portrait, audio, None, **RUN)
    want = runtime.animate(portrait, audio, None, **RUN)
    assert got.num_generated_frames == want.num_generated_frames == 12
    assert got.frames.shape == want.frames.shape == (12, 128, 128, 3) and got.frames.dtype == np.uint8
    diff = np.abs(got.frames.astype(np.int16) - want.frames.astype(np.int16))
    print(f"fp16 vs fp32: max {int(diff.max())} levels, mean {diff.mean():.3f}")
    assert int(diff.max()) <= FP16_MAX_LEVELS
    assert diff.mean() < 0.5  # most pixels agree exactly: not a different video within the bound by chance
