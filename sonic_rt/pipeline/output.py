"""Streamed output: decode -> interpolate -> encode in VAE chunks, as soon as a chunk's frames are final.

Memory does not grow with the video's length beyond the latents: each chunk of 8 frames is decoded, RIFE
fills the middles, and the frames go to the writers (the mp4, an HLS stream) and, when asked, to the returned
frames. In the wavefront order (:mod:`sonic_rt.scheduler`) the first chunk is final after a fixed amount of
work, so the video grows from early on, whatever its length.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import media
from ..audio_features import SAMPLE_RATE
from ..backends import Graphs
from .memory import MemoryFallback, Notify
from .timing import StageTimer

OUTPUT_FPS = Fraction(25)  # after RIFE x2; Fraction(25, 2) without interpolation


def output_fps(interpolate: bool) -> Fraction:
    """Frame rate of the written video: 25 fps with RIFE x2, 12.5 fps without."""
    return OUTPUT_FPS if interpolate else OUTPUT_FPS / 2


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] float in [0, 1] -> uint8 [n, H, W, 3]; truncation as official ``(x*255).astype(uint8)``."""
    return (frames * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def audio_for_mux(audio, samples: np.ndarray, stack: ExitStack) -> str | os.PathLike:
    """The file to mux: the input file itself, or a temporary 16 kHz WAV of an input array (removed when
    ``stack`` closes).

    Args:
        audio: what the caller passed (a path, or a float32 array).
        samples: float32 mono samples at 16 kHz, ``[S]`` (used when ``audio`` is an array).
    """
    if isinstance(audio, (str, os.PathLike)):
        return audio
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sonic_rt_audio_"))
    return media.write_wav(Path(tmp) / "audio.wav", samples, SAMPLE_RATE)


class StreamingOutput:
    """Decode -> interpolate -> encode in VAE chunks of 8 frames, in order, as soon as a chunk's frames are final.

    :meth:`push` is called by the sampler during the last step with the frames that are final so far, and
    once more at the end with all of them. With interpolation the output is [f0, m01, f1, ...]: each chunk
    starts with the middle between the previous chunk's last frame and its own first, so the whole video is
    2N-1 frames.

    Args:
        graphs: the pipeline's graphs (``vae_decoder``, ``rife``).
        timer: where ``decode``, ``interpolate`` and ``encode`` time goes.
        interpolate: RIFE x2 or not.
        writers: where the output frames go: a :class:`sonic_rt.media.VideoWriter` (the mp4) and/or a
            :class:`sonic_rt.media.HlsWriter`; empty to write nothing. :meth:`finish` closes them (timed as
            ``encode``); after an error their owner aborts them.
        keep: a list the generated uint8 frames [n, H, W, 3] of each chunk are appended to, or None.
        events: the ``events(kind, info)`` callback, or None: ``("frames", {"generated", "written",
            "video_seconds", "elapsed_seconds"})`` per written chunk (frames generated and written so far, the
            written video's length in seconds, seconds since ``started``).
        say: where out-of-memory retry notices go (:func:`sonic_rt.pipeline.memory.notifier`).
        where: the end of out-of-memory messages (size, and the setting to lower).
        paste: a :class:`sonic_rt.paste_back.PasteBack` that composites every output frame into the whole photo
            before it is encoded (``keep`` still gets the generated frames), or None.
        started: the ``time.perf_counter()`` the run started at (None: when this object was made).
        decode_frames: frames per VAE decode call (None: the graph's largest, official ``decode_chunk_size`` 8;
            :attr:`Components.decode_frames <sonic_rt.pipeline.components.Components.decode_frames>`).

    Attributes:
        num_out: frames written (or that would be written) so far.
        seconds: time spent in :meth:`push` (taken out of the ``denoise`` stage by the caller).
    """

    def __init__(
        self,
        graphs: Graphs,
        timer: StageTimer,
        interpolate: bool,
        writers,
        keep: list | None,
        events: Callable[[str, dict], None] | None,
        say: Notify,
        where: str,
        paste=None,
        decode_frames: int | None = None,
        started: float | None = None,
    ):
        self.graphs, self.timer, self.interpolate, self.paste = graphs, timer, interpolate, paste
        self.writers, self.keep, self.events = list(writers or []), keep, events
        self.fps, self.started = output_fps(interpolate), started if started is not None else time.perf_counter()
        # on out-of-memory: fewer frames per VAE call (changes frames near chunk edges), fewer RIFE pairs (exact)
        self.decode_memory = MemoryFallback(
            "frames per VAE decode call", False, f"out of memory decoding one frame {where}", say
        )
        self.rife_memory = MemoryFallback(
            "frame pairs per RIFE call", True, f"out of memory interpolating one frame pair {where}", say
        )
        self.chunk_size = decode_frames or graphs.vae_decoder.spec.dims["frames"].max  # official decode_chunk_size 8
        self.next_frame = 0  # first frame not decoded yet
        self.previous = None  # last decoded frame of the previous chunk (for RIFE)
        self.num_out = 0
        self.seconds = 0.0

    def push(self, latents: torch.Tensor, ready: torch.Tensor) -> None:
        """Decode every whole chunk from :attr:`next_frame` on whose frames are all ``ready``.

        Args:
            latents: [1, N, 4, h, w] in the working dtype; final where ``ready``.
            ready: [N] bool.
        """
        started = time.perf_counter()
        num_frames = latents.shape[1]
        ready = ready.cpu()
        while self.next_frame < num_frames:
            end = min(self.next_frame + self.chunk_size, num_frames)
            if not bool(ready[self.next_frame : end].all()):
                break
            self._chunk(latents[0, self.next_frame : end])
            self.next_frame = end
        self.seconds += time.perf_counter() - started

    def finish(self, latents: torch.Tensor) -> None:
        """Decode every frame not decoded yet (``latents`` [1, N, 4, h, w] are all final), then close the writers:
        the encoders' last frames, the audio, the file moved into place (timed as ``encode``)."""
        self.push(latents, torch.ones(latents.shape[1], dtype=torch.bool))
        if self.writers:
            with self.timer.stage("encode"):
                for writer in self.writers:
                    writer.close()

    def frames(self) -> np.ndarray | None:
        """The kept generated frames, uint8 [N, H, W, 3], or None when none were kept."""
        return np.concatenate(self.keep) if self.keep else None

    def _chunk(self, z: torch.Tensor) -> None:
        timer, g = self.timer, self.graphs
        with timer.stage("decode"):
            z = (1 / g.config.vae_scaling_factor) * z  # official decode_latents: 1 / 0.18215 * z
            decoded = self.decode_memory.run(len(z), lambda part: g.vae_decoder(z[part]))  # [n, 3, H, W]
            frames = decoded.float().mul_(0.5).add_(0.5).clamp_(0, 1)  # in place: the decoder's own output
            as_generated = self.keep is not None or (self.writers and not self.interpolate and self.paste is None)
            generated = to_uint8(frames) if as_generated else None
        out = self._interpolate(frames) if self.interpolate else frames
        if self.keep is not None:
            self.keep.append(generated)
        if self.writers:
            with timer.stage("encode"):  # as eager's: the frames made uint8, composited into the photo, encoded
                if self.paste is not None:
                    output = self.paste(out)  # uint8 [n', H0, W0, 3], the whole photo
                else:
                    output = to_uint8(out) if self.interpolate else generated
                for writer in self.writers:
                    writer.write(output)
            self.num_out += len(output)
        else:
            self.num_out += len(out)
        if self.events is not None:
            self.events(
                "frames",
                {
                    "generated": self.next_frame + len(frames),
                    "written": self.num_out,
                    "video_seconds": self.num_out / float(self.fps),
                    "elapsed_seconds": time.perf_counter() - self.started,
                },
            )

    def _interpolate(self, frames: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] decoded frames -> [m(prev,f0), f0, m(f0,f1), f1, ...] (no leading middle for the first
        chunk), RIFE in fp32 with the pairs batched."""
        g = self.graphs
        with self.timer.stage("interpolate"):
            seq = frames if self.previous is None else torch.cat([self.previous, frames])
            middles = self.rife_memory.run(len(seq) - 1, lambda part: g.rife(seq[:-1][part], seq[1:][part])).clamp(0, 1)
            out = torch.stack([middles, seq[1:]], dim=1).flatten(0, 1)
            if self.previous is None:
                out = torch.cat([frames[:1], out])
            self.previous = frames[-1:]
        return out


__all__ = ["StreamingOutput", "OUTPUT_FPS", "output_fps", "to_uint8", "audio_for_mux"]
