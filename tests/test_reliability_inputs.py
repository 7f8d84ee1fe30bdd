"""Reliability against hostile inputs: broken media files, untrusted model files, tampered engine directories.

Every hostile input must end in the project's typed error (``ImageError`` / ``AudioError`` for media,
``CheckpointError`` for model files, ``EngineError`` for engine directories), naming the file, or succeed with a
sane result; no other exception may escape and every loader call must finish within ``CALL_LIMIT_S``.

Media inputs are property-based (hypothesis, derandomized and without an example database, so every session runs
the same examples): random bytes under every extension, truncated and byte-mutated prefixes of real files (PNG,
JPEG, WebP, WAV, mp3, m4a, flac, mp4 with and without audio), hand-written WAV headers with absurd sample rates,
channel counts and sample formats, float WAVs holding NaN, infinities and huge values, and PNG headers declaring
more than ``MAX_IMAGE_PIXELS`` pixels. Each hypothesis test checks that it ran exactly its stated number of
examples. The rest are explicit cases (zero-length files, directories, wrong extensions, decompression-bomb
headers of four formats, code-running pickles, tampered engine directories) and three CLI runs.

Case count (one case = one hostile input handed to the code under test): ``TOTAL_CASES`` = 3672, which is
``HYPOTHESIS_CASES`` (3600 generated + 15 hand-picked hypothesis examples = 3615) + ``EXPLICIT_CASES`` (57
parametrized or listed inputs, the 3 CLI runs included); see the constants below.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import sonic_rt
from sonic_rt.checkpoint import read_state_dict
from sonic_rt.errors import AudioError, CheckpointError, EngineError, ImageError
from sonic_rt.manifest import open_engine_dir, sha256_file, verify_files
from sonic_rt.media import (
    MAX_AUDIO_SAMPLE_RATE,
    MAX_IMAGE_PIXELS,
    MAX_SAMPLE_MAGNITUDE,
    MIN_AUDIO_SAMPLE_RATE,
    AudioInfo,
    VideoWriter,
    load_audio,
    load_image,
    probe_audio,
    write_wav,
)

# --------------------------------------------------------------------------------------------------------------------
# How much runs: the suite's case count is computed from these constants
# --------------------------------------------------------------------------------------------------------------------

#: Longest a single loader call may take on a hostile input, seconds.
CALL_LIMIT_S = 10.0

#: Generated examples per hypothesis test (derandomized, so these exact examples run every session).
RANDOM_BYTES_EXAMPLES = 800  # random bytes (optionally behind a real magic number) x 9 extensions
PREFIX_EXAMPLES = 1000  # truncated prefixes of 9 real files, under any of the 9 extensions
MUTATION_EXAMPLES = 800  # prefixes with 1..8 bytes overwritten
WAV_HEADER_EXAMPLES = 600  # hand-written WAV headers: rate, channels, bits, format tag, block align
FLOAT_WAV_EXAMPLES = 300  # float32/float64 WAVs with NaN, infinities, huge and normal values
PNG_BOMB_EXAMPLES = 100  # PNG headers declaring more than MAX_IMAGE_PIXELS pixels

#: Hand-picked hypothesis ``@example`` inputs (they run in addition to the generated ones).
WAV_HEADER_EXPLICIT = 7  # the brief's absurd rates (0, 1 Hz, 4 GHz) and channel counts (0, 255, 65535)
FLOAT_WAV_EXPLICIT = 5  # NaN, +inf, -inf, 3e38 at 22.05 kHz, 1e300 in float64
PNG_BOMB_EXPLICIT = 3  # 100000 x 100000, 9000 x 9000 (over our limit, under Pillow's), 2**31-1 square

HYPOTHESIS_CASES = (
    RANDOM_BYTES_EXAMPLES
    + PREFIX_EXAMPLES
    + MUTATION_EXAMPLES
    + WAV_HEADER_EXAMPLES
    + WAV_HEADER_EXPLICIT
    + FLOAT_WAV_EXAMPLES
    + FLOAT_WAV_EXPLICIT
    + PNG_BOMB_EXAMPLES
    + PNG_BOMB_EXPLICIT
)

EXTENSIONS = ("png", "jpg", "webp", "wav", "mp3", "m4a", "flac", "mp4", "")
MANY_CHANNELS = ("flac_7.1", "wav_9ch", "wav_64ch")
MIDSTREAM_CHANGES = ("mono_then_stereo", "22050_then_44100")
IMAGE_BOMBS = ("png_100000", "jpeg_65500", "webp_16384", "gif_65535", "webp_9000")
WRONG_EXTENSIONS = ("wav_as_png", "png_as_wav", "mp3_as_jpg", "jpg_as_mp3", "video_as_m4a")
PICKLE_FORMATS = ("torch_zip", "torch_zip_top_level", "torch_legacy", "pickle_protocol_2", "pickle_protocol_0")
ENGINE_TAMPERING = (
    "truncated_manifest",
    "manifest_is_a_list",
    "support_file_missing",
    "support_file_modified",
    "support_file_escapes",
    "artifact_escapes",
    "artifact_absolute",
    "artifact_not_verified",
    "artifact_symlink_escapes",
    "graph_removed",
    "backend_removed",
    "spec_malformed",
)

EXPLICIT_CASES = (
    2 * len(EXTENSIONS)  # a zero-length file and a directory, per extension
    + len(MANY_CHANNELS)
    + len(MIDSTREAM_CHANGES)
    + len(IMAGE_BOMBS)
    + len(WRONG_EXTENSIONS)
    + len(PICKLE_FORMATS)
    + 1  # the same pickle with trust_pickle=True: the control that the payload is live
    + 1  # Runtime on a demo copy whose unet.pth runs code
    + 2  # verify_files with an escaping name, absolute and relative
    + len(ENGINE_TAMPERING)
    + 3  # CLI: a bomb image, an absurd-rate wav, a code-running unet.pth
)

#: The number of hostile inputs one session of this file runs (the README states it).
TOTAL_CASES = HYPOTHESIS_CASES + EXPLICIT_CASES

#: Shared hypothesis settings: the same examples every session, no example database, no shrinking phase (a failure
#: is reported with the example that failed), a deadline per example of three loader calls.
FUZZ = settings(
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    deadline=3 * CALL_LIMIT_S * 1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, color_type: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (8 bits, ``color_type``), with little or no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def wav_bytes(
    rate: int, channels: int, bits: int = 16, tag: int = 1, data: bytes = b"\0" * 4000, block_align: int | None = None
) -> bytes:
    """A RIFF/WAVE file written field by field, so any header value (even a nonsense one) can be stated."""
    align = (channels * bits // 8) & 0xFFFF if block_align is None else block_align
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * max(align, 1)) & 0xFFFFFFFF, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


class Decoded(BaseException):
    """Raised by the decode spy; a BaseException so that no ``except Exception`` in the loader can swallow it."""


@pytest.fixture
def no_pixel_decoding(monkeypatch, tmp_path):
    """Make any attempt to decode pixel data fail loudly: a refused bomb must be refused from its header.

    The fixture checks that the spy is armed: loading a valid 8 x 8 PNG raises ``Decoded``.
    """

    def spy(self, *args, **kwargs):
        raise Decoded(f"pixel data of a {self.size} image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    for plugin in ("WebPImagePlugin", "GifImagePlugin", "PngImagePlugin", "JpegImagePlugin"):
        module = __import__(f"PIL.{plugin}", fromlist=["_"])
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, ImageFile.ImageFile) and "load" in vars(cls):
                monkeypatch.setattr(cls, "load", spy)
    valid = tmp_path / "armed.png"
    Image.new("RGB", (8, 8)).save(valid)
    with pytest.raises(Decoded):
        load_image(valid)


LOADERS = {load_image: ImageError, probe_audio: AudioError, load_audio: AudioError}


def call(fn, path: Path):
    """Call a loader on ``path``; return its result or its typed error (any other exception propagates).

    Checks that the call took less than ``CALL_LIMIT_S``, that an error is the loader's own type and names the
    file, and that a result is sane: an RGB image within the pixel limit, an ``AudioInfo`` with a plausible rate,
    or a finite float32 1-D array.
    """
    start = time.monotonic()
    try:
        result = fn(path)
    except LOADERS[fn] as exc:
        result = exc
        assert exc.path == os.fspath(path) and str(exc).startswith(os.fspath(path)), str(exc)
    elapsed = time.monotonic() - start
    assert elapsed < CALL_LIMIT_S, f"{fn.__name__}({path}) took {elapsed:.1f} s"
    if isinstance(result, Exception):
        return result
    if fn is load_image:
        assert isinstance(result, Image.Image) and result.mode == "RGB"
        width, height = result.size
        assert 1 <= width * height <= MAX_IMAGE_PIXELS
        assert np.asarray(result).shape == (height, width, 3)
    elif fn is probe_audio:
        assert isinstance(result, AudioInfo)
        assert MIN_AUDIO_SAMPLE_RATE <= result.sample_rate <= MAX_AUDIO_SAMPLE_RATE and result.channels >= 1
        assert math.isfinite(result.duration_s) and result.duration_s >= 0
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.float32 and result.ndim == 1
        assert result.size >= 1 and np.isfinite(result).all()
    return result


def call_all(path: Path) -> dict:
    """``call`` every loader on ``path``; returns ``{loader: result or typed error}``."""
    return {fn: call(fn, path) for fn in LOADERS}


class Scratch:
    """A fresh file name per hypothesis example (function-scoped ``tmp_path`` is shared by all examples)."""

    def __init__(self, root: Path):
        self.root, self.count = root, 0

    def write(self, data: bytes, ext: str) -> Path:
        """Write ``data`` to a new file named ``case<N>.<ext>`` (no suffix when ``ext`` is empty)."""
        self.count += 1
        path = self.root / (f"case{self.count}.{ext}" if ext else f"case{self.count}")
        path.write_bytes(data)
        return path


@pytest.fixture
def scratch(tmp_path) -> Scratch:
    """A :class:`Scratch` writing into this test's ``tmp_path``."""
    return Scratch(tmp_path)


