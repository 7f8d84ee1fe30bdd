"""Cog's predictions API (``sonic_rt.serving``) as a client written from Cog's docs/http.md sees it, with plain
``requests`` over real HTTP.

The API runs in this process (uvicorn on a thread, a free loopback port, no page) over the session's demo runtime
through a :class:`~sonic_rt.serving.local.LocalRunner` whose ``calls`` count the runtime's ``animate`` calls. Jobs
are small (64 px, 1-2 steps). The job layer's own rules (restarts, retention, a second server) use a stand-in
runner that writes a small file, so they need no model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")
requests = pytest.importorskip("requests", reason="requests is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")

from sonic_rt import AnimateOptions, InputError  # noqa: E402
from sonic_rt.serving.inputs import COG_SONIC_NAMES, RANGES, SERVER_ONLY_OPTIONS  # noqa: E402
from sonic_rt.serving.jobs import JobResult, Jobs, Settings  # noqa: E402
from sonic_rt.serving.local import LocalRunner  # noqa: E402
from sonic_rt.serving.server import build_app  # noqa: E402
from sonic_rt.serving.store import PROCESSING, STARTING, SUCCEEDED, JobStore, Prediction  # noqa: E402

DEADLINE_S = 120  # a job that has not ended by then has hung (a failure, not a speed claim)
SMALL = {"steps": 1, "min_resolution": 64}


# ------------------------------------------------------------------------------------------------------ helpers
class Api:
    """A running API: its base URL, its Jobs and its runner."""

    def __init__(self, url: str, jobs: Jobs, runner):
        self.url, self.jobs, self.runner = url, jobs, runner

    def outputs(self) -> set[Path]:
        return set(self.jobs.outputs.iterdir())

    def wait(self, pred_id: str, headers=None) -> dict:
        """Poll GET /predictions/{id} until it has ended."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            body = requests.get(f"{self.url}/predictions/{pred_id}", headers=headers, timeout=10).json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body
            assert time.monotonic() < deadline, f"prediction {pred_id} did not end: {body}"
            time.sleep(0.1)


@contextmanager
def serving(runner, workdir: Path, *, api_key: str | None = None, **settings):
    """The API over ``runner`` on a free loopback port, stopped (and its Jobs closed) at the end."""
    jobs = Jobs(runner, workdir, Settings(**settings))
    app = build_app(jobs, api_key=api_key, page=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Api(f"http://127.0.0.1:{port}", jobs, runner)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


class Receiver:
    """A webhook receiver on loopback: records each POSTed body; answers 500 to the first ``fail_first``."""

    def __init__(self, fail_first: int = 0):
        self.bodies: list[dict] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(receiver.answers) < fail_first else 200
                receiver.answers.append(status)
                if status == 200:
                    receiver.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, status: str) -> list[dict]:
        deadline = time.monotonic() + DEADLINE_S
        while not any(b["status"] == status for b in self.bodies):
            assert time.monotonic() < deadline, f"no {status} webhook: {self.bodies}"
            time.sleep(0.05)
        return self.bodies

    def close(self):
        self.server.shutdown()


def data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def inputs(portrait, speech, **options) -> dict:
    return {"image": data_url(portrait, "image/png"), "audio": data_url(speech, "audio/wav"), **options}


