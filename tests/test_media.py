"""Tests of sonic_rt.media: image loading, audio probing/decoding/resampling, mp4 writing and reading.

All inputs are generated in tmp_path: speech with ``espeak-ng`` (tests skipped when it is absent),
tones written with PyAV, images written with Pillow.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soxr
from PIL import Image

from sonic_rt.errors import AudioError, ImageError, OutputPathError
from sonic_rt.media import (
    MAX_IMAGE_PIXELS,
    AudioInfo,
    VideoWriter,
    check_output_path,
    load_audio,
    load_image,
    probe_audio,
    read_video,
)

ESPEAK = shutil.which("espeak-ng")
NO_ESPEAK = "espeak-ng is not installed (apt-get install espeak-ng)"
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason=NO_ESPEAK)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_FRAME_SIZE = {"aac": 1024, "libmp3lame": 1152, "libopus": 960}


def write_audio(path: Path, data: np.ndarray, sr: int, codec: str, layout: str) -> Path:
    """Write ``data`` ([channels, n], int16 or float32 in [-1, 1]) with PyAV."""
    fmt = "s16p" if data.dtype == np.int16 else "fltp"
    with av.open(str(path), "w") as oc:
        st = oc.add_stream(codec, rate=sr, layout=layout)
        fmt_out = st.codec_context.format.name
        rs = av.AudioResampler(format=fmt_out, layout=layout, rate=sr, frame_size=_FRAME_SIZE.get(codec, 1024))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate = sr
        n = 0
        for f in rs.resample(frame) + rs.resample(None):
            f.pts = n
            n += f.samples
            oc.mux(st.encode(f))
        oc.mux(st.encode(None))
    return path


def stereo_tone(sr: int = 44100, seconds: float = 2.0) -> np.ndarray:
    """int16 [2, n]: 440 Hz on the left, 660 Hz at another level on the right (channels differ)."""
    t = np.arange(int(round(sr * seconds))) / sr
    left = 0.3 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 660 * t + 1.0)
    return np.round(np.stack([left, right]) * 32767).astype(np.int16)


def mono_tone(sr: int = 22050, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return np.round(0.4 * np.sin(2 * np.pi * 300 * t)[None] * 32767).astype(np.int16)


def decoded_samples(path: Path) -> tuple[int, int]:
    """(decoded sample count, sample rate) of the first audio stream."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return sum(f.samples for f in c.decode(s)), s.codec_context.sample_rate


def gradient(n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n, h, w, 3] smooth moving gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for i in range(n):
        r = 127.5 + 100 * np.sin(2 * np.pi * (xx + 2 * i) / w)
        g = 127.5 + 100 * np.cos(2 * np.pi * (yy + i) / h)
        b = 40 + 175 * (xx + yy) / (w + h)
        frames.append(np.stack([r, g, b], -1))
    return np.round(np.stack(frames)).astype(np.uint8)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height RGB, with a few bytes of (all-zero) pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    if ESPEAK is None:
        pytest.skip(NO_ESPEAK)
    p = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([ESPEAK, "-w", str(p), "The quick brown fox jumps over the lazy dog."], check=True)
    return p


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tones")
    st = stereo_tone()
    return {
        "wav": write_audio(d / "stereo.wav", st, 44100, "pcm_s16le", "stereo"),
        "flac": write_audio(d / "stereo.flac", st, 44100, "flac", "stereo"),
        "mp3": write_audio(d / "stereo.mp3", st, 44100, "libmp3lame", "stereo"),
        "m4a": write_audio(d / "stereo.m4a", st, 44100, "aac", "stereo"),
        "ogg": write_audio(d / "mono48k.ogg", mono_tone(48000, 2.0), 48000, "libopus", "mono"),
        "mono_wav": write_audio(d / "mono.wav", mono_tone(), 22050, "pcm_s16le", "mono"),
    }


