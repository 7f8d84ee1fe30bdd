"""The sampler's algorithm: Karras sigmas, Euler v-step, CFG and shift-fusion windows (reference sections 3-5)."""

from __future__ import annotations

import math

import pytest
import torch

from sonic_rt.architectures import SVD_XT_SCHEDULER_CONFIG
from sonic_rt.sampling import (
    SamplingConfig,
    combine_guidance,
    euler_v_step,
    initial_noise,
    karras_schedule,
    sample,
    scale_model_input,
    window_indices,
    window_starts,
)

# docs/official_algorithm.md section 3, computed with diffusers 0.29.0
OFFICIAL_SIGMAS = [
    700.0,
    545.729,
    421.569,
    322.454,
    244.023,
    182.547,
    134.854,
    98.267,
    70.541,
    49.810,
    34.537,
    23.468,
    15.590,
    10.097,
    6.354,
    3.870,
    2.269,
    1.273,
    0.6781,
    0.3394,
    0.1574,
    0.06640,
    0.02480,
    0.007882,
    0.002,
    0.0,
]


def test_sigmas_and_timesteps_equal_the_official_table():
    sigmas, timesteps = karras_schedule(SVD_XT_SCHEDULER_CONFIG, 25)
    assert sigmas.shape == (26,) and timesteps.shape == (25,)
    for got, want in zip(sigmas.tolist(), OFFICIAL_SIGMAS):
        assert got == pytest.approx(want, rel=5e-4, abs=1e-6)  # the table is printed to 4-6 digits
    assert timesteps[:2].tolist() == pytest.approx([1.637770, 1.575531], abs=1e-5)
    assert timesteps[-2:].tolist() == pytest.approx([-1.210778, -1.553652], abs=1e-5)
    assert torch.allclose(timesteps, 0.25 * torch.log(sigmas[:-1]), atol=1e-5)


def test_euler_v_step_matches_diffusers_scheduler():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SVD_XT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(25)
    sigmas, timesteps = karras_schedule(SVD_XT_SCHEDULER_CONFIG, 25)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 5, 4, 8, 8, generator=gen) * 30, torch.randn(1, 5, 4, 8, 8, generator=gen)
    for i in (0, 3, 24):
        scheduler._step_index = i
        want = scheduler.step(v, timesteps[i], x).prev_sample
        got = euler_v_step(v, x, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_euler_step_and_input_scaling_are_bit_identical_to_diffusers_at_every_step(dtype):
    """The coefficients come from fp32 sigma tensors, as diffusers computes them (not Python floats)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SVD_XT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(25)
    sigmas, timesteps = karras_schedule(SVD_XT_SCHEDULER_CONFIG, 25)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 25, 4, 16, 16, generator=gen) * 30).to(dtype)
    v = torch.randn(1, 25, 4, 16, 16, generator=gen).to(dtype)
    for i in range(25):
        scheduler._step_index = i
        assert torch.equal(scale_model_input(x, sigmas[i]), scheduler.scale_model_input(x, timesteps[i]))
        scheduler._step_index = i
        want = scheduler.step(v, timesteps[i], x).prev_sample
        assert want.dtype == dtype and torch.equal(euler_v_step(v, x, sigmas[i], sigmas[i + 1]), want), i


def test_seeded_noise_is_the_official_draw_sequence():
    """seed_everything(seed), then randn of the image shape (noise augmentation), then the latents."""
    image_shape, latent_shape = (1, 3, 128, 128), (1, 60, 4, 16, 16)
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(72589)  # what the official seed_everything does to torch's CPU generator
        torch.randn(image_shape, dtype=dtype)
        official = torch.randn(latent_shape, dtype=dtype)
        got = initial_noise(72589, image_shape, latent_shape, torch.device("cpu"), dtype)
        assert got.dtype == dtype and torch.equal(got, official)
    other = initial_noise(72590, image_shape, latent_shape, torch.device("cpu"), torch.float32)
    assert not torch.equal(other, initial_noise(72589, image_shape, latent_shape, torch.device("cpu"), torch.float32))


def test_cfg_combination():
    u, d, c = torch.full((1, 2), 1.0), torch.full((1, 2), 3.0), torch.full((1, 2), 4.0)
    out = combine_guidance(torch.cat([u, d, c]), 2.0, 7.5)
    assert out.shape == (1, 2)
    assert out.tolist() == [[1 + 2 * (3 - 1) + 7.5 * (4 - 3)] * 2]


def test_window_indices_wrap_circularly_with_the_unreduced_shift():
    assert window_starts(60, 25, 0, 7) == [0, 25, 50]
    assert window_starts(60, 25, 4, 7) == [-28, -3, 22]  # shift 28 is not reduced modulo 25
    first, second, last = window_indices(60, 25, 1, 7)
    assert first == list(range(53, 60)) + list(range(0, 18))
    assert second == list(range(18, 43))
    assert last == list(range(43, 60)) + list(range(0, 8))  # wraps: frames 0-7 appear twice this step


def test_short_video_window_repeats_frames():
    (window,) = window_indices(7, 25, 0, 7)
    assert window == [k % 7 for k in range(25)]
    (window,) = window_indices(7, 25, 2, 7)
    assert window == [(k - 14) % 7 for k in range(25)]


@pytest.mark.parametrize("num_frames", [7, 25, 50, 60, 126])
@pytest.mark.parametrize("step", [0, 1, 5])
def test_every_frame_is_the_mean_over_exactly_the_windows_holding_it(num_frames, step):
    """Latents start at 0. Steps before ``step`` get v = 0 (x stays 0). At ``step`` the stepped window is
    k * v with k = (sigma_next - sigma) / sqrt(sigma^2 + 1), so giving the w-th window the constant
    v = w + 1 makes each frame's result k * mean(w + 1 over its appearances, with multiplicity). (Run in the
    default wavefront order; tests/test_wavefront.py shows it equals the step order.)"""
    config = SamplingConfig(steps=step + 1, frames_per_window=25, shift_offset=7)
    sigmas = torch.tensor([1.0] * step + [10.0, 4.0])
    windows = window_indices(num_frames, 25, step, 7)
    calls = []

    def denoise(x, group):
        assert x.shape == (1, 25, 1, 1, 1) and len(group) == 1
        window = group[0]
        if window.step < step:
            return torch.zeros_like(x)
        calls.append(window.index.tolist())
        return torch.full_like(x, float(windows.index(calls[-1]) + 1))  # the w-th window of the step: w + 1

    result = sample(torch.zeros(1, num_frames, 1, 1, 1), sigmas, torch.zeros(step + 1), config, denoise)
    assert sorted(calls) == sorted(windows)  # every window of the step ran once (in any order); none dropped
    values: dict[int, list[int]] = {}
    for w, idx in enumerate(windows):
        for f in idx:
            values.setdefault(f, []).append(w + 1)
    assert sorted(values) == list(range(num_frames))  # every frame is in some window
    k = (4.0 - 10.0) / math.sqrt(10.0**2 + 1)
    expected = torch.tensor([k * sum(values[f]) / len(values[f]) for f in range(num_frames)])
    torch.testing.assert_close(result.flatten(), expected, rtol=1e-6, atol=1e-6)


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError):
        SamplingConfig(frames_per_window=0)
