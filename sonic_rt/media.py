"""Media input and output: portrait images, speech audio and the output mp4.

All audio and video decoding and encoding goes through PyAV (FFmpeg linked in-process, no ``ffmpeg``
binary); resampling uses ``soxr``; images use Pillow. Every problem a user can cause with a bad input
raises a typed error from :mod:`sonic_rt.errors` whose message starts with the file name.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ._lazy import LazyModule
from .errors import AudioError, ImageError, InputError, OutputPathError

# Imported on first use: the models and the sampler run where PyAV / soxr are not installed (sonic_rt/_lazy.py).
av = LazyModule("av", "av")
soxr = LazyModule("soxr", "soxr")

PathLike = Union[str, "os.PathLike[str]"]

#: Largest portrait (width * height, pixels) :func:`load_image` decodes by default.
MAX_IMAGE_PIXELS: int = 64_000_000

#: Native sample rates (Hz) an audio file may declare. Below the lowest, a few kilobytes of samples
#: would stretch to hours of audio (and gigabytes when resampled to 16 kHz); no real recording is made
#: at under 4 kHz or over 768 kHz.
MIN_AUDIO_SAMPLE_RATE: int = 4_000
MAX_AUDIO_SAMPLE_RATE: int = 768_000

#: Largest sample magnitude :func:`load_audio` accepts. Audio is nominally in [-1, 1] (float files may
#: peak somewhat above); a float wav holding values near the float32 limit would overflow to infinity in
#: the channel mean and the resampler, and poison every feature computed from it.
MAX_SAMPLE_MAGNITUDE: float = 1e6


def _aac_rates() -> frozenset[int]:
    """Sample rates the FFmpeg AAC encoder accepts (Hz); other rates are resampled to 48000."""
    global _AAC_RATES
    if _AAC_RATES is None:
        _AAC_RATES = frozenset(av.Codec("aac", "w").audio_rates or ())
    return _AAC_RATES


_AAC_RATES: frozenset[int] | None = None
_AAC_FRAME_SIZE = 1024  # samples per AAC frame


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _check_input_file(path: PathLike, kind: str, error: type[InputError]) -> str:
    """Return ``path`` as a string if it is a non-empty regular file, else raise ``error`` naming it."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise error(f"{kind} file does not exist", p)
    if os.path.isdir(p):
        raise error(f"is a directory, not an {kind} file", p)
    if os.path.getsize(p) == 0:
        raise error(f"{kind} file is empty (0 bytes)", p)
    return p


