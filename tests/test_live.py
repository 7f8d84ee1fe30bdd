"""The live stream of a job: the page plays the first seconds while the rest is made, and API clients get each
finished segment (SSE and webhook ``output`` events, the record's ``stream``), served by this server.

The job layer's rules (announced only when finished, served with the right types, removed on cancel, failure and
expiry, swept after a restart) use a stand-in runner that writes a real HLS stream with
:class:`sonic_rt.media.HlsWriter` and no model, one chunk at a time as its test allows. The end-to-end tests run the
demo runtime at 64 px: the SSE stream of a 12 s job (each segment fetched and decoded the moment it is announced),
a cancel mid-stream, and the page in headless Chromium on 60 s of speech. The browser test saves a screenshot
taken while the job runs to ``$SONIC_RT_LIVE_SCREENSHOT`` (default: pytest's tmp); ``docs/live.png`` is written
by::

    SONIC_RT_LIVE_SCREENSHOT=docs/live.png .venv/bin/python -m pytest tests/test_live.py -k browser
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")
requests = pytest.importorskip("requests", reason="requests is not installed")

from test_predictions import DEADLINE_S, Receiver, inputs, serving  # noqa: E402

from sonic_rt import SonicError, media  # noqa: E402
from sonic_rt.serving import live  # noqa: E402
from sonic_rt.serving.jobs import JobResult, Jobs  # noqa: E402
from sonic_rt.serving.local import LocalRunner  # noqa: E402

FPS = 25
CHUNK = 16  # frames per written chunk (8 generated frames after RIFE x2, as the runtime writes them)


# ------------------------------------------------------------------------------------------------------ helpers
class HlsRunner:
    """A stand-in runner that writes a real HLS stream (64 px, 25 fps, a tone as its audio) where the job's options
    say, ``seconds`` long, one chunk of 16 frames at a time, reporting ``frames`` after each like the runtime.

    Args:
        seconds: length of the video.
        hold_after: chunks after which it waits for :attr:`go` (None: never waits).
        fail_after: chunks after which it raises a ``SonicError`` (None: never).
    """

    def __init__(self, seconds: float = 5.0, hold_after: int | None = None, fail_after: int | None = None):
        self.seconds, self.hold_after, self.fail_after = seconds, hold_after, fail_after
        self.go, self.holding = threading.Event(), threading.Event()

    def setup(self):
        pass

    def describe(self):
        return {"model": "stand-in"}

    async def run(self, job, report):
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def write():
            frames = int(self.seconds * FPS)
            t = np.arange(int(self.seconds * 16000)) / 16000
            tone = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            with media.HlsWriter(job.options.hls, fps=FPS, width=64, height=64, samples=tone) as writer:
                for chunk, start in enumerate(range(0, frames, CHUNK)):
                    if stop.is_set():
                        raise SonicError("stopped")
                    if chunk == self.hold_after:
                        self.holding.set()
                        self.go.wait(DEADLINE_S)
                    if chunk == self.fail_after:
                        raise SonicError("the stand-in failed half-way")
                    n = min(CHUNK, frames - start)
                    writer.write(np.full((n, 64, 64, 3), (chunk * 37) % 256, np.uint8))
                    loop.call_soon_threadsafe(
                        report, "frames", {"video_seconds": (start + n) / FPS, "written": start + n}
                    )
            job.out.write_bytes(b"\x00\x00\x00\x18ftypmp42")
            return frames

        future = loop.run_in_executor(None, write)
        try:
            frames = await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            self.go.set()
            await asyncio.wait([future])
            raise
        return JobResult(num_frames=frames, fps=float(FPS), width=64, height=64)

    def close(self):
        self.go.set()


def sse(url: str, body: dict):
    """POST with ``Accept: text/event-stream``; yields ``(event, data)`` as they arrive."""
    with requests.post(url, json=body, headers={"Accept": "text/event-stream"}, stream=True, timeout=DEADLINE_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])


def decode(data: bytes, tmp_path: Path) -> tuple[int, float | None, float]:
    """Video frames, seconds of audio (None: no audio stream) and the first frame's time of an mp4, with PyAV."""
    path = tmp_path / f"segment-{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    frames, fps, audio_s = media.read_video(path)
    import av

    with av.open(str(path)) as container:
        first = next(container.decode(video=0))
        start = float(first.pts * first.time_base)
    return len(frames), audio_s, start


