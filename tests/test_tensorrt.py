"""The TensorRT backend and engine builder.

TensorRT cannot be installed on CI, so three tiers:

- without TensorRT: choosing the backend or building an engine fails with a message naming TensorRT;
- with a recording fake ``tensorrt`` module: our code's calls (profile shapes from the spec, FP16 flag,
  timing cache, atomic plan writes; shape and address binding, per-stream contexts) are checked;
- with real TensorRT and a GPU (``-m gpu``): a real engine for the demo-sized audio2token graph is built
  and compared with PyTorch.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import importlib
import math
import sys
import types

import pytest
import torch

import sonic_rt.backends
from sonic_rt.errors import BackendUnavailableError, EngineError
from sonic_rt.graphs import DimRange, PipelineConfig, Precision, ShapeOptions, TensorSpec, graph_specs

BACKEND_MODULE = "sonic_rt.backends.tensorrt_backend"

# The demo checkpoint's sizes (sonic_rt.demo), written out by hand so no weights are needed.
DEMO_CONFIG = PipelineConfig(
    latent_channels=4,
    unet_in_channels=8,
    cross_attention_dim=32,
    audio_context_tokens=32,
    attention_levels=(0, 1),
    vae_scale_factor=8,
    vae_scaling_factor=0.18215,
    clip_image_size=224,
    clip_embed_dim=32,
    whisper_mel_bins=80,
    whisper_positions=1500,
    whisper_states=3,
    whisper_d_model=32,
    token_window=10,
    bucket_window=50,
    num_buckets=2,
)
DEMO_SHAPES = ShapeOptions(frames=8, resolution=DimRange(128, 128, 256), windows=DimRange(1, 1, 2))


def specs(precision: Precision = Precision.FP16):
    return graph_specs(DEMO_CONFIG, DEMO_SHAPES, precision)


def tensorrt_importable() -> bool:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# 1. TensorRT absent
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here")
def test_without_tensorrt_choosing_the_backend_says_what_to_install():
    from sonic_rt.backends import get_backend

    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        get_backend("tensorrt")


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here")
def test_without_tensorrt_building_an_engine_says_what_to_install(tmp_path):
    from export.tensorrt_build import build_engine

    spec = specs()["rife"]
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        build_engine(tmp_path / "rife.onnx", spec, tmp_path / "rife.plan", Precision.FP32)
    assert not (tmp_path / "rife.plan").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. A recording fake of the TensorRT 10 Python API
# ---------------------------------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT, HALF, BF16, INT64, INT32, BOOL = range(6)


SPEC_DTYPE = {"float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16, "int64": DataType.INT64}


class TensorIOMode(enum.Enum):
    INPUT, OUTPUT = range(2)


def at(ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """The CPU memory at ``ptr`` as a tensor (what a TensorRT kernel would read or write)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(shape)


