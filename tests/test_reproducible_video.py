"""The same frames and sound make the same files, byte for byte: the mp4 (H.264 + AAC, the container) and the HLS
stream (playlist, init segment, media segments), in one process, in another process, and in a process that may use
only one core; and the same command run twice writes the same video.

The frames of the media tests are ones on which the bundled libx264, with its default settings on a CPU with
AVX-512, wrote a different file at every encode (macroblock-tree rate control in its AVX-512 assembly): a moving
pattern, a texture that fades in and out, and grain.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sonic_rt import media

FPS = Fraction(25)

# Writes the files of `kind` (mp4 or hls) from frames.npy (and audio.wav / samples.npy) into a folder, in a process
# that may use only the first of the cores this one may use.
WRITER = """
import os, sys
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import numpy as np
from sonic_rt import media
kind, folder = sys.argv[1], Path(sys.argv[2])
frames = np.load(folder / "frames.npy")
n, h, w, _ = frames.shape
if kind == "mp4":
    with media.VideoWriter(folder / "out.mp4", fps=25, width=w, height=h, audio=folder / "audio.wav") as writer:
        writer.write(frames)
else:
    samples = np.load(folder / "samples.npy")
    with media.HlsWriter(folder / "live.m3u8", fps=25, width=w, height=h, samples=samples) as writer:
        writer.write(frames)
"""


def hard_frames(n: int = 75, size: int = 64) -> np.ndarray:
    """uint8 RGB ``[n, size, size, 3]``, seeded: a moving sine pattern, an 8x8-block texture fading in and out, and
    Gaussian grain (sigma 6 levels)."""
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.uniform(0, 255, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    y, x = np.mgrid[0:size, 0:size] / size
    frames = []
    for i in range(n):
        t = i / 10
        img = (
            127
            + 60 * np.sin(6 * x + t)[..., None] * np.array([1.0, 0.5, 0.2])
            + 50 * np.cos(5 * y - 0.7 * t)[..., None]
        )
        img = img + 0.2 * np.sin(t) * blocks + rng.normal(0, 6, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    """float32 mono: a 220 Hz tone with a 3 Hz tremolo."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def in_another_process(kind: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRITER, kind, str(folder)], capture_output=True, text=True, timeout=120, env=os.environ
    )


def hls_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("live")}


def inputs(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, Path]:
    """3 s of :func:`hard_frames` at ``size`` pixels and of :func:`tone`, also saved in ``folder`` for
    :data:`WRITER`."""
    frames, samples = hard_frames(size=size), tone(3.0)
    np.save(folder / "frames.npy", frames)
    np.save(folder / "samples.npy", samples)
    return frames, samples, media.write_wav(folder / "audio.wav", samples)


def test_the_same_frames_and_sound_make_the_same_mp4_byte_for_byte_in_any_process(tmp_path):
    frames, _, audio = inputs(tmp_path, 64)  # at 64 px the previous settings gave a new file at every encode
    written = []
    for name in ("a.mp4", "b.mp4"):  # two writers in this process
        with media.VideoWriter(tmp_path / name, fps=FPS, width=64, height=64, audio=audio) as writer:
            writer.write(frames[:20])
            writer.write(frames[20:])
        written.append((tmp_path / name).read_bytes())
    other = in_another_process("mp4", tmp_path)
    assert other.returncode == 0, other.stderr
    written.append((tmp_path / "out.mp4").read_bytes())
    assert written[0] == written[1], "two encodes in one process differ"
    assert written[0] == written[2], "an encode in a process on one core differs"
    decoded, _, audio_s = media.read_video(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape and audio_s == pytest.approx(3.0, abs=2048 / 16000)
    with av.open(str(tmp_path / "a.mp4")) as container:  # no clock in the file: runs at other times write it too
        tags = [container.metadata, *(s.metadata for s in container.streams)]
    assert not any("creation_time" in t for t in tags)


def test_the_same_frames_and_sound_make_the_same_hls_stream_byte_for_byte_in_any_process(tmp_path):
    frames, samples, _ = inputs(tmp_path, 128)  # at 128 px x264 takes as many slices as it may use cores (up to 2)
    streams = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        with media.HlsWriter(folder / "live.m3u8", fps=FPS, width=128, height=128, samples=samples) as writer:
            writer.write(frames[:30])
            writer.write(frames[30:])
        streams.append(hls_files(folder))
    other = in_another_process("hls", tmp_path)
    assert other.returncode == 0, other.stderr
    streams.append(hls_files(tmp_path))
    assert sorted(streams[0]) == ["live.m3u8", "live_00000.m4s", "live_00001.m4s", "live_init.mp4"]
    assert streams[0] == streams[1], "two streams written in one process differ"
    assert streams[0] == streams[2], "a stream written in a process on one core differs"


def test_every_h264_stream_has_the_reproducible_settings(tmp_path):
    """The x264 settings line in the bitstream says what the writers asked for: a fixed thread count (frame threads
    for the file, slices for the live stream, whose frames must be out at once) and, for the live stream, no
    look-ahead or B-frames. (At 256 px x264 allows 4 slices; it takes fewer on smaller frames.)"""
    frames = np.zeros((10, 256, 256, 3), np.uint8)
    with media.VideoWriter(tmp_path / "o.mp4", fps=FPS, width=256, height=256) as writer:
        writer.write(frames)
    with media.HlsWriter(tmp_path / "live.m3u8", fps=FPS, width=256, height=256) as writer:
        writer.write(frames)

    def x264_line(data: bytes) -> str:
        start = data.index(b"x264 - core")
        return data[start : data.index(b"\0", start)].decode()

    threads = f" threads={media.X264_THREADS} "
    mp4 = x264_line((tmp_path / "o.mp4").read_bytes())
    live = x264_line((tmp_path / "live_00000.m4s").read_bytes())
    assert threads in mp4 and "sliced_threads=0" in mp4 and "rc_lookahead=40" in mp4 and "crf=18.0" in mp4
    assert threads in live and "sliced_threads=1" in live and "bframes=0" in live and "rc_lookahead" not in live


@pytest.mark.slow
def test_the_same_command_run_twice_writes_the_same_video(runtime, demo_dir, portrait, speech, tmp_path):
    """Same input, seed, machine and libraries: the same mp4 and HLS stream, byte for byte, from two runs in this
    process, and the same mp4 from the CLI in another process."""
    written = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        runtime.animate(portrait, speech, folder / "out.mp4", hls=folder / "live.m3u8", seed=5, steps=2, progress=False)
        written.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    assert {"out.mp4", "live.m3u8", "live_init.mp4", "live_00000.m4s"} <= set(written[0])
    assert written[0] == written[1]
    cli = subprocess.run(
        [sys.executable, "-m", "sonic_rt", "animate", "--model", str(demo_dir), "--image", str(portrait)]
        + ["--audio", str(speech), "--out", str(tmp_path / "cli.mp4"), "--seed", "5", "--steps", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli.mp4").read_bytes() == written[0]["out.mp4"]