def _encode_audio(path: Path, codec: str, rate: int, layout: str, seconds: float) -> Path:
    channels = av.AudioLayout(layout).nb_channels
    t = np.arange(int(rate * seconds)) / rate
    data = np.stack([0.3 * np.sin(2 * np.pi * (300 + 110 * c) * t) for c in range(channels)]).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name,
            layout=layout,
            rate=rate,
            frame_size=stream.codec_context.frame_size or 1024,
        )
        # packed input: PyAV's planar from_ndarray has the same 8+ channel plane bug as to_ndarray
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T).reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = rate
        n = 0
        for f in resampler.resample(frame) + resampler.resample(None):
            f.pts = n
            n += f.samples
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))
    return path


def _gradient(n: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([(xx * 5 + i * 9) % 256, (yy * 7) % 256, (xx + yy + i) % 256], -1) for i in range(n)]
    return np.stack(frames).astype(np.uint8)


SOURCE_NAMES = ("png", "jpg", "webp", "wav", "mp3", "m4a", "flac", "mp4_video_only", "mp4_with_audio")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, dict]:
    """Real, valid files of every input kind, small so that prefixes reach every header field.

    Each entry: ``path``, ``bytes``, and what its full decode gives: ``size`` (images) or ``rate``,
    ``channels`` and ``samples`` (the 16 kHz length of ``load_audio``; audio).
    """
    d = tmp_path_factory.mktemp("sources")
    image = _gradient(1, 24, 40)[0]
    out: dict[str, dict] = {}
    for ext, kwargs in (("png", {}), ("jpg", {"quality": 90}), ("webp", {"quality": 80})):
        path = d / f"face.{ext}"
        Image.fromarray(image).save(path, **kwargs)
        out[ext] = {"path": path, "size": (40, 24)}
    t = np.arange(4000) / 16000
    write_wav(d / "speech.wav", 0.4 * np.sin(2 * np.pi * 220 * t), 16000)
    out["wav"] = {"path": d / "speech.wav"}
    out["mp3"] = {"path": _encode_audio(d / "speech.mp3", "libmp3lame", 22050, "mono", 0.5)}
    out["m4a"] = {"path": _encode_audio(d / "speech.m4a", "aac", 22050, "mono", 0.5)}
    out["flac"] = {"path": _encode_audio(d / "speech.flac", "flac", 22050, "stereo", 0.5)}
    with VideoWriter(d / "video_only.mp4", fps=25, width=32, height=32) as writer:
        writer.write(_gradient(4, 32, 32))
    out["mp4_video_only"] = {"path": d / "video_only.mp4"}
    with VideoWriter(d / "with_audio.mp4", fps=25, width=32, height=32, audio=out["wav"]["path"]) as writer:
        writer.write(_gradient(4, 32, 32))
    out["mp4_with_audio"] = {"path": d / "with_audio.mp4"}
    for name, entry in out.items():
        entry["bytes"] = entry["path"].read_bytes()
        if "size" not in entry and name != "mp4_video_only":
            info = probe_audio(entry["path"])
            entry.update(rate=info.sample_rate, channels=info.channels, samples=len(load_audio(entry["path"])))
    assert set(out) == set(SOURCE_NAMES)
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. Hostile media files, property-based
# --------------------------------------------------------------------------------------------------------------------