class FakeTensorRT(types.ModuleType):
    """Records the calls made on it. ``engine_spec`` describes the I/O of the networks it parses and the
    engines it deserializes; ``forward`` maps input tensors to output tensors at run time."""

    DataType, TensorIOMode = DataType, TensorIOMode
    BuilderFlag = enum.Enum("BuilderFlag", "FP16 TF32")
    MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    def __init__(self, engine_spec, *, forward=None, parse_errors=(), build_fails=False):
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        self.spec, self.forward, self.parse_errors, self.build_fails = engine_spec, forward, parse_errors, build_fails
        self.calls: list[tuple] = []
        self.plan = b"fake plan for " + engine_spec.name.encode()
        fake = self

        def recorder(name, result=None):
            def method(self, *args, **kwargs):
                fake.calls.append((name, *args, *kwargs.values()))
                return result(self, *args) if callable(result) else result

            return method

        def tensors(tensor_specs):
            return [types.SimpleNamespace(name=t.name, dtype=SPEC_DTYPE[t.dtype]) for t in tensor_specs]

        class Network:
            inputs, outputs = tensors(engine_spec.inputs), tensors(engine_spec.outputs)
            num_inputs, num_outputs = len(inputs), len(outputs)
            get_input = lambda self, i: self.inputs[i]  # noqa: E731
            get_output = lambda self, i: self.outputs[i]  # noqa: E731

        class TimingCache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+tuned"

        class Config:
            set_flag = recorder("set_flag")
            set_memory_pool_limit = recorder("set_memory_pool_limit")
            add_optimization_profile = recorder("add_optimization_profile")
            create_timing_cache = recorder("create_timing_cache", lambda self, data: TimingCache(data))
            get_timing_cache = lambda self: self.cache  # noqa: E731

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache, ignore_mismatch))
                self.cache = cache
                return True

        class Builder:
            def __init__(self, logger):
                pass

            create_network = recorder("create_network", lambda self, flags: Network())
            create_builder_config = recorder("create_builder_config", lambda self: Config())
            create_optimization_profile = recorder("create_optimization_profile", lambda self: Profile())
            build_serialized_network = recorder(
                "build_serialized_network", lambda self, *_: None if fake.build_fails else fake.plan
            )

        class Profile:
            set_shape = recorder("set_shape")

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = len(fake.parse_errors)

            parse_from_file = recorder("parse_from_file", lambda self, path: not fake.parse_errors)
            get_error = lambda self, i: fake.parse_errors[i]  # noqa: E731

        class Context:
            def __init__(self):
                self.shapes, self.addresses = {}, {}

            def set_input_shape(self, name, shape):
                fake.calls.append(("set_input_shape", name, shape))
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                fake.calls.append(("set_tensor_address", name, ptr))
                self.addresses[name] = ptr

            def get_tensor_shape(self, name):
                return self._outputs()[name].shape

            def execute_async_v3(self, stream):
                fake.calls.append(("execute_async_v3", stream))
                for name, value in self._outputs().items():
                    at(self.addresses[name], value.shape, value.dtype).copy_(value)
                return True

            def _outputs(self):
                ins = {
                    t.name: at(self.addresses[t.name], self.shapes[t.name], t.torch_dtype) for t in engine_spec.inputs
                }
                return fake.forward(**ins)

        class Engine:
            names = [t.name for t in engine_spec.inputs + engine_spec.outputs]
            num_io_tensors = len(names)
            get_tensor_name = lambda self, i: self.names[i]  # noqa: E731
            create_execution_context = recorder("create_execution_context", lambda self: Context())

            def get_tensor_mode(self, name):
                inputs = [t.name for t in engine_spec.inputs]
                return TensorIOMode.INPUT if name in inputs else TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return next(SPEC_DTYPE[t.dtype] for t in engine_spec.inputs + engine_spec.outputs if t.name == name)

            def get_tensor_profile_shape(self, name, index):
                return [list(shape) for shape in engine_spec.profile()[name]]

        class Runtime:
            def __init__(self, logger):
                pass

            deserialize_cuda_engine = recorder(
                "deserialize_cuda_engine", lambda self, data: Engine() if bytes(data) == fake.plan else None
            )

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    def called(self, name: str) -> list[tuple]:
        return [call[1:] for call in self.calls if call[0] == name]


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes in a CUDA device; tensors stay on the CPU. ``stream.cuda_stream`` is the current stream."""
    stream = types.SimpleNamespace(cuda_stream=7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return stream


def install(monkeypatch, fake: FakeTensorRT):
    """Make ``fake`` the ``tensorrt`` module and import the backend against it (both undone after the test)."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, BACKEND_MODULE, None)  # recorded, so the fresh import is removed afterwards
    del sys.modules[BACKEND_MODULE]
    monkeypatch.setattr(sonic_rt.backends, "tensorrt_backend", None, raising=False)
    return importlib.import_module(BACKEND_MODULE)


