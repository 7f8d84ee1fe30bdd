"""Memory: the ``low_memory`` plan, and the out-of-memory policy (a batched call that fails for lack of
memory is retried in halves).

``low_memory`` (``Runtime(low_memory=True)``, ``--low-memory``) aims at 12 GB GPUs at 512x512. It

- keeps every graph but the UNet in host memory and moves it to the GPU only while it runs
  (:data:`OFFLOADED_GRAPHS`; the torch backend), which frees the CLIP, VAE, Whisper, adapter and RIFE weights
  (about 1.9 GB in fp16/fp32) during denoising;
- runs one window per UNet call (3 CFG rows);
- chunks the UNet's feed-forward layers over frames (:func:`feed_forward_chunk`; the torch backend), which cuts
  the largest activation of a call, the level-0 GEGLU projection, to a fifth;
- decodes :data:`LOW_MEMORY_DECODE_FRAMES` frames per VAE call instead of 8 (the temporal decoder mixes the
  frames of a call, so frames near chunk edges differ slightly from the default's).

Engines (onnxruntime, TensorRT) get the last two: their weights stay where their runtime put them.

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

# low_memory: what stays in host memory between calls, the VAE decode chunk, the feed-forward chunking bound
OFFLOADED_GRAPHS = (
    "whisper_encoder",
    "image_encoder",
    "vae_encoder",
    "audio2token",
    "audio2bucket",
    "vae_decoder",
    "rife",
)
LOW_MEMORY_DECODE_FRAMES = 4  # official decode_chunk_size is 8
FEED_FORWARD_CHUNK_MAX = 5  # frames per feed-forward chunk at most: 25 frames -> 5 chunks


def feed_forward_chunk(frames_per_window: int) -> int:
    """Frames per chunk of the UNet's feed-forward layers under ``low_memory``: the largest divisor of
    ``frames_per_window`` that is at most :data:`FEED_FORWARD_CHUNK_MAX` (diffusers' ``_chunked_feed_forward``
    needs a divisor): 5 for the official 25 frames, so the GEGLU activations are a fifth as large."""
    return max(d for d in range(1, min(FEED_FORWARD_CHUNK_MAX, frames_per_window) + 1) if frames_per_window % d == 0)


def decode_frames(low_memory: bool, graph_min: int, graph_max: int) -> int:
    """Frames per VAE decode call: the graph's largest (official ``decode_chunk_size`` 8), or
    :data:`LOW_MEMORY_DECODE_FRAMES` under ``low_memory``, within what the graph accepts."""
    return min(max(LOW_MEMORY_DECODE_FRAMES, graph_min), graph_max) if low_memory else graph_max


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


__all__ = [
    "MemoryFallback",
    "is_out_of_memory",
    "notifier",
    "Notify",
    "OFFLOADED_GRAPHS",
    "LOW_MEMORY_DECODE_FRAMES",
    "FEED_FORWARD_CHUNK_MAX",
    "feed_forward_chunk",
    "decode_frames",
]
