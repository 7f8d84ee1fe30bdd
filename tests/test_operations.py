"""``python -m sonic_rt serve`` as an operator runs it: stopped by SIGTERM (a deploy) or SIGKILL (a crash) with one
job running and three waiting, then started again on the same work directory; every prediction ends once,
``succeeded``, with one ``completed`` webhook.

The server runs in a subprocess (demo checkpoint, no page, ``--log-format json``), on a free loopback port, its
demo model the session's (through a private ``SONIC_RT_CACHE``), its webhooks to a receiver on loopback
(``--allow-private-urls``). The JSON log lines of both runs are read back: one ``finished`` line per prediction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")
requests = pytest.importorskip("requests", reason="requests is not installed")

from test_predictions import DEADLINE_S, Receiver, inputs  # noqa: E402

START_TIMEOUT = 180
ASYNC = {"Prefer": "respond-async"}
IDS = ("first", "second", "third", "fourth")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``serve`` process on ``workdir``; its stderr goes to ``log``."""

    started: list[Server] = []

    def __init__(self, root: Path, workdir: Path, port: int, log: Path, *extra: str, environ: dict | None = None):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        # PYTHONFAULTHANDLER: a server that hangs prints every thread's stack on SIGABRT (see stop)
        env = {
            **(os.environ if environ is None else environ),
            "SONIC_RT_CACHE": str(root / "cache"),
            "TMPDIR": str(root / "tmp"),
            "PYTHONFAULTHANDLER": "1",
        }
        command = [sys.executable, "-m", "sonic_rt", "serve", "--demo", "--no-page", "--compile", "off"]
        command += ["--port", str(port), "--workdir", str(workdir), "--allow-private-urls", "--log-format", "json"]
        self._out = open(log, "w")
        self.proc = subprocess.Popen([*command, *extra], env=env, stdout=self._out, stderr=subprocess.STDOUT)
        Server.started.append(self)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet; Ray Serve's proxy starting
                pass
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.3)

    def get(self, pred_id: str) -> dict:
        return requests.get(f"{self.url}/predictions/{pred_id}", timeout=10).json()

    def wait_running(self, pred_id: str) -> None:
        """Until ``pred_id`` is inside its UNet loop (a window done)."""
        deadline = time.monotonic() + DEADLINE_S
        while self.get(pred_id)["progress"].get("windows_done", 0) < 1:
            assert time.monotonic() < deadline, f"{pred_id} did not start"
            time.sleep(0.05)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 120) -> int:
        """Send ``sig`` (None: none, it is stopping already) and wait for the exit code."""
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # its threads' stacks go to the log
            self.proc.wait(timeout=10)
            raise AssertionError(f"the server did not exit: {self.log.read_text()[-6000:]}") from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()

    def events(self) -> list[dict]:
        """The JSON log lines with an ``event``."""
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if "event" in record:
                    found.append(record)
        return found


@pytest.fixture
def root(demo_dir, tmp_path):
    """A private cache (the session's demo model) and TMPDIR; every server started meanwhile is killed at the end."""
    from sonic_rt.demo import DEMO_VERSION

    (tmp_path / "cache").mkdir()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cache" / f"demo-model-v{DEMO_VERSION}").symlink_to(demo_dir, target_is_directory=True)
    yield tmp_path
    for server in Server.started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    Server.started.clear()


def submit_four(server: Server, receiver: Receiver, portrait, speech, long_speech) -> None:
    """The first (long: 4 s of speech, 6 steps) runs; the other three (1 step) wait behind it."""
    for pred_id in IDS:
        audio, steps = (long_speech, 6) if pred_id == "first" else (speech, 1)
        body = {"input": inputs(portrait, audio, steps=steps, min_resolution=64), "webhook": receiver.url}
        r = requests.put(f"{server.url}/predictions/{pred_id}", json=body, headers=ASYNC, timeout=30)
        assert r.status_code == 202, r.text
    server.wait_running("first")
    assert [server.get(p)["status"] for p in IDS] == ["processing", "starting", "starting", "starting"]
    deadline = time.monotonic() + DEADLINE_S
    while len([b for b in receiver.bodies if b["status"] == "starting"]) < 4:  # every start webhook is out
        assert time.monotonic() < deadline, receiver.bodies
        time.sleep(0.05)