# -- builder ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "graph, precision, fp16",
    [
        ("unet", Precision.FP16, True),
        ("vae_decoder", Precision.FP16, True),
        ("rife", Precision.FP16, False),
        ("audio2bucket", Precision.FP16, False),  # official fp32 in any build
        ("unet", Precision.FP32, False),
    ],
)
def test_builder_uses_the_spec_profile_precision_and_timing_cache(
    monkeypatch, fake_gpu, tmp_path, graph, precision, fp16
):
    from export.tensorrt_build import build_engine

    spec = specs(precision)[graph]
    fake = FakeTensorRT(spec)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    onnx = tmp_path / f"{graph}.onnx"
    onnx.write_bytes(b"onnx")
    plan, cache = tmp_path / "engines" / f"{graph}.plan", tmp_path / "timing.cache"

    info = build_engine(onnx, spec, plan, precision, timing_cache=cache, workspace_bytes=1 << 30)

    assert fake.called("create_network") == [(0,)]
    assert fake.called("parse_from_file") == [(str(onnx),)]
    assert {name: (lo, opt, hi) for name, lo, opt, hi in fake.called("set_shape")} == spec.profile()
    assert len(fake.called("set_shape")) == len(spec.inputs)
    assert len(fake.called("add_optimization_profile")) == 1
    assert fake.called("set_flag") == ([(fake.BuilderFlag.FP16,)] if fp16 else [])
    assert fake.called("set_memory_pool_limit") == [(fake.MemoryPoolType.WORKSPACE, 1 << 30)]
    assert plan.read_bytes() == fake.plan
    assert cache.read_bytes() == b"+tuned"  # a fresh cache, tuned by this build
    assert sorted(p.name for p in plan.parent.iterdir()) == [plan.name]  # no temp file left
    assert info["profile"] == {name: [list(s) for s in shapes] for name, shapes in spec.profile().items()}
    assert info["precision"] == ("fp16" if fp16 else "fp32") and info["timing_cache_reused"] is False

    # a second build starts from the saved timing cache
    fake.calls.clear()
    info = build_engine(onnx, spec, plan, precision, timing_cache=cache)
    assert fake.called("create_timing_cache")[0] == (b"+tuned",)
    assert [mismatch for _, mismatch in fake.called("set_timing_cache")] == [False]
    assert info["timing_cache_reused"] is True and cache.read_bytes() == b"+tuned+tuned"
    assert fake.called("set_memory_pool_limit") == []


def test_profile_table_lists_every_input_from_the_spec():
    from export.tensorrt_build import profile_table

    spec = specs()["unet"]
    lines = profile_table(spec)
    assert lines[0].split() == ["input", "min", "opt", "max"]
    assert len(lines) == 1 + len(spec.inputs)
    for line, (name, (lo, opt, hi)) in zip(lines[1:], spec.profile().items()):
        assert line.split() == [name, *("x".join(map(str, s)) for s in (lo, opt, hi))]


def test_builder_reports_every_parser_error_and_writes_nothing(monkeypatch, fake_gpu, tmp_path):
    from export.tensorrt_build import EngineBuildError, build_engine

    spec = specs(Precision.FP32)["rife"]
    errors = ("In node 3 (importResize): UNSUPPORTED_NODE: mode", "In node 9 (parseGraph): INVALID_NODE: x")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(spec, parse_errors=errors))
    onnx = tmp_path / "rife.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(EngineBuildError) as info:
        build_engine(onnx, spec, tmp_path / "rife.plan", Precision.FP32, timing_cache=tmp_path / "cache")
    assert str(onnx) in str(info.value) and all(e in str(info.value) for e in errors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rife.onnx"]


def test_builder_refuses_a_failed_build_an_onnx_unlike_the_spec_and_a_wrong_precision(monkeypatch, fake_gpu, tmp_path):
    from export.tensorrt_build import EngineBuildError, build_engine

    spec = specs(Precision.FP32)["rife"]
    onnx = tmp_path / "rife.onnx"
    onnx.write_bytes(b"onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(spec, build_fails=True))
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_engine(onnx, spec, tmp_path / "rife.plan", Precision.FP32)
    assert not (tmp_path / "rife.plan").exists()

    renamed = dataclasses.replace(spec, outputs=(TensorSpec("out", ("pairs", 3, "height", "width"), "float32"),))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(renamed))
    with pytest.raises(EngineBuildError, match="re-export"):
        build_engine(onnx, spec, tmp_path / "rife.plan", Precision.FP32)

    unet = specs(Precision.FP16)["unet"]
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(unet))
    with pytest.raises(ValueError, match="Precision.FP16"):
        build_engine(onnx, unet, tmp_path / "unet.plan", Precision.FP32)
    with pytest.raises(EngineBuildError, match="export the graph first"):
        build_engine(tmp_path / "missing.onnx", spec, tmp_path / "rife.plan", Precision.FP32)


