"""Exported graphs (ONNX Runtime backend) against the PyTorch reference, and the engine-directory manifest."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import sonic_rt
from export.build_engines import BuildOptions, build_engines
from export.onnx_export import ExportError
from sonic_rt.backends import Backend
from sonic_rt.checkpoint import resolve_model_dir
from sonic_rt.errors import BackendUnavailableError, EngineError, InputError
from sonic_rt.graphs import DimRange, Precision, ShapeOptions, graph_modules
from sonic_rt.graphs.modules import GRAPH_NAMES
from sonic_rt.loading import load_models
from sonic_rt.manifest import open_engine_dir, read_manifest

SHAPES = ShapeOptions(resolution=DimRange(128, 128, 256), windows=DimRange(1, 1, 2))
QUIET = dict(log=lambda _: None)

# Several batch / frame / size points per graph beyond the profile's min, opt and max.
POINTS = {
    "unet": [
        {"batch": 6, "frames": 7, "height": 16, "width": 24},
        {"batch": 3, "frames": 25, "height": 32, "width": 16},
    ],
    "vae_decoder": [{"frames": 3, "latent_height": 16, "latent_width": 24}],
    "vae_encoder": [{"height": 192, "width": 128}],
    "rife": [{"pairs": 5, "height": 128, "width": 192}],
    "audio2token": [{"frames": 13}],
    "audio2bucket": [{"frames": 1}],
}


@pytest.fixture(scope="module")
def reference(demo_dir):
    """The fp32 PyTorch graph modules; the UNet in the official (reference) attention structure."""
    models = load_models(resolve_model_dir(demo_dir), torch.device("cpu"), torch.float32)
    return graph_modules(models)


def _points(name):
    return ["min", "opt", "max", *POINTS.get(name, [])]


@torch.no_grad()
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_fp32_graph_matches_pytorch_at_several_shapes(engine_dir, reference, name):
    """fp32: |onnxruntime - torch| <= 1e-4 * (1 + max|torch|) at every point (measured ~1e-6..1e-5)."""
    graph = open_engine_dir(engine_dir, None, None).graphs.graphs[name]
    for i, point in enumerate(_points(name)):
        args = graph.spec.sample_inputs(point, seed=i)
        want = reference[name](*args)
        got = graph(*args)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-4 * (1 + want.abs().max()), (name, point)


@pytest.fixture(scope="module")
def fp16_engine_dir(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "demo-ort-fp16"
    build_engines(demo_dir, out, BuildOptions(precision=Precision.FP16, shapes=SHAPES, check_points=("min",)), **QUIET)
    return out


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in GRAPH_NAMES if n not in ("audio2token", "audio2bucket", "rife")])
def test_fp16_graph_obeys_the_low_precision_rule(fp16_engine_dir, reference, name):
    """fp16 (the low-precision rule of docs/testing.md): the exported graph may be at most 2x as far from the
    fp32 reference as PyTorch's own fp16 result, plus atol 2e-3 * (1 + max|reference|)."""
    graph = open_engine_dir(fp16_engine_dir, None, None).graphs.graphs[name]
    assert graph.spec.inputs[0].dtype == "float16"
    half = copy.deepcopy(reference[name]).half()
    extra = POINTS["unet"][:1] if name == "unet" else []  # torch's own fp16 on CPU is slow: few points
    for i, point in enumerate(["min", *extra]):
        args = graph.spec.sample_inputs(point, seed=10 + i)
        want = reference[name](*[a.float() for a in args])
        torch_err = (half(*args).float() - want).abs().max()
        got = graph(*args)
        assert got.dtype == torch.float16 and got.shape == want.shape
        err = (got.float() - want).abs().max()
        assert err <= 2 * torch_err + 2e-3 * (1 + want.abs().max()), (name, point, float(err), float(torch_err))


def test_fp16_build_keeps_the_official_fp32_graphs(fp16_engine_dir):
    manifest = read_manifest(fp16_engine_dir)
    assert manifest["precision"] == "fp16"
    dtypes = {name: entry["spec"]["inputs"][0]["dtype"] for name, entry in manifest["graphs"].items()}
    assert dtypes == {
        "whisper_encoder": "float16",
        "image_encoder": "float16",
        "vae_encoder": "float16",
        "audio2token": "float32",
        "audio2bucket": "float32",
        "unet": "float16",
        "vae_decoder": "float16",
        "rife": "float32",
    }