@pytest.fixture(scope="module")
def video_only(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vid") / "video_only.mp4"
    with VideoWriter(p, fps=25, width=32, height=32) as w:
        w.write(gradient(5, 32, 32))
    return p


# --------------------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_load_audio_lossless_exact_length(tones, kind):
    y = load_audio(tones[kind])
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.shape[0] == 32000  # 2.0 s * 16 kHz, exact for lossless input


def test_load_audio_lossy_lengths(tones):
    # mp3: LAME writes a gapless header, FFmpeg trims priming/padding; allow one mp3 frame (1152 samples
    # at 44.1 kHz = 418 samples at 16 kHz) in case of an encoder without it.
    n_mp3 = load_audio(tones["mp3"]).shape[0]
    assert abs(n_mp3 - 32000) <= 419
    # m4a/aac: priming is trimmed by the edit list, the end is padded to whole 1024-sample frames
    # (up to 1023 samples at 44.1 kHz = 372 at 16 kHz).
    n_aac = load_audio(tones["m4a"]).shape[0]
    assert 32000 <= n_aac <= 32000 + 372
    # ogg/opus at 48 kHz mono: pre-skip trimmed, end padding up to one 960-sample packet (320 at 16 kHz).
    n_ogg = load_audio(tones["ogg"]).shape[0]
    assert 32000 <= n_ogg <= 32000 + 320


@pytest.mark.parametrize("kind", ["mp3", "m4a", "ogg"])
def test_load_audio_lossy_content(tones, kind):
    """Lossy decodes are aligned with the source (priming removed) and close to it."""
    if kind == "ogg":
        ref = (0.4 * np.sin(2 * np.pi * 300 * np.arange(32000) / 16000)).astype(np.float32)
    else:
        ref = load_audio(tones["wav"])
    y = load_audio(tones[kind])
    assert np.corrcoef(ref[1000:30000], y[1000:30000])[0, 1] > 0.99


def test_load_audio_mono_average(tones):
    """At the native rate there is no resampling: output is exactly the mean of L and R (s16 / 32768)."""
    st = stereo_tone().astype(np.float32) / 32768
    y = load_audio(tones["wav"], sample_rate=44100)
    assert y.shape == (88200,)
    np.testing.assert_allclose(y, st.mean(axis=0), atol=1e-7)
    # the channels really differ, so this is not "left channel only"
    assert np.abs(y - st[0]).max() > 0.1 and np.abs(y - st[1]).max() > 0.1


def test_load_audio_parity_with_soxr(tones):
    """Same as librosa.load(sr=16000): mean over channels, then soxr HQ resampling."""
    st = stereo_tone().astype(np.float32) / 32768
    ref = soxr.resample(st.mean(axis=0), 44100, 16000, quality="HQ")
    y = load_audio(tones["wav"])
    assert ref.shape == y.shape
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_load_audio_mono_22k(tones):
    y = load_audio(tones["mono_wav"])
    assert y.shape == (24000,)  # 1.5 s * 16 kHz
    y_native = load_audio(tones["mono_wav"], sample_rate=22050)
    np.testing.assert_allclose(y_native, mono_tone()[0] / 32768, atol=1e-7)


@needs_espeak
def test_load_audio_speech(speech_wav):
    n, sr = decoded_samples(speech_wav)
    assert sr == 22050
    y = load_audio(speech_wav)
    assert y.shape == (math.ceil(n * 16000 / sr),)
    assert np.sqrt(np.mean(y**2)) > 0.01  # there is speech in it
    info = probe_audio(speech_wav)
    assert info == AudioInfo(duration_s=pytest.approx(n / sr), sample_rate=22050, channels=1)


def test_probe_audio(tones):
    info = probe_audio(tones["wav"])
    assert info.sample_rate == 44100 and info.channels == 2
    assert info.duration_s == pytest.approx(2.0)
    info = probe_audio(tones["m4a"])
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration_s == pytest.approx(2.0, abs=0.05)


@needs_espeak
def test_load_audio_from_mp4_track(tmp_path, speech_wav):
    out = tmp_path / "talk.mp4"
    with VideoWriter(out, fps=25, width=32, height=32, audio=speech_wav) as w:
        w.write(gradient(10, 32, 32))
    n, sr = decoded_samples(speech_wav)
    y = load_audio(out)
    # AAC pads the end to whole 1024-sample frames: at most 1024 samples at 22.05 kHz (743 at 16 kHz)
    assert 0 <= y.shape[0] - math.ceil(n * 16000 / sr) <= 744
    ref = load_audio(speech_wav)
    assert np.corrcoef(ref, y[: ref.shape[0]])[0, 1] > 0.95


def _nan_wav(tmp_path: Path) -> Path:
    x = np.zeros((1, 8000), np.float32)
    x[0, 100] = np.nan
    x[0, 200] = np.inf
    return write_audio(tmp_path / "nan.wav", x, 16000, "pcm_f32le", "mono")


def test_audio_errors(tmp_path):
    cases = {
        "missing.wav": (None, "does not exist"),
        "empty.wav": (b"", "empty"),
        "garbage.wav": (np.random.default_rng(0).bytes(50_000), "cannot open"),
        "text.mp3": (b"this is not audio\n" * 100, "cannot open|no audio"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        for fn in (probe_audio, load_audio):
            with pytest.raises(AudioError, match=message) as ei:
                fn(p)
            assert name in str(ei.value), name
    (tmp_path / "dir.wav").mkdir()
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path / "dir.wav")


def test_audio_error_no_audio_stream(video_only):
    for fn in (probe_audio, load_audio):
        with pytest.raises(AudioError, match="has no audio stream") as ei:
            fn(video_only)
        assert "video_only.mp4" in str(ei.value)


def test_audio_error_nan(tmp_path):
    p = _nan_wav(tmp_path)
    with pytest.raises(AudioError, match="contains NaN or infinite samples") as ei:
        load_audio(p)
    assert "nan.wav" in str(ei.value)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def _rgb_image(w: int = 48, h: int = 32) -> np.ndarray:
    return gradient(1, h, w)[0]


@pytest.mark.parametrize(
    "ext, kwargs, tol", [("png", {}, 0), ("webp", {"lossless": True}, 0), ("jpg", {"quality": 95}, 3)]
)
def test_load_image_formats(tmp_path, ext, kwargs, tol):
    arr = _rgb_image()
    p = tmp_path / f"face.{ext}"
    Image.fromarray(arr).save(p, **kwargs)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (48, 32)
    diff = np.abs(np.asarray(im).astype(int) - arr).mean()
    assert diff <= tol
    assert load_image(str(p)).size == (48, 32)


def test_load_image_modes(tmp_path):
    arr = _rgb_image()
    grey = arr[..., 0]
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 7, np.uint8)], -1)
    # arrays
    assert np.array_equal(np.asarray(load_image(arr)), arr)
    g = np.asarray(load_image(grey))
    assert g.shape == (32, 48, 3) and all(np.array_equal(g[..., c], grey) for c in range(3))
    assert np.array_equal(np.asarray(load_image(rgba)), arr)  # alpha dropped, not composited
    # PIL images in other modes
    for mode in ("L", "LA", "RGBA", "P", "I;16"):
        im = load_image(Image.fromarray(arr).convert(mode))
        assert im.mode == "RGB" and im.size == (48, 32)
    # files: grey and RGBA PNG
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), arr)


