"""``python -m sonic_rt serve``: the HTTP API (gradio_client), errors, cancellation, and the page in a real
headless Chromium (selenium).

One server (demo checkpoint, the session's ``demo_dir``) runs in a subprocess on a free loopback port for the
whole module. The browser test saves a screenshot to ``$SONIC_RT_SERVE_SCREENSHOT`` (default: pytest's tmp);
``docs/serve.png`` is written by::

    SONIC_RT_SERVE_SCREENSHOT=docs/serve.png .venv/bin/python -m pytest tests/test_serve.py -k browser
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_TIMEOUT = 180


class StandInRunner:
    """What the page reads of a runner, without loading a model."""

    def setup(self):
        pass

    def describe(self):
        return {"model": "demo", "demo": True, "device": "cpu", "default_min_resolution": 128}

    async def run(self, job, report):
        raise NotImplementedError

    def close(self):
        pass


def test_widgets_come_from_animate_options(tmp_path):
    """The page's options are the AnimateOptions fields with their defaults; min_resolution starts empty (the
    model's own default, filled in when the page loads)."""
    from sonic_rt import AnimateOptions
    from sonic_rt.serving.jobs import Jobs, Settings
    from sonic_rt.serving.page import UI_OPTIONS, build_page

    jobs = Jobs(StandInRunner(), tmp_path, Settings(max_audio_seconds=1.0))
    try:
        blocks, _, _ = build_page(jobs, demo=True)
    finally:
        jobs.store.close()
    defaults = AnimateOptions()
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    shown = [name for name in UI_OPTIONS if f"opt-{name}" in by_id]
    assert {"steps", "seed", "dynamic_scale", "min_resolution", "crop", "interpolate", "paste_back"} <= set(shown)
    for name in shown:
        assert by_id[f"opt-{name}"].value == getattr(defaults, name), name
    assert "RANDOM" in by_id["demo-banner"].value and by_id["demo-banner"].visible
    assert "1 s" in by_id["limits"].value


def test_audio_longer_than_the_limit_is_refused(tmp_path, speech):
    from sonic_rt import AudioError
    from sonic_rt.serving.jobs import Jobs, Settings

    jobs = Jobs(StandInRunner(), tmp_path, Settings(max_audio_seconds=1.0))
    try:
        with pytest.raises(AudioError, match="accepts up to 1 s"):
            jobs._check_audio(speech)
    finally:
        jobs.store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _health(url: str) -> dict:
    status, body = _get(url + "healthz")
    assert status == 200
    return json.loads(body)


class Served:
    def __init__(self, url: str, tmp: Path, cache: Path):
        self.url, self.tmp, self.cache = url, tmp, cache

    def results(self) -> set[Path]:
        """Every file in the server's outputs folder (finished mp4s; a partial file would show too)."""
        return {p for p in (self.cache / "serve" / "outputs").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    """``python -m sonic_rt serve --demo`` on a free port; the demo is the session's demo_dir (through a
    SONIC_RT_CACHE whose demo-model entry links to it); TMPDIR is private so the test can see its files."""
    from sonic_rt.demo import DEMO_VERSION

    root = tmp_path_factory.mktemp("serve")
    cache, tmp = root / "cache", root / "tmp"
    cache.mkdir()
    tmp.mkdir()
    (cache / f"demo-model-v{DEMO_VERSION}").symlink_to(demo_dir, target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "SONIC_RT_CACHE": str(cache), "TMPDIR": str(tmp)}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sonic_rt",
            "serve",
            "--demo",
            "--port",
            str(port),
            "--compile",
            "off",
        ],  # no background compile
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if _get(url + "healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the server did not start in time")
        time.sleep(0.5)
    yield Served(url, tmp, cache)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log.close()
    assert not list(tmp.glob("sonic_rt-serve-*")), "the server left its temporary directory behind"


def _args(portrait, speech, **options):
    from gradio_client import handle_file

    return (handle_file(str(portrait)), handle_file(str(speech))), options


def _video_path(result) -> str:
    return result["video"] if isinstance(result, dict) else result


@pytest.mark.slow
def test_health_and_page(server):
    h = _health(server.url)
    assert h["status"] == "ok" and h["demo"] is True
    status, page = _get(server.url)
    assert status == 200 and b"<html" in page.lower()
    # gradio serves nothing outside the server's own folder
    assert _get(server.url + "gradio_api/file=/etc/passwd")[0] in (403, 404)


@pytest.mark.slow
def test_an_uploaded_html_file_is_never_served_as_a_page_of_this_origin(server, tmp_path):
    """A stored cross-site scripting attempt: an .html upload comes back as a sandboxed download, not text/html."""
    import requests

    evil = tmp_path / "evil.html"
    evil.write_text("<html><body><script>alert(document.cookie)</script></body></html>")
    with open(evil, "rb") as f:
        uploaded = requests.post(server.url + "gradio_api/upload", files={"files": f}, timeout=30)
    assert uploaded.status_code == 200
    (path,) = uploaded.json()
    served = requests.get(server.url + "gradio_api/file=" + path, timeout=30)
    assert served.status_code == 200 and b"<script>" in served.content  # the same bytes...
    assert served.headers["content-type"] == "application/octet-stream"  # ...never as a page
    assert served.headers["content-disposition"].startswith("attachment")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"] == "default-src 'none'; sandbox"
    page = requests.get(server.url, timeout=30)
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    # gradio's routes that would fetch another URL for the client are closed
    assert requests.get(server.url + "gradio_api/file=https://example.com/x.png", timeout=30).status_code == 403


