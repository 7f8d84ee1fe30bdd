"""The predictions API on Ray Serve (``sonic_rt.serving.ray_app``) on a local Ray cluster, as a client sees it.

One application for the whole module: 2 model replicas (each with 1 of the cluster's 2 logical GPUs and the demo
runtime) behind the ingress, on a free loopback port, with the same Cog routes and the same client code as
tests/test_predictions.py (whose helpers this reuses). Each replica's runtime is wrapped so that every
``Runtime.animate`` call writes a start and an end line to a ledger file (job id, replica, GPU ids): the tests
count the runs of each job there, independently of the ingress's own records. Replicas are killed with
``ray.kill(actor, no_restart=False)`` as Ray's own Serve tests do. The last test stops the whole model deployment.
Jobs are small: the demo checkpoint at 64 px, 1 step (more where a job must still be running when it is hit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")

import requests  # noqa: E402
from test_predictions import DEADLINE_S, SMALL, Receiver, decode, expected_frames, inputs  # noqa: E402

from sonic_rt.serving.jobs import Settings  # noqa: E402
from sonic_rt.serving.ray_app import MODEL_APP, PARTIAL, ClusterOptions, deploy, place_once  # noqa: E402

ASYNC = {"Prefer": "respond-async"}


# ------------------------------------------------------------------------------------------ the counted runtime
class LedgerRuntime:
    """A Runtime whose ``animate`` calls are written to ``ledger`` (one JSON line at the start, one at the end)."""

    def __init__(self, runtime, ledger: str):
        self._runtime, self._ledger = runtime, ledger

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def _write(self, record: dict) -> None:
        with open(self._ledger, "a") as f:
            f.write(json.dumps(record) + "\n")

    def animate(self, image, audio, out=None, options=None, **kwargs):
        import ray
        import torch

        folder = Path(out).parent.name  # <job id>-<attempt> (RayRunner's attempt folder)
        where = {
            "job": folder.rsplit("-", 1)[0],
            "attempt": int(folder.rsplit("-", 1)[1]),
            "replica": ray.get_runtime_context().get_actor_name(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "threads": torch.get_num_threads(),  # Ray sets a worker's thread count from its num_cpus
        }
        self._write({"event": "start", **where})
        try:  # the generated frames too, to compare them with one process's (the mp4 is encoded from them)
            result = self._runtime.animate(
                image, audio, out, dataclasses.replace(options, return_frames=True), **kwargs
            )
        except BaseException as exc:
            self._write({"event": "end", "error": type(exc).__name__, **where})
            raise
        self._write({"event": "end", "error": None, "frames_sha256": frames_digest(result.frames), **where})
        return result


def frames_digest(frames) -> str:
    """SHA-256 of uint8 frames [N, H, W, 3] with their shape."""
    import hashlib

    frames = np.ascontiguousarray(frames)
    return hashlib.sha256(str(frames.shape).encode() + frames.tobytes()).hexdigest()


@dataclass(frozen=True)
class CountingLoader:
    """Builds the demo runtime wrapped in a :class:`LedgerRuntime` (in each replica)."""

    model: str
    ledger: str
    name: str = "demo"

    def __call__(self):
        import sonic_rt

        return LedgerRuntime(sonic_rt.Runtime(self.model), self.ledger)


class RayApi:
    def __init__(self, url: str, outputs: Path, ledger: Path):
        self.url, self.outputs, self.ledger = url, outputs, ledger

    def put(self, pred_id: str, body: dict, headers=ASYNC) -> requests.Response:
        r = requests.put(f"{self.url}/predictions/{pred_id}", json=body, headers=headers, timeout=30)
        assert r.status_code == 202, r.text
        return r

    def get(self, pred_id: str) -> dict:
        return requests.get(f"{self.url}/predictions/{pred_id}", timeout=10).json()

    def wait(self, pred_id: str) -> dict:
        deadline = time.monotonic() + DEADLINE_S
        while (body := self.get(pred_id))["status"] not in ("succeeded", "failed", "canceled"):
            assert time.monotonic() < deadline, f"prediction {pred_id} did not end: {body}"
            time.sleep(0.1)
        return body

    def runs(self, job: str | None = None, event: str = "start") -> list[dict]:
        """The ledger's records of ``event`` (of ``job``), in order."""
        if not self.ledger.exists():
            return []
        records = [json.loads(line) for line in self.ledger.read_text().splitlines()]
        return [r for r in records if r["event"] == event and (job is None or r["job"] == job)]

    def running(self, job: str) -> dict:
        """The ledger's start of ``job`` once it is inside its UNet loop (a window done)."""
        deadline = time.monotonic() + DEADLINE_S
        while not (self.runs(job) and self.get(job)["progress"].get("windows_done", 0) >= 1):
            assert time.monotonic() < deadline, f"{job} did not start"
            time.sleep(0.05)
        return self.runs(job)[-1]

    def videos(self) -> set[Path]:
        return set(self.outputs.glob("*.mp4"))

    def partial_files(self) -> list[Path]:
        return [p for p in (self.outputs / PARTIAL).rglob("*") if p.is_file()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(replica: str) -> None:
    import ray

    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=False)


