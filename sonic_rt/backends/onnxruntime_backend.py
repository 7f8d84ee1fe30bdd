"""The ONNX Runtime backend: exported ``.onnx`` graphs on the CPU, CUDA or TensorRT execution provider.

On CPU, torch tensors are handed to ONNX Runtime as numpy views (no copy) and outputs wrapped back. On
CUDA, inputs and preallocated outputs are bound by device pointer (``io_binding``), so nothing crosses to
the host; output shapes come from the graph spec. ``InferenceSession.run`` is thread-safe, so one session
serves every worker thread.

Execution providers are never chosen silently: a CUDA device needs ``CUDAExecutionProvider`` in the
installed onnxruntime (the ``onnxruntime-gpu`` package), else :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from ..errors import BackendUnavailableError, EngineError
from ..graphs import GraphSpec
from ..graphs.spec import NUMPY_DTYPES
from . import Backend, Graph


def default_providers(device: torch.device) -> list[str]:
    """``["CPUExecutionProvider"]`` on CPU, ``["CUDAExecutionProvider"]`` on CUDA (checked available)."""
    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (available: {', '.join(available)});"
                " install onnxruntime-gpu instead of onnxruntime (pip install 'sonic_rt[gpu]'), or run on device='cpu'"
            )
        return ["CUDAExecutionProvider"]
    raise BackendUnavailableError(f"the onnxruntime backend does not run on device {device}")


def _provider_options(name: str, device: torch.device) -> tuple[str, dict[str, str]]:
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return name, {"device_id": str(device.index or 0)}
    return name, {}


class OnnxRuntimeGraph(Graph):
    """One ``InferenceSession`` over an exported graph."""

    def __init__(
        self,
        spec: GraphSpec,
        path: Path,
        device: torch.device,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        super().__init__(spec, device)
        providers = list(providers) if providers else default_providers(self.device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=[_provider_options(p, self.device) for p in providers]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime cannot load the graph ({type(exc).__name__}: {exc})", path) from None
        missing = [p for p in providers if p not in self.session.get_providers()]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime did not enable {', '.join(missing)} for {path.name} "
                f"(enabled: {', '.join(self.session.get_providers())})"
            )
        self.providers = self.session.get_providers()

    def run(self, inputs: list[torch.Tensor], values: Mapping[str, int]) -> list[torch.Tensor]:
        """Run the session. On CUDA this **synchronizes** torch's current stream first: ONNX Runtime's CUDA EP
        runs on its own stream, so inputs written by torch must be complete (one host sync per call)."""
        if self.device.type == "cpu":
            feeds = {t.name: x.numpy() for t, x in zip(self.spec.inputs, inputs)}
            return [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(self.spec.output_names, feeds)]
        binding = self.session.io_binding()
        index = self.device.index or 0
        for t, x in zip(self.spec.inputs, inputs):
            binding.bind_input(t.name, "cuda", index, NUMPY_DTYPES[x.dtype], tuple(x.shape), x.data_ptr())
        outputs = []
        for t, shape in zip(self.spec.outputs, self.spec.output_shapes(values).values()):
            out = torch.empty(shape, dtype=t.torch_dtype, device=self.device)
            binding.bind_output(t.name, "cuda", index, NUMPY_DTYPES[out.dtype], shape, out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream must be ready
        self.session.run_with_iobinding(binding)
        return outputs


class OnnxRuntimeBackend(Backend):
    """Loads exported ``<graph>.onnx`` files (see :mod:`export.build_engines`); they run on any device and
    onnxruntime version, so neither is checked on load."""

    name = "onnxruntime"
    artifact_suffix = ".onnx"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"onnxruntime": ort.__version__}

    @classmethod
    def default_device(cls) -> torch.device:
        """CUDA when torch sees a GPU and onnxruntime has the CUDA execution provider, else the CPU."""
        cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
        return torch.device("cuda" if cuda else "cpu")

    @classmethod
    def load_graph(
        cls, spec: GraphSpec, path: Path, device: torch.device, providers: Sequence[str] | None = None
    ) -> OnnxRuntimeGraph:
        """One session over ``path`` (threads from ``SONIC_RT_ORT_THREADS``, else onnxruntime's default)."""
        threads = int(os.environ.get("SONIC_RT_ORT_THREADS", "0")) or None
        return OnnxRuntimeGraph(spec, path, device, providers, threads)