def test_whole_video_onnxruntime_matches_torch(engine_dir, runtime, portrait, speech, tmp_path):
    """The same video through both backends (official 25 steps): decoded frames differ by at most 2 uint8 levels
    and PSNR >= 60 dB (measured: max 1 level, ~93 dB)."""
    engines = sonic_rt.Runtime(engine_dir)
    assert engines.backend == "onnxruntime" and engines.dtype == torch.float32
    a = runtime.animate(portrait, speech, None, progress=False).frames
    result = engines.animate(portrait, speech, tmp_path / "ort.mp4", progress=False, return_frames=True)
    b = result.frames
    assert a.shape == b.shape and a.shape[0] == result.num_generated_frames
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    print(f"onnxruntime vs torch: max abs diff {diff.max()} levels, PSNR {psnr:.1f} dB")
    assert diff.max() <= 2 and psnr >= 60.0
    assert result.path.is_file() and result.num_frames == 2 * a.shape[0] - 1


# --- manifest: reuse, rebuild, refusal, atomicity ---------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_rerun_with_unchanged_inputs_reuses_every_artifact(demo_dir, engine_dir, tmp_path):
    out = _copy(engine_dir, tmp_path / "e")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    lines = []
    report = build_engines(demo_dir, out, BuildOptions(shapes=SHAPES), log=lines.append)
    assert {a for a, _ in report.actions.values()} == {"reused"}
    assert sum("reused (inputs unchanged, sha256 verified)" in line for line in lines) == 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")} == before  # same files, hard-linked back
    assert read_manifest(out)["graphs"] == read_manifest(engine_dir)["graphs"]


def test_changed_weights_rebuild_only_the_graphs_that_use_them(demo_dir, engine_dir, tmp_path):
    model = _copy(demo_dir, tmp_path / "model")
    path = model / "Sonic" / "audio2bucket.pth"
    state = torch.load(path, weights_only=True)
    state["proj3.bias"] = state["proj3.bias"] + 0.5
    torch.save(state, path)
    out = _copy(engine_dir, tmp_path / "e")
    report = build_engines(model, out, BuildOptions(shapes=SHAPES), **QUIET)
    built = {name: why for name, (action, why) in report.actions.items() if action == "built"}
    assert built == {"audio2bucket": "source changed: Sonic/audio2bucket.pth"}
    assert (
        read_manifest(out)["graphs"]["audio2bucket"]["files"]
        != read_manifest(engine_dir)["graphs"]["audio2bucket"]["files"]
    )


def test_changed_window_length_rebuilds_only_the_unet(demo_dir, engine_dir, tmp_path):
    out = _copy(engine_dir, tmp_path / "e")
    shapes = ShapeOptions(frames=16, resolution=SHAPES.resolution, windows=SHAPES.windows)
    report = build_engines(demo_dir, out, BuildOptions(shapes=shapes, check_points=("min",)), **QUIET)
    assert {n: a for n, (a, _) in report.actions.items() if a == "built"} == {"unet": "built"}
    assert report.actions["unet"][1] == "shapes changed"
    assert read_manifest(out)["graphs"]["unet"]["spec"]["dims"]["frames"] == [1, 16, 16]


def test_a_failed_build_leaves_no_directory_and_keeps_the_old_one(demo_dir, engine_dir, tmp_path, monkeypatch):
    import export.build_engines as builder

    real = builder.export_graph

    def failing(module, spec, path, **kw):
        if spec.name == "unet":
            raise ExportError("simulated failure")
        return real(module, spec, path, **kw)

    monkeypatch.setattr(builder, "export_graph", failing)
    with pytest.raises(ExportError):
        build_engines(demo_dir, tmp_path / "new", BuildOptions(shapes=SHAPES), **QUIET)
    assert list(tmp_path.iterdir()) == []
    out = _copy(engine_dir, tmp_path / "old")
    shapes = ShapeOptions(frames=16, resolution=SHAPES.resolution, windows=SHAPES.windows)
    with pytest.raises(ExportError):
        build_engines(demo_dir, out, BuildOptions(shapes=shapes), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert read_manifest(out) == read_manifest(engine_dir)


def test_out_that_is_not_an_engine_directory_is_refused(demo_dir, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an engine directory"):
        build_engines(demo_dir, tmp_path / "x", BuildOptions(shapes=SHAPES), **QUIET)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_corrupted_or_missing_artifacts_are_refused(engine_dir, tmp_path):
    out = _copy(engine_dir, tmp_path / "e")
    with open(out / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="unet.onnx does not match its sha256.*rebuild it: python -m export"):
        sonic_rt.Runtime(out)
    (out / "unet.onnx").unlink()
    with pytest.raises(EngineError, match="unet.onnx is missing"):
        sonic_rt.Runtime(out)


def test_another_precision_or_format_is_refused(engine_dir, tmp_path):
    with pytest.raises(EngineError, match="built for fp32, but fp16 was requested.*--precision fp16"):
        sonic_rt.Runtime(engine_dir, dtype="fp16")
    out = _copy(engine_dir, tmp_path / "e")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "sonic_rt.engines/0"}))
    with pytest.raises(EngineError, match="manifest format"):
        sonic_rt.Runtime(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="unreadable"):
        sonic_rt.Runtime(out)