def decode(mp4: bytes, tmp_path: Path) -> tuple[np.ndarray, float, bool]:
    """The frames (uint8 [F, H, W, 3]), the frame rate and whether there is an audio stream."""
    import av

    path = tmp_path / f"decoded-{time.monotonic_ns()}.mp4"
    path.write_bytes(mp4)
    with av.open(str(path)) as container:
        has_audio = bool(container.streams.audio)
        fps = float(container.streams.video[0].average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, fps, has_audio


def declare_a_body(url: str, path: str, length: int) -> tuple[int, str]:
    """POST with ``Content-Length: length`` but send no body: the status and detail the server answers with
    (it must answer from the header alone; ``requests`` would always send the real length)."""
    import socket
    import urllib.parse

    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer s3cret\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"]


def expected_frames(speech: Path) -> int:
    """2N-1: RIFE doubles the N generated frames."""
    from sonic_rt.audio_features import num_generated_frames
    from sonic_rt.media import load_audio

    return 2 * num_generated_frames(len(load_audio(speech))) - 1


@pytest.fixture(scope="module")
def api(runtime, tmp_path_factory):
    """The API over the session runtime; webhooks may reach this machine (the receivers are on loopback)."""
    with serving(LocalRunner(runtime), tmp_path_factory.mktemp("api"), allow_private_urls=True) as served:
        yield served


@pytest.fixture(scope="module")
def strict_api(runtime, tmp_path_factory):
    """The API with the defaults of a shared server: a key, no private addresses, one job may wait."""
    with serving(LocalRunner(runtime), tmp_path_factory.mktemp("strict"), api_key="s3cret", max_queue=1) as served:
        yield served


KEY = {"Authorization": "Bearer s3cret"}


# ---------------------------------------------------------------------------------------------- Cog's contract
@pytest.mark.slow
def test_a_cog_client_gets_the_video_by_webhook_with_the_events_in_order(api, portrait, speech, tmp_path):
    receiver = Receiver()
    try:
        r = requests.put(
            f"{api.url}/predictions/wjx3whax6rf4vphkegkhcvpv6a",
            json={"input": inputs(portrait, speech, **SMALL), "webhook": receiver.url},
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert r.status_code == 202
        assert r.json()["id"] == "wjx3whax6rf4vphkegkhcvpv6a" and r.json()["status"] == "starting"
        bodies = receiver.wait_for("succeeded")
    finally:
        receiver.close()
    statuses = [b["status"] for b in bodies]
    assert statuses[0] == "starting" and statuses[-1] == "succeeded"
    assert set(statuses[1:-1]) <= {"processing"} and statuses.count("succeeded") == 1
    logs = [b["logs"] for b in bodies]
    assert all(later.startswith(earlier) for earlier, later in zip(logs, logs[1:])), "logs went backwards"
    with_output = [i for i, b in enumerate(bodies) if b["output"]]
    assert with_output and bodies[with_output[0]]["status"] == "processing", "no output event before completed"
    final = bodies[-1]
    assert final["metrics"]["predict_time"] > 0 and final["error"] is None
    video = requests.get(final["output"], timeout=30)
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4" and video.headers["x-content-type-options"] == "nosniff"
    frames, fps, has_audio = decode(video.content, tmp_path)
    assert frames.shape == (expected_frames(speech), 64, 64, 3)
    assert fps == pytest.approx(25) and has_audio
    assert final["metrics"]["frames"] == frames.shape[0]


@pytest.mark.slow
def test_the_same_put_three_times_starts_one_run(api, portrait, speech):
    body = {"input": inputs(portrait, speech, **SMALL)}
    before = api.runner.calls
    answers = [
        requests.put(f"{api.url}/predictions/same-id-3x", json=body, headers={"Prefer": "respond-async"}, timeout=30)
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert {a.json()["id"] for a in answers} == {"same-id-3x"}
    assert api.wait("same-id-3x")["status"] == "succeeded"
    again = requests.put(f"{api.url}/predictions/same-id-3x", json=body, timeout=30)  # sync, after the end
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    assert api.runner.calls - before == 1
    assert not list(api.jobs.inputs.iterdir()), "a repeated PUT left its decoded inputs behind"


@pytest.mark.slow
def test_cog_sonic_names_give_the_same_video_as_ours_for_the_same_seed(api, portrait, speech, tmp_path):
    cog = {"dynamic_scale": 1.2, "min_resolution": 64, "inference_steps": 1, "keep_resolution": True, "seed": 7}
    ours = {"dynamic_scale": 1.2, "min_resolution": 64, "steps": 1, "paste_back": True, "seed": 7}
    a = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech, **cog)}, timeout=DEADLINE_S)
    b = requests.post(
        f"{api.url}/predictions",
        json={"input": inputs(portrait, speech, **ours), "output_as": "data_url"},
        timeout=DEADLINE_S,
    )
    assert a.status_code == b.status_code == 200  # synchronous: the finished prediction
    assert a.json()["status"] == b.json()["status"] == "succeeded"
    assert b.json()["output"].startswith("data:video/mp4;base64,")
    first, _, _ = decode(requests.get(a.json()["output"], timeout=30).content, tmp_path)
    second, _, _ = decode(base64.b64decode(b.json()["output"].split(",", 1)[1]), tmp_path)
    assert first.shape[1:] == (512, 512, 3), "keep_resolution did not paste back at the photo's size"
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_sse_stream_reports_windows_done_and_video_written_before_the_last_window(api, portrait, speech, tmp_path):
    """12 s of speech at 64 px, 2 steps: 6 windows per step; the wavefront writes chunks before the last ones."""
    from sonic_rt import media

    samples = media.load_audio(speech, 16000)
    twelve = media.write_wav(tmp_path / "12s.wav", np.resize(samples, 12 * 16000), 16000)
    events = []
    with requests.post(
        f"{api.url}/predictions",
        json={"input": inputs(portrait, twelve, steps=2, min_resolution=64)},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=DEADLINE_S,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "completed"
    outputs = [d["kind"] for n, d in events if n == "output"]  # the live segments (tests/test_live.py), the video
    assert outputs == ["segment"] * (len(outputs) - 1) + ["video"] and len(outputs) >= 2
    progress = [d for n, d in events if n == "progress"]
    done = [p["windows_done"] for p in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["windows_total"] == 2 * 6
    assert any(p["video_seconds"] > 0 and p["windows_done"] < p["windows_total"] for p in progress), progress
    assert events[-1][1]["status"] == "succeeded"
    assert events[-1][1]["metrics"]["video_seconds"] == pytest.approx(progress[-1]["video_seconds"], abs=0.05)


@pytest.mark.slow
def test_webhook_filter_and_retries_deliver_only_completed_after_two_failures(api, portrait, speech):
    receiver = Receiver(fail_first=2)
    try:
        r = requests.post(
            f"{api.url}/predictions",
            json={
                "input": inputs(portrait, speech, **SMALL),
                "webhook": receiver.url,
                "webhook_events_filter": ["completed"],
            },
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert r.status_code == 202
        bodies = receiver.wait_for("succeeded")
    finally:
        receiver.close()
    assert receiver.answers == [500, 500, 200]
    assert [b["status"] for b in bodies] == ["succeeded"]


@pytest.mark.slow
def test_multipart_upload_runs_like_data_urls(api, portrait, speech):
    with open(portrait, "rb") as image, open(speech, "rb") as audio:
        r = requests.post(
            f"{api.url}/predictions",
            files={"image": ("face.png", image, "image/png"), "audio": ("speech.wav", audio, "audio/wav")},
            data={"steps": "1", "min_resolution": "64", "crop": "true"},
            timeout=DEADLINE_S,
        )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and r.json()["input"]["steps"] == 1


# ---------------------------------------------------------------------------------------------------- cancel
@pytest.mark.slow
def test_cancel_a_waiting_and_a_running_job_leaves_no_file_and_the_next_one_runs(
    strict_api, portrait, long_speech, speech
):
    api = strict_api
    before = api.outputs()
    long = {"input": inputs(portrait, long_speech, steps=50, min_resolution=64)}
    async_ = {**KEY, "Prefer": "respond-async"}
    assert requests.put(f"{api.url}/predictions/running", json=long, headers=async_, timeout=30).status_code == 202
    deadline = time.monotonic() + DEADLINE_S
    while (
        requests.get(f"{api.url}/predictions/running", headers=KEY, timeout=10)
        .json()["progress"]
        .get("windows_done", 0)
        < 1
    ):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    assert requests.put(f"{api.url}/predictions/waiting", json=long, headers=async_, timeout=30).status_code == 202
    full = requests.put(f"{api.url}/predictions/one-too-many", json=long, headers=async_, timeout=30)
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert requests.get(f"{api.url}/predictions/one-too-many", headers=KEY, timeout=10).status_code == 404

    waiting = requests.post(f"{api.url}/predictions/waiting/cancel", headers=KEY, timeout=30)
    assert waiting.status_code == 200 and waiting.json()["status"] == "canceled"
    assert waiting.json()["started_at"] is None
    running = requests.post(f"{api.url}/predictions/running/cancel", headers=KEY, timeout=DEADLINE_S)
    assert running.status_code == 200
    body = running.json()
    assert body["status"] == "canceled" and body["output"] is None
    assert 1 <= body["progress"]["windows_done"] < body["progress"]["windows_total"]
    assert api.outputs() == before, "a cancelled job left a file behind"
    assert requests.post(f"{api.url}/predictions/unknown/cancel", headers=KEY, timeout=10).status_code == 404

    after = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech, **SMALL)}, headers=KEY)
    assert after.json()["status"] == "succeeded"
    assert len(api.outputs()) == len(before) + 1


