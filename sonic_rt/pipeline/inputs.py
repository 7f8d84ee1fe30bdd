"""Step 1 of the pipeline: check every input and prepare the reference, before any model runs.

Also used by the eager baseline (``bench/eager.py``), so both refuse the same inputs with the same errors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import media
from ..audio_features import SAMPLE_RATE, SAMPLES_PER_AUDIO_FRAME, num_generated_frames
from ..errors import AudioError, InputError
from ..face import FaceBox, Reference, prepare_reference
from ..sampling import SamplingConfig
from .components import Components
from .options import AnimateOptions


@dataclass
class PreparedInputs:
    """Checked inputs of one animation (:func:`check_inputs`).

    Attributes:
        config: the sampler's settings, built from the options.
        out_path: the checked ``.mp4`` path, or None.
        samples: float32 mono audio at 16 kHz, ``[S]``.
        audio_frames: official ``audio_len`` = S // 640 (25 fps audio frames).
        num_frames: N generated frames (12.5 fps), >= 1.
        reference: the prepared portrait (crop, face mask, ``ref_img`` [1, 3, H, W] in [-1, 1], CLIP pixels).
        latent_shape: ``(1, N, 4, H/8, W/8)``, the shape of the latents and of the initial noise.
        image: the loaded photo (RGB, EXIF orientation applied), which ``paste_back`` composites into.
        hls_path: the checked ``.m3u8`` path of the ``hls`` option, or None.
    """

    config: SamplingConfig
    out_path: Path | None
    samples: np.ndarray
    audio_frames: int
    num_frames: int
    reference: Reference
    latent_shape: tuple[int, int, int, int, int]
    image: Image.Image | None = None
    hls_path: Path | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the generated video in pixels."""
        return self.reference.size

    def memory_hint(self) -> str:
        """The end of an out-of-memory message: the size, and what to lower."""
        width, height = self.size
        return f"at {width}x{height}; lower --min-resolution or free device memory"


def check_inputs(
    components: Components, image, audio, out, options: AnimateOptions, latents: torch.Tensor | None = None
) -> PreparedInputs:
    """Check every input of :meth:`sonic_rt.Runtime.animate` and prepare the reference (face crop, mask).

    Checks, in order: the sampling options, ``dynamic_scale``, the output path, the image, the audio (at
    least one generated frame, 80 ms), the face, the engines' shape ranges, the shape of ``latents``.

    Args:
        components: the loaded pipeline (face detector, graphs).
        image, audio, out: as :meth:`sonic_rt.Runtime.animate`.
        options: the options of this animation.
        latents: optional initial noise, checked against ``[1, N, 4, H/8, W/8]``.

    Raises:
        ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: the first bad input.
    """
    try:
        config = SamplingConfig(
            steps=options.steps, frames_per_window=options.frames_per_window, shift_offset=options.shift_offset
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    dynamic_scale = options.dynamic_scale
    if not (isinstance(dynamic_scale, (int, float)) and math.isfinite(dynamic_scale) and dynamic_scale >= 0):
        raise InputError(f"dynamic_scale must be a finite number >= 0, got {dynamic_scale!r}")
    if not (isinstance(options.max_output_side, int) and options.max_output_side >= 64):
        raise InputError(f"max_output_side must be a whole number of pixels >= 64, got {options.max_output_side!r}")
    out_path = media.check_output_path(out) if out is not None else None
    hls_path = media.check_output_path(options.hls, ".m3u8") if options.hls is not None else None
    image_source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    pil_image = media.load_image(image)
    samples, audio_source = load_audio(audio)
    num_frames = num_generated_frames(len(samples))
    if num_frames < 1:
        raise AudioError(
            f"audio is {len(samples) / SAMPLE_RATE:.3f} s long, shorter than one generated frame (80 ms)", audio_source
        )
    face_box = FaceBox.from_user(options.face_box) if options.face_box is not None else None
    reference = prepare_reference(
        pil_image,
        components.face_detector,
        face_box=face_box,
        crop=options.crop,
        min_resolution=options.min_resolution or components.default_min_resolution,
        source=image_source,
    )
    width, height = reference.size
    components.check_shapes(width, height, config.frames_per_window)
    cfg = components.graphs.config
    latent_shape = (1, num_frames, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    if latents is not None and tuple(latents.shape) != latent_shape:
        raise InputError(
            f"latents must have shape {list(latent_shape)} for this image and audio, got {list(latents.shape)}"
        )
    return PreparedInputs(
        config,
        out_path,
        samples,
        len(samples) // SAMPLES_PER_AUDIO_FRAME,
        num_frames,
        reference,
        latent_shape,
        image=pil_image if options.paste_back else None,
        hls_path=hls_path,
    )


def load_audio(audio) -> tuple[np.ndarray, str | None]:
    """Audio as float32 mono 16 kHz samples ``[S]``, plus the source path (None for arrays).

    Args:
        audio: a file PyAV decodes (resampled to 16 kHz mono), or a 1-D float array already at 16 kHz.

    Raises:
        AudioError: an unreadable file, or an array that is not 1-D float or holds NaN / infinite samples.
    """
    if isinstance(audio, (str, os.PathLike)):
        media.probe_audio(audio)
        return media.load_audio(audio, SAMPLE_RATE), os.fspath(audio)
    array = np.asarray(audio)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
        raise AudioError(
            f"an audio array must be 1-D float mono at {SAMPLE_RATE} Hz, got shape {array.shape} dtype {array.dtype}"
        )
    if not np.isfinite(array).all():
        raise AudioError("the audio array contains NaN or infinite samples")
    return array.astype(np.float32), None


__all__ = ["PreparedInputs", "check_inputs", "load_audio"]
