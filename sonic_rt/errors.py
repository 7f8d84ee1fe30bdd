"""Typed errors of sonic_rt.

Every error a user can cause with bad input derives from :class:`SonicError`. The CLI turns any
:class:`SonicError` into a one-line message and exit code 2; the API raises it unchanged. Each message
starts with the file it is about (when there is one) and says what to do.
"""

from __future__ import annotations

import os


class SonicError(Exception):
    """Base class of every error sonic_rt raises on purpose.

    Args:
        message: what is wrong and, where it helps, what to do about it.
        path: the file or directory the problem is about, if any; it is put in front of the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(SonicError):
    """A user input (image, audio, option value or output path) cannot be used."""


class ImageError(InputError):
    """The portrait image is missing, unreadable, corrupt, or too large to decode safely."""


class AudioError(InputError):
    """The audio file is missing, unreadable, has no audio stream, or is too short for one frame."""


class FaceNotFoundError(InputError):
    """No face was found in the portrait; pass an explicit face box (``--face-box x,y,w,h``)."""


class OutputPathError(InputError):
    """The output path cannot be written (missing directory, no permission, wrong suffix)."""


class CheckpointError(SonicError):
    """A model file is missing, does not match the expected keys and shapes, or is not trusted."""


class EngineError(SonicError):
    """An engine directory cannot be used: missing or corrupted artifact, or built for another GPU, library
    version or precision. The message says how to rebuild it."""


class BackendUnavailableError(SonicError):
    """The chosen backend's library or device is not available here; the message names what to install."""


class OutOfMemoryError(SonicError):
    """The device ran out of memory even at the smallest batch the runtime can fall back to; the message
    names the setting to lower (resolution, windows per call) or what to free."""
