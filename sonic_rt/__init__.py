"""sonic_rt: an inference runtime for Sonic (Tencent, CVPR 2025, arXiv 2411.16331).

One portrait photo plus a speech recording in, a lip-synced talking-head video out::

    import sonic_rt
    rt = sonic_rt.Runtime("checkpoints")            # the official Sonic checkpoint layout
    result = rt.animate("face.png", "speech.wav", "out.mp4")           # the official defaults
    result = rt.animate("face.png", "speech.wav", "out.mp4", steps=10)  # any AnimateOptions field by name

:class:`AnimateOptions` lists every option with its default, unit and source (``AnimateOptions.describe()``).
"""

from typing import TYPE_CHECKING

from .errors import AudioError, CheckpointError, FaceNotFoundError, ImageError, InputError, OutputPathError, SonicError
from .pipeline.options import AnimateOptions

if TYPE_CHECKING:
    from .runtime import AnimateResult, Runtime


def __getattr__(name: str):
    """``Runtime`` and ``AnimateResult`` load torch and the model code (seconds): imported when first used, so
    ``import sonic_rt``, ``--help`` and the commands that need no model stay fast (PEP 562)."""
    if name in ("Runtime", "AnimateResult"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sonic_rt' has no attribute {name!r}")


__all__ = [
    "Runtime",
    "AnimateResult",
    "AnimateOptions",
    "SonicError",
    "InputError",
    "ImageError",
    "AudioError",
    "FaceNotFoundError",
    "OutputPathError",
    "CheckpointError",
]
__version__ = "0.1.0"