def test_builder_needs_a_gpu(monkeypatch, tmp_path):
    from export.tensorrt_build import build_engine

    spec = specs(Precision.FP32)["rife"]
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(spec))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        build_engine(tmp_path / "rife.onnx", spec, tmp_path / "rife.plan", Precision.FP32)


# -- runtime ----------------------------------------------------------------------------------------------
def rife_spec():
    return specs(Precision.FP32)["rife"]


def average(img0, img1):
    return {"middle": (img0 + img1) / 2}


@pytest.fixture
def rife(monkeypatch, fake_gpu, tmp_path):
    """(fake tensorrt, backend module, plan path) for the rife graph."""
    fake = FakeTensorRT(rife_spec(), forward=average)
    backend = install(monkeypatch, fake)
    plan = tmp_path / "rife.plan"
    plan.write_bytes(fake.plan)
    return fake, backend, plan


def test_run_binds_every_tensor_and_returns_the_engine_outputs(rife, fake_gpu):
    fake, backend, plan = rife
    spec = rife_spec()
    graph = backend.TensorRTGraph(spec, plan, torch.device("cpu"))
    assert graph.check_ranges
    img0, img1 = spec.sample_inputs({"pairs": 3, "height": 192, "width": 128}, seed=1)

    out = graph(img0, img1)

    assert fake.called("set_input_shape") == [("img0", (3, 3, 192, 128)), ("img1", (3, 3, 192, 128))]
    addresses = dict(fake.called("set_tensor_address"))
    assert set(addresses) == {"img0", "img1", "middle"}
    assert addresses["img0"] == img0.data_ptr() and addresses["img1"] == img1.data_ptr()
    assert fake.called("execute_async_v3") == [(fake_gpu.cuda_stream,)]
    assert out.shape == (3, 3, 192, 128)
    torch.testing.assert_close(out, (img0 + img1) / 2)
    assert out.data_ptr() != addresses["middle"]  # a copy: the next call reuses the buffer

    small = spec.sample_inputs("min", seed=2)
    graph(*small)
    torch.testing.assert_close(out, (img0 + img1) / 2)  # the first result is untouched


def test_one_context_and_one_set_of_buffers_per_stream(rife, fake_gpu):
    fake, backend, plan = rife
    spec = rife_spec()
    graph = backend.TensorRTGraph(spec, plan, torch.device("cpu"))
    inputs = spec.sample_inputs("opt")
    graph(*inputs)
    graph(*inputs)
    assert len(fake.called("create_execution_context")) == 1
    fake_gpu.cuda_stream = 8
    graph(*inputs)
    assert len(fake.called("create_execution_context")) == 2
    middle = [ptr for name, ptr in fake.called("set_tensor_address") if name == "middle"]
    assert middle[0] == middle[1] != middle[2]
    assert [s for (s,) in fake.called("execute_async_v3")] == [7, 7, 8]
    buffer = graph._slots[8].buffers["middle"]
    assert tuple(buffer.shape) == spec.max_shape(spec.outputs[0])


def test_dims_outside_the_profile_fail_before_tensorrt(rife):
    from sonic_rt.errors import InputError

    fake, backend, plan = rife
    graph = backend.TensorRTGraph(rife_spec(), plan, torch.device("cpu"))
    too_big = torch.zeros(9, 3, 128, 128)
    with pytest.raises(InputError, match="outside the range"):
        graph(too_big, too_big)
    assert fake.called("set_input_shape") == []


