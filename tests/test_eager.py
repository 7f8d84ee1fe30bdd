"""The eager baseline (bench/eager.py): the runtime's function, computed with the official structure and cost."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.eager import EagerPipeline
from sonic_rt.audio_features import SAMPLE_RATE
from sonic_rt.errors import InputError
from sonic_rt.media import load_audio, read_video
from sonic_rt.runtime import STAGES
from sonic_rt.sampling import window_starts

STEPS = 2


@pytest.fixture(scope="module")
def eager(runtime):
    return EagerPipeline(runtime)


def test_eager_computes_the_runtimes_function_and_writes_a_complete_mp4(
    runtime, eager, portrait, long_speech, tmp_path
):
    """Same weights, same sampler: the generated frames agree to fp32 reduction order. Tolerance: at most 2
    uint8 levels on at most 0.1% of the values (measured: 1 level on ~0.015%)."""
    want = runtime.animate(portrait, long_speech, None, steps=STEPS, progress=False)
    got = eager.animate(portrait, long_speech, tmp_path / "eager.mp4", steps=STEPS, progress=False, return_frames=True)
    n = len(load_audio(long_speech, SAMPLE_RATE)) // 640 // 2
    assert got.num_generated_frames == want.num_generated_frames == n > 25  # several windows per step
    assert got.frames.shape == want.frames.shape == (n, 128, 128, 3)
    diff = np.abs(got.frames.astype(np.int16) - want.frames.astype(np.int16))
    assert diff.max() <= 2 and (diff > 0).mean() <= 1e-3
    assert list(got.timings) == list(STAGES)
    frames, fps, audio_s = read_video(tmp_path / "eager.mp4")
    assert len(frames) == got.num_frames == 2 * n - 1 and fps == 25.0
    assert audio_s is not None and audio_s > (2 * n - 1) / 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eager.mp4"]


def test_eager_does_the_official_work(runtime, eager, portrait, speech, monkeypatch):
    """The costs the baseline exists to keep: Whisper and CLIP twice, the VAE encoder twice, the adapters per
    frame with audio2token(zeros) recomputed per frame, one UNet call per window, the mask downsampled in
    every spatial layer, whole-video decode in 8-frame chunks, RIFE one pair at a time."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from sonic_rt.models.unet import SpatialAudioAttnProcessor

    calls: dict[str, int] = {}

    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [
        module.register_forward_hook(count(name))
        for name, module in (
            ("whisper", eager.whisper),
            ("clip", eager.image_encoder),
            ("audio2token", eager.audio2token),
            ("audio2bucket", eager.audio2bucket),
            ("unet", eager.unet),
            ("rife", eager.rife),
        )
    ]
    for method in ("encode", "decode"):
        original = getattr(eager.vae, method)
        monkeypatch.setattr(eager.vae, method, lambda *a, _o=original, _m=method, **k: (count(_m)(), _o(*a, **k))[1])
    downsample = IPAdapterMaskProcessor.downsample
    monkeypatch.setattr(
        IPAdapterMaskProcessor, "downsample", staticmethod(lambda *a, **k: (count("mask")(), downsample(*a, **k))[1])
    )
    try:
        result = eager.animate(portrait, speech, None, steps=STEPS, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    n = result.num_generated_frames
    windows = len(window_starts(n, 25, 0, 7))
    spatial = sum(
        isinstance(getattr(m, "processor", None), SpatialAudioAttnProcessor) for m in eager.unet.unet.modules()
    )
    assert calls == {
        "whisper": 2,
        "clip": 2,
        "encode": 2,
        "audio2token": 2 * n,
        "audio2bucket": n,
        "unet": STEPS * windows,
        "mask": STEPS * windows * spatial,
        "decode": math.ceil(n / 8),
        "rife": n - 1,
    }


def test_eager_needs_the_torch_backend(engine_dir):
    import sonic_rt

    with pytest.raises(InputError, match="torch-backend"):
        EagerPipeline(sonic_rt.Runtime(engine_dir, device="cpu"))