def wait_for_replicas(count: int) -> None:
    """Until the model deployment has ``count`` running replicas again (Serve replaces a killed one)."""
    from ray import serve

    deadline = time.monotonic() + DEADLINE_S
    while True:
        deployment = serve.status().applications[MODEL_APP].deployments["SonicModel"]
        if deployment.replica_states.get("RUNNING", 0) == count and deployment.status == "HEALTHY":
            return
        assert time.monotonic() < deadline, f"the model deployment did not come back: {deployment}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_api(ray_cluster, demo_dir, tmp_path_factory):
    from ray import cloudpickle, serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import this test module
    root = tmp_path_factory.mktemp("ray-serve")
    ledger, outputs = root / "ledger.jsonl", root / "shared-outputs"
    options = ClusterOptions(
        replicas=2,
        num_gpus=1,
        num_cpus=1,
        max_attempts=3,
        retry_backoff_s=0.2,
        health_check_period_s=2,
        graceful_shutdown_timeout_s=2,
    )
    url = deploy(
        CountingLoader(str(demo_dir), str(ledger)),
        options,
        workdir=root / "workdir",
        outputs=outputs,
        settings=Settings(concurrency=2, allow_private_urls=True),
        port=free_port(),
    )
    try:
        yield RayApi(url, outputs, ledger)
    finally:
        serve.shutdown()


def one_process_digest(runtime, portrait, speech, threads: int, **options) -> str:
    """:func:`frames_digest` of the frames ``Runtime.animate`` generates in this process, with ``threads`` torch
    threads as in the replicas (fp32 sums in another order may differ in the last bit)."""
    import torch

    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = runtime.animate(portrait, speech, None, progress=False, return_frames=True, **options)
    finally:
        torch.set_num_threads(own)
    return frames_digest(result.frames)


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_twelve_predictions_over_two_replicas_each_run_once_with_the_videos_of_one_process(
    ray_api, runtime, portrait, speech, tmp_path
):
    api = ray_api
    before = api.videos()
    ids = [f"twelve{i}" for i in range(12)]
    seeds = {pred_id: 100 + i % 4 for i, pred_id in enumerate(ids)}
    receiver = Receiver()
    try:
        for pred_id in ids:
            body = {"input": inputs(portrait, speech, **SMALL, seed=seeds[pred_id])}
            if pred_id == "twelve0":
                body["webhook"] = receiver.url
            api.put(pred_id, body)
        # the last one is still waiting: follow it as a Cog client would, with its event stream
        events, name = [], None
        with requests.get(
            f"{api.url}/predictions/twelve11", headers={"Accept": "text/event-stream"}, stream=True, timeout=DEADLINE_S
        ) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        bodies = [api.wait(pred_id) for pred_id in ids]
        hooks = receiver.wait_for("succeeded")
    finally:
        receiver.close()

    assert [b["status"] for b in bodies] == ["succeeded"] * 12, [b["error"] for b in bodies]
    assert [b["attempts"] for b in bodies] == [1] * 12
    for pred_id in ids:  # each ran exactly once, and to its end
        assert len(api.runs(pred_id)) == 1, api.runs(pred_id)
        assert [r["error"] for r in api.runs(pred_id, "end")] == [None]
    assert len({r["replica"] for r in api.runs() if r["job"] in ids}) == 2, "one replica ran every job"
    new = api.videos() - before
    assert len(new) == 12 and not api.partial_files()

    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "completed"
    outputs = [d for n, d in events if n == "output"]  # the live stream's segments, then the video once
    assert [d["kind"] for d in outputs] == ["segment"] * (len(outputs) - 1) + ["video"] and len(outputs) >= 2
    assert [d["index"] for d in outputs[:-1]] == list(range(len(outputs) - 1))
    progress = [d for n, d in events if n == "progress"]
    assert progress and progress[-1]["windows_done"] == progress[-1]["windows_total"] == 1
    assert events[-1][1]["status"] == "succeeded"
    statuses = [h["status"] for h in hooks]
    assert statuses[0] == "starting" and statuses[-1] == "succeeded" and statuses.count("succeeded") == 1

    # the same frames as one process makes with the same seed (compared before H.264: libx264 through PyAV does
    # not give the same mp4 twice for the same frames here, even in one process)
    (threads,) = {r["threads"] for r in api.runs()}
    expected = {}
    for pred_id, body in zip(ids, bodies):
        seed = seeds[pred_id]
        if seed not in expected:
            expected[seed] = one_process_digest(runtime, portrait, speech, threads, **SMALL, seed=seed)
        assert api.runs(pred_id, "end")[0]["frames_sha256"] == expected[seed], pred_id
        frames, fps, has_audio = decode(requests.get(body["output"], timeout=30).content, tmp_path)
        assert frames.shape == (expected_frames(speech), 64, 64, 3) and fps == pytest.approx(25) and has_audio
    assert len(set(expected.values())) == 4, "different seeds gave the same frames"