# ------------------------------------------------------------------------------------------------- bad input
def _grey(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    return path


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_the_server_keeps_serving(strict_api, portrait, speech, tmp_path):
    from sonic_rt import media

    api = strict_api
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really" * 20)
    silence = media.write_wav(tmp_path / "silence.wav", np.zeros(160, np.float32), 16000)  # 10 ms
    cases = {
        "corrupt image": ({"image": data_url(corrupt, "image/png")}, r"^image\.png: "),
        "no face": ({"image": data_url(_grey(tmp_path), "image/png")}, r"^image\.png: .*face"),
        "10 ms of silence": ({"audio": data_url(silence, "audio/wav")}, r"^audio\.wav: .*shorter than one"),
    }

    for case, (override, pattern) in cases.items():
        body = {"input": {**inputs(portrait, speech, **SMALL), **override}}
        r = requests.post(f"{api.url}/predictions", json=body, headers=KEY, timeout=DEADLINE_S)
        assert r.status_code == 200, case
        pred = r.json()
        assert pred["status"] == "failed", case
        assert re.search(pattern, pred["error"]) and "\n" not in pred["error"], (case, pred["error"])
        assert str(api.jobs.workdir) not in pred["error"], "the error names a path on the server"
        assert "Traceback" not in pred["error"] and pred["output"] is None
    status, detail = declare_a_body(api.url, "/predictions", 2 * 1024**3)  # 2 GB announced, none sent
    assert status == 413 and "accepts up to" in detail
    refused = {
        "unknown input": ({"steps_typo": 3}, r"^input\.steps_typo: Extra inputs are not permitted"),
        "out of range": ({"steps": 0}, r"^input\.steps: "),
        "both names": ({"steps": 2, "inference_steps": 3}, r"^input: .*inference_steps"),
        "not a URL": ({"image": "face.png"}, r"^input\.image: "),
        "a loopback URL": (
            {"audio": "http://127.0.0.1:9/speech.wav"},
            r"^input\.audio: .*loopback.*--allow-private-urls",
        ),
        "a private URL": ({"image": "http://10.0.0.1/face.png"}, r"^input\.image: .*private address.*--allow-private"),
        "a link-local URL": ({"image": "http://169.254.169.254/x"}, r"^input\.image: .*link-local"),
    }
    for case, (override, pattern) in refused.items():
        body = {"input": {**inputs(portrait, speech, **SMALL), **override}}
        r = requests.post(f"{api.url}/predictions", json=body, headers=KEY, timeout=30)
        assert r.status_code == 422 and re.search(pattern, r.json()["detail"]), (case, r.text)
    assert requests.get(f"{api.url}/health-check", timeout=10).json()["status"] == "READY"
    assert not list(api.jobs.inputs.iterdir()), "refused or failed requests left their inputs behind"


@pytest.mark.slow
def test_a_shared_server_refuses_requests_without_its_key(strict_api, portrait, speech):
    api = strict_api
    body = {"input": inputs(portrait, speech, **SMALL)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = requests.post(f"{api.url}/predictions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{api.url}/predictions/anything", timeout=10).status_code == 401
    assert requests.get(f"{api.url}/health-check", timeout=10).status_code == 200
    assert requests.get(f"{api.url}/openapi.json", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------ the schema
def test_openapi_input_lists_every_option_with_its_default_unit_and_range(api):
    doc = requests.get(f"{api.url}/openapi.json", timeout=10).json()
    schema = doc["components"]["schemas"]["Input"]
    props = schema["properties"]
    assert schema["required"] == ["image", "audio"] and schema["additionalProperties"] is False
    for info in AnimateOptions.describe():
        if info.name in SERVER_ONLY_OPTIONS:
            assert info.name not in props
            continue
        assert props[info.name]["default"] == (list(info.default) if isinstance(info.default, tuple) else info.default)
        assert info.help in props[info.name]["description"]
        if info.unit:
            assert props[info.name]["x-unit"] == info.unit
    assert props["steps"]["minimum"] == 1 and props["min_resolution"]["anyOf"][0]["maximum"] == 1024
    for alias in COG_SONIC_NAMES:
        assert alias in props
    for path in (
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
        "/health-check",
    ):
        assert path in doc["paths"], path
    assert "PredictionRequest" in doc["components"]["schemas"]


@pytest.mark.parametrize(
    "name, below",
    [("steps", 0), ("frames_per_window", 0), ("shift_offset", -1), ("dynamic_scale", -0.5), ("max_output_side", 63)],
)
def test_the_api_minimums_are_where_the_runtime_starts_refusing(runtime, portrait, speech, name, below):
    """RANGES' lower bounds are the runtime's own: one step below is refused by check_inputs, the bound is not."""
    lowest = RANGES[name][0]
    runtime.check_inputs(str(portrait), str(speech), None, AnimateOptions(**{name: lowest}))
    with pytest.raises(InputError):
        runtime.check_inputs(str(portrait), str(speech), None, AnimateOptions(**{name: below}))


# --------------------------------------------------------------------------------- the job layer's own rules
class FileRunner:
    """A stand-in runner: writes a few bytes as the "video" (after ``gate`` is set, when given); 2 windows in 0.5 s
    of denoising, 1 frame at 25 fps, 1 MiB of peak memory. An image file whose bytes are ``bad`` fails the job as
    bad input does."""

    TIMINGS = {"preprocess": 0.1, "denoise": 0.5, "decode": 0.2, "encode": 0.1, "total": 0.9}

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.calls = gate, 0

    def setup(self):
        pass

    def describe(self):
        return {"model": "stand-in"}

    async def run(self, job, report):
        from sonic_rt import ImageError

        self.calls += 1
        report("plan", {"windows_total": 2})
        if job.image.read_bytes() == b"bad":
            raise ImageError("not a recognised image file", job.image)
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 60)
        job.out.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        return JobResult(
            num_frames=1,
            fps=25.0,
            width=64,
            height=64,
            timings=dict(self.TIMINGS),
            windows=2,
            peak_memory_bytes=2**20,
            device="cpu",
        )

    def close(self):
        pass


def test_a_restarted_server_runs_the_jobs_it_did_not_finish_again_under_their_ids(tmp_path, portrait, speech):
    """Records a crashed server left running and waiting (their inputs in their folders) run again at the next
    start, oldest first, each once; a leftover partial output and an unowned input folder are deleted."""
    store = JobStore(tmp_path / "jobs.sqlite")
    folders = {}
    for pred_id, status in (("was-running", PROCESSING), ("was-waiting", STARTING)):
        folder = tmp_path / "inputs" / pred_id
        folder.mkdir(parents=True)
        files = {"image": {"path": str(folder / "image.png")}, "audio": {"path": str(folder / "audio.wav")}}
        (folder / "image.png").write_bytes(portrait.read_bytes())
        (folder / "audio.wav").write_bytes(speech.read_bytes())
        attempts = 1 if status == PROCESSING else 0
        store.add(Prediction(id=pred_id, status=status, files=files, input_folder=str(folder), attempts=attempts))
        folders[pred_id] = folder
    store.close()  # the process died: nothing else was written
    (tmp_path / "outputs").mkdir()
    partial = tmp_path / "outputs" / ".token.abc123.partial.mp4"
    partial.write_bytes(b"half a video")
    (tmp_path / "inputs" / "orphan").mkdir()
    runner = FileRunner()
    with serving(runner, tmp_path) as api:
        assert not partial.exists() and not (tmp_path / "inputs" / "orphan").exists()
        running, waiting = api.wait("was-running"), api.wait("was-waiting")
        assert running["status"] == waiting["status"] == SUCCEEDED
        assert running["attempts"] == 2 and waiting["attempts"] == 1
        assert "the server restarted while this prediction was running: it runs again" in running["logs"]
        assert runner.calls == 2 and len(api.outputs()) == 2
        assert not folders["was-running"].exists() and not folders["was-waiting"].exists()


def test_a_job_still_running_when_the_grace_ends_runs_again_at_the_next_start(tmp_path, portrait, speech):
    """SIGTERM's drain: no new prediction (Stopping, health STOPPING); the running job outlasts the grace, so it is
    interrupted with its record left `processing`; the next server runs it again under its id."""
    from sonic_rt.serving.inputs import parse_input
    from sonic_rt.serving.jobs import NewPrediction, Stopping

    raw = {"image": data_url(portrait, "image/png"), "audio": data_url(speech, "audio/wav")}

    async def stopped_during_the_job():
        gate = threading.Event()
        jobs = Jobs(FileRunner(gate), tmp_path)
        await jobs.start()
        folder = jobs.input_folder()
        parsed = parse_input(raw, folder, max_file_bytes=10**8)
        await jobs.create(NewPrediction(id="slow", parsed=parsed, folder=folder))
        while jobs.get("slow").status != PROCESSING:
            await asyncio.sleep(0.01)
        await jobs.drain(0.2)
        assert jobs.health()["status"] == "STOPPING"
        late = jobs.input_folder()
        with pytest.raises(Stopping):
            await jobs.create(
                NewPrediction(id="late", parsed=parse_input(raw, late, max_file_bytes=10**8), folder=late)
            )
        await jobs.close()
        gate.set()  # the stand-in's thread returns; the job was interrupted already

    asyncio.run(stopped_during_the_job())
    runner = FileRunner()
    with serving(runner, tmp_path) as api:
        assert [p.id for p in api.jobs.recovered] == ["slow"]
        body = api.wait("slow")
        assert body["status"] == SUCCEEDED and body["attempts"] == 2 and runner.calls == 1
        assert requests.get(f"{api.url}/predictions/late", timeout=10).status_code == 404


def test_a_completed_webhook_the_stopped_server_did_not_get_out_is_sent_once_at_the_next_start(tmp_path):
    receiver = Receiver()
    store = JobStore(tmp_path / "jobs.sqlite")
    ended = dict(status=SUCCEEDED, webhook=receiver.url, last_event_id="a-9")
    store.add(Prediction(id="pending", webhooks_done=["start"], **ended))
    store.add(Prediction(id="delivered", webhooks_done=["start", "completed"], **ended))
    store.add(Prediction(id="older", status=SUCCEEDED, webhook=receiver.url))  # a record that tracked nothing
    store.close()
    try:
        with serving(FileRunner(), tmp_path, allow_private_urls=True) as api:
            receiver.wait_for("succeeded")
            deadline = time.monotonic() + DEADLINE_S
            while "completed" not in api.jobs.store.get("pending").webhooks_done:
                assert time.monotonic() < deadline, "the delivery was not recorded"
                time.sleep(0.05)
        with serving(FileRunner(), tmp_path, allow_private_urls=True):
            time.sleep(0.5)  # a second start sends nothing more
    finally:
        receiver.close()
    assert [b["id"] for b in receiver.bodies] == ["pending"]


def test_a_second_server_on_the_same_workdir_is_refused(tmp_path):
    from sonic_rt import SonicError

    first = Jobs(FileRunner(), tmp_path)
    try:
        with pytest.raises(SonicError, match="in use by another server"):
            Jobs(FileRunner(), tmp_path)
    finally:
        first.store.close()


def test_a_job_outlives_the_client_that_dropped_its_connection(tmp_path, portrait, speech):
    """A sync PUT whose client goes away while the job runs: the job runs on; the client finds the result by id."""
    import socket

    runner = FileRunner(gate=threading.Event())
    with serving(runner, tmp_path) as api:
        body = json.dumps({"input": inputs(portrait, speech)}).encode()
        port = int(api.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                f"PUT /predictions/dropped HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + DEADLINE_S
            while (r := requests.get(f"{api.url}/predictions/dropped", timeout=10)).status_code == 404 or r.json()[
                "status"
            ] != "processing":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
        # the client has hung up; the job is still running
        runner.gate.set()
        assert api.wait("dropped")["status"] == "succeeded"
        assert runner.calls == 1


def test_outputs_are_deleted_after_keep_outputs_and_the_record_says_data_removed(tmp_path, portrait, speech):
    with serving(FileRunner(), tmp_path, keep_outputs_s=3600) as api:
        pred = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech)}, timeout=30).json()
        assert requests.get(pred["output"], timeout=10).status_code == 200
        assert api.jobs.expire(now=time.time() + 1800) == 0  # half-way: kept
        assert api.jobs.expire(now=time.time() + 3601) == 1
        after = requests.get(f"{api.url}/predictions/{pred['id']}", timeout=10).json()
        assert after["data_removed"] is True and after["output"] is None and after["status"] == "succeeded"
        assert requests.get(pred["output"], timeout=10).status_code == 404
        assert not api.outputs()


