"""Backends: one interface, implementations chosen by name and imported only when chosen.

A backend (a subclass of :class:`Backend`) turns a :class:`~sonic_rt.graphs.GraphSpec` (plus weights or an
artifact) into a :class:`Graph`: a callable taking torch tensors in the spec's input order and returning torch
tensors on the runtime's device. The pipeline only ever sees :class:`Graphs`; no backend knows about
shift-fusion windows. Callers ask a backend what it does (:attr:`Backend.is_exported`,
:attr:`Backend.compiled`, ...) instead of comparing its name.

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import torch

from ..errors import BackendUnavailableError, InputError
from ..graphs import GRAPH_NAMES, GraphSpec, PipelineConfig, Precision


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives, so that choosing one imports only its module.

    Attributes:
        module, cls: the module and the :class:`Backend` subclass in it.
        install: what to install when importing the module fails.
        engines: whether the backend loads artifacts from an engine directory (what ``manifest.json``
            may name and ``python -m export.build_engines --backend`` builds); known without importing.
    """

    module: str
    cls: str
    install: str
    engines: bool


REGISTRY: dict[str, BackendEntry] = {
    "torch": BackendEntry("sonic_rt.backends.torch_backend", "TorchBackend", "torch==2.13.0", engines=False),
    "onnxruntime": BackendEntry(
        "sonic_rt.backends.onnxruntime_backend",
        "OnnxRuntimeBackend",
        "onnxruntime (CPU: pip install 'sonic_rt[onnx]') or onnxruntime-gpu (CUDA: pip install 'sonic_rt[gpu]'); "
        "never both",
        engines=True,
    ),
    "tensorrt": BackendEntry(
        "sonic_rt.backends.tensorrt_backend",
        "TensorRTBackend",
        "TensorRT 10 with its Python bindings (pip install 'sonic_rt[tensorrt]' where NVIDIA's index is reachable) "
        "and a CUDA GPU",
        engines=True,
    ),
}


