"""The exportable graphs of the Sonic pipeline and their I/O descriptions."""

from .modules import (FP32_GRAPHS, GRAPH_NAMES, PipelineConfig, ShapeOptions, graph_modules,  # noqa: F401
                      graph_specs)
from .spec import DimRange, GraphSpec, Precision, TensorSpec  # noqa: F401
