"""Modules imported on first use, so that ``import sonic_rt`` works where an optional native dependency is missing.

PyAV (FFmpeg) and soxr are needed only to decode or resample audio files and to write mp4s; with them imported
lazily, the UNet, the kernels and the sampler run on a machine that has neither (the GPU check does: see
bench/README.md), and the first use of a missing one raises ``ModuleNotFoundError`` naming the package.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for module ``name``: the first attribute access imports it (then every access is forwarded).

    Args:
        name: the module to import (``"av"``).
        package: the pip package that provides it, for the error message.

    Raises (on first use):
        ModuleNotFoundError: the module is not installed; the message names ``package``.
    """

    def __init__(self, name: str, package: str):
        self._name, self._package, self._module = name, package, None

    def _load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    f"{self._name} is needed here but not installed (pip install {self._package})", name=self._name
                ) from exc
        return self._module

    def __getattr__(self, attr: str):
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"