def test_the_tests_cluster_is_on_loopback_and_leaves_nothing_in_home(ray_cluster, home_ray_at_start):
    ray = ray_cluster
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert (Path.home() / ".ray").exists() == home_ray_at_start, "the Ray tests wrote ~/.ray"


@pytest.mark.slow
def test_metrics_reach_prometheus_through_the_ingress_and_ray(ray_api, portrait, speech):
    """The ingress's /metrics and Ray's metrics endpoint of the node (the same names, with Ray's ray_ prefix and
    Serve's tags) count the predictions that ended."""
    import ray
    from test_predictions import metric_samples

    api = ray_api
    for pred_id in ("metrics-a", "metrics-b"):
        api.put(pred_id, {"input": inputs(portrait, speech, **SMALL)})
    assert {api.wait(p)["status"] for p in ("metrics-a", "metrics-b")} == {"succeeded"}
    own = metric_samples(requests.get(f"{api.url}/metrics", timeout=10).text)
    succeeded = own[("sonic_rt_predictions_total", (("status", "succeeded"),))]
    assert succeeded >= 2 and own[("sonic_rt_stage_seconds_count", (("stage", "denoise"),))] >= 2
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = [
            (labels, value)
            for (name, labels), value in metric_samples(text).items()
            if name == "ray_sonic_rt_predictions_total" and ("status", "succeeded") in labels
        ]
        if found and sum(value for _, value in found) >= succeeded:
            break
        assert time.monotonic() < deadline, f"Ray did not export the predictions: {found}"
        time.sleep(1)
    labels = dict(found[0][0])
    assert labels["deployment"] == "SonicIngress" and labels["application"] == "sonic"


@pytest.mark.slow
def test_two_replicas_with_one_gpu_each_get_different_gpu_ids(ray_api, portrait, speech):
    api = ray_api
    for pred_id in ("gpu-a", "gpu-b"):  # two at once: one on each replica (a replica takes one job at a time)
        api.put(pred_id, {"input": inputs(portrait, speech, **SMALL)})
    assert {api.wait(p)["status"] for p in ("gpu-a", "gpu-b")} == {"succeeded"}
    a, b = api.runs("gpu-a")[0], api.runs("gpu-b")[0]
    assert a["replica"] != b["replica"]
    assert len(a["gpu_ids"]) == len(b["gpu_ids"]) == 1 and a["gpu_ids"] != b["gpu_ids"]
    assert {*a["gpu_ids"], *b["gpu_ids"]} == {"0", "1"}


@pytest.mark.slow
def test_a_job_whose_replica_is_killed_completes_on_the_other_once_with_no_partial_file(ray_api, portrait, long_speech):
    api = ray_api
    before = api.videos()
    api.put("killed", {"input": inputs(portrait, long_speech, steps=10, min_resolution=64)})
    first = api.running("killed")
    kill(first["replica"])
    body = api.wait("killed")
    assert body["status"] == "succeeded", body["error"]
    assert body["attempts"] == 2 and "attempt 2:" in body["logs"] and "stopped" in body["logs"]
    starts = api.runs("killed")
    assert [r["attempt"] for r in starts] == [1, 2] and starts[1]["replica"] != first["replica"]
    assert [r["error"] for r in api.runs("killed", "end")] == [None]  # the killed run never ended
    assert api.videos() - before == {api.outputs / Path(body["output"]).name}
    assert not api.partial_files(), api.partial_files()
    assert body["metrics"]["frames"] == expected_frames(long_speech)
    wait_for_replicas(2)


