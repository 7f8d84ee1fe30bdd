"""The out-of-memory policy: a batched call that fails for lack of memory is retried in halves.

Three batched calls of the pipeline use it: windows per UNet call and RIFE pairs per call (independent rows:
the result is unchanged) and frames per VAE decode call (the temporal decoder mixes the frames of a chunk:
frames at the chunk edges change slightly). Each retry is said on stderr and to the ``events`` callback as
``("memory", {"what", "failed", "retry"})``; a batch of one that still fails raises
:class:`~sonic_rt.errors.OutOfMemoryError` with a message naming the setting to lower.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from ..errors import OutOfMemoryError

Notify = Callable[[str, dict], None]  # say(message, info): where a retry notice goes


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``torch.cuda.OutOfMemoryError``, or a backend's error whose
    message says so (ONNX Runtime "Failed to allocate memory", TensorRT / CPU allocator "out of memory")."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "failed to allocate memory", "can't allocate memory")
    )


def notifier(events: Callable[[str, dict], None] | None) -> Notify:
    """``say(message, info)``: print ``sonic_rt: message`` on stderr and send ``("memory", info)`` to ``events``."""

    def say(message: str, info: dict) -> None:
        print(f"sonic_rt: {message}", file=sys.stderr, flush=True)
        if events is not None:
            events("memory", info)

    return say


class MemoryFallback:
    """Runs a batched call in smaller pieces after an out-of-memory error, and keeps the smaller size.

    Args:
        what: the batched thing, for messages ("windows per UNet call").
        exact: whether splitting the batch leaves the result unchanged (windows and RIFE pairs are
            independent; VAE chunks are not: the temporal decoder mixes the frames of a chunk).
        failure: the message of the :class:`OutOfMemoryError` raised when a batch of 1 still fails (names
            the setting to lower).
        say: where the retry notice goes (:func:`notifier`).
    """

    def __init__(self, what: str, exact: bool, failure: str, say: Notify):
        self.what, self.exact, self.failure, self.say = what, exact, failure, say
        self.limit: int | None = None

    def run(self, size: int, call: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """``call(slice)`` -> the outputs of that part of the batch of ``size``; concatenated along dim 0.

        Raises:
            OutOfMemoryError: a part of one row still ran out of memory.
        """
        limit = min(size, self.limit or size)
        while True:
            try:
                if limit >= size:
                    return call(slice(0, size))
                return torch.cat([call(slice(s, min(s + limit, size))) for s in range(0, size, limit)])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if limit == 1:
                    raise OutOfMemoryError(self.failure) from exc
                failed, limit = limit, limit // 2
                self.limit = limit
                effect = "same result" if self.exact else "frames at the chunk edges differ slightly"
                self.say(
                    f"out of memory with {failed} {self.what}; retrying with {limit} ({effect})",
                    {"what": self.what, "failed": failed, "retry": limit},
                )


__all__ = ["MemoryFallback", "is_out_of_memory", "notifier", "Notify"]