def stream_files(jobs: Jobs) -> list[Path]:
    return [p for p in jobs.streams.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------ the playlist itself
def test_a_playlist_lists_only_finished_segments_and_says_when_it_ended(tmp_path):
    playlist = tmp_path / "live.m3u8"
    assert live.read_playlist(playlist) == live.Playlist((), False)  # nothing written yet
    with media.HlsWriter(playlist, fps=FPS, width=64, height=64) as writer:
        writer.write(np.zeros((60, 64, 64, 3), np.uint8))  # 2.4 s: the first segment is closed by the key frame at 2 s
        during = live.read_playlist(playlist)
        assert during == live.Playlist((("live_00000.m4s", 2.0),), False)
        assert live.part(tmp_path, "0.mp4")[0] == "video/mp4"
        assert live.part(tmp_path, "1.mp4") is None  # being written: not served
    after = live.read_playlist(playlist)
    assert after.ended and [name for name, _ in after.segments] == ["live_00000.m4s", "live_00001.m4s"]
    assert after.segments[1][1] == pytest.approx(0.4)
    served = live.part(tmp_path, "live.m3u8")[1]
    assert served.splitlines()[:2] == ["#EXTM3U", live.START_AT_BEGINNING]
    for name in ("../live.m3u8", "live_init.mp4/../x", "live_1.m4s", "x.mp4", "live.m3u8.tmp", "-1.mp4"):
        assert live.part(tmp_path, name) is None, name


# --------------------------------------------------------------------------------------------- the job layer
def test_each_segment_is_announced_once_finished_with_its_seconds_and_served_with_its_type(tmp_path, portrait, speech):
    runner = HlsRunner(seconds=5.0, hold_after=4)  # 4 chunks = 2.56 s written, then it waits
    with serving(runner, tmp_path) as api:
        events = sse(f"{api.url}/predictions", {"input": inputs(portrait, speech)})
        segments = []
        for event, data in events:
            if event == "start":
                pred_id = data["id"]
            if event == "output" and data["kind"] == "segment":
                segments.append(data)
                break
        assert runner.holding.wait(DEADLINE_S)
        first = segments[0]
        assert (first["index"], first["start_seconds"], first["end_seconds"]) == (0, 0.0, 2.0)
        assert first["chunk"].endswith("/0.mp4") and first["playlist"].endswith("/live.m3u8")
        polled = requests.get(f"{api.url}/predictions/{pred_id}", timeout=10).json()
        assert polled["status"] == "processing" and polled["output"] is None
        assert polled["stream"] == {
            "playlist": first["playlist"],
            "segments": [{"index": 0, "url": first["chunk"], "start_seconds": 0.0, "end_seconds": 2.0}],
            "ended": False,
        }
        base = first["playlist"].rsplit("/", 1)[0]
        assert requests.get(f"{base}/1.mp4", timeout=10).status_code == 404  # still being written
        answers = {name: requests.get(f"{base}/{name}", timeout=10) for name in
                   ("live.m3u8", "live_init.mp4", "live_00000.m4s", "0.mp4")}  # fmt: skip
        types = {name: r.headers["content-type"] for name, r in answers.items()}
        assert types == {
            "live.m3u8": "application/vnd.apple.mpegurl",
            "live_init.mp4": "video/mp4",
            "live_00000.m4s": "video/iso.segment",
            "0.mp4": "video/mp4",
        }
        assert all(r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff" for r in answers.values())
        assert answers["live.m3u8"].headers["cache-control"] == "no-store"
        assert answers["0.mp4"].content == answers["live_init.mp4"].content + answers["live_00000.m4s"].content
        frames, audio_s, start = decode(answers["0.mp4"].content, tmp_path)
        assert (frames, start) == (50, 0.0) and audio_s == pytest.approx(2.0, abs=0.07)
        runner.go.set()
        rest = list(events)
    outputs = [d for e, d in rest if e == "output"]
    assert [d["kind"] for d in outputs] == ["segment", "segment", "video"]
    assert [(d["index"], d["start_seconds"], d["end_seconds"]) for d in outputs[:2]] == [(1, 2.0, 4.0), (2, 4.0, 5.0)]
    completed = rest[-1]
    assert completed[0] == "completed" and completed[1]["status"] == "succeeded"
    assert completed[1]["stream"]["ended"] is True and len(completed[1]["stream"]["segments"]) == 3


def test_a_late_subscriber_and_a_finished_prediction_replay_the_segments(tmp_path, portrait, speech):
    with serving(HlsRunner(seconds=4.5), tmp_path) as api:
        done = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech)}, timeout=30).json()
        assert done["status"] == "succeeded"
        with requests.get(
            f"{api.url}/predictions/{done['id']}", headers={"Accept": "text/event-stream"}, stream=True, timeout=30
        ) as r:
            lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("event: ")]
        assert lines == ["event: start"] + ["event: output"] * 4 + ["event: completed"]
        # the playlist of a finished job is a complete one a player can replay from the start
        text = requests.get(done["stream"]["playlist"], timeout=10).text
        assert text.rstrip().endswith("#EXT-X-ENDLIST") and live.START_AT_BEGINNING in text