def metric_samples(text: str) -> dict[tuple, float]:
    """``{(sample name, ((label, value), ...)): value}`` of a Prometheus text page, read by prometheus_client's own
    parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_what_the_jobs_did(tmp_path, portrait, speech):
    """One job succeeds (with a webhook), one is canceled while it waits, one fails on its input; a full line (429),
    an unknown input (422) and a missing key (401) are refused: /metrics says exactly that."""
    gate, receiver = threading.Event(), Receiver()
    async_ = {**KEY, "Prefer": "respond-async"}
    body = {"input": inputs(portrait, speech)}
    try:
        with serving(FileRunner(gate), tmp_path, api_key="s3cret", max_queue=1, allow_private_urls=True) as api:
            hooked = {**body, "webhook": receiver.url}
            assert requests.put(f"{api.url}/predictions/ok", json=hooked, headers=async_, timeout=30).status_code == 202
            deadline = time.monotonic() + DEADLINE_S
            while api.jobs.get("ok").status != "processing":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.02)
            assert requests.put(f"{api.url}/predictions/wait", json=body, headers=async_, timeout=30).status_code == 202
            full = requests.put(f"{api.url}/predictions/full", json=body, headers=async_, timeout=30)
            assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
            assert requests.post(f"{api.url}/predictions/wait/cancel", headers=KEY, timeout=30).json()["status"] == (
                "canceled"
            )
            gate.set()
            assert api.wait("ok", KEY)["status"] == "succeeded"
            bad = {"input": {**inputs(portrait, speech), "image": "data:image/png;base64,YmFk"}}  # b"bad"
            assert requests.post(f"{api.url}/predictions", json=bad, headers=KEY, timeout=30).json()["status"] == (
                "failed"
            )
            unknown = {"input": {**inputs(portrait, speech), "stepz": 1}}
            assert requests.post(f"{api.url}/predictions", json=unknown, headers=KEY, timeout=30).status_code == 422
            assert requests.get(f"{api.url}/predictions/ok", timeout=10).status_code == 401
            receiver.wait_for("succeeded")
            delivered = 'sonic_rt_webhook_deliveries_total{event="completed",result="delivered"} 1.0'
            deadline = time.monotonic() + DEADLINE_S
            while delivered not in (page := requests.get(f"{api.url}/metrics", headers=KEY, timeout=10)).text:
                assert time.monotonic() < deadline, "the completed webhook was not counted"
                time.sleep(0.05)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
            assert requests.get(f"{api.url}/metrics", timeout=10).status_code == 401  # behind the key
    finally:
        receiver.close()
    values = metric_samples(page.text)

    def value(name, **labels):
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    for status, count in (("succeeded", 1), ("canceled", 1), ("failed", 1)):
        assert value("sonic_rt_predictions_total", status=status) == count, status
    for code in ("429", "422", "401"):
        assert value("sonic_rt_rejected_requests_total", code=code) == 1, code
    assert value("sonic_rt_queue_depth") == value("sonic_rt_jobs_running") == 0
    assert value("sonic_rt_queue_wait_seconds_count") == 2  # ok and bad started; wait was canceled first
    assert value("sonic_rt_run_seconds_count") == 2
    assert value("sonic_rt_stage_seconds_count", stage="denoise") == 1
    assert value("sonic_rt_stage_seconds_sum", stage="denoise") == pytest.approx(0.5)
    assert value("sonic_rt_stage_seconds_count", stage="load") == 1
    assert value("sonic_rt_stage_seconds_count", stage="total") == 0  # the sum of the others, not a stage
    assert value("sonic_rt_windows_per_second_sum") == pytest.approx(4.0)  # 2 windows in 0.5 s
    assert value("sonic_rt_realtime_factor_count") == 1
    assert value("sonic_rt_peak_memory_bytes_sum", device="cpu") == 2**20
    assert value("sonic_rt_webhook_deliveries_total", event="start", result="delivered") == 1
    assert value("sonic_rt_webhook_deliveries_total", event="completed", result="delivered") == 1


def test_a_loopback_webhook_is_refused_at_creation_naming_the_flag(strict_api, portrait, speech):
    api = strict_api
    receiver = Receiver()  # a usual local receiver
    try:
        for url in (receiver.url, receiver.url.replace("127.0.0.1", "localhost"), "http://[::1]:9/hook"):
            body = {"input": inputs(portrait, speech, **SMALL), "webhook": url}
            r = requests.put(f"{api.url}/predictions/hook-refused", json=body, headers=KEY, timeout=30)
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert detail.startswith("webhook: refused: ") and "loopback" in detail, detail
            assert "--allow-private-urls" in detail
        bad_filter = {"input": inputs(portrait, speech, **SMALL), "webhook_events_filter": ["start", "finished"]}
        r = requests.put(f"{api.url}/predictions/hook-refused", json=bad_filter, headers=KEY, timeout=30)
        assert r.status_code == 422 and r.json()["detail"].startswith("webhook_events_filter: unknown event 'finished'")
        assert requests.get(f"{api.url}/predictions/hook-refused", headers=KEY, timeout=10).status_code == 404
        assert not receiver.bodies and not list(api.jobs.inputs.iterdir())
    finally:
        receiver.close()


class SteppedRunner(FileRunner):
    """A stand-in runner that reports the plan, waits for ``first``, reports a window, waits for ``second``."""

    def __init__(self):
        super().__init__()
        self.first, self.second = threading.Event(), threading.Event()

    async def run(self, job, report):
        report("plan", {"windows_total": 2})
        await asyncio.to_thread(self.first.wait, 60)
        report("window", {"step": 0, "index": [0]})
        await asyncio.to_thread(self.second.wait, 60)
        job.out.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        return JobResult(num_frames=1, fps=25.0, width=64, height=64)


def read_sse(lines, until) -> list[tuple[str | None, str, object]]:
    """``(id, event, data)`` of each event, and ``(None, "comment", text)`` of each comment, from ``lines`` (a
    response's ``iter_lines``), until ``until(items)``."""
    items, event_id, name = [], None, None
    for line in lines:
        if line.startswith(":"):
            items.append((None, "comment", line[1:].strip()))
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            items.append((event_id, name, json.loads(line[6:])))
            event_id = name = None
        if until(items):
            break
    return items


def test_an_event_stream_resumes_after_last_event_id_and_sends_heartbeats(tmp_path, portrait, speech, monkeypatch):
    from sonic_rt.serving import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "HEARTBEAT_S", 0.2)
    runner = SteppedRunner()
    sse = {"Accept": "text/event-stream"}
    with serving(runner, tmp_path) as api:
        r = requests.put(
            f"{api.url}/predictions/resume",
            json={"input": inputs(portrait, speech)},
            timeout=30,
            headers={"Prefer": "respond-async"},
        )
        assert r.status_code == 202
        url = f"{api.url}/predictions/resume"
        deadline = time.monotonic() + DEADLINE_S
        while api.jobs.get("resume").progress.get("windows_total") != 2:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.02)
        with requests.get(url, headers=sse, stream=True, timeout=30) as first:
            seen = read_sse(
                first.iter_lines(decode_unicode=True), lambda items: any(kind == "comment" for _, kind, _ in items)
            )
        assert [kind for _, kind, _ in seen][:2] == ["start", "progress"] and seen[-1] == (None, "comment", "heartbeat")
        last_id = [event_id for event_id, _, _ in seen if event_id][-1]
        runner.first.set()  # a window is done while no one listens
        while api.jobs.get("resume").progress.get("windows_done") != 1:
            time.sleep(0.02)
        with requests.get(url, headers={**sse, "Last-Event-ID": last_id}, stream=True, timeout=30) as resumed:
            lines = resumed.iter_lines(decode_unicode=True)
            missed = read_sse(lines, lambda items: any(kind == "comment" for _, kind, _ in items))
            runner.second.set()
            rest = read_sse(lines, lambda items: items and items[-1][1] == "completed")
        events = [(kind, data) for _, kind, data in missed + rest if kind != "comment"]
        assert events[0] == ("progress", {**events[0][1], "windows_done": 1}), "the missed event did not come first"
        assert "start" not in [kind for kind, _ in events], "the resumed stream started over"
        assert events[-1][0] == "completed" and events[-1][1]["status"] == "succeeded"
        completed_id = (missed + rest)[-1][0]
        assert completed_id and int(completed_id.rsplit("-", 1)[1]) > int(last_id.rsplit("-", 1)[1])
        after = requests.get(url, headers={**sse, "Last-Event-ID": completed_id}, timeout=30)
        assert after.status_code == 204  # an EventSource stops reconnecting
        again = requests.get(url, headers=sse, timeout=30)  # a new subscriber: the ended prediction at once
        assert again.status_code == 200 and "event: completed" in again.text


