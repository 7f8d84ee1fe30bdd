"""``python -m sonic_rt batch`` (``sonic_rt.serving.batch``): a jobs file on Ray Data (a local Ray cluster) and in
this process; per-line errors, resuming, a worker killed in the middle of a job; and the one line a user without
Ray gets for ``--ray``. The demo checkpoint at 64 px and 1 step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sonic_rt.serving.batch import RESULTS, read_jobs, run_batch

SMALL = {"steps": 1, "min_resolution": 64}
NO_RAY = "import sys; sys.modules['ray'] = None; from sonic_rt.cli import main; raise SystemExit(main(sys.argv[1:]))"


def write_jobs(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]


def expected_frames(speech: Path) -> int:
    from sonic_rt.audio_features import num_generated_frames
    from sonic_rt.media import load_audio

    return 2 * num_generated_frames(len(load_audio(speech))) - 1


def video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@dataclass(frozen=True)
class DemoLoader:
    """The demo runtime; with ``kill_marker``, the worker that first reaches a window of a job whose output is
    ``kill_output`` kills its own process (SIGKILL), once: a worker lost in the middle of a job."""

    model: str
    kill_marker: str | None = None
    kill_output: str | None = None

    def __call__(self):
        import sonic_rt

        runtime = sonic_rt.Runtime(self.model)
        return runtime if self.kill_marker is None else KillingRuntime(runtime, self.kill_marker, self.kill_output)


class KillingRuntime:
    def __init__(self, runtime, marker: str, output: str):
        self._runtime, self._marker, self._output = runtime, marker, output

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def animate(self, image, audio, out=None, options=None, **kwargs):
        import signal

        def events(kind, info):
            if kind == "window" and Path(out).name == self._output and not os.path.exists(self._marker):
                Path(self._marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        return self._runtime.animate(image, audio, out, options, events=events, **kwargs)


@pytest.fixture(scope="module")
def by_value(ray_cluster):
    """Ray's workers cannot import this test module: its loaders travel by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_cluster


# ------------------------------------------------------------------------------------------------ on Ray Data
@pytest.mark.slow
def test_ten_lines_with_a_corrupt_image_give_nine_videos_one_error_line_and_a_rerun_skips_the_nine(
    by_value, demo_dir, portrait, speech, tmp_path
):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really" * 20)
    lines = [
        {"image": str(broken if i == 3 else portrait), "audio": str(speech), "output": f"clip{i}.mp4",
         "options": {**SMALL, "seed": i}}
        for i in range(10)
    ]  # fmt: skip
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    load = DemoLoader(str(demo_dir))

    first = run_batch(jobs, out, load, ray_address="", workers=2, num_gpus=0, progress=False)
    assert (first.succeeded, first.failed, first.skipped) == (9, 1, 0)
    records = results(out)
    assert [r["line"] for r in records] == list(range(1, 11))
    failed = records[3]
    assert failed["status"] == "failed" and failed["output"] == "clip3.mp4"
    assert failed["error"].startswith(f"{broken}: ") and "\n" not in failed["error"]
    assert all(r["status"] == "succeeded" and r["error"] is None for i, r in enumerate(records) if i != 3)
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert videos == [f"clip{i}.mp4" for i in range(10) if i != 3]
    assert not list(out.glob(".*"))  # no temporary file
    for record in records:
        if record["status"] == "succeeded":
            assert record["frames"] == expected_frames(speech) == video_frames(out / record["output"])

    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    again = run_batch(jobs, out, load, ray_address="", workers=2, num_gpus=0, progress=False)
    assert (again.succeeded, again.failed, again.skipped) == (0, 1, 9)
    assert [r["status"] for r in results(out)] == ["skipped"] * 3 + ["failed"] + ["skipped"] * 6
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == written, "a skipped output was rewritten"


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_job_costs_no_line(by_value, demo_dir, portrait, long_speech, tmp_path):
    marker = tmp_path / "killed.pid"
    lines = [
        {"image": str(portrait), "audio": str(long_speech), "output": f"take{i}.mp4", "options": {**SMALL, "seed": i}}
        for i in range(4)
    ]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    load = DemoLoader(str(demo_dir), kill_marker=str(marker), kill_output="take1.mp4")
    summary = run_batch(jobs, out, load, ray_address="", workers=2, num_gpus=0, progress=False)
    assert marker.exists(), "no worker was killed"
    assert (summary.succeeded, summary.failed, summary.skipped) == (4, 0, 0)
    assert [(r["line"], r["status"]) for r in results(out)] == [(i, "succeeded") for i in range(1, 5)]
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"take{i}.mp4" for i in range(4)]
    assert not list(out.glob(".*")), "the killed worker's temporary file was left"


