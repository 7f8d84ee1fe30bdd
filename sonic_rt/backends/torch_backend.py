"""The torch backend: the PyTorch modules themselves (the reference every other backend is checked against)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..graphs import GraphSpec, PipelineConfig, Precision, graph_modules, graph_specs
from ..graphs.modules import FP32_GRAPHS, ShapeOptions
from . import Backend, Graph, Graphs


class TorchGraph(Graph):
    """A graph run by its ``nn.Module`` under ``torch.inference_mode``.

    Attributes:
        home: where the module's weights wait between calls: None (they stay on :attr:`device`), or the CPU
            after :meth:`offload` (the ``low_memory`` runtime: moved to the device for each call, then back).
    """

    def __init__(self, spec: GraphSpec, module: nn.Module, device: torch.device):
        super().__init__(spec, device)
        self.module = module
        self.call = module  # what run() calls: the module, or its compiled form (compile())
        self.home: torch.device | None = None

    def offload(self, home: torch.device | str = "cpu") -> None:
        """Keep the weights on ``home`` (host memory) and move them to :attr:`device` only while a call runs.

        A no-op when ``home`` is the device itself. Costs one host-to-device copy of the weights per call (the
        VAE's 0.2 GB at ~25 GB/s over PCIe 4: ~8 ms per decoded chunk).
        """
        home = torch.device(home)
        if home == self.device:
            return
        self.home = home
        self.module.to(home)

    def compile(self, what: str, say=None, mode=None) -> bool:
        """Run the module under ``torch.compile`` from now on as ``mode`` says (:class:`sonic_rt.compiling.CompileMode`,
        default ON); returns False where it will not (OFF, or compiling cannot work here: ON says why), leaving
        the module uncompiled."""
        from ..compiling import CompileMode, compile_module

        compiled = compile_module(self.module, what, self.device, say, CompileMode.ON if mode is None else mode)
        if compiled is not None:
            self.call = compiled
        return compiled is not None

    def replicate(self, device: torch.device | str, mode=None) -> TorchGraph:
        """A copy of this graph with its own weights on ``device`` (a UNet replica for another GPU), compiled as
        ``mode`` says (:meth:`compile`)."""
        import copy

        replica = TorchGraph(self.spec, copy.deepcopy(self.module).to(device), torch.device(device))
        if self.call is not self.module:
            replica.compile("UNet", mode=mode)
        return replica

    def run(self, inputs: list[torch.Tensor], values: Mapping[str, int]) -> list[torch.Tensor]:
        if self.home is not None:
            self.module.to(self.device)
        try:
            with torch.inference_mode():
                out = self.call(*inputs)
        finally:
            if self.home is not None:
                self.module.to(self.home)  # also after a failure: the device memory is given back either way
        return list(out) if isinstance(out, (tuple, list)) else [out]


class TorchBackend(Backend):
    """Builds :class:`Graphs` over loaded :class:`~sonic_rt.loading.SonicModels` (no artifacts, any batch)."""

    name = "torch"
    artifact_suffix = None

    @staticmethod
    def versions() -> dict[str, str]:
        return {"torch": torch.__version__}

    @classmethod
    def default_device(cls) -> torch.device:
        """CUDA when torch sees a GPU, else the CPU."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @classmethod
    def from_models(cls, models) -> Graphs:
        """Graphs over ``models`` in their own dtypes: UNet/VAE/CLIP in ``models.dtype``; Whisper, the
        adapters and RIFE in fp32 (official)."""
        config = PipelineConfig.from_models(models)
        specs = graph_specs(
            config, ShapeOptions(), Precision.from_torch(models.dtype), fp32_graphs=FP32_GRAPHS | {"whisper_encoder"}
        )
        modules = graph_modules(models)
        return Graphs.from_mapping(
            cls, config, {name: TorchGraph(spec, modules[name], models.device) for name, spec in specs.items()}
        )