@pytest.mark.slow
def test_killing_a_replica_while_jobs_are_queued_loses_none(ray_api, portrait, speech):
    api = ray_api
    before = api.videos()
    ids = [f"queued{i}" for i in range(6)]
    for pred_id in ids:
        api.put(pred_id, {"input": inputs(portrait, speech, steps=4, min_resolution=64)})
    assert api.get("queued5")["status"] == "starting"  # 2 run, the others wait
    kill(api.running("queued0")["replica"])
    bodies = [api.wait(pred_id) for pred_id in ids]
    assert [b["status"] for b in bodies] == ["succeeded"] * 6, [b["error"] for b in bodies]
    assert sorted(b["attempts"] for b in bodies) == [1, 1, 1, 1, 1, 2]
    for pred_id, body in zip(ids, bodies):
        assert len(api.runs(pred_id)) == body["attempts"]
        assert [r["error"] for r in api.runs(pred_id, "end")] == [None]
    assert len(api.videos() - before) == 6 and not api.partial_files()
    wait_for_replicas(2)


@pytest.mark.slow
def test_cancel_reaches_the_replica_running_the_job(ray_api, portrait, long_speech):
    api = ray_api
    before = api.videos()
    api.put("cancelme", {"input": inputs(portrait, long_speech, steps=50, min_resolution=64)})
    api.running("cancelme")
    r = requests.post(f"{api.url}/predictions/cancelme/cancel", timeout=DEADLINE_S)
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["output"] is None
    deadline = time.monotonic() + DEADLINE_S
    while not api.runs("cancelme", "end"):  # the replica's runtime stops at its next window
        assert time.monotonic() < deadline, "the replica did not stop the job"
        time.sleep(0.1)
    assert [r["error"] for r in api.runs("cancelme", "end")] == ["Cancelled"]
    assert api.videos() == before and not api.partial_files()


def test_a_second_result_of_a_job_is_discarded_and_the_first_output_kept(tmp_path):
    first, late, out = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "out.mp4"
    first.write_bytes(b"first")
    late.write_bytes(b"late")
    assert place_once(first, out) is True
    assert place_once(late, out) is False
    assert out.read_bytes() == b"first" and not first.exists() and not late.exists()


@pytest.mark.slow
def test_stopping_the_model_deployment_fails_its_jobs_after_max_attempts_and_the_api_answers(
    ray_api, portrait, speech, long_speech
):
    """Runs last: the model deployment is gone afterwards."""
    from ray import serve

    api = ray_api
    api.put("doomed-running", {"input": inputs(portrait, long_speech, steps=50, min_resolution=64)})
    for pred_id in ("doomed-1", "doomed-2"):
        api.put(pred_id, {"input": inputs(portrait, speech, steps=50, min_resolution=64)})
    api.running("doomed-running")
    serve.delete(MODEL_APP)
    for pred_id in ("doomed-running", "doomed-1", "doomed-2"):
        body = api.wait(pred_id)
        assert body["status"] == "failed" and body["attempts"] == 3, body
        assert body["error"].startswith("gave up after 3 attempts (--max-attempts 3): ")
        assert f"the model deployment {MODEL_APP!r} is not running" in body["error"]
        assert "\n" not in body["error"] and body["output"] is None
    health = requests.get(f"{api.url}/health-check", timeout=10)
    assert health.status_code == 200 and health.json()["setup"]["status"] == "succeeded"
    assert requests.get(f"{api.url}/predictions/twelve0", timeout=10).json()["status"] == "succeeded"
    assert not api.partial_files()
    assert os.path.isdir(api.outputs)


def test_autoscaling_settings_go_to_serve_as_given_and_replace_the_fixed_count():
    from ray import serve

    from sonic_rt.serving.ray_app import SonicModel

    autoscaling = {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 1}
    options = ClusterOptions(replicas=2, num_gpus=1, autoscaling=autoscaling)
    kwargs = options.model_deployment()
    assert "num_replicas" not in kwargs and options.max_replicas == 6
    config = serve.deployment(**kwargs)(SonicModel)._deployment_config  # Serve's own validation of the settings
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 6)
    assert config.max_ongoing_requests == 1
    fixed = serve.deployment(**ClusterOptions(replicas=3).model_deployment())(SonicModel)
    assert fixed.num_replicas == 3 and fixed.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