def engine_backends() -> tuple[str, ...]:
    """Names of the backends that load an engine directory (``("onnxruntime", "tensorrt")``), in registry order."""
    return tuple(name for name, entry in REGISTRY.items() if entry.engines)


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name``, importing its module now.

    Raises:
        InputError: unknown name.
        BackendUnavailableError: the backend's library is not installed (names what to install).
    """
    if name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    try:
        return getattr(importlib.import_module(entry.module), entry.cls)
    except ImportError as exc:
        raise BackendUnavailableError(f"the {name} backend needs {entry.install} ({exc})") from None


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


class Backend(abc.ABC):
    """What every backend provides. Backends are used as classes (never instantiated): every member is a
    class attribute or a classmethod/staticmethod.

    Attributes:
        name: the registry name ("torch", "onnxruntime", "tensorrt"), recorded in ``manifest.json``.
        artifact_suffix: the suffix of the file one graph is loaded from (".onnx", ".plan"), or None for a
            backend that runs the PyTorch modules themselves.
        is_exported: derived, ``artifact_suffix is not None``: the graphs come from an engine directory,
            built for the shape ranges their specs record (so a UNet batch outside them is refused up front).
        checks_ranges: its graphs refuse dims outside the spec's ranges (TensorRT optimisation profiles).
        compiled: its artifacts are compiled from the ONNX export for one GPU and one version of the
            backend's library (TensorRT plans): the builder compiles them, and loading refuses another GPU
            (:meth:`gpu_identity`) or library version (:meth:`versions`). ONNX files are portable.
        default_precision: what ``python -m export.build_engines`` builds when no ``--precision`` is given.

    A subclass that leaves ``name`` or ``artifact_suffix`` unset, or an abstract method unimplemented, is a
    ``TypeError`` when the class is defined, not when it is first used.
    """

    name: ClassVar[str]
    artifact_suffix: ClassVar[str | None]
    is_exported: ClassVar[bool]
    checks_ranges: ClassVar[bool] = False
    compiled: ClassVar[bool] = False
    default_precision: ClassVar[Precision] = Precision.FP32

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [attr for attr in ("name", "artifact_suffix") if not hasattr(cls, attr)]
        abstract = [
            attr
            for attr in ("versions", "default_device")
            if getattr(getattr(cls, attr), "__isabstractmethod__", False)
        ]
        if missing or abstract:
            raise TypeError(f"backend {cls.__name__} does not define {', '.join(missing + abstract)}")
        cls.is_exported = cls.artifact_suffix is not None

    @classmethod
    @abc.abstractmethod
    def versions(cls) -> dict[str, str]:
        """``{library: version}`` of the library the backend runs on, e.g. ``{"tensorrt": "10.8.0"}``."""

    @classmethod
    @abc.abstractmethod
    def default_device(cls) -> torch.device:
        """Where graphs run when the caller names no device.

        Raises:
            BackendUnavailableError: the backend needs a device that is missing here (TensorRT: a CUDA GPU).
        """

    @classmethod
    def gpu_identity(cls, device: torch.device | str) -> dict[str, str] | None:
        """What a compiled artifact is tied to on ``device``, e.g. ``{"name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0"}``; None for a backend whose artifacts run on any device (the default)."""
        return None

    @classmethod
    def load_graph(
        cls, spec: GraphSpec, path: Path, device: torch.device, providers: Sequence[str] | None = None
    ) -> Graph:
        """Load the artifact ``path`` as graph ``spec`` on ``device`` (exported backends override this).

        Args:
            spec: the graph's I/O description (from the manifest).
            path: the artifact, ``<graph><artifact_suffix>``, inside a verified engine directory.
            device: where the graph runs.
            providers: ONNX Runtime execution providers (ignored by other backends).

        Raises:
            EngineError: the artifact cannot be loaded or does not match ``spec``.
            BackendUnavailableError: the device is unusable by this backend.
            InputError: the backend loads no artifacts (torch: build :class:`Graphs` from the modules).
        """
        raise InputError(f"the {cls.name} backend runs the PyTorch modules and loads no artifact ({path})")


@dataclass
class Graphs:
    """The eight graphs of the pipeline (see :mod:`sonic_rt.graphs.modules`) plus the model constants.

    Attributes:
        backend: the backend class that loaded the graphs (:class:`Backend`).
        config: model sizes and constants (:class:`PipelineConfig`).
        whisper_encoder, image_encoder, vae_encoder, audio2token, audio2bucket, unet, vae_decoder, rife: the
            graphs, in :data:`~sonic_rt.graphs.GRAPH_NAMES` order.
    """

    backend: type[Backend]
    config: PipelineConfig
    whisper_encoder: Graph
    image_encoder: Graph
    vae_encoder: Graph
    audio2token: Graph
    audio2bucket: Graph
    unet: Graph
    vae_decoder: Graph
    rife: Graph

    @classmethod
    def from_mapping(cls, backend: type[Backend], config: PipelineConfig, graphs: Mapping[str, Graph]) -> Graphs:
        """Graphs from ``{name: Graph}`` holding exactly the :data:`~sonic_rt.graphs.GRAPH_NAMES`.

        Raises:
            ValueError: a graph is missing or unknown.
        """
        if set(graphs) != set(GRAPH_NAMES):
            raise ValueError(f"graphs {sorted(graphs)} are not the pipeline's {list(GRAPH_NAMES)}")
        return cls(backend, config, **graphs)

    @property
    def graphs(self) -> dict[str, Graph]:
        """``{name: Graph}`` in :data:`~sonic_rt.graphs.GRAPH_NAMES` order."""
        return {name: getattr(self, name) for name in GRAPH_NAMES}


# The graph fields are the pipeline's graph names, in order: one list, checked once at import.
if tuple(f.name for f in fields(Graphs))[2:] != GRAPH_NAMES:
    raise ImportError(f"Graphs' graph fields are not GRAPH_NAMES {GRAPH_NAMES}")
