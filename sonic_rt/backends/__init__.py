"""Backends: one interface, implementations chosen by name and imported only when chosen.

A backend turns a :class:`~sonic_rt.graphs.GraphSpec` (plus weights or an artifact) into a :class:`Graph`:
a callable taking torch tensors in the spec's input order and returning torch tensors on the runtime's
device. The pipeline only ever sees :class:`Graphs`; no backend knows about shift-fusion windows.

=============  =====================================================  =====================================
name           runs                                                   needs
=============  =====================================================  =====================================
torch          the PyTorch modules (the reference)                    torch
onnxruntime    exported ONNX graphs (CPU, CUDA or TensorRT EP)        ``pip install onnxruntime`` (CPU) or
                                                                      ``onnxruntime-gpu`` (CUDA)
tensorrt       serialized TensorRT 10 engines                         TensorRT 10 Python API, a CUDA GPU
=============  =====================================================  =====================================
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import BackendUnavailableError, InputError
from ..graphs import GraphSpec, PipelineConfig

# name -> (module, class, what to install)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("sonic_rt.backends.torch_backend", "TorchBackend", "torch==2.13.0"),
    "onnxruntime": ("sonic_rt.backends.onnxruntime_backend", "OnnxRuntimeBackend",
                    "onnxruntime (CPU: pip install 'sonic_rt[onnx]') or onnxruntime-gpu (CUDA: pip install "
                    "'sonic_rt[gpu]'); never both"),
    "tensorrt": ("sonic_rt.backends.tensorrt_backend", "TensorRTBackend",
                 "TensorRT 10 with its Python bindings (pip install 'sonic_rt[tensorrt]' where NVIDIA's index is "
                 "reachable) and a CUDA GPU"),
}


def get_backend(name: str):
    """The backend class called ``name``, importing its module now.

    Raises:
        InputError: unknown name.
        BackendUnavailableError: the backend's library is not installed (names what to install).
    """
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls, install = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendUnavailableError(f"the {name} backend needs {install} ({exc})") from None


class Graph(abc.ABC):
    """A runnable graph: ``graph(*inputs) -> output`` (one tensor) or a tuple of outputs.

    Inputs are validated against :attr:`spec` (and cast to its dtypes), outputs are torch tensors on
    :attr:`device`. Subclasses implement :meth:`run`.

    Args:
        spec: the graph's I/O description.
        device: where inputs and outputs live.
        check_ranges: refuse dims outside the spec's ranges (engines with optimisation profiles).
    """

    def __init__(self, spec: GraphSpec, device: torch.device, *, check_ranges: bool = False):
        self.spec, self.device, self.check_ranges = spec, torch.device(device), check_ranges

    def __call__(self, *inputs: torch.Tensor):
        values = self.spec.check_inputs(inputs, check_ranges=self.check_ranges)
        cast = [x.to(device=self.device, dtype=t.torch_dtype).contiguous() for t, x in zip(self.spec.inputs, inputs)]
        outputs = self.run(cast, values)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @abc.abstractmethod
    def run(self, inputs: list[torch.Tensor], values: Mapping[str, int]) -> list[torch.Tensor]:
        """Run on ``inputs`` (validated, cast, contiguous, on :attr:`device`; ``values`` = their named dims) and
        return the outputs in spec order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, device={self.device})"


@dataclass
class Graphs:
    """The eight graphs of the pipeline (see :mod:`sonic_rt.graphs.modules`) plus the model constants.

    Attributes:
        backend: the backend name.
        config: model sizes and constants (:class:`PipelineConfig`).
        graphs: name -> :class:`Graph`.
    """

    backend: str
    config: PipelineConfig
    graphs: dict[str, Graph]

    def __getattr__(self, name: str) -> Graph:
        graphs = self.__dict__.get("graphs", {})
        if name in graphs:
            return graphs[name]
        raise AttributeError(name)