def test_webhooks_carry_every_segment_so_far_and_the_video_output_is_never_throttled_away(tmp_path, portrait, speech):
    receiver = Receiver()
    try:
        with serving(HlsRunner(seconds=6.5), tmp_path, allow_private_urls=True) as api:
            r = requests.post(
                f"{api.url}/predictions",
                json={"input": inputs(portrait, speech), "webhook": receiver.url, "webhook_events_filter": ["output"]},
                headers={"Prefer": "respond-async"},
                timeout=30,
            )
            assert r.status_code == 202
            api.wait(r.json()["id"])
            deadline = time.monotonic() + DEADLINE_S
            while not any(b["output"] for b in receiver.bodies):
                assert time.monotonic() < deadline, receiver.bodies
                time.sleep(0.05)
    finally:
        receiver.close()
    bodies = receiver.bodies
    assert all(b["status"] == "processing" for b in bodies)
    counts = [len(b["stream"]["segments"]) for b in bodies]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 4  # each carries all so far: none lost
    assert bodies[-1]["output"] is not None and [b["output"] is not None for b in bodies].count(True) == 1
    assert [s["end_seconds"] for s in bodies[-1]["stream"]["segments"]] == [2.0, 4.0, 6.0, 6.48]  # 162 frames


def test_a_failed_job_removes_its_segments(tmp_path, portrait, speech):
    runner = HlsRunner(seconds=8.0, hold_after=9, fail_after=9)  # 2 segments finished, then it fails
    with serving(runner, tmp_path) as api:
        events = sse(f"{api.url}/predictions", {"input": inputs(portrait, speech)})
        segments = []
        for event, data in events:
            if event == "output":
                segments.append(data)
            if len(segments) == 2:
                break
        assert runner.holding.wait(DEADLINE_S)
        assert all(requests.get(d["chunk"], timeout=10).status_code == 200 for d in segments)
        runner.go.set()
        rest = list(events)
        assert rest[-1][0] == "completed"
        assert "output" not in [e for e, _ in rest], "a segment of the failing job was announced"
        final = rest[-1][1]
        assert final["status"] == "failed" and final["error"] == "the stand-in failed half-way"
        assert final["stream"] is None and not stream_files(api.jobs) and not list(api.jobs.streams.iterdir())
        assert all(requests.get(d["chunk"], timeout=10).status_code == 404 for d in segments)
        assert requests.get(segments[0]["playlist"], timeout=10).status_code == 404


def test_a_canceled_job_removes_its_segments(tmp_path, portrait, speech):
    runner = HlsRunner(seconds=8.0, hold_after=6)
    with serving(runner, tmp_path) as api:
        r = requests.post(
            f"{api.url}/predictions", json={"input": inputs(portrait, speech)}, headers={"Prefer": "respond-async"}
        )
        assert runner.holding.wait(DEADLINE_S)
        assert len(stream_files(api.jobs)) >= 3  # playlist, init, a segment
        canceled = requests.post(f"{api.url}/predictions/{r.json()['id']}/cancel", timeout=DEADLINE_S).json()
        assert canceled["status"] == "canceled" and canceled["stream"] is None
        assert not list(api.jobs.streams.iterdir())


def test_segments_are_deleted_with_the_output_after_keep_outputs(tmp_path, portrait, speech):
    with serving(HlsRunner(seconds=2.5), tmp_path, keep_outputs_s=3600) as api:
        pred = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech)}, timeout=30).json()
        url = pred["stream"]["segments"][0]["url"]
        assert requests.get(url, timeout=10).status_code == 200
        assert api.jobs.expire(now=time.time() + 1800) == 0
        assert requests.get(url, timeout=10).status_code == 200  # kept as long as the output
        assert api.jobs.expire(now=time.time() + 3601) == 1
        assert requests.get(url, timeout=10).status_code == 404
        after = requests.get(f"{api.url}/predictions/{pred['id']}", timeout=10).json()
        assert after["data_removed"] is True and after["stream"] is None
        assert not list(api.jobs.streams.iterdir())


