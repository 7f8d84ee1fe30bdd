"""Shared fixtures: the demo checkpoint, a real portrait and real speech, all made once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"

# Triton kernels run in the interpreter where there is no GPU. The flag must be set before any module that
# defines a @triton.jit kernel is imported (docs/development.md); on a GPU machine the kernels are compiled.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


# Ray: a local cluster started by the tests registers its node as 127.0.0.1, so that it opens no port beyond this
# machine. Ray reads this at import and otherwise uses the machine's interface address (ray.init turns an explicit
# 127.0.0.1 into that address too); it must be set before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# torch.compile's on-disk cache (sonic_rt.compiling): the default mode runs compiled the shapes found there, so the
# tests get an empty cache of their own rather than whatever the user's ~/.cache holds.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sonic_rt_tests_inductor_")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from sonic_rt.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def runtime(demo_dir):
    import sonic_rt

    return sonic_rt.Runtime(demo_dir)


@pytest.fixture(scope="session")
def portrait(tmp_path_factory) -> Path:
    """skimage's astronaut: a real (public-domain) portrait photo, 512x512 RGB."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("inputs") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def _espeak(text: str, path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """Real synthetic speech (espeak-ng), about 2.5 s, 22.05 kHz mono wav."""
    return _espeak("Hello there. This is Sonic.", tmp_path_factory.mktemp("inputs") / "speech.wav")


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> Path:
    """About 4 s of speech: N > 25 generated frames, so several windows per step."""
    return _espeak(
        "Hello, this is a test of the sonic runtime. It should animate a face.",
        tmp_path_factory.mktemp("inputs") / "long_speech.wav",
    )


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    from sonic_rt.media import write_wav as _write

    return _write(path, samples, rate)


@pytest.fixture(scope="session")
def engine_dir(demo_dir, tmp_path_factory) -> Path:
    """The demo checkpoint exported for the onnxruntime backend in fp32 (built once per session)."""
    from export.build_engines import BuildOptions, build_engines
    from sonic_rt.graphs import DimRange, ShapeOptions

    out = tmp_path_factory.mktemp("engines") / "demo-ort"
    options = BuildOptions(shapes=ShapeOptions(resolution=DimRange(128, 128, 256), windows=DimRange(1, 1, 2)))
    build_engines(demo_dir, out, options, log=lambda _: None)
    return out


HOME_RAY = Path.home() / ".ray"
HOME_RAY_AT_START = HOME_RAY.exists()  # before any test ran (tests/test_ray_serve.py checks that none made it)


@pytest.fixture(scope="session")
def home_ray_at_start() -> bool:
    """Whether ``~/.ray`` existed when the test session started."""
    return HOME_RAY_AT_START


@pytest.fixture
def own_cluster_env():
    """The environment of a subprocess that starts a Ray cluster of its own (``serve --ray``, ``batch --ray``):
    without this session's loopback setting (above) or a cluster address, so that the command's own code must put
    its cluster on loopback; with a token of its own (so that Ray writes none to ``~/.ray``) and a short temporary
    folder (Ray's socket paths must stay under 108 bytes), removed afterwards."""
    import secrets

    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")
    ray_tmp = tempfile.mkdtemp(prefix="sonic_ray_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster, started once per session (tests/test_ray_serve.py, tests/test_batch.py): 8 logical
    CPUs on this machine's cores and 2 logical GPUs, so that GPU placement is checked without a GPU (Ray's
    resources are logical; a replica given a GPU here still runs the runtime on the CPU).

    On loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set above; ``_node_ip_address``). Token
    authentication stays on (Ray's default for a new local cluster), with a token of this session's in the
    environment (``RAY_AUTH_TOKEN``): without one, ``ray.init`` writes a new token to ``~/.ray/auth_token``, which a
    cluster the user later starts with ``ray start`` would then require (and ``serve --ray`` would not have)."""
    import secrets

    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")
    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_TOKEN")}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # as Ray draws one: 256 bits
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