def check_all_ended_once(server: Server, receiver: Receiver, earlier: list[dict] | None, workdir: Path) -> list[dict]:
    """Every prediction succeeded, with one completed webhook and one finished log line each (in ``earlier``, the
    log of the server before, and in this one's; None: the logs are not read, as under ``--ray``, where the
    ingress logs to Ray's files); 4 mp4s, no other file in the outputs folder. Returns the predictions. (A waiting
    prediction sends no webhook after ``start``, so the ``starting`` bodies are its ``start`` events.)"""
    deadline = time.monotonic() + DEADLINE_S
    while (preds := [server.get(p) for p in IDS]) and any(p["status"] not in ("succeeded", "failed") for p in preds):
        assert time.monotonic() < deadline, preds
        time.sleep(0.1)
    assert [p["status"] for p in preds] == ["succeeded"] * 4, [p["error"] for p in preds]
    deadline = time.monotonic() + DEADLINE_S
    while len([b for b in receiver.bodies if b["status"] == "succeeded"]) < 4:
        assert time.monotonic() < deadline, "a completed webhook is missing"
        time.sleep(0.05)
    time.sleep(1.0)  # time for a duplicate to arrive, if there were one
    for pred_id in IDS:
        statuses = [b["status"] for b in receiver.bodies if b["id"] == pred_id]
        assert statuses.count("succeeded") == 1 and statuses.count("starting") == 1, (pred_id, statuses)
        if earlier is not None:
            logs = earlier + server.events()
            finished = [e for e in logs if e["event"] == "finished" and e.get("prediction_id") == pred_id]
            assert [e["status"] for e in finished] == ["succeeded"], (pred_id, finished)
    outputs = workdir / "outputs"
    assert sorted(p.name for p in outputs.iterdir() if p.is_file()) == sorted(Path(p["output"]).name for p in preds)
    # under --ray the outputs folder also holds the attempts' folders (empty once each ended) and the live streams,
    # each one finished (its playlist closed)
    assert not [p for p in (outputs / ".partial").rglob("*") if p.is_file()]
    streams = sorted((outputs / ".streams").glob("*/live.m3u8"))
    assert len(streams) in (0, 4) and all("#EXT-X-ENDLIST" in p.read_text() for p in streams), streams
    for pred in preds:
        assert requests.get(pred["output"], timeout=30).content[4:8] == b"ftyp"
    return preds


def sigterm_drains(server: Server, receiver: Receiver, portrait, speech, exit_timeout: float) -> None:
    """SIGTERM to ``server`` (running ``first``, three waiting): health says ``STOPPING``, ``/healthz`` 503, a new
    prediction gets 503 with ``Retry-After``; the server exits 0 by itself once ``first`` is done, its only
    completed webhook."""
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while (health := requests.get(f"{server.url}/health-check", timeout=10).json())["status"] != "STOPPING":
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    late = requests.put(
        f"{server.url}/predictions/late", json={"input": inputs(portrait, speech)}, headers=ASYNC, timeout=30
    )
    assert late.status_code == 503 and int(late.headers["Retry-After"]) >= 1
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 503
    assert server.stop(None, timeout=exit_timeout) == 0  # it exits by itself once the running job is done
    assert [b["id"] for b in receiver.bodies if b["status"] == "succeeded"] == ["first"]


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish_and_the_next_start_runs_the_waiting_ones(
    root, portrait, speech, long_speech
):
    workdir, port, receiver = root / "work", free_port(), Receiver()
    try:
        first = Server(root, workdir, port, root / "first.log", "--grace-seconds", "120")
        submit_four(first, receiver, portrait, speech, long_speech)
        sigterm_drains(first, receiver, portrait, speech, exit_timeout=150)
        events = first.events()
        assert [e["event"] for e in events if e["event"] in ("stopping", "interrupted")] == ["stopping"]

        second = Server(root, workdir, port, root / "second.log")
        preds = check_all_ended_once(second, receiver, events, workdir)
        assert [p["attempts"] for p in preds] == [1, 1, 1, 1]
        recovered = [e["prediction_id"] for e in second.events() if e["event"] == "recovered"]
        assert recovered == ["second", "third", "fourth"]  # in the order they were made
        assert requests.get(f"{second.url}/predictions/late", timeout=10).status_code == 404
        assert second.stop() == 0
    finally:
        receiver.close()