def test_load_refuses_plans_that_do_not_match(monkeypatch, fake_gpu, tmp_path):
    spec = rife_spec()
    wrong_name = dataclasses.replace(spec, outputs=(TensorSpec("out", ("pairs", 3, "height", "width"), "float32"),))
    wrong_dtype = dataclasses.replace(spec, outputs=(TensorSpec("middle", ("pairs", 3, "height", "width"), "float16"),))
    wrong_profile = dataclasses.replace(spec, dims={**spec.dims, "pairs": DimRange(1, 2, 4)})
    cases = [(wrong_name, "outputs"), (wrong_dtype, "precision"), (wrong_profile, "shapes")]
    for engine_spec, message in cases:
        fake = FakeTensorRT(engine_spec)
        backend = install(monkeypatch, fake)
        plan = tmp_path / "rife.plan"
        plan.write_bytes(fake.plan)
        with pytest.raises(EngineError, match=message):
            backend.TensorRTGraph(spec, plan, torch.device("cpu"))

    plan.write_bytes(b"a plan from another TensorRT version")
    with pytest.raises(EngineError, match="another TensorRT version or GPU.*export.build_engines"):
        backend.TensorRTGraph(spec, plan, torch.device("cpu"))
    with pytest.raises(EngineError, match="cannot read"):
        backend.TensorRTGraph(spec, tmp_path / "missing.plan", torch.device("cpu"))


def test_backend_needs_cuda(monkeypatch, tmp_path):
    fake = FakeTensorRT(rife_spec())
    backend = install(monkeypatch, fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.TensorRTBackend.versions() == {"tensorrt": "10.99.0-fake"}
    assert backend.TensorRTBackend.name == "tensorrt" and backend.TensorRTBackend.artifact_suffix == ".plan"
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        backend.TensorRTBackend.default_device()
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        backend.TensorRTBackend.load_graph(rife_spec(), tmp_path / "rife.plan", torch.device("cuda"))
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        backend.TensorRTBackend.gpu_identity("cuda")


def test_load_graph_refuses_a_cpu_device(rife):
    fake, backend, plan = rife
    with pytest.raises(BackendUnavailableError, match="only on CUDA"):
        backend.TensorRTBackend.load_graph(rife_spec(), plan, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# 3. Real TensorRT on a GPU
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_engine_for_audio2token_matches_pytorch(tmp_path):
    if not tensorrt_importable():
        pytest.skip("TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from export.onnx_export import export_graph
    from export.tensorrt_build import build_engine
    from sonic_rt.backends import get_backend
    from sonic_rt.graphs.modules import Audio2TokenGraph
    from sonic_rt.models.audio_adapters import AudioProjModel

    spec = specs()["audio2token"]  # always fp32 (official)
    torch.manual_seed(0)
    c = DEMO_CONFIG
    module = Audio2TokenGraph(
        AudioProjModel(
            c.token_window, c.whisper_states, c.whisper_d_model, 64, c.cross_attention_dim, c.audio_context_tokens
        )
    ).eval()
    onnx, plan, cache = tmp_path / "audio2token.onnx", tmp_path / "audio2token.plan", tmp_path / "timing.cache"
    export_graph(module, spec, onnx)
    info = build_engine(onnx, spec, plan, Precision.FP32, timing_cache=cache)
    assert plan.stat().st_size == info["plan_bytes"] > 0 and cache.stat().st_size > 0

    backend = get_backend("tensorrt")
    identity = backend.gpu_identity("cuda")
    assert identity["name"] and identity["compute_capability"].count(".") == 1
    graph = backend.load_graph(spec, plan, torch.device("cuda"))
    module = module.cuda()
    side = torch.cuda.Stream()
    for i, point in enumerate(("min", "opt", "max")):
        (x,) = spec.sample_inputs(point, seed=i, device="cuda")
        with torch.no_grad():
            want = module(x)
        torch.testing.assert_close(graph(x), want, atol=1e-2, rtol=1e-2)  # TensorRT may use TF32
        with torch.cuda.stream(side):
            got = graph(x)
        torch.cuda.current_stream().wait_stream(side)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert len(graph._slots) == 2