def test_health_says_starting_then_ready_or_setup_failed(tmp_path):
    from sonic_rt import CheckpointError

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return None

    class Loading(LocalRunner):
        def describe(self):
            return {"model": "stand-in"}

    with serving(Loading(load=slow_load), tmp_path / "a") as api:
        assert requests.get(f"{api.url}/health-check", timeout=10).json()["status"] == "STARTING"
        assert requests.get(f"{api.url}/healthz", timeout=10).status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while (health := requests.get(f"{api.url}/health-check", timeout=10).json())["status"] == "STARTING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health["status"] == "READY" and health["setup"]["status"] == "succeeded"
        assert health["setup"]["started_at"] <= health["setup"]["completed_at"]

    def broken_load():
        raise CheckpointError("missing unet.pth", "/models/sonic")

    with serving(Loading(load=broken_load), tmp_path / "b") as api:
        deadline = time.monotonic() + 30
        while (health := requests.get(f"{api.url}/health-check", timeout=10).json())["status"] == "STARTING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health["status"] == "SETUP_FAILED" and health["setup"]["logs"] == "sonic: missing unet.pth\n"
        r = requests.post(f"{api.url}/predictions", json={"input": {"image": "data:,x", "audio": "data:,y"}})
        assert r.status_code == 503 and "could not be loaded" in r.json()["detail"]


