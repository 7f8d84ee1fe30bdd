"""``python -m bench.encoder``: which H.264 settings give the same file twice, and what they cost.

The same frames are encoded with libx264 through PyAV (in memory, mp4, yuv420p) under several settings, round
robin, ``--repeats`` times each, all in this process. For each setting:

- **distinct files**: how many different files the repeats gave (1: reproducible), and the largest difference
  between two of them after decoding (uint8 levels);
- **size**: bytes, against the previous default's;
- **PSNR** against the RGB frames given to the encoder (one MSE over every value of the video; ``10 log10(255^2 /
  MSE)``); for scale, the PSNR of the RGB -> yuv420p -> RGB conversion alone (the ceiling of every row); and the
  luma PSNR against the frames' own yuv420p conversion (the encoder's loss alone);
- **encode time**: the median of the repeats (the machine may be shared: the load average is recorded).

Two sets of frames:

- ``talking-head``: scikit-image's astronaut portrait at ``--size`` pixels with a synthetic talking-head motion
  (the face region, found with the OpenCV Haar detector, rotates by up to 2 degrees and shifts by up to 3 px, the
  mouth opens and closes at 3 Hz, the background stays still), ``--frames`` frames at 25 fps (249: 10 s of
  Sonic's output). There are no real Sonic weights here, so this stands in for its output: natural texture,
  small sub-pixel motion, a still background. Size and PSNR are judged on it.
- ``demo``: what the demo checkpoint (random weights) makes of the astronaut and 9 s of speech at 64 px in 4
  steps (the 112 generated frames), the case where two runs were first seen to write different files.

Settings: the previous default (``crf`` 18 and PyAV's defaults: as many slice threads as cores, x264's
assembly for this CPU), sonic_rt's file and live-stream settings (:func:`sonic_rt.media.x264_options`), and
single changes (``cpu-independent=1``, ``mbtree=0``, ``rc-lookahead=0``, the AVX-512 assembly off, other thread
counts and kinds). Writes ``--out`` (JSON) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import RESULTS, cpu_flags, load_average, log, machine_info, utc_now, write_json
from bench.common import command_line as _command_line
from bench.presets import DEFAULT_CACHE

FPS = 25


# ---------------------------------------------------------------------------------------------------------
# The frames
# ---------------------------------------------------------------------------------------------------------
def talking_head(frames: int, size: int) -> np.ndarray:
    """uint8 RGB ``[frames, size, size, 3]``: the astronaut with a moving face over a still background."""
    import cv2
    from skimage import data

    from sonic_rt.face import HaarFaceDetector

    photo = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    face = max(HaarFaceDetector().detect(photo), key=lambda f: f.w * f.h)
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # feathered ellipse around the face: the moving part
    ellipse = ((xx - cx) / (0.75 * face.w)) ** 2 + ((yy - cy) / (0.9 * face.h)) ** 2
    mask = np.clip((1.2 - ellipse) / 0.4, 0, 1)[..., None]
    mouth_y = face.y + 0.8 * face.h
    bump = np.exp(-(((xx - cx) / (0.25 * face.w)) ** 2) - ((yy - mouth_y) / (0.12 * face.h)) ** 2)
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        t = i / FPS
        angle = 2.0 * np.sin(2 * np.pi * t / 3.1)
        shift = (3.0 * np.sin(2 * np.pi * t / 2.3), 2.0 * np.sin(2 * np.pi * t / 4.7))
        opening = 0.5 + 0.5 * np.sin(2 * np.pi * t * 3.0)
        m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
        m[:, 2] += shift
        inv = cv2.invertAffineTransform(m)  # destination pixel -> source pixel
        src_x = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
        src_y = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
        src_y = src_y - 4.0 * opening * bump * np.sign(yy - mouth_y)  # lips part: up above the mouth, down below
        moved = cv2.remap(
            photo, src_x.astype(np.float32), src_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        out[i] = np.round(mask * moved + (1 - mask) * photo).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------
# Settings and one encode
# ---------------------------------------------------------------------------------------------------------
def settings(crf: int) -> dict[str, dict[str, Any]]:
    """name -> {"options": libx264 options, "thread_type": PyAV thread type, "what": description}."""
    from sonic_rt import media

    file, live = media.x264_options(crf), media.x264_options(crf, key_interval=2 * FPS)
    rows = {
        "previous default": ({"crf": str(crf)}, "SLICE", "PyAV's defaults"),
        "sonic_rt file (mp4)": (file, media.x264_thread_type(live=False), "media.x264_options"),
        "sonic_rt live stream (HLS)": (live, media.x264_thread_type(live=True), "a key frame every 2 s"),
        "cpu-independent=1 only": ({"crf": str(crf), "x264-params": "cpu-independent=1"}, "SLICE", ""),
        "mbtree=0 only": ({"crf": str(crf), "mbtree": "0"}, "SLICE", ""),
        "rc-lookahead=0 only": ({"crf": str(crf), "rc-lookahead": "0"}, "SLICE", ""),
    }
    if {"avx2", "avx512f"} <= set(cpu_flags()):
        rows["AVX-512 assembly off"] = ({"crf": str(crf), "x264-params": "asm=avx2"}, "SLICE", "x264's CPU flags")
    thread_type = media.x264_thread_type(live=False)
    rows["file, 1 thread"] = ({**file, "threads": "1"}, thread_type, "")
    rows["file, 8 threads"] = ({**file, "threads": "8"}, thread_type, "")
    rows["file, as many threads as x264 picks"] = ({**file, "threads": "0"}, thread_type, "")
    rows["file, slice threads"] = (file, "SLICE", "")
    return {name: {"options": o, "thread_type": t, "what": w} for name, (o, t, w) in rows.items()}


def demo_frames(cache: Path) -> np.ndarray:
    """uint8 RGB ``[112, 64, 64, 3]``: the demo checkpoint's frames of the astronaut and 9 s of speech, 4 steps."""
    import sonic_rt
    from bench.presets import ensure_inputs, speech_of_length
    from sonic_rt.demo import write_demo_model

    model = cache / "demo-model"
    if not model.is_dir():
        write_demo_model(model)
    image, _ = ensure_inputs(cache)
    runtime = sonic_rt.Runtime(model, device="cpu")
    result = runtime.animate(image, speech_of_length(cache, 9.0), None, steps=4, min_resolution=64, progress=False)
    return result.frames


