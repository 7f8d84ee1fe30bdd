"""How far the opt-in dtypes take the video from fp32, and what they cost, on this CPU.

What is measured: the same animation (same portrait, speech, seed and settings) with ``Runtime(dtype=...)``
for fp32 (the CPU default) and each requested dtype, side by side in one process: the decoded frames before
interpolation (uint8 [N, H, W, 3]) are compared with fp32's (mean and max absolute difference in uint8 levels,
and the share of values that differ by more than 2 levels), and each run's wall time (after one warm-up call
per dtype) gives the speed against fp32.

Usage::

    python -m bench.precision                       # structure preset, bf16, 25 steps, 4 s of speech
    python -m bench.precision --preset widths --dtypes bf16,fp16 --seconds 2
    # results: bench/results/precision-<preset>-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.common import cpu_flags
from bench.presets import DEFAULT_CACHE, REPO, SIZES, ensure_inputs, ensure_model, log, speech_of_length


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("demo", "widths", "structure"), default="structure")
    p.add_argument("--dtypes", default="bf16", help="comma-separated from bf16, fp16 (fp32 is the reference)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seconds", type=float, default=4.0, help="audio length in seconds")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    import sonic_rt

    size = SIZES[args.preset]
    model = ensure_model(size, args.cache)
    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    dtypes = ["fp32"] + [d.strip() for d in args.dtypes.split(",") if d.strip() and d.strip() != "fp32"]
    runs, frames = {}, {}
    for dtype in dtypes:
        rt = sonic_rt.Runtime(model, device="cpu", dtype=dtype)
        rt.animate(image, audio, None, steps=1, progress=False, min_resolution=size.resolution)  # warm-up
        started = time.perf_counter()
        result = rt.animate(image, audio, None, steps=args.steps, progress=False, min_resolution=size.resolution)
        runs[dtype] = {"seconds": time.perf_counter() - started, "denoise_s": result.timings["denoise"]}
        frames[dtype] = result.frames.astype(np.int16)
        log(f"{dtype}: {runs[dtype]['seconds']:.1f} s")
        del rt
    for dtype in dtypes:
        diff = np.abs(frames[dtype] - frames["fp32"])
        runs[dtype].update(
            mean_levels=float(diff.mean()),
            max_levels=int(diff.max()),
            share_over_2_levels=float((diff > 2).mean()),
            speed_vs_fp32=runs["fp32"]["seconds"] / runs[dtype]["seconds"],
        )
    command = shlex.join(["python", "-m", "bench.precision", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "benchmark": "bench.precision",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "preset": args.preset,
        "steps": args.steps,
        "audio_s": args.seconds,
        "num_generated_frames": int(frames["fp32"].shape[0]),
        "runs": runs,
    }
    lines = [
        f"# bench.precision: preset `{args.preset}` on CPU",
        "",
        f"- date: {report['date']}",
        f"- command: `{command}`",
        f"- CPU bf16 flags: {', '.join(report['cpu_flags']) or 'none'}; "
        f"torch {torch.__version__}, {report['threads']} threads",
        f"- {args.steps} steps, {args.seconds:g} s of speech, {report['num_generated_frames']} frames compared "
        "(decoded, before interpolation)",
        "",
        "| dtype | seconds | speed vs fp32 | mean levels from fp32 | max levels | share > 2 levels |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {d} | {r['seconds']:.1f} | x{r['speed_vs_fp32']:.2f} | {r['mean_levels']:.2f} | "
        f"{r['max_levels']} | {100 * r['share_over_2_levels']:.2f}% |"
        for d, r in runs.items()
    ]
    out = args.out or REPO / "bench" / "results" / f"precision-{args.preset}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
