"""The window scheduler: same latents whatever the lanes, batching or ranks; failures surface; early output."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import sonic_rt
from sonic_rt import media
from sonic_rt.errors import InputError
from sonic_rt.models.unet import level_face_masks
from sonic_rt.sampling import window_indices
from sonic_rt.scheduler import SchedulerConfig

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from toy import toy_denoise, toy_sample  # noqa: E402

# N < 25, N not a multiple of 25 (wrap-around window), a long N
LENGTHS = [7, 60, 126]
SETUPS = [
    SchedulerConfig(lanes=2),
    SchedulerConfig(lanes=3),
    SchedulerConfig(windows_per_call=2),
    SchedulerConfig(windows_per_call=3, lanes=2),
]


_run = toy_sample  # sample() on the toy problem with a CPU scheduler of the given settings


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}")
def test_threads_and_batching_give_bit_identical_latents(num_frames, setup):
    assert torch.equal(_run(num_frames, setup), _run(num_frames))


@pytest.mark.parametrize("num_frames", LENGTHS)
@pytest.mark.parametrize("setup", [SchedulerConfig()] + SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}")
def test_every_window_runs_exactly_once_per_step(num_frames, setup):
    seen = Counter()
    lock = threading.Lock()

    def denoise(x, windows):
        with lock:
            for w in windows:
                seen[(w.step, tuple(w.index.tolist()))] += 1
        return toy_denoise(x, windows)

    _run(num_frames, setup, denoise)
    want = Counter((step, tuple(idx)) for step in range(4) for idx in window_indices(num_frames, 25, step, 7))
    assert seen == want


@pytest.mark.parametrize("setup", [SchedulerConfig()] + SETUPS, ids=lambda s: f"w{s.windows_per_call}-l{s.lanes}")
def test_a_worker_exception_surfaces(setup):
    def denoise(x, windows):
        if any(w.step == 2 and int(w.index[0]) == 50 - 14 for w in windows):
            raise ValueError("window failed")
        return toy_denoise(x, windows)

    with pytest.raises(ValueError, match="window failed"):
        _run(126, setup, denoise)


def test_final_frames_are_reported_as_their_windows_finish():
    reports = []
    result = _run(
        126, SchedulerConfig(lanes=2), on_final_frames=lambda lat, ready: reports.append((lat.clone(), ready.clone()))
    )
    counts = [int(r.sum()) for _, r in reports]
    assert counts == sorted(counts) and counts[0] < 126 and counts[-1] == 126  # progressively, then all
    for latents, ready in reports:  # what is reported final is final
        assert torch.equal(latents[:, ready], result[:, ready])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


RANKS = (
    [(2, n, "") for n in LENGTHS + [25, 1000]]
    + [(3, n, "") for n in (7, 60, 126, 1000)]
    + [
        (4, 1000, ""),
        (2, 126, "--lanes 2 --windows-per-call 2"),
        (3, 300, "--windows-per-call 3 --order steps"),
    ]
)


@pytest.mark.parametrize("ranks,num_frames,flags", RANKS, ids=lambda v: str(v).replace(" ", "") or "default")
def test_gloo_ranks_give_bit_identical_latents(ranks, num_frames, flags, tmp_path):
    """Ranks own contiguous frame ranges and exchange edges point to point: the latents of one process."""
    out = tmp_path / "latents.pt"
    run = _torchrun(ranks, str(SCRIPTS / "distributed_sample.py"), str(out), str(num_frames), *flags.split())
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(out), _run(num_frames))


@pytest.mark.parametrize("ranks,failing", [(2, 1), (3, 0)])
def test_a_failure_on_one_rank_is_logged_by_every_rank(ranks, failing, tmp_path):
    """Every rank logs the failing rank's message before any exits (torchrun stops the rest when one exits)."""
    out = tmp_path / "x.pt"
    run = _torchrun(ranks, str(SCRIPTS / "distributed_sample.py"), str(out), "60", "--fail-rank", str(failing))
    assert run.returncode != 0
    failure = f"rank {failing} failed: ValueError: rank {failing} failed on purpose"
    lines = run.stderr.splitlines()
    assert failure in lines, run.stderr[-3000:]
    for rank in set(range(ranks)) - {failing}:
        assert f"rank {rank} stops: {failure}" in lines, run.stderr[-3000:]
    assert not out.exists()


def test_a_killed_rank_ends_the_job_with_an_error_in_bounded_time(tmp_path):
    """Rank 1 dies (SIGKILL) mid-job: rank 0 stops waiting for its messages and fails, under torchrun."""
    started = time.monotonic()
    run = _torchrun(2, str(SCRIPTS / "distributed_sample.py"), str(tmp_path / "x.pt"), "126", "--kill-rank", "1")
    assert run.returncode != 0 and time.monotonic() - started < 120
    assert "SIGKILL" in run.stderr
    assert not (tmp_path / "x.pt").exists()


