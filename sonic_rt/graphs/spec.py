"""I/O descriptions of exported graphs: one source of truth for names, dtypes and symbolic dims.

A :class:`GraphSpec` declares a graph's inputs and outputs once (name, dtype, dims where a dim is an int or
the name of a :class:`DimRange`). Everything shape-related is derived from it, never restated:

- ONNX ``dynamic_axes`` (:meth:`GraphSpec.dynamic_axes`): every named dim whose range is not a single value;
- TensorRT optimisation profiles (:meth:`GraphSpec.profile`): per input (min, opt, max) shapes;
- buffer sizes (:meth:`GraphSpec.max_shape`): the max of every dim, for preallocated output buffers;
- sample inputs (:meth:`GraphSpec.sample_inputs`): random tensors at any point of the ranges, used to trace
  the export, to run-check each exported graph and in the parity tests;
- input validation (:meth:`GraphSpec.check_inputs`): rank, fixed dims, consistent named dims, range.

Specs are plain data and round-trip through JSON (:meth:`GraphSpec.to_json`), so an engine manifest carries
the exact description its artifacts were built for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError

# Element types by name (``TensorSpec.dtype``; the names ONNX and TensorRT tensors are checked against).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
# torch dtype -> numpy dtype, for host buffers and onnxruntime bindings (numpy has no bfloat16).
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class Precision(enum.Enum):
    """Numeric precision of a graph's float tensors and of the torch backend's weights.

    The one table of precision names: :meth:`parse` reads every spelling users and programs pass (``"fp16"``,
    ``"float16"``, ``torch.float16``, a ``Precision`` or None), and each member knows its element type name
    (:attr:`dtype`), its torch dtype and its numpy dtype.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # torch backend only

    @property
    def dtype(self) -> str:
        """The element type name of the float tensors (``TensorSpec.dtype``): float32, float16 or bfloat16."""
        return _ELEMENT_TYPES[self.value]

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def numpy_dtype(self) -> type[np.generic]:
        """The numpy dtype. Raises ValueError for BF16, which numpy has not."""
        try:
            return NUMPY_DTYPES[self.torch_dtype]
        except KeyError:
            raise ValueError(f"numpy has no {self.dtype} dtype") from None

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> Precision:
        """The precision of a torch float dtype.

        Raises:
            InputError: another dtype (sonic_rt runs in float32, float16 or bfloat16).
        """
        for precision in cls:
            if precision.torch_dtype == dtype:
                return precision
        raise InputError(f"unsupported dtype {dtype}; use one of {', '.join(_names())}")

    @classmethod
    def parse(cls, value: str | torch.dtype | Precision | None) -> Precision | None:
        """A precision from its name (``"fp16"`` or ``"float16"``, ``"bf16"`` / ``"bfloat16"``, ``"fp32"`` /
        ``"float32"``), a torch dtype or a ``Precision``; None stays None (the caller's default applies).

        Raises:
            InputError: an unknown name or dtype; the message lists the names.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, torch.dtype):
            return cls.from_torch(value)
        if isinstance(value, str):
            for precision in cls:
                if value in (precision.value, precision.dtype):
                    return precision
        raise InputError(f"unknown dtype {value!r}; use one of {', '.join(_names())}")


_ELEMENT_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tensorrt_dtype_names(trt) -> dict[Any, str]:
    """TensorRT's ``DataType`` -> element type name (``TensorSpec.dtype``), for the ``tensorrt`` module given:
    the engine builder and the TensorRT backend check their tensors against the spec with it."""
    return {
        trt.DataType.FLOAT: "float32",
        trt.DataType.HALF: "float16",
        trt.DataType.BF16: "bfloat16",
        trt.DataType.INT64: "int64",
        trt.DataType.INT32: "int32",
        trt.DataType.BOOL: "bool",
    }


def _names() -> list[str]:
    """Every name :meth:`Precision.parse` accepts, short name first: fp16, float16, bf16, bfloat16, fp32, float32."""
    order = (Precision.FP16, Precision.BF16, Precision.FP32)
    return [name for precision in order for name in (precision.value, precision.dtype)]


@dataclass(frozen=True)
class DimRange:
    """The values a symbolic dim may take: TensorRT's (min, opt, max); ``opt`` is what engines tune for."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (isinstance(self.min, int) and 1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"a dim range needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def fixed(cls, value: int) -> DimRange:
        return cls(value, value, value)

    @property
    def is_fixed(self) -> bool:
        return self.min == self.max

    def scaled(self, factor: int) -> DimRange:
        return DimRange(self.min * factor, self.opt * factor, self.max * factor)

    def __str__(self) -> str:
        return str(self.min) if self.is_fixed else f"{self.min}..{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``dims`` holds ints (fixed) and names of the graph's :class:`DimRange` s.

    ``sample_range`` is where :meth:`GraphSpec.sample_inputs` draws values (uniform); None means
    standard normal.
    """

    name: str
    dims: tuple[int | str, ...]
    dtype: str
    sample_range: tuple[float, float] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


Point = str | Mapping[str, int]  # "min" | "opt" | "max", or explicit values of (some) named dims


@dataclass(frozen=True)
class GraphSpec:
    """The I/O description of one exported graph.

    Attributes:
        name: graph name (also the artifact stem: ``<name>.onnx``, ``<name>.plan``).
        inputs, outputs: the tensors, in call order.
        dims: range of every symbolic dim used by the tensors.
        derived: dims that follow from another one: ``name -> (source, mul, div)`` means
            ``name = ceil(source * mul / div)`` (pixel height = 8 x latent height, a UNet level's grid =
            ceil(latent / 2**l)). Inputs are checked against it; output shapes are computed from it.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange] = field(hash=False)
    derived: Mapping[str, tuple[str, int, int]] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        for tensor in self.inputs + self.outputs:
            for dim in tensor.dims:
                if isinstance(dim, str) and dim not in self.dims:
                    raise ValueError(f"{self.name}.{tensor.name}: dim {dim!r} has no range")
        for name, (source, _, _) in self.derived.items():
            if name not in self.dims or source not in self.dims:
                raise ValueError(f"{self.name}: derived dim {name!r} or its source {source!r} has no range")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def _value(self, dim: int | str, point: Point) -> int:
        if isinstance(dim, int):
            return dim
        if isinstance(point, str):
            return getattr(self.dims[dim], point)
        if dim in point:
            return int(point[dim])
        if dim in self.derived:
            source, mul, div = self.derived[dim]
            return -(-self._value(source, point) * mul // div)
        return self.dims[dim].opt

    def shape(self, tensor: TensorSpec, point: Point = "opt") -> tuple[int, ...]:
        """Concrete shape of ``tensor`` at ``point`` ("min", "opt", "max" or {dim: value})."""
        return tuple(self._value(d, point) for d in tensor.dims)

    def max_shape(self, tensor: TensorSpec) -> tuple[int, ...]:
        """Largest shape ``tensor`` can take: what a preallocated buffer must hold."""
        return self.shape(tensor, "max")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX ``dynamic_axes``: every named dim whose range is not a single value."""
        axes = {}
        for tensor in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(tensor.dims) if isinstance(d, str) and not self.dims[d].is_fixed}
            if named:
                axes[tensor.name] = named
        return axes

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) shapes."""
        return {t.name: (self.shape(t, "min"), self.shape(t, "opt"), self.shape(t, "max")) for t in self.inputs}

    def sample_inputs(
        self, point: Point = "opt", *, seed: int = 0, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ...]:
        """Random inputs at ``point``, in call order (seeded CPU generator, then moved to ``device``)."""
        gen = torch.Generator().manual_seed(seed)
        tensors = []
        for spec in self.inputs:
            shape = self.shape(spec, point)
            if spec.sample_range is None:
                x = torch.randn(shape, generator=gen)
            else:
                low, high = spec.sample_range
                x = torch.rand(shape, generator=gen) * (high - low) + low
            tensors.append(x.to(device=device, dtype=spec.torch_dtype))
        return tuple(tensors)

    def check_inputs(self, tensors: Sequence[torch.Tensor], *, check_ranges: bool = True) -> dict[str, int]:
        """Validate call inputs against the spec; returns the value of every named dim.

        Raises:
            InputError: wrong count, rank or fixed dim; a named dim with two values; a value outside its
                range (when ``check_ranges``; engines with optimisation profiles accept nothing else).
        """
        if len(tensors) != len(self.inputs):
            raise InputError(
                f"graph {self.name!r} takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), "
                f"got {len(tensors)}"
            )
        values: dict[str, int] = {}
        for spec, tensor in zip(self.inputs, tensors):
            if tensor.dim() != len(spec.dims):
                raise InputError(
                    f"{self.name}.{spec.name}: expected {len(spec.dims)} dims {list(spec.dims)}, got "
                    f"shape {list(tensor.shape)}"
                )
            for axis, (dim, size) in enumerate(zip(spec.dims, tensor.shape)):
                if isinstance(dim, int):
                    if size != dim:
                        raise InputError(f"{self.name}.{spec.name}: dim {axis} must be {dim}, got {size}")
                elif values.setdefault(dim, size) != size:
                    raise InputError(
                        f"{self.name}.{spec.name}: dim {dim!r} is {size} here but {values[dim]} in another input"
                    )
        for dim, (source, mul, div) in self.derived.items():
            if source in values:
                want = -(-values[source] * mul // div)
                if values.setdefault(dim, want) != want:
                    raise InputError(
                        f"{self.name}: {dim} must be ceil({source} * {mul} / {div}) = {want}, got {values[dim]}"
                    )
        if check_ranges:
            for dim, size in values.items():
                rng = self.dims[dim]
                if not rng.min <= size <= rng.max:
                    raise InputError(
                        f"{self.name}: {dim} = {size} is outside the range this engine was built for "
                        f"({rng.min}..{rng.max}); rebuild it with a wider range "
                        "(python -m export.build_engines --help)"
                    )
        return values

    def output_shapes(self, values: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Output shapes for the named-dim ``values`` returned by :meth:`check_inputs`."""
        try:
            return {t.name: tuple(d if isinstance(d, int) else values[d] for d in t.dims) for t in self.outputs}
        except KeyError as exc:
            raise ValueError(f"{self.name}: output dim {exc} follows from no input") from None

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def tensor(t: TensorSpec) -> dict[str, Any]:
            out = {"name": t.name, "dims": list(t.dims), "dtype": t.dtype}
            if t.sample_range is not None:
                out["sample_range"] = list(t.sample_range)
            return out

        return {
            "name": self.name,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
            "derived": {k: list(v) for k, v in self.derived.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GraphSpec:
        def tensor(t: Mapping[str, Any]) -> TensorSpec:
            rng = t.get("sample_range")
            return TensorSpec(t["name"], tuple(t["dims"]), t["dtype"], tuple(rng) if rng is not None else None)

        return cls(
            data["name"],
            tuple(tensor(t) for t in data["inputs"]),
            tuple(tensor(t) for t in data["outputs"]),
            {k: DimRange(*v) for k, v in data["dims"].items()},
            {k: tuple(v) for k, v in data.get("derived", {}).items()},
        )
