"""The TensorRT backend: serialized TensorRT 10 engines (``<graph>.plan``) run on a CUDA GPU.

Engine lifecycle (built by :mod:`export.tensorrt_build`, loaded here):

1. **load**: the plan file is deserialized with a ``trt.Runtime``; a plan built for another TensorRT
   version or GPU deserializes to None, which is an :class:`EngineError` saying how to rebuild.
2. **check**: the engine's I/O tensor names, modes and dtypes, and its optimisation profile, must equal
   the :class:`~sonic_rt.graphs.GraphSpec` (the one description of the graph).
3. **activate + allocate**, lazily, once per CUDA stream: an execution context (a context runs on one
   stream at a time) and one output buffer per output at :meth:`GraphSpec.max_shape`.
4. **infer**: bind shapes and addresses, ``execute_async_v3`` on the caller's current stream, return a
   clone of each output's leading region. Nothing synchronizes with the host.

Inputs are read asynchronously: like any torch kernel launched on the current stream, the caller must not
reuse an input's memory on another stream before the work queued here has run.

The module imports ``tensorrt`` at the top; the backend registry imports it only when the backend is
chosen, turning an ImportError into :class:`BackendUnavailableError`. Nothing here touches the GPU at
import time.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Mapping, Sequence

import tensorrt as trt
import torch

from ..errors import BackendUnavailableError, EngineError
from ..graphs import GraphSpec, Precision
from ..graphs.spec import tensorrt_dtype_names
from . import Backend, Graph

LOGGER = trt.Logger(trt.Logger.WARNING)
REBUILD = "rebuild it with python -m export.build_engines (see --help)"

# TensorRT tensor dtype -> spec dtype name (TensorSpec.dtype)
_DTYPES = tensorrt_dtype_names(trt)


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the tensorrt backend needs a CUDA GPU, and torch sees none here "
            "(torch.cuda.is_available() is False); use the torch or onnxruntime backend"
        )


class _Slot:
    """What one CUDA stream owns: an execution context and its output buffers (spec max shapes)."""

    __slots__ = ("context", "buffers")

    def __init__(self, context, buffers: dict[str, torch.Tensor]):
        self.context, self.buffers = context, buffers


class TensorRTGraph(Graph):
    """One deserialized TensorRT engine, callable with torch tensors on a CUDA device.

    Args:
        spec: the graph's I/O description; the engine must match it (names, modes, dtypes, profile).
        path: the ``.plan`` file written by :func:`export.tensorrt_build.build_engine`.
        device: the CUDA device the engine runs on (``cuda`` means the current device).

    Raises:
        BackendUnavailableError: no CUDA device.
        EngineError: missing or unreadable plan, a plan TensorRT cannot deserialize (another TensorRT
            version or GPU), or an engine whose I/O or profile differs from ``spec``.
    """

    def __init__(self, spec: GraphSpec, path: Path, device: torch.device):
        _require_cuda()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(spec, device, check_ranges=TensorRTBackend.checks_ranges)
        self.path = Path(path)
        try:
            plan = self.path.read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read the TensorRT plan ({exc.strerror}); {REBUILD}", self.path) from None
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(LOGGER)
            self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(
                f"TensorRT {trt.__version__} cannot deserialize this plan: built for another TensorRT "
                f"version or GPU? {REBUILD}",
                self.path,
            )
        self._check_engine()
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()

    # -- load-time checks ------------------------------------------------------------------------------
    def _check_engine(self) -> None:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise EngineError(
                f"the engine's inputs ({', '.join(inputs)}) and outputs ({', '.join(outputs)}) are not "
                f"graph {self.spec.name!r}'s ({', '.join(self.spec.input_names)} -> "
                f"{', '.join(self.spec.output_names)}); {REBUILD}",
                self.path,
            )
        for tensor in self.spec.inputs + self.spec.outputs:
            trt_dtype = engine.get_tensor_dtype(tensor.name)
            if _DTYPES.get(trt_dtype) != tensor.dtype:
                raise EngineError(
                    f"{tensor.name} is {trt_dtype} in the engine but {tensor.dtype} in graph "
                    f"{self.spec.name!r} (built for another precision?); {REBUILD}",
                    self.path,
                )
        for name, want in self.spec.profile().items():
            got = tuple(tuple(dims) for dims in engine.get_tensor_profile_shape(name, 0))
            if got != want:
                raise EngineError(
                    f"{name}: the engine was built for (min, opt, max) shapes {got}, graph "
                    f"{self.spec.name!r} needs {want}; {REBUILD}",
                    self.path,
                )

    # -- per-stream state ------------------------------------------------------------------------------
    def _slot(self, stream_handle: int) -> _Slot:
        """The context and output buffers of the stream ``stream_handle``, created on first use."""
        slot = self._slots.get(stream_handle)
        if slot is None:
            with self._lock:
                slot = self._slots.get(stream_handle)
                if slot is None:
                    context = self.engine.create_execution_context()
                    if context is None:
                        raise EngineError(
                            "TensorRT could not create an execution context (out of GPU memory?)", self.path
                        )
                    buffers = {
                        t.name: torch.empty(self.spec.max_shape(t), dtype=t.torch_dtype, device=self.device)
                        for t in self.spec.outputs
                    }
                    slot = self._slots[stream_handle] = _Slot(context, buffers)
        return slot

    # -- inference -------------------------------------------------------------------------------------
    def run(self, inputs: list[torch.Tensor], values: Mapping[str, int]) -> list[torch.Tensor]:
        """Enqueue the engine on the current stream; returns fresh output tensors (no host sync).

        ``inputs`` are contiguous, on :attr:`device`, in spec order and dtypes, their dims inside the
        profile (checked by :meth:`Graph.__call__`); ``values`` are their named dims.
        """
        shapes = self.spec.output_shapes(values)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            slot = self._slot(stream)
            context = slot.context
            for tensor, x in zip(self.spec.inputs, inputs):
                if not context.set_input_shape(tensor.name, tuple(x.shape)):
                    raise EngineError(f"TensorRT rejects shape {list(x.shape)} for input {tensor.name}", self.path)
                context.set_tensor_address(tensor.name, x.data_ptr())
            for tensor in self.spec.outputs:
                got = tuple(context.get_tensor_shape(tensor.name))
                if got != shapes[tensor.name]:
                    raise EngineError(
                        f"output {tensor.name} has shape {list(got)} in the engine but "
                        f"{list(shapes[tensor.name])} by graph {self.spec.name!r}'s spec; {REBUILD}",
                        self.path,
                    )
                context.set_tensor_address(tensor.name, slot.buffers[tensor.name].data_ptr())
            if not context.execute_async_v3(stream):
                raise EngineError(f"TensorRT failed to enqueue graph {self.spec.name!r} (see its log above)", self.path)
            outputs = []
            for tensor in self.spec.outputs:
                shape = shapes[tensor.name]
                # the engine writes a dense [shape] tensor at the start of the [max shape] buffer
                region = slot.buffers[tensor.name].view(-1)[: math.prod(shape)].view(shape)
                outputs.append(region.clone())  # ordered on this stream: the next run cannot overwrite it first
            return outputs


class TensorRTBackend(Backend):
    """Loads ``<graph>.plan`` files built by :func:`export.tensorrt_build.build_engine`: compiled for one GPU and
    TensorRT version (both checked on load), with one optimisation profile (shapes outside it are refused)."""

    name = "tensorrt"
    artifact_suffix = ".plan"
    checks_ranges = True
    compiled = True
    default_precision = Precision.FP16

    @staticmethod
    def versions() -> dict[str, str]:
        return {"tensorrt": trt.__version__}

    @classmethod
    def default_device(cls) -> torch.device:
        """The current CUDA device. Raises :class:`BackendUnavailableError` without one."""
        _require_cuda()
        return torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def gpu_identity(device: torch.device | str) -> dict[str, str]:
        """What a plan is tied to: ``{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}``.

        Recorded by the engine builder and compared by the manifest check on load.
        """
        _require_cuda()
        device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(device)
        return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}

    @classmethod
    def load_graph(
        cls, spec: GraphSpec, path: Path, device: torch.device, providers: Sequence[str] | None = None
    ) -> TensorRTGraph:
        """Load ``path`` as graph ``spec`` on ``device``; ``providers`` is ignored (onnxruntime only)."""
        _require_cuda()
        if torch.device(device).type != "cuda":
            raise BackendUnavailableError(f"the tensorrt backend runs only on CUDA devices, not {device}")
        return TensorRTGraph(spec, path, device)