# --------------------------------------------------------------------------------------------- in this process
@pytest.mark.slow
def test_without_ray_the_lines_run_here_and_bad_lines_are_reported_not_raised(runtime, portrait, speech, tmp_path):
    lines = [
        {"image": "face.png", "audio": "speech.wav", "output": "ok.mp4", "options": SMALL},  # relative to the file
        "{not json",
        {"image": "face.png", "audio": "speech.wav", "output": "../escape.mp4"},
        {"image": "face.png", "audio": "speech.wav", "output": "typed.mp4", "options": {"steps": "5"}},
        {"image": "face.png", "audio": "speech.wav", "output": "ok.mp4", "options": SMALL},
        "",
        {"image": "face.png", "audio": "missing.wav", "output": "missing.mp4", "options": SMALL},
    ]
    (tmp_path / "face.png").symlink_to(portrait)
    (tmp_path / "speech.wav").symlink_to(speech)
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    summary = run_batch(jobs, out, lambda: runtime, progress=False)
    assert (summary.succeeded, summary.failed, summary.skipped) == (1, 5, 0)
    records = {r["line"]: r for r in results(out)}
    assert sorted(records) == [1, 2, 3, 4, 5, 7]
    assert records[1]["status"] == "succeeded" and records[1]["frames"] == expected_frames(speech)
    assert records[2]["error"].startswith("line 2: not JSON")
    assert records[3]["error"] == "line 3: output '../escape.mp4' must be a file name ending in .mp4 (no folder)"
    assert records[4]["error"] == 'line 4: options.steps: expected int, got "5"'
    assert records[5]["error"] == "line 5: output 'ok.mp4' is also an earlier line's"
    assert records[7]["status"] == "failed" and records[7]["error"].startswith(f"{tmp_path / 'missing.wav'}: ")
    assert sorted(p.name for p in out.iterdir()) == ["ok.mp4", RESULTS]


def test_read_jobs_refuses_unknown_fields_and_server_only_options(tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"image": "a.png", "audio": "a.wav", "output": "a.mp4", "seed": 3},
            {"image": "a.png", "audio": "a.wav", "output": "b.mp4", "options": {"hls": "x.m3u8"}},
            {"image": "a.png", "audio": "a.wav", "output": "c.mp4", "options": {"face_box": [1, 2, 30, 40]}},
        ],
    )
    ok, errors = read_jobs(jobs)
    assert [e["error"] for e in errors] == [
        "line 1: unknown field 'seed'; a line has image, audio, output, options",
        "line 2: options.hls: not an option here (see AnimateOptions)",
    ]
    assert [(j.line, j.output, j.image, j.options) for j in ok] == [
        (3, "c.mp4", str(tmp_path / "a.png"), {"face_box": (1, 2, 30, 40)})
    ]


# ------------------------------------------------------------------------------------------- the command line
def test_the_command_resumes_and_exits_1_when_a_line_failed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.mp4").write_bytes(b"complete")  # an output that exists is complete: skipped, no model loaded
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", [{"image": "a.png", "audio": "a.wav", "output": "done.mp4"}, {"image": "a.png"}]
    )
    r = subprocess.run(
        [sys.executable, "-m", "sonic_rt", "batch", str(jobs), "--out", str(out), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("sonic_rt batch: 0 succeeded, 1 failed, 1 skipped")
    assert [(x["status"], x["error"]) for x in results(out)] == [
        ("skipped", None),
        ("failed", "line 2: audio must be a file name (a non-empty string)"),
    ]


@pytest.mark.parametrize("command", [["batch", "jobs.jsonl", "--out", "out", "--demo"], ["serve", "--demo"]])
def test_ray_flags_without_ray_installed_say_how_to_install_it_in_one_line(command, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", NO_RAY, *command, "--ray"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --ray needs Ray, which is not installed here: pip install -e '.[cluster]'"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_with_a_bare_ray_flag_runs_on_a_cluster_of_its_own_on_loopback(
    own_cluster_env, demo_dir, portrait, speech, tmp_path
):
    """``batch --ray`` with no address starts a local cluster, on 127.0.0.1 by its own doing, and runs the line
    there."""
    jobs = write_jobs(
        tmp_path / "jobs.jsonl", [{"image": str(portrait), "audio": str(speech), "output": "a.mp4", "options": SMALL}]
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sonic_rt", "batch", str(jobs), "--out", str(out), "--model", str(demo_dir)]
    r = subprocess.run(
        [*command, "--ray", "--no-progress"], capture_output=True, text=True, timeout=300, env=own_cluster_env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sonic_rt batch --ray: started a local Ray cluster on 127.0.0.1 " in r.stderr
    assert [x["status"] for x in results(out)] == ["succeeded"]
    assert video_frames(out / "a.mp4") == expected_frames(speech)


def test_a_local_cluster_that_would_listen_beyond_loopback_is_stopped_with_a_clear_error(own_cluster_env):
    """Ray imported before :func:`init_ray` could put its local cluster on loopback: the cluster comes up on the
    machine's interface address, and init_ray shuts it down and says why, rather than serve on it."""
    script = (
        "import ray\n"  # first: Ray fixes its cluster mode now, from an environment without the setting
        "from sonic_rt.errors import SonicError\n"
        "from sonic_rt.serving.ray_app import init_ray\n"
        "try:\n"
        "    init_ray('')\n"
        "except SonicError as e:\n"
        "    print('refused:', e, '| still initialized:', ray.is_initialized())\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=own_cluster_env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip()
    assert line.startswith("refused: the local Ray cluster came up on ") and "not on loopback (127.0.0.1)" in line
    assert line.endswith("| still initialized: False")
