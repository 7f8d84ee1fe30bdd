"""Build a TensorRT 10 engine (``<graph>.plan``) from an exported ONNX graph.

One optimisation profile per engine, taken from the graph's :class:`~sonic_rt.graphs.GraphSpec`
(:meth:`GraphSpec.profile`): the shapes are never restated here. Steps:

1. parse the ONNX (``parse_from_file`` also reads ``<name>.onnx.data`` next to it) and check that the
   network's inputs and outputs are the spec's;
2. configure: FP16 kernels for an fp16 build (the ONNX is already exported in fp16), workspace limit,
   the profile, the timing cache (loaded from ``timing_cache`` when the file exists);
3. build, then write the plan and the updated timing cache atomically (temp file + ``os.replace``), so
   an interrupted build never leaves a truncated plan behind.

``tensorrt`` is imported inside :func:`build_engine`, so importing this module needs no TensorRT.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sonic_rt.errors import BackendUnavailableError, EngineError
from sonic_rt.graphs import GraphSpec, Precision
from sonic_rt.graphs.spec import tensorrt_dtype_names

INSTALL = (
    "TensorRT 10 with its Python bindings: pip install 'sonic_rt[tensorrt]' where NVIDIA's package index "
    "is reachable (the PyPI 'tensorrt' package downloads the libraries from there), or NVIDIA's TensorRT "
    "container"
)


class EngineBuildError(EngineError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"building TensorRT engines needs {INSTALL} ({exc})") from None
    return tensorrt


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def profile_table(spec: GraphSpec) -> list[str]:
    """The optimisation profile of ``spec`` as printable lines: a header, then input, min, opt, max."""
    rows = [("input", "min", "opt", "max")]
    rows += [(name, *map(_shape, shapes)) for name, shapes in spec.profile().items()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _write_atomic(path: Path, data) -> None:
    """Write ``data`` (bytes or any buffer, e.g. a TensorRT ``IHostMemory``) to ``path`` via a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_network(trt, network, spec: GraphSpec, onnx_path: Path) -> None:
    """The parsed network's inputs and outputs must be the spec's (names and dtypes)."""
    dtypes = tensorrt_dtype_names(trt)
    got = {}
    for count, get in ((network.num_inputs, network.get_input), (network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            got[tensor.name] = dtypes.get(tensor.dtype, str(tensor.dtype))
    want = {t.name: t.dtype for t in spec.inputs + spec.outputs}
    if got != want:
        raise EngineBuildError(
            f"the ONNX graph's inputs and outputs {got} are not graph {spec.name!r}'s {want}; "
            "re-export it with python -m export.build_engines",
            onnx_path,
        )


def build_engine(
    onnx_path: str | os.PathLike,
    spec: GraphSpec,
    plan_path: str | os.PathLike,
    precision: Precision,
    *,
    timing_cache: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
) -> dict:
    """Build ``plan_path`` from ``onnx_path`` for graph ``spec``.

    Args:
        onnx_path: the exported graph (:func:`export.onnx_export.export_graph`), in ``precision``.
        spec: the graph's I/O description; gives the one optimisation profile.
        plan_path: where to write the serialized engine.
        precision: the build precision. ``FP16`` enables FP16 kernels for graphs whose spec has fp16
            tensors; graphs the spec keeps in fp32 (the audio adapters and RIFE, official fp32) are built
            in fp32 whatever ``precision`` is. ``FP32`` builds fp32 (TensorRT may use TF32).
        timing_cache: a file to load tactic timings from (when it exists) and to save them to; makes
            rebuilds on the same GPU and TensorRT version much faster.
        workspace_bytes: limit of the builder's workspace memory pool (TensorRT's default: all GPU memory).

    Returns:
        Build info: ``graph``, ``plan``, ``plan_bytes``, ``precision`` (the one the graph was built in:
        "fp32" for a graph kept in fp32), ``seconds`` (the build itself),
        ``profile`` ({input: [min, opt, max]}), ``timing_cache`` (path or None), ``timing_cache_reused``
        (whether the existing cache matched this TensorRT version and GPU), ``tensorrt`` (version).

    Raises:
        BackendUnavailableError: TensorRT is not installed, or there is no CUDA GPU.
        EngineBuildError: missing ONNX file, parser errors (all of them listed), a network whose I/O is
            not the spec's, or a failed build (TensorRT's log above says why).
        ValueError: ``precision`` is BF16 (torch backend only), or FP32 for a spec with fp16 tensors.
    """
    trt = _import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("building TensorRT engines needs a CUDA GPU, and torch sees none here")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in (Precision.FP32, Precision.FP16):
        raise ValueError(f"TensorRT engines are built in fp32 or fp16, not {precision.value}")
    has_fp16 = any(t.dtype == "float16" for t in spec.inputs + spec.outputs)
    if has_fp16 and precision is Precision.FP32:
        raise ValueError(f"graph {spec.name!r} has fp16 tensors (an fp16 export); build it with Precision.FP16")
    precision = Precision.FP16 if has_fp16 else Precision.FP32  # graphs kept in fp32 get no FP16 kernels
    if not onnx_path.is_file():
        raise EngineBuildError("no such ONNX file; export the graph first (python -m export.build_engines)", onnx_path)

    # 1. Parse
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse the graph ({len(errors)} errors):\n  "
            + "\n  ".join(errors or ["(no error reported; see TensorRT's log above)"]),
            onnx_path,
        )
    _check_network(trt, network, spec, onnx_path)

    # 2. Configure: precision, workspace, the profile, the timing cache
    config = builder.create_builder_config()
    if precision is Precision.FP16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    shapes = spec.profile()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cached = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cached) if cached else None
    reused = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    if not reused:  # no cache yet, or one written by another TensorRT version or GPU: start a fresh one
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    # 3. Build, then write the plan and the timing cache atomically
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine (see its log above)", onnx_path)
    _write_atomic(plan_path, plan)
    if cache_path is not None:
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    return {
        "graph": spec.name,
        "plan": str(plan_path),
        "plan_bytes": plan_path.stat().st_size,
        "precision": precision.value,
        "seconds": round(seconds, 3),
        "profile": {name: [list(s) for s in triple] for name, triple in shapes.items()},
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "timing_cache_reused": reused,
        "tensorrt": trt.__version__,
    }
