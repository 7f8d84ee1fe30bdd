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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster, started once per session (tests/test_ray_serve.py, tests/test_batch.py): 8 logical
    CPUs on this machine's cores and 2 logical GPUs, so that GPU placement is checked without a GPU (Ray's
    resources are logical; a replica given a GPU here still runs the runtime on the CPU)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