def test_a_restarted_server_removes_the_streams_of_the_jobs_it_lost(tmp_path, portrait, speech):
    with serving(HlsRunner(seconds=2.5), tmp_path) as api:
        kept = requests.post(f"{api.url}/predictions", json={"input": inputs(portrait, speech)}, timeout=30).json()
        lost = api.jobs.streams / "a-job-the-server-lost"
        lost.mkdir()
        (lost / "live_00000.m4s").write_bytes(b"\x00")
    jobs = Jobs(HlsRunner(), tmp_path)
    try:
        assert [p.name for p in jobs.streams.iterdir()] == [kept["stream"]["playlist"].split("/")[-2]]
    finally:
        jobs.store.close()


# --------------------------------------------------------------------------------------------- the demo runtime
@pytest.fixture(scope="module")
def twelve_seconds(speech, tmp_path_factory) -> Path:
    samples = media.load_audio(speech, 16000)
    return media.write_wav(tmp_path_factory.mktemp("live") / "12s.wav", np.resize(samples, 12 * 16000), 16000)


@pytest.mark.slow
def test_sse_segments_of_a_real_job_play_the_moment_they_are_announced(runtime, portrait, twelve_seconds, tmp_path):
    """12 s of speech, 64 px, 2 steps: six segments, each fetched and decoded when its event arrives (before the next
    is made), with its 50 frames at 25 fps, its audio, and the times the event says."""
    with serving(LocalRunner(runtime), tmp_path / "work") as api:
        decoded, names = [], []
        for event, data in sse(f"{api.url}/predictions", {"input": inputs(portrait, twelve_seconds, steps=2,
                                                                             min_resolution=64)}):  # fmt: skip
            names.append(event)
            if event == "output" and data["kind"] == "segment":
                r = requests.get(data["chunk"], timeout=30)
                assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
                frames, audio_s, start = decode(r.content, tmp_path)
                decoded.append((data, frames, audio_s, start, api.jobs.running))
        final = data
    segments_before = names[: names.index("completed")].count("output") - 1  # the last output is the video
    assert segments_before >= 3 and final["status"] == "succeeded"
    assert sum(running for *_, running in decoded[:3]) == 3, "the first segments came after the job ended"
    for data, frames, audio_s, start, _ in decoded:
        seconds = data["end_seconds"] - data["start_seconds"]
        assert frames == round(seconds * FPS) and start == pytest.approx(data["start_seconds"], abs=1e-6)
        assert audio_s is not None, data
        if data is not decoded[-1][0]:  # the speech under its 2 s (AAC frames are 64 ms)
            assert audio_s == pytest.approx(seconds, abs=0.07), data
    # the last segment carries the rest of the speech (12 s; the video is 2N-1 frames, a little shorter), give or
    # take two AAC frames of 1024 samples (the encoder's priming, the last frame's padding)
    assert sum(audio_s for _, _, audio_s, *_ in decoded) == pytest.approx(12.0, abs=2 * 1024 / 16000)
    assert decoded[-1][0]["end_seconds"] == pytest.approx(final["metrics"]["video_seconds"], abs=0.05)
    assert final["metrics"]["frames"] == sum(frames for _, frames, *_ in decoded)


