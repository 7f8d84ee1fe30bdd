"""The wavefront order: the same latents as step by step, bit for bit; dependencies respected; output that starts
after a fixed amount of work whatever the length."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import sonic_rt
from sonic_rt.errors import InputError
from sonic_rt.sampling import SamplingConfig, ShiftFusionWork, Unit, sample, window_indices
from sonic_rt.scheduler import Distributed, SchedulerConfig, WindowScheduler

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from toy import toy_denoise, toy_sample  # noqa: E402

# N < T (one window holding repeated frames), N = T, N not a multiple of T (a wrap-around window), a long N
LENGTHS = [7, 25, 60, 126, 1000]
SETUPS = [
    SchedulerConfig(),
    SchedulerConfig(lanes=2),
    SchedulerConfig(windows_per_call=2),
    SchedulerConfig(windows_per_call=3, lanes=2),
]


_run = toy_sample  # sample() on the toy problem with a CPU scheduler of the given settings


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}")
def test_the_wavefront_gives_the_step_by_step_latents_bit_for_bit(num_frames, setup):
    steps_order = _run(num_frames, SchedulerConfig(order="steps"))
    assert torch.equal(_run(num_frames, setup), steps_order)


@pytest.mark.parametrize("num_frames", [60, 126])
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}")
def test_every_unit_runs_once_after_every_window_it_reads_from(num_frames, setup):
    """Checked against the window indices themselves: unit (s, j) starts only after every step-(s-1) window
    holding one of its frames has finished."""
    started, finished, lock = [], set(), threading.Lock()

    def denoise(x, windows):
        with lock:
            for w in windows:
                frames = set(w.index.tolist())
                if w.step > 0:
                    previous = window_indices(num_frames, 25, w.step - 1, 7)
                    needed = {(w.step - 1, j) for j, row in enumerate(previous) if frames & set(row)}
                    assert needed <= finished, (w.step, sorted(frames)[:3])
                started.append((w.step, tuple(w.index.tolist())))
        out = toy_denoise(x, windows)
        with lock:
            for w in windows:
                j = window_indices(num_frames, 25, w.step, 7).index(w.index.tolist())
                finished.add((w.step, j))
        return out

    _run(num_frames, setup, denoise)
    want = sorted((s, tuple(row)) for s in range(4) for row in window_indices(num_frames, 25, s, 7))
    assert sorted(started) == want


def test_ready_units_of_one_step_share_a_call_and_never_mix_steps():
    sizes, lock = [], threading.Lock()

    def denoise(x, windows):
        with lock:
            sizes.append(len(windows))
        assert len({w.step for w in windows}) == 1
        return toy_denoise(x, windows)

    _run(1000, SchedulerConfig(windows_per_call=4), denoise)
    assert max(sizes) == 4 and sum(sizes) == 4 * 40  # 40 windows per step, 4 steps


def test_the_first_frames_are_final_after_a_cone_of_work_that_does_not_grow_with_length():
    """Units run before frames 0..7 are final (the first VAE chunk): at most the cone of those frames, and the
    same count for 2,500 and 7,500 frames (25 steps, the official shape)."""
    first = {}
    for num_frames in (2500, 7500):
        ran = []
        latents = torch.zeros(1, num_frames, 1, 1, 1)
        sigmas, timesteps = torch.linspace(10.0, 0.0, 26), torch.linspace(1.0, 0.1, 25)

        def on_final(latents, ready, ran=ran, num_frames=num_frames):
            if num_frames not in first and bool(ready[:8].all()):
                first[num_frames] = len(ran)

        scheduler = WindowScheduler(SchedulerConfig(), "cpu")
        sample(
            latents,
            sigmas,
            timesteps,
            SamplingConfig(steps=25),
            lambda x, windows: x * 0.5,
            on_window=ran.append,
            scheduler=scheduler,
            on_final_frames=on_final,
        )
        assert first[num_frames] <= ShiftFusionWork(num_frames, 25, 25, 7).cone_size(range(8))
    assert first[2500] == first[7500] < 0.05 * 25 * (7500 // 25)  # under 5% of 10 minutes' work


def test_the_plan_is_a_valid_order_with_the_last_step_in_output_order():
    work = ShiftFusionWork(126, 6, 25, 7)
    plan = work.plan()
    assert sorted(plan) == sorted(work.units())
    position = {u: i for i, u in enumerate(plan)}
    assert all(position[d] < position[u] for u in plan for d in work.dependencies(u))
    last = [u for u in plan if u.step == 5]
    assert [work.output_key(u) for u in last] == sorted(work.output_key(u) for u in last)
    assert work.dependencies(Unit(0, 0)) == []


def test_several_devices_under_torchrun_are_refused():
    with pytest.raises(InputError, match="each rank runs one device"):
        WindowScheduler(SchedulerConfig(), "cpu", Distributed(rank=0, world_size=2), devices=["cpu", "cpu"])


def test_an_unknown_order_is_refused():
    with pytest.raises(InputError, match="order must be one of wavefront, steps"):
        SchedulerConfig(order="diagonal")


def test_a_failing_unit_surfaces_and_no_later_unit_starts():
    calls = []

    def denoise(x, windows):
        calls.append(windows[0].step)
        if windows[0].step == 1:
            raise ValueError("unit failed")
        return toy_denoise(x, windows)

    for setup in (SchedulerConfig(), SchedulerConfig(lanes=2)):
        calls.clear()
        with pytest.raises(ValueError, match="unit failed"):
            _run(126, setup, denoise)
        assert max(calls) <= 1


def test_through_the_demo_unet_the_wavefront_gives_the_step_by_step_frames(runtime, demo_dir, portrait, long_speech):
    """The real (demo) UNet on CPU, N = 51 (3 windows per step, one wrapping): the default wavefront, with lanes
    and with batching, writes exactly the frames of the step-by-step order."""
    steps_rt = sonic_rt.Runtime(demo_dir, scheduler=SchedulerConfig(order="steps"))
    base = steps_rt.animate(portrait, long_speech, None, steps=3, progress=False).frames
    assert runtime.scheduling.order == "wavefront"
    assert np.array_equal(runtime.animate(portrait, long_speech, None, steps=3, progress=False).frames, base)
    for setup in (SchedulerConfig(lanes=2), SchedulerConfig(windows_per_call=2, lanes=2)):
        other = sonic_rt.Runtime(demo_dir, scheduler=setup)
        assert np.array_equal(other.animate(portrait, long_speech, None, steps=3, progress=False).frames, base), setup