# ---------------------------------------------------------------------------------------- outbound requests
@pytest.mark.parametrize(
    "address, refused",
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("192.168.0.1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "a private address"),
        ("224.0.0.1", "a multicast address"),
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
    ],
)
def test_outbound_requests_reach_public_addresses_only(address, refused):
    from sonic_rt.serving.security import refusal

    assert refusal(address) == refused


def test_a_name_that_resolves_to_loopback_is_refused_and_allowed_with_the_flag():
    from sonic_rt.serving.security import RefusedAddress, checked_address

    with pytest.raises(RefusedAddress, match=r"localhost \(127\.0\.0\.1\) is a loopback address"):
        asyncio.run(checked_address("localhost", 80, allow_private=False))
    assert asyncio.run(checked_address("localhost", 80, allow_private=True)) in ("127.0.0.1", "::1")


def test_a_redirect_to_a_private_address_is_refused(tmp_path):
    """A public-looking first hop cannot lead the fetch into the private network: each hop is checked."""
    from sonic_rt.serving.inputs import FetchError, fetch

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/face.png"
        with pytest.raises(FetchError, match="169.254.169.254 is a link-local address"):
            # the first hop is loopback, allowed here only to stand in for a public server
            asyncio.run(_fetch_allowing_first_hop(fetch, url, tmp_path))
    finally:
        server.shutdown()