def encode(frames: np.ndarray, options: dict[str, str], thread_type: str) -> tuple[bytes, float]:
    """The mp4 bytes of ``frames`` (uint8 RGB ``[n, H, W, 3]``) at 25 fps, and the seconds it took."""
    import av

    buf = io.BytesIO()
    started = time.perf_counter()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_type = thread_type
        stream.time_base = stream.codec_context.time_base = Fraction(1, FPS)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue(), time.perf_counter() - started


def decode(data: bytes, luma: bool = False) -> np.ndarray:
    """The frames of an mp4's video stream: uint8 RGB ``[n, H, W, 3]``, or with ``luma`` the Y planes ``[n, H, W]``
    as decoded (no conversion)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if luma:
            return np.stack([y_plane(f) for f in container.decode(video=0)])
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def y_plane(frame) -> np.ndarray:
    """The Y plane ``[H, W]`` of a yuv420p ``av.VideoFrame`` (PyAV's yuv420p array is ``[H * 3 / 2, W]``, Y first)."""
    return frame.to_ndarray(format="yuv420p")[: frame.height]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape (one MSE over every value)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def yuv420(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """The luma planes ``[n, H, W]`` of ``frames`` converted to yuv420p by PyAV (what the encoder is given), and
    the PSNR of RGB -> yuv420p -> RGB (the ceiling of every setting's RGB PSNR)."""
    import av

    converted = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in frames]
    luma = np.stack([y_plane(f) for f in converted])
    return luma, psnr(np.stack([f.to_ndarray(format="rgb24") for f in converted]), frames)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def measure(frames: np.ndarray, rows: dict[str, dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Every figure of the module docstring for one set of frames."""
    luma, ceiling = yuv420(frames)
    encoded: dict[str, list[bytes]] = {name: [] for name in rows}
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):  # round robin: a burst of other work on the machine hits every setting alike
        for name, s in rows.items():
            data, took = encode(frames, s["options"], s["thread_type"])
            encoded[name].append(data)
            seconds[name].append(took)
    results = {}
    for name, s in rows.items():
        first = decode(encoded[name][0])
        differing = [d for d in encoded[name][1:] if d != encoded[name][0]]
        results[name] = {
            **s,
            "distinct_outputs": len(set(encoded[name])),
            "max_level_difference": max(
                (int(np.abs(decode(d).astype(int) - first).max()) for d in differing), default=0
            ),
            "bytes": len(encoded[name][0]),
            "psnr_db": psnr(first, frames),
            "luma_psnr_db": psnr(decode(encoded[name][0], luma=True), luma),
            "encode_s": statistics.median(seconds[name]),
            "encode_s_all": seconds[name],
        }
        log(f"{name}: {results[name]['distinct_outputs']} distinct of {repeats}, {results[name]['bytes']} bytes")
    shape = list(frames.shape)
    return {"frames": shape, "yuv420p_ceiling_psnr_db": ceiling, "results": results}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-ready dict."""
    import av

    rows = settings(args.crf)
    contents = {"talking-head": lambda: talking_head(args.frames, args.size), "demo": lambda: demo_frames(args.cache)}
    report: dict[str, Any] = {
        "benchmark": "bench.encoder",
        "date": utc_now(),
        "command": command,
        "machine": {**machine_info(), "pyav": av.__version__, "libavcodec": av.library_versions.get("libavcodec")},
        "settings": {"crf": args.crf, "repeats": args.repeats, "fps": FPS},
        "contents": {},
    }
    for name in args.contents:
        log(f"{name}: making the frames")
        frames = contents[name]()
        log(f"{name}: {len(rows)} settings x {args.repeats} encodes of {frames.shape[0]} frames, {frames.shape[2]} px")
        report["contents"][name] = measure(frames, rows, args.repeats)
    report["load_average_at_end"] = load_average()
    return report


def format_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# bench.encoder: which H.264 settings give the same file twice, and what they cost",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cpus_usable']} usable cores; {', '.join(m['cpu_flags'])}), PyAV "
        f"{m['pyav']}, libavcodec {'.'.join(map(str, m['libavcodec']))}; load average at the end "
        f"{report['load_average_at_end']} (a shared machine: the times are noisy, the sizes and PSNR are not)",
        f"- {s['repeats']} encodes per setting, round robin, in one process; size and time against the previous "
        "default. PSNR RGB: against the RGB frames given to the encoder; PSNR Y: the luma against the frames' own "
        "yuv420p conversion (the encoder's loss alone)",
    ]
    for content, c in report["contents"].items():
        n, h, w, _ = c["frames"]
        base = c["results"]["previous default"]
        lines += [
            "",
            f"## {content}: {n} frames, {w}x{h}",
            "",
            f"RGB -> yuv420p -> RGB alone: {c['yuv420p_ceiling_psnr_db']:.2f} dB (the ceiling of the RGB PSNR).",
            "",
            "| setting | options | threads | distinct files | max diff (levels) | kB | size | PSNR RGB dB "
            "| PSNR Y dB | encode s | time |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in c["results"].items():
            options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            what = f" ({r['what']})" if r["what"] else ""
            lines.append(
                f"| {name} | `{options}`{what} | {r['thread_type'].lower()} "
                f"| {r['distinct_outputs']} of {s['repeats']} | {r['max_level_difference']} "
                f"| {r['bytes'] / 1000:.1f} | x{r['bytes'] / base['bytes']:.2f} | {r['psnr_db']:.2f} "
                f"| {r['luma_psnr_db']:.2f} | {r['encode_s']:.2f} | x{r['encode_s'] / base['encode_s']:.2f} |"
            )
    return "\n".join([*lines, ""])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.encoder",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="results: bench/results/encoder-cpu.{json,md} (see --out)",
    )
    p.add_argument("--frames", type=int, default=249, help="frames to encode (default 249: 10 s of output)")
    p.add_argument("--size", type=int, default=512, help="frame side in pixels, even (default 512: Sonic's)")
    p.add_argument("--crf", type=int, default=18, help="x264 crf of the default rows (default 18: sonic_rt's)")
    p.add_argument("--repeats", type=int, default=4, help="encodes per setting (default 4)")
    p.add_argument(
        "--contents",
        default="talking-head,demo",
        help="comma-separated frame sets: talking-head, demo (default: both)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the demo checkpoint and the inputs are cached (default: engines/bench)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "encoder-cpu.json", help="JSON results path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.contents = [c.strip() for c in args.contents.split(",") if c.strip()]
    if args.frames < 1 or args.size < 16 or args.size % 2 or args.repeats < 2:
        p.error("--frames >= 1, --size even and >= 16, --repeats >= 2")
    if not args.contents or not set(args.contents) <= {"talking-head", "demo"}:
        p.error("--contents takes talking-head, demo")
    report = run(args, _command_line("bench.encoder", argv))
    write_json(args.out, report)
    markdown = format_markdown(report)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown, flush=True)
    log(f"wrote {args.out} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