def test_without_torchrun_a_killed_rank_is_noticed_by_the_survivor(tmp_path):
    """Two plain processes (no torchrun agent to stop the survivor): rank 0 raises RankFailed naming rank 1."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "SONIC_RT_RANK_TIMEOUT": "60",
    }
    script = [sys.executable, str(SCRIPTS / "distributed_sample.py"), str(tmp_path / "x.pt"), "126", "--kill-rank", "1"]
    started = time.monotonic()
    procs = [
        subprocess.Popen(script, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 120
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    assert "RankFailed: lost rank 1" in errors[0]
    assert not (tmp_path / "x.pt").exists()


# --- through the Runtime ---------------------------------------------------------------------------------------


def test_runtime_lanes_and_batching_are_bit_identical(runtime, demo_dir, portrait, long_speech):
    """Through the real (demo) UNet on CPU: 2 lanes, and 2 or 3 windows per UNet call, give exactly the frames of
    one window per call (N = 51: 3 windows per step, one of them wrapping)."""
    base = runtime.animate(portrait, long_speech, None, steps=2, progress=False).frames
    for setup in (SchedulerConfig(lanes=2), SchedulerConfig(windows_per_call=2), SchedulerConfig(windows_per_call=3)):
        other = sonic_rt.Runtime(demo_dir, scheduler=setup)
        assert (other.animate(portrait, long_speech, None, steps=2, progress=False).frames == base).all(), setup


@torch.no_grad()
def test_batched_unet_rows_equal_single_window_rows(runtime):
    """The property the batching relies on: with batch-invariant linears, each CFG row of a batched UNet call is
    bit-identical to the same row computed in a one-window call."""
    unet = runtime.graphs.unet.module
    gen = torch.Generator().manual_seed(3)
    masks = level_face_masks(torch.ones(1, 1, 128, 128), (16, 16), unet.attention_levels)

    def window():
        return (
            torch.randn(3, 25, 8, 16, 16, generator=gen),
            torch.randn(3, 1, 32, generator=gen),
            torch.randn(3, 25, 32, 32, generator=gen),
            torch.rand(3, 3, generator=gen) * 20,
        )

    windows = [window() for _ in range(3)]
    t = torch.tensor([0.4])
    single = [unet(s, t, c, a, i, *masks) for s, c, a, i in windows]
    batched = unet(
        *(
            torch.cat(parts) if k != 1 else t
            for k, parts in enumerate(
                [
                    [w[0] for w in windows],
                    None,
                    [w[1] for w in windows],
                    [w[2] for w in windows],
                    [w[3] for w in windows],
                ]
            )
        ),
        *masks,
    )
    assert all(torch.equal(batched[3 * j : 3 * j + 3], single[j]) for j in range(3))


def test_output_starts_before_the_last_window_of_the_last_step(runtime, portrait, long_speech, tmp_path):
    """N = 50 (exactly 4.0 s): two windows per step, no wrap-around window, so the first chunks are final
    after the first window of the last step. (When N is not a multiple of 25, frame 0 is also in the
    wrap-around window, and output starts when that window is done.)"""
    samples = sonic_rt.media.load_audio(long_speech, 16000)
    samples = np.pad(samples, (0, max(0, 64000 - len(samples))))[:64000]
    events = []
    result = runtime.animate(
        portrait,
        samples,
        tmp_path / "o.mp4",
        steps=2,
        progress=False,
        events=lambda kind, info: events.append((kind, info)),
    )
    assert result.num_generated_frames == 50
    windows = [i for i, (kind, _) in enumerate(events) if kind == "window"]
    frames = [i for i, (kind, _) in enumerate(events) if kind == "frames"]
    assert len(windows) >= 2 and frames
    assert frames[0] < windows[-1]  # the first chunk was encoded while windows were still to run
    assert events[frames[-1]][1]["written"] == result.num_frames


def test_engines_refuse_more_windows_per_call_than_built(engine_dir):
    with pytest.raises(InputError, match="windows per UNet call"):
        sonic_rt.Runtime(engine_dir, scheduler=SchedulerConfig(windows_per_call=3))
    assert sonic_rt.Runtime(engine_dir, scheduler=SchedulerConfig(windows_per_call=2)).scheduling.windows_per_call == 2


def test_bad_scheduler_settings_are_refused():
    with pytest.raises(InputError):
        SchedulerConfig(lanes=0)
    with pytest.raises(InputError):
        SchedulerConfig(windows_per_call=0)


@pytest.mark.slow
def test_cli_under_torchrun_two_ranks_writes_the_same_video(demo_dir, portrait, speech, tmp_path):
    """Two gloo ranks share the windows; rank 0 writes. Same frames as one rank (both with OMP_NUM_THREADS=1)."""
    videos = {}
    for nproc in (1, 2):
        out = tmp_path / f"o{nproc}.mp4"
        run = _torchrun(
            nproc,
            "-m",
            "sonic_rt",
            "animate",
            "--model",
            str(demo_dir),
            "--image",
            str(portrait),
            "--audio",
            str(speech),
            "--out",
            str(out),
            "--steps",
            "2",
            "--quiet",
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        videos[nproc] = media.read_video(out)[0]
    assert videos[1].shape == videos[2].shape and (videos[1] == videos[2]).all()


def test_engine_batching_matches_one_window_per_call(engine_dir, portrait, long_speech):
    """The onnxruntime backend (engines built for 1..2 windows per call): 2 windows per call vs 1."""
    one = sonic_rt.Runtime(engine_dir).animate(portrait, long_speech, None, steps=2, progress=False).frames
    two = (
        sonic_rt.Runtime(engine_dir, scheduler=SchedulerConfig(windows_per_call=2))
        .animate(portrait, long_speech, None, steps=2, progress=False)
        .frames
    )
    diff = abs(one.astype(int) - two.astype(int)).max()
    print(f"onnxruntime, 2 windows per call vs 1: max frame diff {diff}")
    assert diff == 0
