"""The exportable graphs of the Sonic pipeline and their I/O descriptions."""

from .modules import FP32_GRAPHS, GRAPH_NAMES, PipelineConfig, ShapeOptions, graph_modules, graph_specs
from .spec import DimRange, GraphSpec, Precision, TensorSpec

__all__ = [
    "FP32_GRAPHS",
    "GRAPH_NAMES",
    "PipelineConfig",
    "ShapeOptions",
    "graph_modules",
    "graph_specs",
    "DimRange",
    "GraphSpec",
    "Precision",
    "TensorSpec",
]