def load_image(image: PathLike | Image.Image | np.ndarray, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load a portrait as an RGB Pillow image.

    Args:
        image: a file path (anything Pillow opens: PNG, JPEG, WebP, ...), a ``PIL.Image.Image``, or a
            numpy ``uint8`` array of shape ``[H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]``
            (RGBA).
        max_pixels: largest accepted ``width * height`` in pixels; checked from the file header before
            any pixel data is decoded.

    Returns:
        A new mode ``"RGB"`` image, ``width x height`` pixels, with the EXIF orientation applied (so a
        JPEG tagged "rotate 90" comes back with width and height swapped). Alpha is dropped, as in the
        official Sonic code (``Image.open(p).convert("RGB")``).

    Raises:
        ImageError: the file is missing, a directory, empty, truncated or not an image; the image has
            more than ``max_pixels`` pixels (or trips Pillow's decompression-bomb guard); an array has
            the wrong dtype or shape (``path`` is None then).
    """
    if isinstance(image, np.ndarray):
        return _image_from_array(image, max_pixels)
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", None) or None  # set when it came from Image.open
        _check_pixels(image.size, max_pixels, name)
        try:
            return _to_rgb(image, name)
        except OSError as e:  # a lazily opened image whose pixel data is corrupt
            raise ImageError(f"cannot decode image ({e})", name) from e
    if not isinstance(image, (str, os.PathLike)):
        raise ImageError(f"expected a path, PIL.Image.Image or numpy uint8 array, got {type(image).__name__}")

    path = _check_input_file(image, "image", ImageError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_pixels(im.size, max_pixels, path)
                im.load()
                return _to_rgb(im, path)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely ({e})", path) from e
    except Image.UnidentifiedImageError as e:
        raise ImageError("not a recognised image file (PNG, JPEG, WebP, ...)", path) from e
    except OSError as e:
        raise ImageError(f"cannot read image, the file may be truncated or corrupt ({e})", path) from e
    except Exception as e:  # Pillow decoders also raise SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"corrupt image ({type(e).__name__}: {e})", path) from e


def _check_pixels(size: tuple[int, int], max_pixels: int, path: str | None) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}; downscale it first",
            path,
        )
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})", path)


def _to_rgb(im: Image.Image, path: str | None) -> Image.Image:
    """EXIF-transpose and convert to RGB; always returns a new image."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # malformed EXIF block
        raise ImageError(f"cannot apply the EXIF orientation ({type(e).__name__}: {e})", path) from e
    return im.convert("RGB")


def _image_from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"image array must have dtype uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"image array must have shape [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}")
    height, width = arr.shape[:2]
    _check_pixels((width, height), max_pixels, None)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.ndim if arr.ndim == 2 else arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode).convert("RGB")


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file.

    Attributes:
        duration_s: duration in seconds as the container header states it (an estimate for some
            formats such as mp3 without a Xing header; 0.0 when the header has none).
        sample_rate: native sample rate of the first audio stream, Hz.
        channels: channel count of the first audio stream.
    """

    duration_s: float
    sample_rate: int
    channels: int


def _reason(e: Exception) -> str:
    """Short reason of an FFmpeg/OS error, without the errno and file name PyAV puts in ``str(e)``."""
    return getattr(e, "strerror", None) or str(e)


def _open_audio(path: PathLike) -> tuple[av.container.InputContainer, av.audio.stream.AudioStream]:
    """Open ``path`` and return (container, first audio stream); the caller closes the container."""
    p = _check_input_file(path, "audio", AudioError)
    try:
        container = av.open(p, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise AudioError(f"cannot open as audio ({_reason(e)})", p) from e
    if not container.streams.audio:
        container.close()
        raise AudioError("has no audio stream", p)
    stream = container.streams.audio[0]
    codec = stream.codec_context
    if codec is None:  # FFmpeg has no decoder for the stream's codec (or the header names none)
        container.close()
        raise AudioError("the audio codec is unknown or not supported; convert the file to wav, flac or mp3", p)
    if not codec.sample_rate or not codec.channels:
        container.close()
        raise AudioError("audio stream has no sample rate or channel count; the file may be corrupt", p)
    if not MIN_AUDIO_SAMPLE_RATE <= codec.sample_rate <= MAX_AUDIO_SAMPLE_RATE:
        container.close()
        raise AudioError(
            f"audio sample rate {codec.sample_rate} Hz is outside {MIN_AUDIO_SAMPLE_RATE}.."
            f"{MAX_AUDIO_SAMPLE_RATE} Hz; the header is corrupt or the file is not speech audio",
            p,
        )
    return container, stream


def probe_audio(path: PathLike) -> AudioInfo:
    """Read the header of an audio (or video) file without decoding it.

    Args:
        path: file containing at least one audio stream (wav, mp3, m4a, flac, ogg, mp4, ...).

    Returns:
        :class:`AudioInfo` of the first audio stream.

    Raises:
        AudioError: the file is missing, cannot be opened, has no audio stream, its codec is unknown, or
            its sample rate is outside ``MIN_AUDIO_SAMPLE_RATE..MAX_AUDIO_SAMPLE_RATE``.
    """
    container, stream = _open_audio(path)
    try:
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        return AudioInfo(
            duration_s=duration,
            sample_rate=int(stream.codec_context.sample_rate),
            channels=int(stream.codec_context.channels),
        )
    finally:
        container.close()


def _packed_to_array(frame: av.AudioFrame) -> np.ndarray:
    """Samples of a packed (interleaved) float frame as float32 ``[channels, n]``."""
    channels = frame.layout.nb_channels
    return frame.to_ndarray().reshape(frame.samples, channels).T


def _decode_audio(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path``.

    Returns:
        (samples float32 ``[channels, n]`` in [-1, 1], native sample rate in Hz).
    """
    p = os.fspath(path)
    container, stream = _open_audio(p)
    # Convert to packed float at the native rate and layout (sample values unchanged, s16 -> x / 32768).
    # Packed, not planar: PyAV's AudioFrame.planes walks extended_data up to a NULL pointer that is
    # not there for 8 or more planar channels, so fltp.to_ndarray() reads past the array and can crash
    # the process.
    resampler = av.AudioResampler(format="flt")
    chunks: list[np.ndarray] = []
    first: tuple[int, int] | None = None  # (channels, sample rate) of the first decoded frame
    try:
        for frame in container.decode(stream):
            # The resampler passes frames that are already flt through unchecked, so a frame that switches
            # mono <-> stereo or the sample rate (damaged or concatenated mp3s) is caught here.
            here = (frame.layout.nb_channels, int(frame.sample_rate))
            if first is None:
                first = here
            elif here != first:
                raise AudioError(
                    f"the channel count or sample rate changes inside the stream ({first[0]} ch "
                    f"{first[1]} Hz, then {here[0]} ch {here[1]} Hz); the file may be corrupt or "
                    "glued together from several files, re-encode it",
                    p,
                )
            for out in resampler.resample(frame):
                chunks.append(_packed_to_array(out))
        for out in resampler.resample(None):
            chunks.append(_packed_to_array(out))
    except (av.FFmpegError, ValueError) as e:
        raise AudioError(f"cannot decode audio, the file may be corrupt ({_reason(e)})", p) from e
    finally:
        container.close()
    rate = first[1] if first is not None else int(stream.codec_context.sample_rate)
    if not MIN_AUDIO_SAMPLE_RATE <= rate <= MAX_AUDIO_SAMPLE_RATE:
        raise AudioError(
            f"decoded audio has a sample rate of {rate} Hz, outside {MIN_AUDIO_SAMPLE_RATE}.."
            f"{MAX_AUDIO_SAMPLE_RATE} Hz; the file may be corrupt",
            p,
        )
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise AudioError("no audio samples could be decoded", p)
    samples = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    return samples, rate


def load_audio(path: PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Decode an audio file to mono float32 at ``sample_rate``, like ``librosa.load(path, sr=sample_rate)``.

    All frames of the first audio stream are decoded, channels are averaged to mono, and the result is
    resampled with soxr quality "HQ" (librosa's default ``soxr_hq``) to exactly
    ``ceil(n * sample_rate / native_rate)`` samples (librosa's ``fix_length``).

    Args:
        path: wav, mp3, m4a/aac, flac, ogg, or any file with an audio track (e.g. an mp4).
        sample_rate: output sample rate, Hz.

    Returns:
        float32 array of shape ``[n]``, nominally in [-1, 1], at ``sample_rate`` Hz.

    Raises:
        AudioError: the file is missing, unreadable or corrupt, has no audio stream, decodes to zero
            samples, contains NaN or infinite samples or samples larger than ``MAX_SAMPLE_MAGNITUDE``,
            changes its channel count or sample rate mid-stream, or has a sample rate outside
            ``MIN_AUDIO_SAMPLE_RATE..MAX_AUDIO_SAMPLE_RATE``.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    samples, native_rate = _decode_audio(path)
    if not np.isfinite(samples).all():
        raise AudioError("contains NaN or infinite samples", os.fspath(path))
    peak = float(np.abs(samples).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioError(
            f"sample values reach {peak:.3g}, far outside [-1, 1]; the file is corrupt or not audio",
            os.fspath(path),
        )
    mono = np.mean(samples, axis=0)
    if native_rate == sample_rate:
        return np.ascontiguousarray(mono, dtype=np.float32)
    y = soxr.resample(mono, native_rate, sample_rate, quality="HQ")
    n_out = int(math.ceil(mono.shape[0] * sample_rate / native_rate))
    if y.shape[0] < n_out:
        y = np.pad(y, (0, n_out - y.shape[0]))
    return np.ascontiguousarray(y[:n_out], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Output video
# --------------------------------------------------------------------------------------------------


def check_output_path(out: PathLike, suffix: str = ".mp4") -> Path:
    """Check, before any heavy work, that a file ending in ``suffix`` can be written at ``out``.

    Args:
        out: output file path; must end in ``suffix``.
        suffix: ``.mp4`` (the video) or ``.m3u8`` (an HLS playlist, :class:`HlsWriter`).

    Returns:
        The resolved absolute path.

    Raises:
        OutputPathError: the suffix is not ``suffix``, ``out`` is an existing directory, or its parent
            directory is missing, not a directory, or not writable.
    """
    p = Path(os.fspath(out)).expanduser()
    if p.suffix.lower() != suffix:
        raise OutputPathError(f"output file must end in {suffix}", p)
    p = p.resolve()
    if p.is_dir():
        raise OutputPathError(f"is an existing directory; give a file name ending in {suffix}", p)
    parent = p.parent
    if not parent.exists():
        raise OutputPathError(f"output directory {parent} does not exist; create it first", p)
    if not parent.is_dir():
        raise OutputPathError(f"{parent} is not a directory", p)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {parent} is not writable", p)
    return p


def _video_rate(fps, width, height, crf) -> Fraction:
    """Check the settings of an H.264 yuv420p writer; returns ``fps`` as a fraction (denominator <= 10000).

    Raises:
        ValueError: ``fps`` not a positive number, ``width`` or ``height`` not a positive even integer, ``crf``
            outside 0..51.
    """
    try:
        rate = Fraction(fps).limit_denominator(10000)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"fps must be a positive number, got {fps!r}") from e
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % 2:
            raise ValueError(f"{name} must be a positive even integer for yuv420p, got {v!r}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    return rate


#: x264 constant rate factor of every video written (the official Sonic code re-encodes with ffmpeg ``-crf 18``).
DEFAULT_CRF: int = 18

#: x264 parameters of every H.264 stream written. ``cpu-independent=1``: x264's macroblock-tree rate control runs
#: its C code instead of the assembly chosen for this CPU. With the AVX-512 assembly, the bundled libx264 wrote a
#: different file for the same frames from one encode to the next (decoded frames up to 26 levels apart); with
#: ``cpu-independent``, as with that assembly off, every encode was the same, and the file as small as before
#: (``python -m bench.encoder``; docs/performance.md "The written video").
X264_PARAMS: str = "cpu-independent=1"

#: Encoder threads: a fixed count, so that the bitstream does not depend on how many cores the process may use
#: (by default x264 takes its thread count from the CPU affinity, and the count changes the bitstream).
X264_THREADS: int = 4


def x264_options(crf: int = DEFAULT_CRF, *, key_interval: int | None = None) -> dict[str, str]:
    """The libx264 options of a stream (PyAV ``add_stream(options=...)``): ``crf``, :data:`X264_PARAMS`,
    :data:`X264_THREADS` and, for a live stream (``key_interval``: frames from one key frame to the next, each
    starting a segment), ``tune=zerolatency`` (no look-ahead and no B-frames: each frame's packet is out as soon as
    it is encoded), a fixed GOP and no scene-cut key frames."""
    options = {"crf": str(int(crf)), "x264-params": X264_PARAMS, "threads": str(X264_THREADS)}
    if key_interval is not None:
        interval = str(int(key_interval))
        options.update(tune="zerolatency", g=interval, keyint_min=interval, sc_threshold="0")
    return options


def x264_thread_type(live: bool) -> str:
    """PyAV's thread type of the encoder: ``"SLICE"`` for a live stream (every thread on the same frame, so a frame
    is out as soon as it is encoded), ``"FRAME"`` for a file (several frames at once, no slices: a smaller file)."""
    return "SLICE" if live else "FRAME"


def _add_h264_stream(container, rate: Fraction, width: int, height: int, crf: int, key_interval: int | None = None):
    """Add a libx264 yuv420p stream with :func:`x264_options` to ``container``; time base ``1 / rate``."""
    stream = container.add_stream("libx264", rate=rate, options=x264_options(crf, key_interval=key_interval))
    stream.width, stream.height, stream.pix_fmt = int(width), int(height), "yuv420p"
    stream.codec_context.thread_type = x264_thread_type(live=key_interval is not None)
    stream.time_base = stream.codec_context.time_base = 1 / rate
    return stream


def _encode_rgb(container, stream, frames: np.ndarray, first_pts: int) -> int:
    """Encode and mux uint8 RGB ``frames`` (``[n, H, W, 3]`` or one ``[H, W, 3]``, shape checked against
    ``stream``) with pts ``first_pts, first_pts + 1, ...``; returns how many were written.

    Raises:
        ValueError: wrong dtype or shape.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        got = getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a uint8 numpy array, got {got}")
    if frames.ndim == 3:
        frames = frames[None]
    expected = (stream.height, stream.width, 3)
    if frames.ndim != 4 or frames.shape[1:] != expected:
        raise ValueError(f"frames must have shape [n, {expected[0]}, {expected[1]}, 3], got {frames.shape}")
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = first_pts + i, stream.codec_context.time_base
        container.mux(stream.encode(frame))
    return len(frames)


def _close_quietly(container) -> None:
    """Close a container being discarded; its own errors no longer matter."""
    if container is not None:
        try:
            container.close()
        except Exception:
            pass


class VideoWriter:
    """Write an H.264 (+ AAC) mp4 atomically.

    Frames go to a uniquely named temporary file in the output directory
    (``.<name>.<random>.partial.mp4``); :meth:`close` finishes it and ``os.replace``-s it onto ``out``.
    :meth:`abort` (or any exception, including ``KeyboardInterrupt``, inside a ``with`` block) deletes
    the temporary file and leaves ``out`` untouched. Without ``with``, call :meth:`close` or
    :meth:`abort` yourself.

    Video: libx264, yuv420p, ``crf``, :func:`x264_options` (the same frames and audio give the same file, byte
    for byte); stream time base ``1/fps`` and frame ``i`` has pts ``i``, so the
    frame count and frame rate read back exactly. Audio (optional): the first audio stream of ``audio``
    is re-encoded in full (not trimmed to the video) as AAC at the source rate (48000 Hz when AAC does
    not support it), mono or stereo (more channels are downmixed to stereo). Decoders see up to 1023
    extra samples of AAC padding at the end.

    Args:
        out: final ``.mp4`` path (checked with :func:`check_output_path`).
        fps: frames per second (a float is turned into the nearest fraction with denominator <= 10000,
            so 29.97002997 becomes 30000/1001).
        width: frame width in pixels, positive and even.
        height: frame height in pixels, positive and even.
        audio: file whose first audio stream is muxed in, or None for a silent video.
        crf: x264 constant rate factor, 0 (lossless) to 51.

    Raises:
        OutputPathError: ``out`` cannot be written.
        AudioError: ``audio`` is missing, unreadable or has no audio stream (checked here; a decode
            error found while muxing is raised by :meth:`close`).
        ValueError: bad ``fps``, ``width``, ``height`` or ``crf``.
    """

    def __init__(
        self,
        out: PathLike,
        *,
        fps: Fraction | float,
        width: int,
        height: int,
        audio: PathLike | None = None,
        crf: int = DEFAULT_CRF,
    ) -> None:
        self._path = check_output_path(out)
        rate = _video_rate(fps, width, height, crf)
        self._audio_src = os.fspath(audio) if audio is not None else None
        audio_info = probe_audio(self._audio_src) if self._audio_src is not None else None

        self._fps = rate
        self._width, self._height = int(width), int(height)
        self._frames = 0
        self._done = False
        fd, tmp = tempfile.mkstemp(prefix=f".{self._path.stem}.", suffix=".partial.mp4", dir=self._path.parent)
        os.close(fd)
        self._temp_path = Path(tmp)
        self._container: av.container.OutputContainer | None = None
        try:
            self._container = av.open(tmp, mode="w", format="mp4")
            self._video = _add_h264_stream(self._container, rate, self._width, self._height, crf)
            self._audio = None
            if audio_info is not None:
                out_rate = audio_info.sample_rate if audio_info.sample_rate in _aac_rates() else 48000
                layout = "mono" if audio_info.channels == 1 else "stereo"
                a = self._container.add_stream("aac", rate=out_rate, layout=layout)
                a.time_base = Fraction(1, out_rate)
                self._audio = a
        except BaseException:
            self.abort()
            raise

    @property
    def path(self) -> Path:
        """Final output path (resolved)."""
        return self._path

    @property
    def temp_path(self) -> Path:
        """Temporary file the video is written to until :meth:`close` renames it onto :attr:`path`."""
        return self._temp_path

    @property
    def frames_written(self) -> int:
        """Number of video frames passed to :meth:`write` so far."""
        return self._frames

    def write(self, frames: np.ndarray) -> None:
        """Encode frames.

        Args:
            frames: uint8 RGB, shape ``[n, height, width, 3]`` or a single ``[height, width, 3]`` frame.

        Raises:
            ValueError: wrong dtype or shape, or the writer is already closed or aborted.
        """
        if self._done or self._container is None:
            raise ValueError("VideoWriter is already closed")
        self._frames += _encode_rgb(self._container, self._video, frames, self._frames)

    def close(self) -> None:
        """Flush the encoders, mux the audio, and move the finished file onto :attr:`path`.

        Does nothing if already closed. On any failure the temporary file is removed and the error
        re-raised.

        Raises:
            ValueError: no frames were written.
            AudioError: the audio file could not be decoded.
        """
        if self._done:
            return
        try:
            if self._frames == 0:
                raise ValueError(f"{self._path}: no video frames were written")
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._mux_audio()
            self._container.close()
            self._container = None
            os.replace(self._temp_path, self._path)
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the output: close the encoder and delete the temporary file; ``out`` is untouched."""
        self._done = True
        _close_quietly(self._container)
        self._container = None
        try:
            os.unlink(self._temp_path)
        except FileNotFoundError:
            pass

    def _mux_audio(self) -> None:
        """Decode the whole source audio, re-encode it as AAC and mux it."""
        assert self._audio is not None and self._container is not None
        codec = self._audio.codec_context
        resampler = av.AudioResampler(
            format="fltp", layout=codec.layout.name, rate=codec.sample_rate, frame_size=_AAC_FRAME_SIZE
        )
        src, stream = _open_audio(self._audio_src)
        n = 0

        def encode(frames: list[av.AudioFrame]) -> None:
            nonlocal n
            for f in frames:
                f.pts = n
                f.time_base = codec.time_base
                n += f.samples
                self._container.mux(self._audio.encode(f))

        try:
            for frame in src.decode(stream):
                frame.pts = None  # the resampler keeps its own clock; we number samples ourselves
                encode(resampler.resample(frame))
            encode(resampler.resample(None))
        except (av.FFmpegError, ValueError) as e:
            raise AudioError(f"cannot decode audio, the file may be corrupt ({_reason(e)})", self._audio_src) from e
        finally:
            src.close()
        if n == 0:
            raise AudioError("no audio samples could be decoded", self._audio_src)
        self._container.mux(self._audio.encode(None))

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


HLS_SEGMENT_SECONDS = 2  # target length of an HLS segment (a key frame starts each one)


class HlsWriter:
    """Write an HLS stream (H.264 + AAC in fMP4 segments) that a player can open while it is being written.

    FFmpeg's HLS muxer (through PyAV) writes ``<stem>.m3u8`` (an ``EVENT`` playlist, so players keep polling it),
    ``<stem>_init.mp4`` and ``<stem>_00000.m4s``, ... beside it; each segment and each rewrite of the playlist is
    written under a temporary name and renamed (``hls_flags=temp_file``), so a reader never sees half a segment.
    :meth:`close` adds ``#EXT-X-ENDLIST``. :meth:`abort` (or an exception inside a ``with`` block) removes the
    playlist and every segment.

    Video: libx264, yuv420p, ``crf``, :func:`x264_options` with ``tune=zerolatency`` (no look-ahead, so a segment is
    out as soon as its frames are written), a key frame every :data:`HLS_SEGMENT_SECONDS` (segments of that
    length); the same frames and samples give the same files, byte for byte.
    Audio (optional): ``samples`` (float32 mono) as AAC, interleaved: each :meth:`write` also muxes the audio up
    to the end of the frames written so far, so every segment plays with its sound; :meth:`close` muxes the rest.

    Args:
        out: the playlist path, ending in ``.m3u8`` (checked with :func:`check_output_path`).
        fps: frames per second; width, height: frame size in pixels, positive and even.
        samples: float32 mono audio ``[S]`` at ``sample_rate`` Hz (16000: the runtime's audio), or None.
        crf: x264 constant rate factor, 0 to 51.

    Raises:
        OutputPathError: ``out`` cannot be written, or a segment of that name already exists.
        ValueError: bad ``fps``, ``width``, ``height`` or ``crf``.
    """

    def __init__(
        self,
        out: PathLike,
        *,
        fps: Fraction | float,
        width: int,
        height: int,
        samples: np.ndarray | None = None,
        sample_rate: int = 16000,
        crf: int = DEFAULT_CRF,
    ) -> None:
        self._path = check_output_path(out, ".m3u8")
        rate = _video_rate(fps, width, height, crf)
        stem, folder = self._path.stem, self._path.parent
        self._init = folder / f"{stem}_init.mp4"
        self._pattern = folder / f"{stem}_%05d.m4s"
        clash = [p for p in (self._path, self._init) if p.exists()] + sorted(folder.glob(f"{stem}_*.m4s"))
        if clash:
            raise OutputPathError(
                f"an HLS stream of that name is already there ({clash[0].name}); remove it first", self._path
            )
        self._fps, self._frames, self._done = rate, 0, False
        self._samples = None if samples is None else np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        self._sample_rate, self._audio_pos = int(sample_rate), 0
        key_interval = max(1, round(HLS_SEGMENT_SECONDS * rate))
        self._container = av.open(
            os.fspath(self._path),
            mode="w",
            format="hls",
            options={
                "hls_time": str(HLS_SEGMENT_SECONDS),
                "hls_playlist_type": "event",
                "hls_segment_type": "fmp4",
                "hls_flags": "temp_file+independent_segments",
                "hls_list_size": "0",
                "hls_fmp4_init_filename": self._init.name,
                "hls_segment_filename": os.fspath(self._pattern),
            },
        )
        try:
            self._video = _add_h264_stream(self._container, rate, width, height, crf, key_interval)
            self._audio, self._resampler = None, None
            if self._samples is not None:
                a = self._container.add_stream("aac", rate=self._sample_rate, layout="mono")
                a.time_base = Fraction(1, self._sample_rate)
                self._audio = a
                self._resampler = av.AudioResampler(
                    format="fltp", layout="mono", rate=self._sample_rate, frame_size=_AAC_FRAME_SIZE
                )
        except BaseException:
            self.abort()
            raise

    @property
    def path(self) -> Path:
        """The playlist (resolved)."""
        return self._path

    @property
    def frames_written(self) -> int:
        """Video frames passed to :meth:`write` so far."""
        return self._frames

    def files(self) -> list[Path]:
        """The playlist, the init segment and the media segments written so far (those that exist)."""
        folder = self._path.parent
        found = [p for p in (self._path, self._init) if p.exists()]
        return found + sorted(folder.glob(f"{self._path.stem}_*.m4s"))

    def write(self, frames: np.ndarray) -> None:
        """Encode frames (uint8 RGB ``[n, height, width, 3]`` or one ``[height, width, 3]``), then the audio up to
        their end.

        Raises:
            ValueError: wrong dtype or shape, or the writer is closed.
        """
        if self._done or self._container is None:
            raise ValueError("HlsWriter is already closed")
        self._frames += _encode_rgb(self._container, self._video, frames, self._frames)
        self._mux_audio_until(int(self._frames / self._fps * self._sample_rate))

    def _mux_audio_until(self, end: int) -> None:
        if self._audio is None:
            return
        end = min(end, len(self._samples))
        if end > self._audio_pos:
            chunk = av.AudioFrame.from_ndarray(self._samples[None, self._audio_pos : end], format="flt", layout="mono")
            chunk.sample_rate = self._sample_rate
            for out in self._resampler.resample(chunk):
                out.pts = None  # the encoder numbers the samples
                self._container.mux(self._audio.encode(out))
            self._audio_pos = end

    def close(self) -> None:
        """Flush the encoders, mux the rest of the audio and end the playlist (``#EXT-X-ENDLIST``).

        Raises:
            ValueError: no frames were written (the partial stream is removed).
        """
        if self._done:
            return
        try:
            if self._frames == 0:
                raise ValueError(f"{self._path}: no video frames were written")
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._mux_audio_until(len(self._samples))
                for out in self._resampler.resample(None):
                    self._container.mux(self._audio.encode(out))
                self._container.mux(self._audio.encode(None))
            self._container.close()
            self._container = None
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop and remove the playlist and every segment written (temporary ones included)."""
        self._done = True
        _close_quietly(self._container)
        self._container = None
        folder, stem = self._path.parent, self._path.stem
        leftovers = [*folder.glob(f"{stem}_*.m4s*"), *folder.glob(f"{stem}.m3u8*"), *folder.glob(f"{stem}_init.mp4*")]
        for p in [self._path, self._init, *leftovers]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def __enter__(self) -> HlsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_video(path: PathLike) -> tuple[np.ndarray, float, float | None]:
    """Decode an mp4 completely (test and inspection helper).

    Args:
        path: video file.

    Returns:
        (frames uint8 ``[n, H, W, 3]`` RGB, video frame rate in frames per second, audio duration in
        seconds = decoded samples / sample rate, or None when there is no audio stream).

    Raises:
        OSError / av.FFmpegError: the file cannot be opened or decoded (this helper does not wrap them).
        ValueError: the file has no video stream.
    """
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        frames: list[np.ndarray] = []
        samples = 0
        streams = [vstream] + ([astream] if astream is not None else [])
        for packet in container.demux(streams):
            for frame in packet.decode():
                if packet.stream is vstream:
                    frames.append(frame.to_ndarray(format="rgb24"))
                else:
                    samples += frame.samples
        rate = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
        fps = float(rate) if rate else 0.0
        audio_s = samples / astream.codec_context.sample_rate if astream is not None else None
    if frames:
        video = np.stack(frames)
    else:
        video = np.zeros((0, vstream.height, vstream.width, 3), np.uint8)
    return video, fps, audio_s


def write_wav(path: PathLike, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write float mono ``samples`` [n] in [-1, 1] (clipped) as a 16-bit PCM WAV at ``sample_rate`` Hz."""
    import wave

    path = Path(path)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path