MAGIC = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"RIFF\x24\x00\x00\x00WEBPVP8 ",
    b"ID3\x04\x00\x00",
    b"\xff\xfb\x90\x64",
    b"fLaC\x00\x00\x00\x22",
    b"\x00\x00\x00\x20ftypisom",
    b"OggS\x00\x02",
    b"GIF89a",
)


def test_random_bytes_under_every_extension(scratch):
    """Random bytes, alone or behind a real format's magic number, under each extension: typed error or sane."""
    seen = []

    @settings(FUZZ, max_examples=RANDOM_BYTES_EXAMPLES)
    @given(magic=st.sampled_from(MAGIC), body=st.binary(min_size=1, max_size=4096), ext=st.sampled_from(EXTENSIONS))
    def check(magic, body, ext):
        seen.append(ext)
        path = scratch.write(magic + body, ext)
        call_all(path)
        path.unlink()

    check()
    assert len(seen) == RANDOM_BYTES_EXAMPLES
    assert set(seen) == set(EXTENSIONS)


def _cut(data: bytes, cut) -> bytes:
    n = cut if isinstance(cut, int) else int(cut * len(data))
    return data[: max(1, min(n, len(data)))]


def test_truncated_real_files_under_any_extension(scratch, sources):
    """A prefix of a real file (the header alone, half the data, all of it), under its own or another extension.

    An image that still loads has its full size; audio that still probes has the original rate and channel
    count, and decodes to no more than the whole file does (plus one codec frame).
    """
    seen = []

    @settings(FUZZ, max_examples=PREFIX_EXAMPLES)
    @given(
        source=st.sampled_from(SOURCE_NAMES),
        cut=st.one_of(st.integers(0, 1024), st.floats(0, 1)),
        ext=st.sampled_from(EXTENSIONS),
    )
    def check(source, cut, ext):
        seen.append(source)
        entry = sources[source]
        data = _cut(entry["bytes"], cut)
        results = call_all(scratch.write(data, ext))
        image, info, samples = results[load_image], results[probe_audio], results[load_audio]
        if isinstance(image, Image.Image):
            assert "size" in entry and image.size == entry["size"], (source, len(data))
        if isinstance(info, AudioInfo):
            assert "rate" in entry and (info.sample_rate, info.channels) == (entry["rate"], entry["channels"])
        if isinstance(samples, np.ndarray):
            assert "samples" in entry and len(samples) <= entry["samples"] + 2048 * 16000 // entry["rate"]

    check()
    assert len(seen) == PREFIX_EXAMPLES
    assert set(seen) == set(SOURCE_NAMES)


