"""One video on several devices: the same latents as one device, bit for bit; rows split when few windows are ready;
each CPU replica on its share of the cores; torchrun ranks that own contiguous ranges and exchange only edges."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

import sonic_rt
from sonic_rt.errors import InputError
from sonic_rt.pipeline.components import resolve_devices
from sonic_rt.ranks import RankExecutor, RankPlan
from sonic_rt.sampling import SamplingConfig, ShiftFusionWork, Unit, make_run, sample
from sonic_rt.scheduler import Distributed, SchedulerConfig, WindowScheduler

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from toy import ToyGuidance, toy_denoise, toy_problem  # noqa: E402

LENGTHS = [7, 25, 60, 126]  # N < T, N = T, a wrap-around window, several windows per step
SETUPS = [
    SchedulerConfig(),
    SchedulerConfig(windows_per_call=2),
    SchedulerConfig(lanes=2),
    SchedulerConfig(windows_per_call=3, lanes=2, order="steps"),
    SchedulerConfig(split_rows=False),
]


def _sample(num_frames: int, config: SchedulerConfig, devices: int, denoise=None, threads: int | None = None):
    latents, sigmas, timesteps = toy_problem(num_frames)
    denoise = denoise if denoise is not None else ToyGuidance(devices)
    scheduler = WindowScheduler(config, devices=["cpu"] * devices, threads=threads)
    try:
        return sample(latents, sigmas, timesteps, SamplingConfig(steps=len(timesteps)), denoise, scheduler=scheduler)
    finally:
        scheduler.close()


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("devices", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "setup", SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}-{s.order}-{'split' if s.split_rows else 'whole'}"
)
def test_devices_lanes_batching_and_row_splits_give_the_one_device_latents_bit_for_bit(num_frames, devices, setup):
    want = _sample(num_frames, SchedulerConfig(order="steps"), 1)
    assert torch.equal(_sample(num_frames, setup, devices), want)


@pytest.mark.parametrize("devices,parts", [(2, {(0, 1), (2,)}), (3, {(0,), (1,), (2,)})])
def test_a_window_alone_runs_its_guidance_rows_on_the_free_devices(devices, parts):
    """N = 7: one window per step, so never more than one ready: every unit's rows go to every free replica."""
    toy = ToyGuidance(devices)
    _sample(7, SchedulerConfig(), devices, toy)
    by_step: dict[int, set] = {}
    for replica, rows, step in toy.calls:
        assert rows is not None, "a lone window ran whole although devices were free"
        by_step.setdefault(step, set()).add((replica, rows))
    for step, calls in by_step.items():
        assert {rows for _, rows in calls} == parts, step
        assert len({replica for replica, _ in calls}) == devices, step  # each part on another replica


def test_windows_ready_together_run_whole_on_different_devices_and_splits_can_be_turned_off():
    toy = ToyGuidance(2)
    _sample(1000, SchedulerConfig(order="steps"), 2, toy)  # 40 windows per step, all ready at step 0
    first_step = [(replica, rows) for replica, rows, step in toy.calls if step == 0]
    assert all(rows is None for _, rows in first_step[:-1])  # whole while another window was ready
    assert {replica for replica, _ in first_step} == {0, 1}
    whole = ToyGuidance(3)
    _sample(7, SchedulerConfig(split_rows=False), 3, whole)
    assert all(rows is None for _, rows, _ in whole.calls)


def test_cpu_workers_split_the_threads_between_them():
    seen, lock = set(), threading.Lock()

    def denoise(x, windows):
        with lock:
            seen.add((threading.current_thread().name, torch.get_num_threads()))
        return toy_denoise(x, windows)

    _sample(126, SchedulerConfig(), 2, denoise, threads=4)
    assert {threads for _, threads in seen} == {2} and len(seen) == 2  # two worker threads, 2 threads each
    seen.clear()
    _sample(126, SchedulerConfig(lanes=2), 3, denoise, threads=2)
    assert {threads for _, threads in seen} == {1}  # six workers on 2 threads: one each


def test_a_denoiser_that_cannot_be_placed_is_refused_on_other_devices():
    latents, sigmas, timesteps = toy_problem(60)
    config = SamplingConfig(steps=len(timesteps))
    other = WindowScheduler(SchedulerConfig(), devices=["cpu", "cuda:0"])  # never runs: refused first
    with pytest.raises(InputError, match="placeable"):
        sample(latents, sigmas, timesteps, config, toy_denoise, scheduler=other)
    with pytest.raises(InputError, match="1 UNet replicas for 2 devices"):
        sample(latents, sigmas, timesteps, config, ToyGuidance(1), scheduler=other)
    other.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers of a machine without CUDA")
def test_devices_are_resolved_and_bad_ones_refused_in_one_line():
    assert resolve_devices("all") == [torch.device("cpu")]
    assert resolve_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert resolve_devices(None) is None
    for bad, match in [
        (["cuda:0", "cuda:1"], "no CUDA GPU"),
        ([], "empty"),
        ("gpu7", "devices"),
        (["cpu", "meta"], "all CUDA GPUs or all CPU"),
    ]:
        with pytest.raises(InputError, match=match):
            resolve_devices(bad)


