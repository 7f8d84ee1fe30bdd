"""Several GPUs per Ray replica or batch worker: Ray gives the actor N GPUs (here the cluster's 2 logical GPUs, CPU
devices underneath) and its Runtime runs each video over all of them, with the frames of one device."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")

from test_predictions import SMALL, expected_frames, inputs  # noqa: E402
from test_ray_serve import RayApi, frames_digest, free_port, one_process_digest  # noqa: E402

from sonic_rt.serving.jobs import Settings  # noqa: E402
from sonic_rt.serving.ray_app import ClusterOptions, RuntimeLoader, deploy, replica_devices  # noqa: E402


@dataclass(frozen=True)
class DevicesLedgerLoader:
    """The runtime of ``RuntimeLoader(gpus=2)``, each animate writing its devices, GPU ids, threads and frames."""

    model: str
    ledger: str
    name: str = "demo"

    def __call__(self):
        return DevicesLedger(RuntimeLoader(self.model, gpus=2)(), self.ledger)


class DevicesLedger:
    def __init__(self, runtime, ledger: str):
        self._runtime, self._ledger = runtime, ledger

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def animate(self, image, audio, out=None, options=None, **kwargs):
        import dataclasses

        import ray
        import torch

        result = self._runtime.animate(image, audio, out, dataclasses.replace(options, return_frames=True), **kwargs)
        record = {
            "job": Path(out).parent.name.rsplit("-", 1)[0],
            "event": "end",
            "devices": [str(d) for d in self._runtime.devices],
            "workers": len(self._runtime._scheduler.workers),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "threads": torch.get_num_threads(),
            "frames_sha256": frames_digest(result.frames),
        }
        with open(self._ledger, "a") as f:
            f.write(json.dumps(record) + "\n")
        return result


@pytest.fixture
def two_gpu_replica(ray_cluster, demo_dir, tmp_path_factory):
    from ray import cloudpickle, serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(sys.modules["test_ray_serve"])
    root = tmp_path_factory.mktemp("ray-devices")
    ledger, outputs = root / "ledger.jsonl", root / "outputs"
    options = ClusterOptions(replicas=1, num_gpus=2, num_cpus=1, health_check_period_s=2)
    url = deploy(
        DevicesLedgerLoader(str(demo_dir), str(ledger)),
        options,
        workdir=root / "workdir",
        outputs=outputs,
        settings=Settings(concurrency=1, allow_private_urls=True),
        port=free_port(),
    )
    try:
        yield RayApi(url, outputs, ledger)
    finally:
        serve.shutdown()


def test_replica_devices_are_the_actors_gpus_or_cpu_devices_under_logical_gpus():
    import torch

    assert replica_devices(1) is None
    want = [f"cuda:{i}" for i in range(3)] if torch.cuda.is_available() else ["cpu"] * 3
    assert replica_devices(3) == want


@pytest.mark.slow
def test_a_replica_with_two_gpus_runs_each_video_over_both_with_the_frames_of_one_device(
    two_gpu_replica, runtime, portrait, long_speech
):
    api = two_gpu_replica
    api.put("two-gpus", {"input": inputs(portrait, long_speech, **SMALL, seed=7)})
    body = api.wait("two-gpus")
    assert body["status"] == "succeeded", body["error"]
    (run,) = api.runs("two-gpus", "end")
    assert sorted(run["gpu_ids"]) == ["0", "1"]  # Ray gave the replica both GPUs
    assert run["devices"] == ["cpu", "cpu"] and run["workers"] == 2  # logical GPUs: two CPU devices underneath
    one_device = one_process_digest(runtime, portrait, long_speech, run["threads"], **SMALL, seed=7)
    assert run["frames_sha256"] == one_device
    assert body["metrics"]["frames"] == expected_frames(long_speech)


@pytest.mark.slow
def test_a_batch_worker_with_two_gpus_writes_the_video_of_one_device(
    ray_cluster, demo_dir, portrait, long_speech, tmp_path
):
    """``batch --ray --gpus-per-worker 2``: the Ray Data worker owns both logical GPUs, its Runtime runs the video over
    two CPU devices, and the written video decodes to one device's (same threads: Ray's one CPU per worker)."""
    import ray
    import torch

    import sonic_rt
    from sonic_rt import media
    from sonic_rt.serving.batch import run_batch

    jobs = tmp_path / "jobs.jsonl"
    line = {"image": str(portrait), "audio": str(long_speech), "output": "two.mp4", "options": {**SMALL, "seed": 3}}
    jobs.write_text(json.dumps(line) + "\n")
    deadline = time.monotonic() + 60  # an earlier test's replica gives its GPUs back as Ray tears it down
    while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0) == 2, "another test's actor still holds the cluster's GPUs"
    load = RuntimeLoader(str(demo_dir), gpus=2)
    summary = run_batch(jobs, tmp_path / "out", load, ray_address="", workers=1, num_gpus=2, progress=False)
    assert summary.succeeded == 1 and summary.failed == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sonic_rt.Runtime(demo_dir).animate(portrait, long_speech, tmp_path / "one.mp4", progress=False, **SMALL, seed=3)
    finally:
        torch.set_num_threads(threads)
    two, one = media.read_video(tmp_path / "out" / "two.mp4")[0], media.read_video(tmp_path / "one.mp4")[0]
    assert two.shape == one.shape and len(two) == expected_frames(long_speech)
    assert (two == one).all()