def test_real_files_with_overwritten_bytes(scratch, sources):
    """A prefix of a real file with 1 to 8 bytes overwritten anywhere (headers included): typed error or sane."""
    seen = []

    @settings(FUZZ, max_examples=MUTATION_EXAMPLES)
    @given(
        source=st.sampled_from(SOURCE_NAMES),
        cut=st.floats(0.05, 1),
        edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
        ext=st.sampled_from(EXTENSIONS),
    )
    def check(source, cut, edits, ext):
        seen.append(source)
        data = bytearray(_cut(sources[source]["bytes"], cut))
        for where, value in edits:
            data[int(where * len(data))] = value
        call_all(scratch.write(bytes(data), ext))

    check()
    assert len(seen) == MUTATION_EXAMPLES


RATES = st.one_of(
    st.sampled_from(
        [0, 1, 2, 3999, 4000, 8000, 16000, 44100, 768000, 768001, 2**31 - 1, 2**31, 4_000_000_000, 2**32 - 1]
    ),
    st.integers(MIN_AUDIO_SAMPLE_RATE, MAX_AUDIO_SAMPLE_RATE),
    st.integers(0, 2**32 - 1),
)
CHANNELS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 6, 8, 9, 64, 65, 255, 65535]), st.integers(1, 16), st.integers(0, 65535)
)
BITS = st.one_of(st.sampled_from([0, 1, 4, 8, 16, 24, 32, 64, 65535]), st.integers(0, 65535))
TAGS = st.sampled_from([0, 1, 2, 3, 6, 7, 0x11, 0x55, 0xFFFE, 0xFFFF])