@pytest.mark.slow
def test_after_sigkill_the_next_start_runs_the_interrupted_and_the_waiting_jobs_once(
    root, portrait, speech, long_speech
):
    workdir, port, receiver = root / "work", free_port(), Receiver()
    try:
        first = Server(root, workdir, port, root / "first.log")
        submit_four(first, receiver, portrait, speech, long_speech)
        first.stop(signal.SIGKILL)
        assert not [b for b in receiver.bodies if b["status"] == "succeeded"]

        second = Server(root, workdir, port, root / "second.log")
        preds = check_all_ended_once(second, receiver, first.events(), workdir)
        assert [p["attempts"] for p in preds] == [2, 1, 1, 1]  # the first ran again from the start
        assert "the server restarted while this prediction was running" in preds[0]["logs"]
        assert preds[0]["metrics"]["frames"] > preds[1]["metrics"]["frames"]
        assert second.stop() == 0
    finally:
        receiver.close()


def listening_addresses(pid: int) -> dict[str, set[str]]:
    """The addresses each process of ``pid``'s tree listens on (TCP), by process name."""
    import psutil

    root = psutil.Process(pid)
    found: dict[str, set[str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            addresses = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            found.setdefault(proc.name(), set()).update(addresses)
        except psutil.Error:  # it ended meanwhile
            pass
    return found


@pytest.mark.slow
def test_under_ray_sigterm_lets_the_running_job_finish_and_the_next_start_runs_the_waiting_ones(
    root, own_cluster_env, portrait, speech, long_speech
):
    """``serve --ray`` with no address: a local Ray cluster of its own, on loopback by its own doing (Ray Serve's
    replicas aside, see below), and SIGTERM drains it as it drains one process, though Ray's own SIGTERM handler
    would stop the cluster at once."""
    workdir, port, receiver = root / "work", free_port(), Receiver()
    try:
        first = Server(
            root, workdir, port, root / "first.log", "--ray", "--grace-seconds", "120", environ=own_cluster_env
        )
        assert "started a local Ray cluster on 127.0.0.1" in first.log.read_text()
        listening = listening_addresses(first.proc.pid)
        assert "gcs_server" in listening and "raylet" in listening, listening
        loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
        # Ray Serve 2.x opens each replica's inter-deployment gRPC server on every interface ("[::]:0" in
        # ray/serve/_private/replica.py, not configurable); every other port of the cluster is on loopback.
        wide = {name: found - loopback for name, found in listening.items() if found - loopback}
        assert all(name.startswith("ray::ServeReplica:") for name in wide), wide

        submit_four(first, receiver, portrait, speech, long_speech)
        sigterm_drains(first, receiver, portrait, speech, exit_timeout=180)
        assert "the running jobs may finish for 120 s" in first.log.read_text()

        second = Server(root, workdir, port, root / "second.log", "--ray", environ=own_cluster_env)
        preds = check_all_ended_once(second, receiver, None, workdir)
        assert [p["attempts"] for p in preds] == [1, 1, 1, 1]
        assert requests.get(f"{second.url}/predictions/late", timeout=10).status_code == 404
        assert second.stop() == 0
    finally:
        receiver.close()
