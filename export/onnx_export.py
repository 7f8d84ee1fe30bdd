"""Export one graph to ONNX, check it, clean it up with onnxslim and run-check it with ONNX Runtime.

The TorchScript exporter (``dynamo=False``) is used on purpose: the dynamo exporter produces a broken UNet
graph when frames are dynamic and batch > 1 (onnxscript ``repeat_interleave`` translation, "invalid expand
shape" in ONNX Runtime; see docs/development.md). Dynamic axes come from the graph's
:class:`~sonic_rt.graphs.GraphSpec`, never restated here.

:func:`check_parity` is the one comparison of an exported graph with PyTorch: :func:`run_check` uses it for
the ONNX file, :mod:`export.build_engines` for compiled (TensorRT) artifacts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sonic_rt.graphs import GraphSpec
from sonic_rt.graphs.spec import Point

OPSET = 17  # LayerNormalization (17) is the newest op the graphs need; every TensorRT 10 and ORT >= 1.14 has it
EXTERNAL_DATA_THRESHOLD = 1 << 30  # graphs over 1 GiB keep their weights in <name>.onnx.data


class ExportError(RuntimeError):
    """An exported graph failed a check (checker, shape inference, run or parity)."""


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, *, opset: int = OPSET) -> list[Path]:
    """Trace ``module`` at the spec's opt shapes and write ``path`` (plus ``path.data`` for big graphs).

    Returns the files written. Raises :class:`ExportError` when the checker or shape inference rejects the
    graph.
    """
    import onnx
    import onnxslim

    path = Path(path)
    raw = path.with_suffix(".raw.onnx")
    args = spec.sample_inputs("opt", device=next(module.parameters()).device)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: shape-dependent Python branches, checked by run_check
        torch.onnx.export(
            module,
            args,
            str(raw),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )
    try:
        model = onnxslim.slim(str(raw))
        if model is None:
            raise ExportError(f"onnxslim could not simplify {raw}")
        model = (
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            if model.ByteSize() < EXTERNAL_DATA_THRESHOLD
            else model
        )
        external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        onnx.save_model(
            model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=path.name + ".data"
        )
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path.name}: the ONNX checker rejects the graph: {exc}") from None
    finally:
        for leftover in raw.parent.glob(raw.name + "*"):
            leftover.unlink()
        for leftover in raw.parent.glob(raw.stem + "*"):
            if leftover.name != path.name and leftover.name != path.name + ".data" and leftover.exists():
                leftover.unlink()
    files = [path]
    if (path.parent / (path.name + ".data")).exists():
        files.append(path.parent / (path.name + ".data"))
    return files


def _session_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def check_parity(
    module: torch.nn.Module,
    spec: GraphSpec,
    run: Callable[[list[torch.Tensor], Point], Any],
    points: Sequence[Point],
    *,
    rtol: float,
    atol: float,
    seed: int,
    label: str,
) -> dict[str, float]:
    """Compare an exported graph with its PyTorch module on the spec's sample inputs at several shape points.

    Args:
        module: the reference. Sample inputs are drawn on its device; it gets their floats in its own dtype
            (an fp16 graph is compared with the fp32 module).
        spec: the graph's I/O description (sample inputs; output names and count).
        run: the graph under test: ``run(inputs, point)`` -> its outputs in spec order (one, or a tuple/list,
            of torch tensors or numpy arrays), ``inputs`` as drawn (spec dtypes, on the module's device).
        points: shape points: "min", "opt", "max" or ``{dim: value}``.
        rtol, atol: an output passes when ``max|graph - reference| <= atol + rtol * max|reference|``
            (compared in float32).
        seed: seed of the first point's inputs (point ``i`` uses ``seed + i``).
        label: what is checked (a file name), at the start of every error message.

    Returns:
        ``{point: max |graph - reference| over the outputs}`` (a dict point is keyed by ``str(dict(point))``).

    Raises:
        ExportError: the graph returns another number of outputs, an output of another shape, or one out of
            tolerance (naming the output and the point).
    """
    parameter = next(module.parameters())
    report = {}
    for i, point in enumerate(points):
        args = spec.sample_inputs(point, seed=seed + i, device=parameter.device)
        with torch.no_grad():
            want = module(*[a.to(parameter.dtype) if a.is_floating_point() else a for a in args])
        got = run(args, point)
        want = want if isinstance(want, (tuple, list)) else (want,)
        got = got if isinstance(got, (tuple, list)) else (got,)
        if len(got) != len(want):
            raise ExportError(f"{label}: {len(got)} outputs at the {point} shapes, PyTorch gives {len(want)}")
        worst = 0.0
        for name, w, g in zip(spec.output_names, want, got):
            w, g = _float32(w), _float32(g)
            if w.shape != g.shape:
                raise ExportError(
                    f"{label}: output {name} has shape {list(g.shape)} at the {point} shapes, expected {list(w.shape)}"
                )
            diff = float(np.abs(g - w).max()) if w.size else 0.0
            if w.size and not diff <= atol + rtol * float(np.abs(w).max()):
                raise ExportError(f"{label}: output {name} differs from PyTorch by {diff:.3g} at the {point} shapes")
            worst = max(worst, diff)
        report[point if isinstance(point, str) else str(dict(point))] = worst
    return report


def _float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A torch tensor (any device) or numpy array as a float32 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def run_check(
    module: torch.nn.Module,
    spec: GraphSpec,
    path: Path,
    points: Sequence[Point] = ("min", "opt"),
    *,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> dict[str, float]:
    """Run the exported graph with ONNX Runtime (CPU) at several shape points and compare it with ``module``
    (:func:`check_parity`; inputs seeded from 100).

    This catches shapes frozen by tracing (a dim that should be dynamic baked in as a constant) as well as
    numerical breakage. Returns the max abs difference per point; raises :class:`ExportError` when the graph
    does not run at a point or an output is past ``atol + rtol * max|reference|``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _session_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(args: list[torch.Tensor], point: Point) -> list[np.ndarray]:
        try:
            return session.run(spec.output_names, {t.name: a.cpu().numpy() for t, a in zip(spec.inputs, args)})
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise ExportError(f"{path.name} does not run at the {point} shapes: {exc}") from None

    return check_parity(module, spec, run, points, rtol=rtol, atol=atol, seed=100, label=path.name)
