"""The whole job on the demo checkpoint with a real portrait and real speech, plus every bad-input path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import write_wav

import sonic_rt
from sonic_rt.errors import AudioError, CheckpointError, FaceNotFoundError, ImageError, InputError, OutputPathError
from sonic_rt.media import probe_audio, read_video
from sonic_rt.runtime import STAGES

FAST = dict(steps=2, progress=False)


def only(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_mp4_has_2n_minus_1_frames_at_25_fps_and_the_full_audio(runtime, portrait, long_speech, tmp_path):
    out = tmp_path / "out.mp4"
    result = runtime.animate(portrait, long_speech, out, **FAST)
    n = len(sonic_rt.media.load_audio(long_speech)) // 640 // 2
    assert n > 25  # several windows per step
    assert result.num_generated_frames == n and result.num_frames == 2 * n - 1
    frames, fps, audio_seconds = read_video(out)
    assert frames.shape == (2 * n - 1, 128, 128, 3)
    assert fps == 25.0
    source = probe_audio(long_speech).duration_s
    assert abs(audio_seconds - source) <= 1024 / 22050 + 0.05  # AAC frame padding
    assert only(tmp_path) == ["out.mp4"]  # no temporary file left
    assert list(result.timings) == list(STAGES)  # every stage, in pipeline order


def test_same_seed_same_frames_other_seed_other_frames(runtime, portrait, speech):
    a = runtime.animate(portrait, speech, None, seed=5, **FAST).frames
    b = runtime.animate(portrait, speech, None, seed=5, **FAST).frames
    c = runtime.animate(portrait, speech, None, seed=6, **FAST).frames
    assert a.dtype == np.uint8 and a.shape[1:] == (128, 128, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_explicit_latents_reproduce_the_seeded_run(runtime, portrait, speech):
    """A seed gives the official noise: the global generator seeded, an image-shaped draw (the official noise
    augmentation, multiplied by 0), then the latents."""
    seeded = runtime.animate(portrait, speech, None, seed=11, **FAST)
    torch.manual_seed(11)
    torch.randn((1, 3, 128, 128))
    noise = torch.randn((1, seeded.num_generated_frames, 4, 16, 16))
    given = runtime.animate(portrait, speech, None, latents=noise, **FAST)
    assert given.seed is None
    assert np.array_equal(seeded.frames, given.frames)
    with pytest.raises(InputError, match="latents must have shape"):
        runtime.animate(portrait, speech, None, latents=noise[:, :3], **FAST)


def test_without_interpolation_n_frames_at_12_5_fps(runtime, portrait, speech, tmp_path):
    out = tmp_path / "o.mp4"
    result = runtime.animate(portrait, speech, out, interpolate=False, return_frames=True, **FAST)
    frames, fps, _ = read_video(out)
    assert fps == 12.5 and len(frames) == result.num_generated_frames == len(result.frames)


def test_arrays_in_and_silent_audio_is_valid(runtime, portrait, tmp_path):
    from PIL import Image

    image = np.asarray(Image.open(portrait))
    silence = np.zeros(16000 * 2, dtype=np.float32)
    result = runtime.animate(image, silence, tmp_path / "quiet.mp4", **FAST)
    assert result.num_generated_frames == 25
    frames, fps, audio_seconds = read_video(tmp_path / "quiet.mp4")
    assert len(frames) == 49 and audio_seconds == pytest.approx(2.0, abs=0.07)


# --- bad input: typed errors raised before any heavy work, and no output left ---------------------------------


def bad_cases(tmp_path: Path, portrait: Path, speech: Path):
    grey = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(portrait.read_bytes()[:200])
    noise = tmp_path / "noise.wav"
    noise.write_bytes(os.urandom(4000))
    short = write_wav(tmp_path / "short.wav", np.zeros(1000, dtype=np.float32))
    video_only = tmp_path / "video_only.mp4"
    with av.open(str(video_only), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {
        "no face": (grey, speech, FaceNotFoundError, r"grey\.png.*--face-box"),
        "corrupt image": (corrupt, speech, ImageError, r"corrupt\.png"),
        "missing image": (tmp_path / "nope.png", speech, ImageError, r"nope\.png"),
        "corrupt audio": (portrait, noise, AudioError, r"noise\.wav"),
        "no audio stream": (portrait, video_only, AudioError, r"video_only\.mp4.*no audio stream"),
        "audio too short": (portrait, short, AudioError, r"short\.wav.*shorter than one generated frame"),
    }


@pytest.mark.parametrize(
    "case", ["no face", "corrupt image", "missing image", "corrupt audio", "no audio stream", "audio too short"]
)
def test_bad_input_raises_a_typed_error_and_leaves_no_output(runtime, portrait, speech, tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image, audio, error, pattern = bad_cases(inputs, portrait, speech)[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(error, match=pattern):
        runtime.animate(image, audio, outdir / "o.mp4", **FAST)
    assert only(outdir) == []


def test_unwritable_output_path(runtime, portrait, speech, tmp_path):
    with pytest.raises(OutputPathError):
        runtime.animate(portrait, speech, tmp_path / "missing_dir" / "o.mp4", **FAST)
    with pytest.raises(OutputPathError):
        runtime.animate(portrait, speech, tmp_path / "o.avi", **FAST)


def test_failure_during_sampling_leaves_no_file(runtime, portrait, speech, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.graphs.rife, "run", boom)
    with pytest.raises(KeyboardInterrupt):
        runtime.animate(portrait, speech, tmp_path / "o.mp4", **FAST)
    assert only(tmp_path) == []


def test_missing_checkpoint_directory():
    with pytest.raises(CheckpointError, match="model directory not found"):
        sonic_rt.Runtime("/nonexistent/sonic")


# --- CLI ----------------------------------------------------------------------------------------------------------


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sonic_rt", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_help_explains():
    result = run_cli("animate", "--help")
    assert result.returncode == 0
    for flag in ("--demo", "--model", "--face-box", "--dynamic-scale", "--no-interpolate", "--trust-pickle"):
        assert flag in result.stdout


def test_cli_bad_input_is_one_line_and_exit_2(demo_dir, portrait, tmp_path):
    result = run_cli(
        "animate",
        "--model",
        str(demo_dir),
        "--image",
        str(portrait),
        "--audio",
        str(tmp_path / "missing.wav"),
        "--out",
        str(tmp_path / "o.mp4"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing.wav" in result.stderr
    assert "Traceback" not in result.stderr
    assert only(tmp_path) == []


@pytest.mark.slow
def test_cli_demo_end_to_end_with_defaults(portrait, long_speech, tmp_path):
    """The README's main command, as a new user runs it (demo created in a fresh cache, 25 steps)."""
    env = dict(os.environ, SONIC_RT_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out.mp4"
    result = run_cli(
        "animate",
        "--demo",
        "--image",
        str(portrait),
        "--audio",
        str(long_speech),
        "--out",
        str(out),
        "--quiet",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM-WEIGHT" in result.stderr
    frames, fps, audio_seconds = read_video(out)
    n = len(sonic_rt.media.load_audio(long_speech)) // 640 // 2
    assert len(frames) == 2 * n - 1 and fps == 25.0 and audio_seconds is not None


def test_cli_sigterm_during_sampling_leaves_no_output(demo_dir, portrait, long_speech, tmp_path):
    """A real CLI process gets SIGTERM mid-run: it exits 130 and leaves nothing in the output folder."""
    import signal
    import time

    outdir = tmp_path / "out"
    outdir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sonic_rt",
            "animate",
            "--model",
            str(demo_dir),
            "--image",
            str(portrait),
            "--audio",
            str(long_speech),
            "--out",
            str(outdir / "o.mp4"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    err = b""
    while time.time() < deadline and b"denoising:" not in err:  # the progress bar (stderr, \r-separated)
        chunk = os.read(proc.stderr.fileno(), 256)
        if not chunk:
            break
        err += chunk
    assert b"denoising:" in err and b"decoding" not in err  # still sampling
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    rest = rest.decode()
    assert proc.returncode == 130, err.decode() + rest
    assert "no output written" in rest
    assert only(outdir) == []


def test_the_fallback_face_detector_is_said_once_and_reported(demo_dir, portrait, speech, capsys):
    """Without yoloface_v5m.pt the OpenCV detector finds the face: one stderr line per Runtime, and every
    AnimateResult carries the note; an explicit face box uses no detector and carries none."""
    rt = sonic_rt.Runtime(demo_dir)
    first = rt.animate(portrait, speech, None, **FAST)
    second = rt.animate(portrait, speech, None, **FAST)
    said = [line for line in capsys.readouterr().err.splitlines() if "Haar cascade" in line]
    assert len(said) == 1 and "yoloface_v5m.pt" in said[0]
    assert first.reference.detector == "haar" and any("Haar cascade" in n for n in first.notes)
    assert second.notes == first.notes
    boxed = rt.animate(portrait, speech, None, face_box=(150, 60, 130, 160), **FAST)
    assert boxed.notes == ()


def test_paste_back_writes_the_whole_photo_at_its_even_size_with_every_frame_and_the_audio(runtime, speech, tmp_path):
    """A wide photo with the face off-centre: the mp4 is the photo at its own (even) size, 2N-1 frames at
    25 fps with the input's audio; far from the crop box the frames are the photo; return_frames stays the
    generated crop; the crop box used is reported."""
    from PIL import Image
    from skimage import data

    photo = np.full((601, 1001, 3), 90, np.uint8)
    photo[40:552, 60:572] = data.astronaut()  # face left of centre
    photo[:, 900:] = (200, 30, 60)  # a band far from any crop box
    path = tmp_path / "wide.png"
    Image.fromarray(photo).save(path)
    out = tmp_path / "wide.mp4"
    result = runtime.animate(path, speech, out, paste_back=True, return_frames=True, **FAST)
    frames, fps, audio_seconds = read_video(out)
    assert (result.width, result.height) == (1000, 600) and frames.shape[1:] == (600, 1000, 3)
    assert fps == 25 and len(frames) == result.num_frames == 2 * result.num_generated_frames - 1
    assert abs(audio_seconds - probe_audio(speech).duration_s) <= 1024 / 16000 + 0.05
    assert result.frames.shape[1:] == (128, 128, 3)  # the model's output, before compositing
    x0, y0, x1, y1 = result.paste.crop_box
    assert x1 < 900  # the crop box is around the face, left of the band
    band = frames[:, 8:-8, 920:-8].astype(int)  # (H.264 blurs a few pixels at the band's edges)
    assert np.abs(band - np.array([200, 30, 60])).max() <= 12  # lossy encode of the unchanged photo