def test_the_cli_hands_devices_and_row_splits_to_the_runtime(monkeypatch, demo_dir, portrait, speech, tmp_path):
    """``--devices cpu,cpu`` and ``--no-split-rows`` reach ``Runtime``; without the flag rows are split."""
    from sonic_rt import cli, runtime

    class Loaded(Exception):
        pass

    seen = []

    def record(model_dir, **kwargs):
        seen.append(kwargs)
        raise Loaded

    monkeypatch.setattr(runtime, "Runtime", record)
    argv = [
        "animate",
        "--model",
        str(demo_dir),
        "--image",
        str(portrait),
        "--audio",
        str(speech),
        "--out",
        str(tmp_path / "o.mp4"),
    ]
    for extra in (["--devices", "cpu,cpu", "--no-split-rows"], []):
        with pytest.raises(Loaded):
            cli.main(argv + extra)
    assert seen[0]["devices"] == "cpu,cpu" and seen[0]["scheduler"].split_rows is False
    assert seen[1]["devices"] is None and seen[1]["scheduler"].split_rows is True


# --- through the demo UNet --------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Every worker and the main thread on one intra-op thread, so one device and k replicas run the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_three_and_four_cpu_replicas_give_the_frames_of_one_device(demo_dir, portrait, long_speech, one_thread):
    """N = 51 (3 windows per step, one wrapping): with 2-4 replicas, windows run on any of them and lone windows are
    split by guidance row; the frames equal one device's bit for bit."""
    kw = dict(steps=2, min_resolution=64, progress=False, return_frames=True)
    want = sonic_rt.Runtime(demo_dir).animate(portrait, long_speech, None, **kw).frames
    for k in (2, 3, 4):
        runtime = sonic_rt.Runtime(demo_dir, devices=["cpu"] * k)
        assert len(runtime.devices) == k and len(runtime._scheduler.workers) == k
        got = runtime.animate(portrait, long_speech, None, **kw).frames
        runtime.close()
        assert got.shape == want.shape and (got == want).all(), k


# --- ranks: the plan every rank derives ---------------------------------------------------------------------------


def _rank_plan(num_frames: int, world: int, steps: int = 25) -> tuple[ShiftFusionWork, RankPlan]:
    work = ShiftFusionWork(num_frames, steps, 25, 7)
    return work, RankPlan(work, work.plan(), world)


@pytest.mark.parametrize("num_frames,world", [(125, 2), (1000, 4), (300, 3)])
def test_each_rank_owns_a_contiguous_range_and_holds_only_its_edges(num_frames, world):
    work, plan = _rank_plan(num_frames, world)
    owned = [plan.owned(r) for r in range(world)]
    assert sorted(f for r in owned for f in r) == list(range(num_frames))  # a partition into ranges
    for r in range(world):
        held = plan.held(r, work.plan())
        reach = {(f + d) % num_frames for f in owned[r] for d in range(-24, 25)}  # its range and 24 frames around
        assert set(owned[r]) <= set(held) <= reach
        assert len(held) <= len(owned[r]) + 2 * 24
        assert all(plan.runner[u] == r for u in plan.units_of(r, work.plan()))
    assert sum(len(plan.units_of(r, work.plan())) for r in range(world)) == len(work.units())


@pytest.mark.parametrize("num_frames,world", [(125, 2), (1000, 4), (300, 3)])
def test_ranks_message_only_their_neighbours_and_send_the_output_to_rank_0(num_frames, world):
    _, plan = _rank_plan(num_frames, world)
    for (a, b), keys in plan.sends.items():
        for key in keys:
            if key[0] == "output":
                assert b == 0 and a != 0
            else:
                assert b in ((a - 1) % world, (a + 1) % world), (a, b, key)


def test_a_rank_keeps_only_its_frames_and_edges_and_lets_go_of_the_rest():
    latents, sigmas, timesteps = toy_problem(1000)
    run = make_run(latents, sigmas, timesteps, SamplingConfig(steps=len(timesteps)), toy_denoise)
    executor = RankExecutor(None, run, Distributed(rank=1, world_size=4), None, None)
    assert run.latents is None  # the whole video's initial latents are let go
    held = executor.state.frames
    assert executor.state.x.shape[1] == executor.state.acc.shape[1] == len(held) <= 250 + 2 * 24
    assert torch.equal(executor.state.x, latents[:, held])
    assert executor.final is None  # rank 0 alone gathers the output


def test_the_edge_traffic_per_step_does_not_grow_with_the_video():
    """What crosses between ranks is a few messages per range edge and step, whatever N: not the whole video."""
    counts = {}
    for num_frames in (500, 5000):
        _, plan = _rank_plan(num_frames, 4)
        counts[num_frames] = sum(1 for keys in plan.sends.values() for k in keys if k[0] != "output")
    assert counts[5000] <= counts[500] * 1.2
    assert counts[5000] <= 25 * 4 * 6  # steps x edges x (contributions and edges both ways)


def test_every_rank_derives_the_same_messages_and_each_receiver_expects_what_its_sender_sends():
    work, plan = _rank_plan(200, 3, steps=6)
    again = RankPlan(work, work.plan(), 3)
    assert again.sends == plan.sends and again.receives == plan.receives
    for (a, b), keys in plan.sends.items():
        assert [key for key, _ in plan.receives[(a, b)]] == keys and len(set(keys)) == len(keys)
    for (_, b), messages in plan.receives.items():
        for key, rows in messages:
            if key[0] == "contribution":  # the rows are the window positions whose frames b owns
                assert rows == len(plan.contributions(Unit(key[1], key[2]))[b])
            else:
                assert rows == len(key[-1])