@pytest.mark.slow
def test_cancel_mid_stream_leaves_no_segment_on_disk(runtime, portrait, twelve_seconds, tmp_path):
    with serving(LocalRunner(runtime), tmp_path / "work") as api:
        body = {"input": inputs(portrait, twelve_seconds, steps=4, min_resolution=64)}
        r = requests.post(f"{api.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)
        pred_id = r.json()["id"]
        deadline = time.monotonic() + DEADLINE_S
        while not (polled := requests.get(f"{api.url}/predictions/{pred_id}", timeout=10).json())["stream"]:
            assert time.monotonic() < deadline and polled["status"] == "processing", polled
            time.sleep(0.05)
        assert stream_files(api.jobs)
        url = polled["stream"]["segments"][0]["url"]
        canceled = requests.post(f"{api.url}/predictions/{pred_id}/cancel", timeout=DEADLINE_S).json()
        assert canceled["status"] == "canceled"
        assert canceled["progress"]["windows_done"] < canceled["progress"]["windows_total"], "it ended first"
        assert not stream_files(api.jobs) and not list(api.jobs.streams.iterdir())
        assert requests.get(url, timeout=10).status_code == 404
        assert not list(api.jobs.outputs.iterdir())


# ------------------------------------------------------------------------------------------------------ the page
@contextmanager
def page_server(runner, workdir: Path, upload_dir: Path):
    """The page and the API over ``runner`` in this process (uvicorn on a thread, a free loopback port)."""
    import uvicorn

    from sonic_rt.serving.server import build_app

    jobs = Jobs(runner, workdir)
    app = build_app(jobs, page=True, demo=True, upload_dir=upload_dir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/", jobs
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def set_number(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def typed(d) -> bool:  # a keystroke can land while gradio re-renders: type again until the field holds it
        field = d.find_element("css selector", css)
        if field.get_attribute("value") != str(value):
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.TAB)
        return d.find_element("css selector", css).get_attribute("value") == str(value)

    WebDriverWait(driver, 10, poll_frequency=0.2).until(typed)


LIVE_STEPS = 1  # the first segment is out within seconds; the rest of the minute takes longer (the assertions)
PLAYING = "return arguments[0].readyState >= 2 && arguments[0].currentTime > 0"


@pytest.mark.slow
def test_browser_plays_the_live_video_with_sound_before_the_job_completes(runtime, portrait, speech, tmp_path):
    """60 s of speech, 64 px, :data:`LIVE_STEPS` steps on the demo runtime: the page's live player (gradio's streaming video,
    hls.js on the job's playlist) has data and its time advances while the job still runs; the result arrives
    later beside it. Prints when each happened (seconds from the click)."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import _browser

    minute = media.write_wav(tmp_path / "60s.wav", np.resize(media.load_audio(speech, 16000), 60 * 16000), 16000)
    with page_server(LocalRunner(runtime), tmp_path / "work", tmp_path / "up") as (url, jobs):
        driver = _browser()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#portrait input[type=file]"))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#speech input[type=file]"))
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#opt-min_resolution input").get_attribute("value"))
            assert not driver.find_elements(By.CSS_SELECTOR, "#live video")  # no job yet: no live player
            driver.find_element(By.CSS_SELECTOR, "#portrait input[type=file]").send_keys(str(portrait))
            driver.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(minute))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#portrait img"))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#speech audio, #speech [data-testid=waveform]"))
            set_number(driver, "#opt-steps input", LIVE_STEPS)
            set_number(driver, "#opt-min_resolution input", 64)
            clicked = time.monotonic()
            driver.find_element(By.ID, "generate").click()
            live = WebDriverWait(driver, DEADLINE_S, poll_frequency=0.1).until(
                lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#live video")), None)
            )
            WebDriverWait(driver, DEADLINE_S, poll_frequency=0.1).until(lambda d: d.execute_script(PLAYING, live))
            playing = time.monotonic() - clicked
            assert jobs.running == 1 and jobs.done == 0, "the job had ended before the live video played"
            assert not driver.find_elements(By.CSS_SELECTOR, "#result video[src]")
            first = driver.execute_script("return arguments[0].currentTime", live)
            WebDriverWait(driver, 30, poll_frequency=0.1).until(
                lambda d: d.execute_script("return arguments[0].currentTime", live) > first + 0.5
            )
            advanced = time.monotonic() - clicked
            assert jobs.running == 1 and jobs.done == 0, "the job had ended before the live video advanced"
            shot = Path(os.environ.get("SONIC_RT_LIVE_SCREENSHOT", tmp_path / "live.png"))
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", live)  # the player in the picture
            # seen, not only playing: nothing (such as gradio's progress overlay) covers the middle of the picture
            on_top = driver.execute_script(
                "const r = arguments[0].getBoundingClientRect();"
                "return document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2)",
                live,
            )
            assert on_top == live, f"the live player is covered by {on_top.tag_name}.{on_top.get_attribute('class')}"
            driver.save_screenshot(str(shot))
            # its sound: Chromium counts the audio bytes the element decoded
            WebDriverWait(driver, 30, poll_frequency=0.1).until(
                lambda d: d.execute_script("return arguments[0].webkitAudioDecodedByteCount", live) > 0
            )
            assert driver.execute_script("return arguments[0].src", live).startswith("blob:")  # hls.js (MSE)
            result = WebDriverWait(driver, DEADLINE_S * 3, poll_frequency=0.2).until(
                lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#result video[src]")), None)
            )
            done = time.monotonic() - clicked
            assert result.is_displayed() and live.is_displayed()  # the result sits beside the live player
            refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
            assert not refused, f"the page's content security policy blocked the live player: {refused}"
            # the played media has an audio track: the stream's first segment (init + segment), decoded with PyAV
            (folder,) = jobs.streams.iterdir()
            first_segment = (folder / "live_init.mp4").read_bytes() + (folder / "live_00000.m4s").read_bytes()
        finally:
            driver.quit()
    print(
        f"\nlive player (60 s of speech, {LIVE_STEPS} steps, 64 px): playing {playing:.1f} s after Generate, "
        f"0.5 s further at {advanced:.1f} s; the result was shown at {done:.1f} s"
    )
    assert playing < advanced < done
    frames, audio_s, _ = decode(first_segment, tmp_path)
    assert frames == 50 and audio_s == pytest.approx(2.0, abs=0.07)