class _FakeTensorRT(Backend):
    """Stands in for the TensorRT backend class (which cannot import here) to test the manifest checks."""

    name, artifact_suffix = "tensorrt", ".plan"
    compiled = True  # like TensorRTBackend: library version and GPU are checked on load
    version = "10.9.0"

    @classmethod
    def versions(cls):
        return {"tensorrt": cls.version}

    @staticmethod
    def default_device():
        return torch.device("cpu")

    @staticmethod
    def gpu_identity(device):
        return {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_tensorrt_engines_for_another_version_or_gpu_are_refused(engine_dir, tmp_path, monkeypatch):
    out = _copy(engine_dir, tmp_path / "e")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(backend="tensorrt", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    manifest["libraries"]["tensorrt"] = "10.8.0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailableError, match="TensorRT"):  # the real library is absent here
        sonic_rt.Runtime(out)
    import sonic_rt.backends as backends

    monkeypatch.setattr(backends, "get_backend", lambda name: _FakeTensorRT)
    with pytest.raises(EngineError, match="built with tensorrt 10.8.0, this is 10.9.0.*--backend tensorrt"):
        sonic_rt.Runtime(out)
    manifest["libraries"]["tensorrt"] = "10.9.0"
    manifest["gpu"] = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built for .*A100.*this GPU is .*H100"):
        sonic_rt.Runtime(out)


# --- CLI ------------------------------------------------------------------------------------------------------------


def _cli(*args, env=None):
    # export/ is not installed (docs/development.md#packaging): run it from the repository root
    return subprocess.run(
        [sys.executable, "-m", "export.build_engines", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_cli_help_and_clear_errors(tmp_path):
    helped = _cli("--help")
    assert helped.returncode == 0 and "--backend" in helped.stdout and "--resolution" in helped.stdout
    bad = _cli("--demo", "--out", str(tmp_path / "x"), "--resolution", "100:128:256")
    assert bad.returncode == 2 and "multiple of 64" in bad.stderr and "Traceback" not in bad.stderr
    trt = _cli("--demo", "--out", str(tmp_path / "y"), "--backend", "tensorrt")
    assert trt.returncode == 2 and "TensorRT" in trt.stderr and "Traceback" not in trt.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_cli_build_then_animate_with_the_engine_directory(tmp_path, portrait, speech):
    """The issue's done-when: build the demo engines for onnxruntime, then animate with them from the CLI."""
    import os

    env = {**os.environ, "SONIC_RT_CACHE": str(tmp_path / "cache")}
    built = _cli("--demo", "--backend", "onnxruntime", "--out", str(tmp_path / "engines" / "demo-ort"), env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "8 graphs built, 0 reused" in built.stderr
    again = _cli("--demo", "--backend", "onnxruntime", "--out", str(tmp_path / "engines" / "demo-ort"), env=env)
    assert again.returncode == 0 and "0 graphs built, 8 reused" in again.stderr
    out = tmp_path / "o.mp4"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sonic_rt",
            "animate",
            "--model",
            str(tmp_path / "engines" / "demo-ort"),
            "--image",
            str(portrait),
            "--audio",
            str(speech),
            "--out",
            str(out),
            "--steps",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    frames, fps, audio_seconds = sonic_rt.media.read_video(out)
    assert frames.shape[1:] == (128, 128, 3) and frames.shape[0] % 2 == 1 and fps == 25.0 and audio_seconds > 1.5
