"""Peak memory and time of ``Runtime(low_memory=True)`` against the default runtime, side by side in one run.

Each runtime is loaded alone (the other is deleted and its memory released first), warmed up with one 1-step
call, then animates the same portrait and speech. Reported per runtime: wall seconds, and on CUDA the peak
allocated memory (``torch.cuda.max_memory_allocated``, weights included) and the peak the driver saw in use on
the device (``mem_get_info``, sampled, CUDA context included); on the CPU the peak RSS. Plus the largest
difference between the two videos' frames in uint8 levels (``low_memory`` decodes 4 frames per VAE call
instead of 8, so frames near those chunk edges differ).

Usage::

    python -m bench.low_memory --preset full --device cuda --seconds 2 --steps 25   # the GPU check's part
    python -m bench.low_memory --preset demo --device cpu --seconds 0.5 --steps 1   # its CPU rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.common import command_line, fmt_table, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, SIZES, ensure_inputs, ensure_model, speech_of_length
from bench.throughput import PeakRss

MB = 1024 * 1024


class PeakDeviceUse(PeakRss):
    """Samples the device memory in use (``total - free`` from ``torch.cuda.mem_get_info``) in a thread."""

    def __init__(self, device: torch.device):
        self.device = device

    def read(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free


def measure(model_dir: Path, low_memory: bool, image: Path, audio: Path, args) -> tuple[dict[str, Any], np.ndarray]:
    """Load a runtime (``low_memory`` or the default), warm it up, animate; returns its figures and frames."""
    import sonic_rt

    device = torch.device(args.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as rss:
        peak_use = PeakDeviceUse(device) if device.type == "cuda" else None
        with peak_use or contextlib.nullcontext():
            rt = sonic_rt.Runtime(model_dir, device=device, low_memory=low_memory)
            settings = dict(min_resolution=args.resolution, progress=False)
            rt.animate(image, audio, None, steps=1, **settings)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            result = rt.animate(image, audio, None, steps=args.steps, **settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
    entry: dict[str, Any] = {
        "seconds": seconds,
        "timings_s": result.timings,
        "frames": int(result.num_generated_frames),
        "peak_rss_mb": rss.peak / MB,
    }
    if device.type == "cuda":
        entry["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        entry["cuda_peak_in_use_mb"] = peak_use.peak / MB
    frames = result.frames
    rt.close()
    del rt, result
    return entry, frames


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.low_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(SIZES), default="demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=2.0, help="audio length in seconds")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the preset's)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--model", type=Path, default=None, help="a checkpoint instead of the preset's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/low_memory-<preset>-<device>.json)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.preset]
    args.resolution = args.resolution or size.resolution
    model_dir = args.model or ensure_model(size, args.cache)
    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    runs, frames = {}, {}
    for name, low in (("default", False), ("low_memory", True)):
        log(f"{name}: {args.seconds:g} s of audio, {args.steps} steps at {args.resolution} px")
        runs[name], frames[name] = measure(model_dir, low, image, audio, args)
    diff = np.abs(frames["default"].astype(np.int16) - frames["low_memory"].astype(np.int16))
    device = torch.device(args.device)
    report = {
        "benchmark": "bench.low_memory",
        "date": utc_now(),
        "command": command_line("bench.low_memory", argv),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "machine": machine_info(device),
        "settings": {
            "preset": args.preset,
            "seconds": args.seconds,
            "steps": args.steps,
            "resolution": args.resolution,
        },
        "runs": runs,
        "frames_max_levels": int(diff.max()),
        "frames_mean_levels": float(diff.mean()),
        "time_ratio": runs["low_memory"]["seconds"] / runs["default"]["seconds"],
    }
    key = "cuda_peak_allocated_mb" if device.type == "cuda" else "peak_rss_mb"
    report["peak_ratio"] = runs["low_memory"][key] / runs["default"][key]
    tag = "cpu" if device.type == "cpu" else "cuda"
    out = args.out or Path(__file__).resolve().parent / "results" / f"low_memory-{args.preset}-{tag}.json"
    write_json(out, report)
    columns = ["seconds", "peak_rss_mb"] + (["cuda_peak_allocated_mb", "cuda_peak_in_use_mb"] if tag == "cuda" else [])
    rows = [[name] + [f"{r[c]:.1f}" for c in columns] for name, r in runs.items()]
    print(fmt_table(["runtime", *columns], rows))
    print(
        f"low_memory / default: time x{report['time_ratio']:.2f}, peak x{report['peak_ratio']:.2f}; frames differ "
        f"by at most {report['frames_max_levels']} uint8 levels (mean {report['frames_mean_levels']:.2f})"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