def test_wav_headers_with_absurd_fields(scratch):
    """Any sample rate (0 Hz to 4 GHz), channel count (0 to 65535), sample size, format tag and block align.

    A rate outside ``MIN_AUDIO_SAMPLE_RATE..MAX_AUDIO_SAMPLE_RATE`` is always refused (1 Hz would turn 4 kB of
    samples into more than an hour of audio, gigabytes once resampled to 16 kHz); a header that probes states
    its own rate and channel count; no WAV is an image.
    """
    seen = []

    @settings(FUZZ, max_examples=WAV_HEADER_EXAMPLES)
    @example(rate=0, channels=1, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @example(rate=1, channels=1, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @example(rate=4_000_000_000, channels=1, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @example(rate=1, channels=1, bits=16, tag=1, align=None, data=b"\0" * 200_000)  # 100000 s at 1 Hz
    @example(rate=16000, channels=0, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @example(rate=16000, channels=255, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @example(rate=16000, channels=65535, bits=16, tag=1, align=None, data=b"\1\2" * 2000)
    @given(
        rate=RATES,
        channels=CHANNELS,
        bits=BITS,
        tag=TAGS,
        align=st.one_of(st.none(), st.integers(0, 65535)),
        data=st.one_of(st.binary(max_size=4096), st.integers(0, 8192).map(lambda n: b"\0" * n)),
    )
    def check(rate, channels, bits, tag, align, data):
        seen.append(rate)
        path = scratch.write(wav_bytes(rate, channels, bits, tag, data, align), "wav")
        results = call_all(path)
        assert isinstance(results[load_image], ImageError)
        if not MIN_AUDIO_SAMPLE_RATE <= rate <= MAX_AUDIO_SAMPLE_RATE:
            assert isinstance(results[probe_audio], AudioError) and isinstance(results[load_audio], AudioError)
        info = results[probe_audio]
        if isinstance(info, AudioInfo):
            assert (info.sample_rate, info.channels) == (rate, channels)
        path.unlink()

    check()
    assert len(seen) == WAV_HEADER_EXAMPLES + WAV_HEADER_EXPLICIT


def test_float_wavs_with_nan_inf_and_huge_values(scratch):
    """Float WAVs: NaN or infinite samples (also float64 values past the float32 range) and samples beyond
    ``MAX_SAMPLE_MAGNITUDE`` are refused by ``load_audio``; anything else decodes to finite samples, exactly the
    input when it is already 16 kHz mono float32."""
    seen = []

    @settings(FUZZ, max_examples=FLOAT_WAV_EXAMPLES)
    @example(width=32, channels=1, rate=16000, values=[0.1, math.nan, 0.2])
    @example(width=32, channels=1, rate=16000, values=[0.1, math.inf, 0.2])
    @example(width=32, channels=2, rate=44100, values=[0.1, -math.inf, 0.2, 0.0])
    @example(width=32, channels=1, rate=22050, values=[3e38, -3e38] * 200)
    @example(width=64, channels=1, rate=22050, values=[1e300, 0.5] * 50)
    @given(
        width=st.sampled_from([32, 64]),
        channels=st.integers(1, 2),
        rate=st.sampled_from([8000, 16000, 22050, 48000]),
        values=st.lists(
            st.one_of(st.floats(-1, 1), st.floats(allow_nan=True, allow_infinity=True)), min_size=0, max_size=600
        ),
    )
    def check(width, channels, rate, values):
        seen.append(width)
        with np.errstate(over="ignore"):
            raw = np.array(values, dtype="<f4" if width == 32 else "<f8")
            frames = raw[: len(raw) // channels * channels].reshape(-1, channels)
            as_f32 = frames.astype(np.float32)
        path = scratch.write(wav_bytes(rate, channels, width, 3, raw.tobytes()), "wav")
        info = call(probe_audio, path)
        assert isinstance(info, AudioInfo) and (info.sample_rate, info.channels) == (rate, channels)
        result = call(load_audio, path)
        if as_f32.size == 0:  # no complete sample frame: "no audio samples" or "cannot decode", both typed
            assert isinstance(result, AudioError)
        elif not np.isfinite(as_f32).all():
            assert isinstance(result, AudioError) and "NaN or infinite" in str(result)
        elif np.abs(as_f32).max() > MAX_SAMPLE_MAGNITUDE:
            assert isinstance(result, AudioError) and "far outside [-1, 1]" in str(result)
        else:
            assert isinstance(result, np.ndarray)
            if rate == 16000 and channels == 1 and width == 32:
                assert np.array_equal(result, as_f32[:, 0])

    check()
    assert len(seen) == FLOAT_WAV_EXAMPLES + FLOAT_WAV_EXPLICIT


@pytest.mark.parametrize("case", MANY_CHANNELS)
def test_audio_with_eight_or_more_channels_decodes_to_their_mean(tmp_path, case):
    """A 7.1 FLAC, 9- and 64-channel WAVs load as the mean of their channels.

    Regression: planar frames of 8 or more channels made PyAV's ``AudioFrame.planes`` read past FFmpeg's
    pointer array, and ``load_audio`` crashed the whole process (found by the WAV header property above).
    """
    rate = 16000
    if case == "flac_7.1":
        path = _encode_audio(tmp_path / "surround.flac", "flac", rate, "7.1", 0.5)
        t = np.arange(rate // 2) / rate
        source = np.stack([0.3 * np.sin(2 * np.pi * (300 + 110 * c) * t) for c in range(8)]).astype(np.float32)
        expected = (np.round(source * 32768) / 32768).mean(axis=0)
        tolerance = 2 / 32768
    else:
        channels = int(case.split("_")[1].removesuffix("ch"))
        ints = (np.arange(channels * 1000) * 37 % 20000 - 10000).astype("<i2")
        path = tmp_path / f"{case}.wav"
        path.write_bytes(wav_bytes(rate, channels, 16, 1, ints.tobytes()))
        expected = (ints.reshape(-1, channels).astype(np.float64) / 32768).mean(axis=1)
        tolerance = 1e-6
    samples = call(load_audio, path)
    assert isinstance(samples, np.ndarray) and samples.shape == expected.shape, samples
    assert np.abs(samples - expected).max() <= tolerance


def _mp3_without_header_frame(data: bytes) -> bytes:
    """The audio frames of an mp3 written by LAME: without its ID3v2 tag and its first (Xing/Info) frame."""
    pos = 0
    if data[:3] == b"ID3":
        pos = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
    assert data[pos] == 0xFF and data[pos + 1] & 0xE0 == 0xE0, "not an MPEG audio frame"
    mpeg1 = (data[pos + 1] >> 3) & 3 == 3
    kbps = (
        (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
        if mpeg1
        else (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
    )[data[pos + 2] >> 4]
    rate = ((44100, 48000, 32000) if mpeg1 else (22050, 24000, 16000))[(data[pos + 2] >> 2) & 3]
    length = (144 if mpeg1 else 72) * kbps * 1000 // rate + ((data[pos + 2] >> 1) & 1)
    return data[pos + length :]


@pytest.mark.parametrize("case", MIDSTREAM_CHANGES)
def test_mp3_whose_channels_or_rate_change_midstream(tmp_path, case):
    """Two mp3s glued together (``cat a.mp3 b.mp3``), the second stereo or at another rate: refused as one
    AudioError (it escaped as numpy's ValueError, or decoded at the wrong speed, before)."""
    first = _encode_audio(tmp_path / "first.mp3", "libmp3lame", 22050, "mono", 0.5)
    second = _encode_audio(
        tmp_path / "second.mp3",
        "libmp3lame",
        *{"mono_then_stereo": (22050, "stereo"), "22050_then_44100": (44100, "mono")}[case],
        0.5,
    )
    path = tmp_path / "glued.mp3"
    path.write_bytes(first.read_bytes() + _mp3_without_header_frame(second.read_bytes()))
    assert isinstance(call(probe_audio, path), AudioInfo)  # the header is fine; the stream is not
    error = call(load_audio, path)
    assert isinstance(error, AudioError) and "changes inside the stream" in str(error), error


@st.composite
def over_the_limit(draw) -> tuple[int, int]:
    """(width, height) with width * height > MAX_IMAGE_PIXELS, each within PNG's 2**31 - 1."""
    width = draw(st.integers(1, 2**31 - 1))
    height = draw(st.integers(MAX_IMAGE_PIXELS // width + 1, 2**31 - 1))
    return width, height


def test_png_headers_declaring_too_many_pixels(scratch, no_pixel_decoding):
    """A PNG whose IHDR declares more than ``MAX_IMAGE_PIXELS`` is refused from the header: no pixel is decoded."""
    seen = []

    @settings(FUZZ, max_examples=PNG_BOMB_EXAMPLES)
    @example(dims=(100_000, 100_000), color_type=2)
    @example(dims=(9000, 9000), color_type=6)  # 81 M pixels: over our limit, under Pillow's own bomb guard
    @example(dims=(2**31 - 1, 2**31 - 1), color_type=0)
    @given(dims=over_the_limit(), color_type=st.sampled_from([0, 2, 3, 4, 6]))
    def check(dims, color_type):
        seen.append(dims)
        path = scratch.write(png_bytes(*dims, color_type=color_type), "png")
        error = call(load_image, path)
        assert isinstance(error, ImageError)
        assert "more than the limit" in str(error) or "too large to decode safely" in str(error)

    check()
    assert len(seen) == PNG_BOMB_EXAMPLES + PNG_BOMB_EXPLICIT


def _bomb(kind: str) -> bytes:
    import io

    buffer = io.BytesIO()
    if kind == "png_100000":
        return png_bytes(100_000, 100_000)
    if kind == "jpeg_65500":
        Image.new("RGB", (16, 16)).save(buffer, "JPEG")
        data = bytearray(buffer.getvalue())
        sof = data.find(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
        return bytes(data)
    if kind.startswith("webp_"):
        side = int(kind.split("_")[1])
        Image.new("RGB", (16, 16)).save(buffer, "WEBP", lossless=True)
        data = bytearray(buffer.getvalue())
        at = data.find(b"VP8L") + 9  # after the chunk size and the 0x2f signature: 14 bits w-1, 14 bits h-1
        old = int.from_bytes(data[at : at + 4], "little")
        data[at : at + 4] = struct.pack("<I", (old & ~((1 << 28) - 1)) | (side - 1) | ((side - 1) << 14))
        return bytes(data)
    if kind == "gif_65535":
        return (
            b"GIF89a"
            + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
            + b","
            + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
            + b"\x02\x02\x44\x01\x00;"
        )
    raise ValueError(kind)


@pytest.mark.parametrize("kind", IMAGE_BOMBS)
def test_image_bombs_of_other_formats_are_refused_from_the_header(tmp_path, no_pixel_decoding, kind):
    """JPEG, WebP and GIF headers declaring up to 4.3 G pixels: refused before any pixel is decoded, naming the file."""
    path = tmp_path / f"bomb.{kind.split('_')[0]}"
    path.write_bytes(_bomb(kind))
    error = call(load_image, path)
    assert isinstance(error, ImageError), error
    assert "more than the limit" in str(error) or "too large to decode safely" in str(error)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_zero_length_file_and_directory_under_every_extension(tmp_path, ext):
    """A zero-length file and a directory, named with each extension: every loader says so, naming the path."""
    name = f"input.{ext}" if ext else "input"
    empty = tmp_path / "empty" / name
    empty.parent.mkdir()
    empty.write_bytes(b"")
    directory = tmp_path / "dir" / name
    directory.mkdir(parents=True)
    for path, reason in ((empty, "empty (0 bytes)"), (directory, "is a directory")):
        for fn, error in call_all(path).items():
            assert isinstance(error, LOADERS[fn]) and reason in str(error), (fn.__name__, path, error)


@pytest.mark.parametrize("case", WRONG_EXTENSIONS)
def test_wrong_extension(tmp_path, sources, case):
    """Content decides, not the extension: audio named .png is not an image (and still decodes as audio), an image
    named .wav is not audio, a video with no audio track named .m4a has no audio stream."""
    source, ext = {
        "wav_as_png": ("wav", "png"),
        "png_as_wav": ("png", "wav"),
        "mp3_as_jpg": ("mp3", "jpg"),
        "jpg_as_mp3": ("jpg", "mp3"),
        "video_as_m4a": ("mp4_video_only", "m4a"),
    }[case]
    path = tmp_path / f"renamed.{ext}"
    path.write_bytes(sources[source]["bytes"])
    results = call_all(path)
    if source in ("png", "jpg"):
        assert results[load_image].size == sources[source]["size"]
        assert isinstance(results[probe_audio], AudioError) and isinstance(results[load_audio], AudioError)
    else:
        assert isinstance(results[load_image], ImageError) and "not a recognised image" in str(results[load_image])
    if source in ("wav", "mp3"):
        assert np.array_equal(results[load_audio], load_audio(sources[source]["path"]))
    if source == "mp4_video_only":
        assert "has no audio stream" in str(results[probe_audio]) and "has no audio stream" in str(results[load_audio])


# --------------------------------------------------------------------------------------------------------------------
# 3a. Untrusted model files: pickles that would run code
# --------------------------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this runs ``touch SENTINEL``: harmless, and detectable."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


def write_code_pickle(path: Path, fmt: str, sentinel: Path, tensors: dict | None = None) -> Path:
    """Write a checkpoint in format ``fmt`` that runs ``touch sentinel`` when unpickled without restrictions."""
    state = {**(tensors or {"w": torch.zeros(2)}), "payload": RunsCode(sentinel)}
    if fmt == "torch_zip":
        torch.save(state, path)
    elif fmt == "torch_zip_top_level":
        torch.save(RunsCode(sentinel), path)
    elif fmt == "torch_legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif fmt.startswith("pickle_protocol_"):
        path.write_bytes(pickle.dumps(RunsCode(sentinel), protocol=int(fmt[-1])))
    else:
        raise ValueError(fmt)
    return path


@pytest.mark.parametrize("fmt", PICKLE_FORMATS)
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, fmt):
    """torch zip and legacy formats, and bare pickles: CheckpointError naming the file; the code never runs."""
    sentinel = tmp_path / "SENTINEL"
    path = write_code_pickle(tmp_path / "evil.pth", fmt, sentinel)
    with pytest.raises(CheckpointError, match="--trust-pickle") as info:
        read_state_dict(path)
    assert info.value.path == str(path) and str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)
    assert not sentinel.exists()


def test_the_payload_is_live_when_trusted(tmp_path):
    """Control for the test above: with trust_pickle=True the same file does run its code (then is refused as not
    a state dict), so the sentinel's absence there means something."""
    sentinel = tmp_path / "SENTINEL"
    path = write_code_pickle(tmp_path / "evil.pth", "torch_zip", sentinel)
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        read_state_dict(path, trust_pickle=True)
    assert sentinel.exists()


@pytest.fixture
def evil_model(demo_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the demo checkpoint whose Sonic/unet.pth holds the real tensors plus a code-running object.

    Returns (model directory, sentinel path the payload would create)."""
    model = Path(shutil.copytree(demo_dir, tmp_path / "model"))
    sentinel = tmp_path / "SENTINEL"
    real = torch.load(model / "Sonic/unet.pth", weights_only=True)
    write_code_pickle(model / "Sonic/unet.pth", "torch_zip", sentinel, tensors=real)
    return model, sentinel


def test_runtime_refuses_a_code_running_unet(evil_model):
    """``Runtime(model_dir)`` with a code-running Sonic/unet.pth: CheckpointError naming it; the code never runs."""
    model, sentinel = evil_model
    with pytest.raises(CheckpointError, match="--trust-pickle") as info:
        sonic_rt.Runtime(model, device="cpu")
    assert info.value.path == str(model.resolve() / "Sonic/unet.pth")
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------------------------
# 3b. Tampered engine directories
# --------------------------------------------------------------------------------------------------------------------


def test_verify_files_refuses_names_that_leave_the_directory(tmp_path):
    """Even when the outside file exists and matches its sha256, a name that escapes the engine directory is
    refused before it is read."""
    root = tmp_path / "engines"
    root.mkdir()
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not yours")
    digest = sha256_file(outside)
    for name in ("../outside.onnx", str(outside)):
        with pytest.raises(EngineError, match="not a plain path inside the engine directory") as info:
            verify_files(root, {name: digest}, {})
        assert info.value.path == str(root / "manifest.json")


def _tamper(engine: Path, case: str, outside: Path) -> str:
    """Apply tampering ``case`` to the engine directory copy; return a regex the EngineError must match."""
    manifest_path = engine / "manifest.json"
    text = manifest_path.read_text()
    manifest = json.loads(text)
    unet = manifest["graphs"]["unet"]
    support = next(iter(manifest["files"]))
    if case == "truncated_manifest":
        manifest_path.write_text(text[: len(text) // 2])
        return "manifest.json is unreadable"
    if case == "manifest_is_a_list":
        manifest_path.write_text(json.dumps([manifest]))
        return "manifest format 'list'"
    if case == "support_file_missing":
        (engine / support).unlink()
        return f"{support} is missing"
    if case == "support_file_modified":
        with open(engine / support, "a") as f:
            f.write(" ")
        return f"{support} does not match its sha256"
    shutil.copy(engine / unet["artifact"], outside)  # an identical artifact outside the directory
    if case == "support_file_escapes":
        manifest["files"][f"../{outside.name}"] = sha256_file(outside)
        expect = "not a plain path inside the engine directory"
    elif case == "artifact_escapes":
        unet["files"] = {f"../{outside.name}": sha256_file(outside)}
        unet["artifact"] = f"../{outside.name}"
        expect = "not a plain path inside the engine directory"
    elif case == "artifact_absolute":
        unet["files"] = {str(outside): sha256_file(outside)}
        unet["artifact"] = str(outside)
        expect = "not a plain path inside the engine directory"
    elif case == "artifact_not_verified":  # files still lists unet.onnx (which verifies), artifact points elsewhere
        unet["artifact"] = str(outside)
        expect = "is not among the files whose sha256 is checked"
    elif case == "artifact_symlink_escapes":
        (engine / unet["artifact"]).unlink()
        (engine / unet["artifact"]).symlink_to(outside)
        expect = "resolves outside the engine directory"
    elif case == "graph_removed":
        del manifest["graphs"]["unet"]
        expect = "graph entries missing: unet"
    elif case == "backend_removed":
        del manifest["backend"]
        expect = "backend None is not one of"
    elif case == "spec_malformed":
        unet["spec"] = {"name": "unet"}
        expect = "malformed spec of graph unet"
    else:
        raise ValueError(case)
    manifest_path.write_text(json.dumps(manifest))
    return expect


@pytest.mark.parametrize("case", ENGINE_TAMPERING)
def test_tampered_engine_directory_is_refused(engine_dir, tmp_path, monkeypatch, case):
    """Each tampering is an EngineError naming the file concerned (the manifest, or the missing/changed file) and
    saying how to rebuild; no graph is ever loaded from outside the engine directory."""
    from sonic_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    engine = Path(shutil.copytree(engine_dir, tmp_path / "engines"))
    expect = _tamper(engine, case, tmp_path / "outside.onnx")
    loaded = []
    real_load = OnnxRuntimeBackend.load_graph.__func__

    def recording_load(cls, spec, path, *args, **kwargs):
        loaded.append(Path(path).resolve())
        return real_load(cls, spec, path, *args, **kwargs)

    monkeypatch.setattr(OnnxRuntimeBackend, "load_graph", classmethod(recording_load))
    with pytest.raises(EngineError, match=expect) as info:
        sonic_rt.Runtime(engine)
    assert str(info.value).startswith(str(engine.resolve())) and "\n" not in str(info.value)
    assert all(path.is_relative_to(engine.resolve()) for path in loaded), loaded
    if case not in ("truncated_manifest", "manifest_is_a_list"):
        assert "rebuild it: python -m export.build_engines" in str(info.value)
    with pytest.raises(EngineError):
        open_engine_dir(engine, None, None)


# --------------------------------------------------------------------------------------------------------------------
# 2 and 3a. The CLI on hostile files: exit 2, one line naming the file, nothing written
# --------------------------------------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m sonic_rt animate ARGS`` with the demo cache under ``tmp_path``."""
    env = dict(os.environ, SONIC_RT_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "sonic_rt", "animate", *args], capture_output=True, text=True, env=env, timeout=600
    )


def assert_one_error_line(result: subprocess.CompletedProcess, names: Path, outdir: Path) -> None:
    """Exit code 2, exactly one stderr line ``error: NAMES: ...``, and nothing at all in ``outdir``."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), result.stderr
    assert os.listdir(outdir) == []  # no OUT.mp4, no .OUT.*.partial.mp4


@pytest.mark.parametrize("bad", ["image", "audio"])
def test_cli_hostile_input_exits_2_with_one_line(tmp_path, portrait, speech, bad):
    """--demo with a decompression-bomb PNG (and good audio), or a 1 Hz WAV (and a good image)."""
    inputs, outdir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outdir.mkdir()
    if bad == "image":
        image, audio = inputs / "bomb.png", speech
        image.write_bytes(png_bytes(100_000, 100_000))
        hostile = image
    else:
        image, audio = portrait, inputs / "one_hertz.wav"
        audio.write_bytes(wav_bytes(1, 1, data=b"\0" * 200_000))
        hostile = audio
    result = run_cli(tmp_path, "--demo", "--image", str(image), "--audio", str(audio), "--out", str(outdir / "OUT.mp4"))
    assert_one_error_line(result, hostile, outdir)


def test_cli_code_running_unet_exits_2_with_one_line(evil_model, tmp_path, portrait, speech):
    """``animate --model`` on a demo copy whose unet.pth runs code: exit 2, one line naming it, code never run."""
    model, sentinel = evil_model
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = run_cli(
        tmp_path,
        "--model",
        str(model),
        "--image",
        str(portrait),
        "--audio",
        str(speech),
        "--out",
        str(outdir / "OUT.mp4"),
        "--device",
        "cpu",
    )
    assert_one_error_line(result, model.resolve() / "Sonic/unet.pth", outdir)
    assert "--trust-pickle" in result.stderr
    assert not sentinel.exists()


def test_stated_case_count():
    """The README's "the suite runs N cases": update both when a count above changes."""
    assert (HYPOTHESIS_CASES, EXPLICIT_CASES, TOTAL_CASES) == (3615, 57, 3672)