async def _fetch_allowing_first_hop(fetch, url, folder):
    from sonic_rt.serving import inputs, security

    original = security.checked_address
    hops = []

    async def first_hop_allowed(host, port, allow_private):
        hops.append(host)
        return await original(host, port, allow_private or len(hops) == 1)

    inputs.checked_address = first_hop_allowed
    try:
        return await fetch(url, folder, "image", max_bytes=1024, timeout_s=10)
    finally:
        inputs.checked_address = original


def test_a_fetch_larger_than_the_cap_is_refused_and_leaves_nothing(tmp_path):
    from sonic_rt.serving.inputs import FetchError, fetch

    class Big(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.end_headers()  # no Content-Length: the cap is found while reading
            self.wfile.write(b"\x00" * 5000)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/speech.wav"
        with pytest.raises(FetchError, match="larger than this server's 1000 bytes"):
            asyncio.run(fetch(url, tmp_path / "in", "audio", max_bytes=1000, timeout_s=10, allow_private=True))
    finally:
        server.shutdown()


def test_binding_beyond_loopback_needs_a_key_or_insecure():
    from sonic_rt import SonicError
    from sonic_rt.serving.security import check_bind

    assert check_bind("127.0.0.1", None, False) is None
    assert check_bind("::1", None, False) is None
    assert check_bind("0.0.0.0", "key", False) is None
    with pytest.raises(SonicError, match="--api-key KEY or the SONIC_RT_API_KEY"):
        check_bind("0.0.0.0", None, False)
    assert "WITHOUT AUTHENTICATION" in check_bind("0.0.0.0", None, True)
