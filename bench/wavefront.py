"""When the first frame is written, for long audio: the wavefront order against step by step, side by side.

For each audio length and each order (``SchedulerConfig(order="steps")`` and ``"wavefront"``) one whole video is
made with the demo checkpoint (the same portrait and speech, an mp4 written), each run in its own process so
that its peak RSS is its own. Measured from the ``frames`` events of :meth:`sonic_rt.Runtime.animate`:

- **first frame**: seconds from the call to the first chunk in the mp4 (``elapsed_seconds`` of the first event);
- **output rate**: seconds of video written per second after that (last minus first event);
- **total**: the call's ``total`` stage; **peak RSS**: sampled every 5 ms in the child process.

The report (``bench/results/wavefront-demo-cpu.{json,md,png}``) gives, per length, both orders, the first-frame
time as a share of the step order's total, and total and peak ratios (wavefront / steps); the plot shows the
first-frame time against length.

``--bookkeeping`` measures instead what each order costs around the model: :func:`sonic_rt.sampling.sample`
for 10 minutes of frames (N = 7,500, 25 steps, latents 4x8x8) with a denoiser that costs nothing, both orders
alternating, best of ``--repeats`` (``bench/results/wavefront-bookkeeping-cpu.{json,md}``). The whole-video totals
above include the model calls, whose speed on a shared machine drifts between runs by more than the orders differ.

Usage::

    python -m bench.wavefront                                   # 1, 2, 5, 10 minutes, 25 steps, 64 px
    python -m bench.wavefront --minutes 0.2,0.4 --steps 2      # a quick look
    python -m bench.wavefront --bookkeeping                     # the orders' own cost, no model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import command_line, fmt_table, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, REPO, SIZES, ensure_inputs, ensure_model, speech_of_length

ORDERS = ("steps", "wavefront")
MB = 1024 * 1024


def measure_one(model: Path, image: Path, audio: Path, order: str, steps: int, resolution: int) -> dict[str, Any]:
    """One video in this process (the child's job): the figures of the module docstring."""
    import sonic_rt
    from bench.throughput import PeakRss
    from sonic_rt.scheduler import SchedulerConfig

    runtime = sonic_rt.Runtime(model, scheduler=SchedulerConfig(order=order))
    chunks: list[dict] = []
    windows = 0
    first_window_after_first_chunk = None

    def events(kind: str, info: dict) -> None:
        nonlocal windows, first_window_after_first_chunk
        if kind == "window":
            windows += 1
        elif kind == "frames":
            chunks.append(dict(info))
            if first_window_after_first_chunk is None:
                first_window_after_first_chunk = windows

    with tempfile.TemporaryDirectory(prefix="sonic_rt_wavefront_") as tmp, PeakRss() as rss:
        started = time.perf_counter()
        result = runtime.animate(
            image, audio, Path(tmp) / "o.mp4", steps=steps, min_resolution=resolution, progress=False, events=events
        )
        wall = time.perf_counter() - started
    first, last = chunks[0], chunks[-1]
    rate_span = last["elapsed_seconds"] - first["elapsed_seconds"]
    return {
        "order": order,
        "generated_frames": result.num_generated_frames,
        "video_seconds": last["video_seconds"],
        "units": windows,
        "units_before_first_chunk": first_window_after_first_chunk,
        "first_frame_s": first["elapsed_seconds"],
        "output_rate": (last["video_seconds"] - first["video_seconds"]) / rate_span if rate_span > 0 else None,
        "total_s": result.timings["total"],
        "wall_s": wall,
        "timings_s": result.timings,
        "peak_rss_mb": rss.peak / MB,
    }


def run_child(args, minutes: float, order: str, model: Path, image: Path, audio: Path) -> dict[str, Any]:
    """:func:`measure_one` in a fresh process (its peak RSS is its own)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "bench.wavefront", "--child", str(out), "--model", str(model), "--image", str(image)]
    cmd += ["--audio", str(audio), "--order", order, "--steps", str(args.steps), "--resolution", str(args.resolution)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def bookkeeping(args) -> dict[str, Any]:
    """The orders' own cost: ``sample()`` with a free denoiser (module docstring), seconds per run, best of
    ``args.repeats``, alternating the orders."""
    import torch

    from sonic_rt.sampling import SamplingConfig, sample
    from sonic_rt.scheduler import SchedulerConfig, WindowScheduler

    num_frames, steps = 7500, 25
    latents = torch.randn(1, num_frames, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas, timesteps = torch.linspace(700.0, 0.0, steps + 1), torch.linspace(1.6, -1.5, steps)
    times: dict[str, list[float]] = {order: [] for order in ORDERS}
    results = {}
    for _ in range(args.repeats):
        for order in ORDERS:
            scheduler = WindowScheduler(SchedulerConfig(order=order), "cpu")
            started = time.perf_counter()
            results[order] = sample(
                latents,
                sigmas,
                timesteps,
                SamplingConfig(steps=steps),
                lambda x, windows: x,
                scheduler=scheduler,
                on_final_frames=lambda latents, ready: None,
            )
            times[order].append(time.perf_counter() - started)
    best = {order: min(t) for order, t in times.items()}
    return {
        "benchmark": "bench.wavefront --bookkeeping",
        "date": utc_now(),
        "command": command_line("bench.wavefront", None),
        "machine": machine_info(None),
        "settings": {
            "num_frames": num_frames,
            "steps": steps,
            "units": steps * num_frames // 25,
            "repeats": args.repeats,
        },
        "seconds": times,
        "best_s": best,
        "per_unit_ms": {order: 1000 * b / (steps * num_frames // 25) for order, b in best.items()},
        "same_latents": bool(torch.equal(results["steps"], results["wavefront"])),
    }


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for minutes, pair in report["runs"].items():
        s, w = pair["steps"], pair["wavefront"]
        rows.append(
            f"| {minutes} min ({s['generated_frames']} frames, {s['units']} windows) "
            f"| {s['first_frame_s']:.1f} s | {w['first_frame_s']:.1f} s "
            f"({100 * w['first_frame_s'] / s['total_s']:.1f}% of steps' total) "
            f"| {s['output_rate'] or 0:.2f} | {w['output_rate'] or 0:.2f} "
            f"| {s['total_s']:.1f} s | {w['total_s']:.1f} s (x{w['total_s'] / s['total_s']:.3f}) "
            f"| {s['peak_rss_mb']:.0f} MB | {w['peak_rss_mb']:.0f} MB (x{w['peak_rss_mb'] / s['peak_rss_mb']:.3f}) |"
        )
    settings = report["settings"]
    return "\n".join(
        [
            "# Wavefront vs step-by-step order: when output starts, long audio",
            "",
            f"- date: {report['date']}; machine: {report['machine'].get('cpu', '')}, "
            f"{report['machine'].get('cpu_count', '')} cores; command: `{report['command']}`",
            f"- demo checkpoint, {settings['steps']} steps, {settings['resolution']} px, espeak-ng speech tiled to "
            "each length, mp4 written; each run in its own process",
            "- first frame: seconds from the call to the first chunk in the mp4; output rate: seconds of video "
            "written per second after it; ratios are wavefront / steps",
            "",
            "| audio | first frame, steps | first frame, wavefront | output rate, steps (video s/s) "
            "| output rate, wavefront | total, steps | total, wavefront | peak RSS, steps | peak RSS, wavefront |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"![first frame against length]({Path(report['plot']).name})",
            "",
        ]
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [float(m) for m in report["runs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for order, style in (("steps", "o-"), ("wavefront", "s-")):
        ax.plot(minutes, [report["runs"][m][order]["first_frame_s"] for m in report["runs"]], style, label=order)
    ax.set_xlabel("audio (minutes)")
    ax.set_ylabel("time to the first written frame (s)")
    ax.set_title(f"demo checkpoint, {report['settings']['steps']} steps, {report['settings']['resolution']} px, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wavefront", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", default="1,2,5,10", help="audio lengths in minutes, comma-separated")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (official 25)")
    p.add_argument("--resolution", type=int, default=64, help="short side in pixels (64: the soak tests' size)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/wavefront-demo-cpu.json)")
    p.add_argument("--bookkeeping", action="store_true", help="measure the orders' own cost without a model")
    p.add_argument("--repeats", type=int, default=3, help="--bookkeeping: runs per order (best is kept)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--audio", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--order", choices=ORDERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        entry = measure_one(args.model, args.image, args.audio, args.order, args.steps, args.resolution)
        args.child.write_text(json.dumps(entry))
        return 0
    if args.bookkeeping:
        report = bookkeeping(args)
        out = args.out or Path(__file__).resolve().parent / "results" / "wavefront-bookkeeping-cpu.json"
        write_json(out, report)
        settings, best, unit = report["settings"], report["best_s"], report["per_unit_ms"]
        out.with_suffix(".md").write_text(
            "\n".join(
                [
                    "# The orders' own cost (no model)",
                    "",
                    f"- date: {report['date']}; machine: {report['machine'].get('cpu', '')}, "
                    f"{report['machine'].get('cpu_count', '')} cores; command: `{report['command']}`",
                    f"- `sample()` over N = {settings['num_frames']} frames, {settings['steps']} steps "
                    f"({settings['units']} windows), latents 4x8x8, a denoiser that returns its input; best of "
                    f"{settings['repeats']}, orders alternating; same latents: {report['same_latents']}",
                    "",
                    "| order | seconds | per window |",
                    "|---|---:|---:|",
                    *(f"| {o} | {best[o]:.2f} | {unit[o]:.3f} ms |" for o in ORDERS),
                    "",
                ]
            )
        )
        print(out.with_suffix(".md").read_text())
        return 0
    model = ensure_model(SIZES["demo"], args.cache)
    image, _ = ensure_inputs(args.cache)
    lengths = [float(m) for m in args.minutes.split(",") if m.strip()]
    out = args.out or Path(__file__).resolve().parent / "results" / "wavefront-demo-cpu.json"
    report: dict[str, Any] = {
        "benchmark": "bench.wavefront",
        "date": utc_now(),
        "command": command_line("bench.wavefront", argv),
        "machine": machine_info(None),
        "settings": {"steps": args.steps, "resolution": args.resolution, "minutes": lengths},
        "runs": {},
        "plot": str(out.with_suffix(".png")),
    }
    for minutes in lengths:
        audio = speech_of_length(args.cache, minutes * 60)
        report["runs"][f"{minutes:g}"] = {}
        for order in ORDERS:
            log(f"{minutes:g} min, {order}")
            entry = run_child(args, minutes, order, model, image, audio)
            report["runs"][f"{minutes:g}"][order] = entry
            log(
                f"{minutes:g} min, {order}: first frame {entry['first_frame_s']:.1f} s, total {entry['total_s']:.1f} s, "
                f"peak RSS {entry['peak_rss_mb']:.0f} MB"
            )
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(report))
    rows = [
        [
            m,
            o,
            f"{e['first_frame_s']:.1f}",
            f"{e['output_rate'] or 0:.2f}",
            f"{e['total_s']:.1f}",
            f"{e['peak_rss_mb']:.0f}",
        ]
        for m, pair in report["runs"].items()
        for o, e in pair.items()
    ]
    print(fmt_table(["minutes", "order", "first frame s", "video s/s", "total s", "peak RSS MB"], rows))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