def test_load_image_exif_orientation(tmp_path):
    p = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_rgb_image(40, 20)).save(p, exif=exif)
    with Image.open(p) as raw:
        assert raw.size == (40, 20)
    assert load_image(p).size == (20, 40)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8), np.zeros((8,), np.uint8)]
)
def test_load_image_bad_arrays(bad):
    with pytest.raises(ImageError) as ei:
        load_image(bad)
    assert ei.value.path is None


def test_load_image_file_errors(tmp_path):
    big = tmp_path / "face.png"
    Image.fromarray(gradient(1, 256, 256)[0]).save(big)
    data = big.read_bytes()
    jpg = tmp_path / "face.jpg"
    Image.fromarray(gradient(1, 256, 256)[0]).save(jpg, quality=90)
    cases = {
        "missing.png": (None, "does not exist"),
        "truncated.png": (data[: len(data) // 2], "truncated"),
        "truncated.jpg": (jpg.read_bytes()[: jpg.stat().st_size // 2], "truncated"),
        "empty.png": (b"", "empty"),
        "text.png": (b"hello, I am not a picture\n" * 10, "not a recognised image"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(ImageError, match=message) as ei:
            load_image(p)
        assert name in str(ei.value), name
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path / "dir.png")


def test_load_image_too_many_pixels(tmp_path):
    # a real image larger than a small limit
    p = tmp_path / "face.png"
    Image.fromarray(_rgb_image(100, 50)).save(p)
    with pytest.raises(ImageError, match="5000 pixels, more than the limit of 4999") as ei:
        load_image(p, max_pixels=4999)
    assert "face.png" in str(ei.value)
    assert load_image(p, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(_rgb_image(100, 50), max_pixels=4999)
    # header-only PNGs: refused from the header alone (decoding would report truncation instead)
    with pytest.raises(ImageError, match="more than the limit") as ei:
        load_image(png_header_only(tmp_path / "huge.png", 9000, 9000))  # 81 M > 64 M
    assert "huge.png" in str(ei.value)
    with pytest.raises(ImageError, match="too large|more than the limit") as ei:
        load_image(png_header_only(tmp_path / "bomb.png", 20000, 20000))  # Pillow's bomb guard
    assert "bomb.png" in str(ei.value)
    assert MAX_IMAGE_PIXELS == 64_000_000


# --------------------------------------------------------------------------------------------------
# output path and video writer
# --------------------------------------------------------------------------------------------------


def test_check_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("out.mp4") == tmp_path.resolve() / "out.mp4"
    with pytest.raises(OutputPathError, match="must end in .mp4") as ei:
        check_output_path(tmp_path / "out.avi")
    assert "out.avi" in str(ei.value)
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "out.mp4")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OutputPathError, match="existing directory"):
        check_output_path(tmp_path / "dir.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a directory"):
        check_output_path(tmp_path / "file" / "out.mp4")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only directories")
def test_check_output_path_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(ro / "out.mp4")
    finally:
        ro.chmod(0o755)


@needs_espeak
def test_video_writer_roundtrip_with_speech(tmp_path, speech_wav):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.mp4"
    n_frames, h, w = 30, 64, 96
    frames = gradient(n_frames, h, w)
    with VideoWriter(out, fps=Fraction(25), width=w, height=h, audio=speech_wav) as vw:
        assert vw.path == out.resolve()
        assert vw.temp_path.parent == out_dir.resolve()
        assert vw.temp_path.name.startswith(".result.") and vw.temp_path.name.endswith(".partial.mp4")
        assert vw.temp_path.exists() and not out.exists()
        vw.write(frames[:10])
        vw.write(frames[10])  # a single [H, W, 3] frame
        vw.write(frames[11:])
        assert vw.frames_written == n_frames
    assert sorted(os.listdir(out_dir)) == ["result.mp4"]

    video, fps, audio_s = read_video(out)
    assert video.shape == (n_frames, h, w, 3) and video.dtype == np.uint8
    assert fps == 25.0
    n, sr = decoded_samples(speech_wav)
    # full audio kept (longer than the 1.2 s of video); AAC adds < 1 frame of padding
    assert audio_s > n_frames / 25
    assert abs(audio_s - n / sr) <= 1024 / sr + 0.05
    # H.264 crf 18 on a smooth gradient, yuv420p chroma subsampling: mean abs diff < 3 (levels of 255)
    assert np.abs(video.astype(int) - frames).mean() < 3
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == n_frames
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].format.name == "yuv420p"
        a = c.streams.audio[0]
        assert (a.codec_context.name, a.rate, a.channels) == ("aac", 22050, 1)


def test_video_writer_stereo_and_odd_rate(tmp_path, tones):
    """Stereo 44.1 kHz stays stereo 44.1 kHz; 5.1 at 37.8 kHz (not an AAC rate) becomes stereo 48 kHz."""
    out = tmp_path / "a.mp4"
    with VideoWriter(out, fps=30000 / 1001, width=32, height=32, audio=tones["wav"]) as vw:
        vw.write(gradient(3, 32, 32))
    video, fps, audio_s = read_video(out)
    assert video.shape[0] == 3 and fps == pytest.approx(30000 / 1001, abs=1e-9)
    assert abs(audio_s - 2.0) <= 1024 / 44100 + 0.05
    with av.open(str(out)) as c:
        assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (44100, 2)

    sr = 37800
    six = np.repeat(mono_tone(sr, 1.0), 6, axis=0)
    src = write_audio(tmp_path / "surround.wav", six, sr, "pcm_s16le", "5.1")
    out2 = tmp_path / "b.mp4"
    with VideoWriter(out2, fps=25, width=32, height=32, audio=src) as vw:
        vw.write(gradient(2, 32, 32))
    _, _, audio_s = read_video(out2)
    assert abs(audio_s - 1.0) <= 1024 / 48000 + 0.05
    with av.open(str(out2)) as c:
        assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (48000, 2)


def test_read_video_no_audio(video_only):
    video, fps, audio_s = read_video(video_only)
    assert video.shape == (5, 32, 32, 3) and fps == 25.0 and audio_s is None


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_video_writer_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out.mp4"
    with pytest.raises(exc):
        with VideoWriter(out, fps=25, width=32, height=32) as vw:
            vw.write(gradient(3, 32, 32))
            raise exc("stop")
    assert os.listdir(tmp_path) == []


def test_video_writer_does_not_clobber_on_failure(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(ValueError, match="shape"):
        with VideoWriter(out, fps=25, width=32, height=32) as vw:
            vw.write(gradient(2, 32, 32))
            vw.write(gradient(1, 32, 48))  # wrong size
    assert out.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.mp4"]
    # a successful write replaces it
    with VideoWriter(out, fps=25, width=32, height=32) as vw:
        vw.write(gradient(2, 32, 32))
    assert read_video(out)[0].shape[0] == 2
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_video_writer_without_with(tmp_path):
    out = tmp_path / "out.mp4"
    vw = VideoWriter(out, fps=25, width=32, height=32)
    vw.write(gradient(2, 32, 32))
    vw.abort()
    assert os.listdir(tmp_path) == []
    vw = VideoWriter(out, fps=12.5, width=32, height=32)
    vw.write(gradient(4, 32, 32))
    vw.close()
    vw.close()  # idempotent
    video, fps, _ = read_video(out)
    assert video.shape[0] == 4 and fps == 12.5
    with pytest.raises(ValueError, match="closed"):
        vw.write(gradient(1, 32, 32))


def test_video_writer_argument_errors(tmp_path, video_only):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="even"):
        VideoWriter(out, fps=25, width=33, height=32)
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(out, fps=0, width=32, height=32)
    with pytest.raises(OutputPathError):
        VideoWriter(tmp_path / "out.mov", fps=25, width=32, height=32)
    with pytest.raises(AudioError, match="has no audio stream"):
        VideoWriter(out, fps=25, width=32, height=32, audio=video_only)
    with pytest.raises(AudioError, match="does not exist"):
        VideoWriter(out, fps=25, width=32, height=32, audio=tmp_path / "nope.wav")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="uint8"):
        with VideoWriter(out, fps=25, width=32, height=32) as vw:
            vw.write(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="no video frames"):
        with VideoWriter(out, fps=25, width=32, height=32):
            pass
    assert os.listdir(tmp_path) == []