@pytest.mark.slow
def test_api_animate_writes_the_video(server, portrait, speech):
    import av

    from sonic_rt.audio_features import num_generated_frames
    from sonic_rt.media import load_audio

    client = gradio_client.Client(server.url, verbose=False)
    args, options = _args(portrait, speech, steps=1)
    path = _video_path(client.predict(*args, **options, api_name="/animate"))
    n = num_generated_frames(len(load_audio(speech)))
    with av.open(path) as container:
        video = container.streams.video[0]
        assert container.streams.audio, "the mp4 has no audio stream"
        assert float(video.average_rate) == pytest.approx(25)
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 2 * n - 1


@pytest.mark.slow
def test_corrupt_image_is_one_line_and_the_server_keeps_serving(server, speech, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really" * 20)
    client = gradio_client.Client(server.url, verbose=False)
    args, options = _args(bad, speech, steps=1)
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(*args, **options, api_name="/animate")
    message = str(info.value)
    assert message.startswith("broken.png: ") and "\n" not in message and "Traceback" not in message
    assert str(server.tmp) not in message  # names the upload, not its server path
    assert _health(server.url)["status"] == "ok"


@pytest.mark.slow
def test_cancel_leaves_nothing_and_the_next_job_runs(server, portrait, long_speech, speech):
    client = gradio_client.Client(server.url, verbose=False)
    before = server.results()
    args, options = _args(portrait, long_speech, steps=25)
    job = client.submit(*args, **options, api_name="/animate")
    deadline = time.monotonic() + 60
    while _health(server.url)["jobs_running"] == 0:  # cancel once it runs (not while it queues)
        assert time.monotonic() < deadline and not job.done(), "the job did not start"
        time.sleep(0.2)
    time.sleep(1.0)
    job.cancel()
    deadline = time.monotonic() + 60
    while _health(server.url)["jobs_running"]:
        assert time.monotonic() < deadline, "the cancelled job did not stop"
        time.sleep(0.2)
    assert server.results() == before, "a cancelled job left a file behind"
    args, options = _args(portrait, speech, steps=1)
    path = _video_path(client.predict(*args, **options, api_name="/animate"))
    assert Path(path).stat().st_size > 0
    assert len(server.results()) == len(before) + 1


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1100",
        "--autoplay-policy=no-user-gesture-required",
        "--mute-audio",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations show there
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


@pytest.mark.slow
def test_browser_generates_and_plays(server, portrait, speech, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#portrait input[type=file]"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#speech input[type=file]"))
        assert "RANDOM" in driver.find_element(By.ID, "demo-banner").text
        driver.find_element(By.CSS_SELECTOR, "#portrait input[type=file]").send_keys(str(portrait))
        driver.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(speech))
        steps = driver.find_element(By.CSS_SELECTOR, "#opt-steps input")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("2", Keys.TAB)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#portrait img"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#speech audio, #speech [data-testid=waveform]"))
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result video[src]"))
        video = driver.find_element(By.CSS_SELECTOR, "#result video")
        driver.execute_script("arguments[0].muted = true; arguments[0].play();", video)
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return arguments[0].readyState >= 2 && arguments[0].currentTime > 0", video)
        )
        assert driver.execute_script("return arguments[0].videoWidth", video) > 0
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery video, #gallery img"))
        driver.set_window_size(1280, 1400)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not refused, f"the page's content security policy blocked part of the page: {refused}"
        shot = Path(os.environ.get("SONIC_RT_SERVE_SCREENSHOT", tmp_path / "serve.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
    finally:
        driver.quit()


def test_a_shared_page_asks_for_the_key(tmp_path):
    """With --api-key the page and gradio's API need a login whose password is the key."""
    import requests
    import uvicorn

    from sonic_rt.serving.jobs import Jobs
    from sonic_rt.serving.server import build_app

    jobs = Jobs(StandInRunner(), tmp_path / "work")
    app = build_app(jobs, api_key="s3cret", page=True, demo=True, upload_dir=tmp_path / "up")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    import threading

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        assert requests.get(url + "/config", timeout=10).status_code == 401
        with open(__file__, "rb") as f:
            assert requests.post(url + "/gradio_api/upload", files={"files": f}, timeout=10).status_code == 401
        session = requests.Session()
        assert session.post(url + "/login", data={"username": "x", "password": "wrong"}, timeout=10).status_code == 400
        assert session.post(url + "/login", data={"username": "x", "password": "s3cret"}, timeout=10).status_code == 200
        assert session.get(url + "/config", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=60)
