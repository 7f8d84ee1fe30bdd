"""Peak memory of one video as a user sees it: each backend in a fresh process of its own, load included.

``bench.throughput`` compares peaks inside one process, where what ran before (the other backend, its warm-up,
the allocator's free lists) moves them. A user comparing two programs runs each alone and reads its peak resident
set (``/usr/bin/time -v``'s "Maximum resident set size", the kernel's ``VmHWM``). This does the same: for each
backend a new Python process imports, loads the checkpoint, animates one video (no warm-up) and reports

- ``peak_mb``: the process's peak RSS over its whole life (``VmHWM`` from ``/proc/self/status``), the figure a
  user compares;
- ``loaded_mb``: its peak up to the end of loading (imports and weights);
- ``animate_added_mb``: how far the RSS rose above its value before ``animate`` while the video was made
  (sampled every few ms, :class:`bench.throughput.PeakRss`).

Backends: ``eager`` (:class:`bench.eager.EagerPipeline`, the official structure over the runtime's weights)
and ``torch`` (``Runtime.animate`` with the default settings). Both load through the same loader, so
``loaded_mb`` differs only by what each imports; the steps do not change the peak (the latents of a video are
the same size at every step), so one step is the default. The backends alternate when ``--repeats`` > 1.

Usage::

    python -m bench.peak_memory --preset structure --seconds 8.7
    python -m bench.peak_memory --preset full --seconds 8.7 --resolution 128   # the official shapes, small frames
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
from bench.presets import DEFAULT_CACHE, SIZES, ensure_inputs, ensure_model, speech_of_length

MB = 1024 * 1024
BACKENDS = ("eager", "torch")
RESULT_MARK = "PEAK_MEMORY_RESULT "  # the child's one line of results on stdout


def high_water_mark_bytes() -> int:
    """This process's peak RSS so far (``VmHWM`` in ``/proc/self/status``, Linux).

    Raises:
        OSError: no ``/proc`` (not Linux).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line")


def child(backend: str, model_dir: Path, image: Path, audio: Path, steps: int, resolution: int) -> dict[str, Any]:
    """Load and animate once in this (fresh) process; returns its figures (see the module's docstring)."""
    import torch

    import sonic_rt
    from bench.eager import EagerPipeline
    from bench.throughput import PeakRss

    imported = high_water_mark_bytes()
    started = time.perf_counter()
    runtime = sonic_rt.Runtime(model_dir, device=torch.device("cpu"))
    animate = EagerPipeline(runtime).animate if backend == "eager" else runtime.animate
    loaded, load_s = high_water_mark_bytes(), time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="sonic_rt_peak_") as tmp:
        started = time.perf_counter()
        with PeakRss() as rss:
            result = animate(
                image, audio, Path(tmp) / "out.mp4", steps=steps, progress=False, min_resolution=resolution
            )
        animate_s = time.perf_counter() - started
    return {
        "backend": backend,
        "peak_mb": high_water_mark_bytes() / MB,
        "imported_mb": imported / MB,
        "loaded_mb": loaded / MB,
        "before_animate_mb": rss.before / MB,
        "animate_added_mb": (rss.peak - rss.before) / MB,
        "load_s": load_s,
        "animate_s": animate_s,
        "frames": int(result.num_generated_frames),
        "threads": torch.get_num_threads(),
    }


def run_child(backend: str, args, model_dir: Path, image: Path, audio: Path) -> dict[str, Any]:
    """One backend in a new process (``python -m bench.peak_memory --child``); returns its figures."""
    command = [sys.executable, "-m", "bench.peak_memory", "--child", backend, "--model", str(model_dir)]
    command += ["--image", str(image), "--audio", str(audio), "--steps", str(args.steps)]
    command += ["--resolution", str(args.resolution)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {backend} process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


COLUMNS = ("peak_mb", "imported_mb", "loaded_mb", "before_animate_mb", "animate_added_mb", "load_s", "animate_s")


def table(report: dict[str, Any]) -> str:
    """Each process's figures, one row per run."""
    rows = [[r["backend"]] + [f"{r[c]:.1f}" for c in COLUMNS] for r in report["runs"]]
    return fmt_table(["backend", *COLUMNS], rows)


def summary(report: dict[str, Any]) -> str:
    """The default / eager ratios in one line."""
    peak, added = report["peak_mb"], report["animate_added_mb"]
    return (
        f"default / eager, each in a fresh process: peak RSS x{report['peak_ratio']:.3f} "
        f"({peak['torch']:.0f} / {peak['eager']:.0f} MB); added by animate x{report['animate_added_ratio']:.3f} "
        f"({added['torch']:.0f} / {added['eager']:.0f} MB)"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the command, date and CPU, :func:`table`, :func:`summary`."""
    settings = report["settings"]
    return (
        f"# bench.peak_memory: {settings['preset']}, {settings['seconds']:g} s of speech, {settings['steps']} "
        f"step(s), {settings['resolution']} px, CPU\n\n`{report['command']}`, {report['date']}, "
        f"{report['machine'].get('cpu', 'CPU unknown')}\n\n```\n{table(report)}\n```\n\n{summary(report)}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.peak_memory",
        description=__doc__.split("\n\n")[0] + " Reports each backend's peak RSS and the default's ratio to eager's.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.peak_memory --preset structure --seconds 8.7\n"
        "results: bench/results/peak_memory-<preset>-cpu.{json,md} (see --out)",
    )
    p.add_argument("--preset", choices=sorted(SIZES), default="structure", help="checkpoint shape (default: structure)")
    p.add_argument("--seconds", type=float, default=8.7, help="speech length in seconds (default: 8.7)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps (default: 1; the peak does not depend on it)")
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the preset's)")
    p.add_argument("--repeats", type=int, default=1, help="processes per backend, alternating (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of each process (OMP_NUM_THREADS)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where checkpoints and inputs are cached")
    p.add_argument("--model", type=Path, default=None, help="a checkpoint instead of the preset's")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/peak_memory-<preset>-cpu.json)"
    )
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        figures = child(args.child, args.model, args.image, args.audio, args.steps, args.resolution)
        print(RESULT_MARK + json.dumps(figures), flush=True)
        return 0
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be at least 1")
    size = SIZES[args.preset]
    args.resolution = args.resolution or size.resolution
    model_dir = (args.model or ensure_model(size, args.cache)).resolve()
    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for backend in BACKENDS:
            log(f"{backend} ({repeat + 1}/{args.repeats}): a fresh process, {args.seconds:g} s of speech, "
                f"{args.steps} step(s) at {args.resolution} px")  # fmt: skip
            runs.append(run_child(backend, args, model_dir, image, audio))
            log(f"  peak {runs[-1]['peak_mb']:.0f} MB")
    peak = {b: max(r["peak_mb"] for r in runs if r["backend"] == b) for b in BACKENDS}
    added = {b: max(r["animate_added_mb"] for r in runs if r["backend"] == b) for b in BACKENDS}
    report = {
        "benchmark": "bench.peak_memory",
        "date": utc_now(),
        "command": command_line("bench.peak_memory", argv),
        "device": "cpu",
        "machine": machine_info(),
        "settings": {
            "preset": args.preset,
            "model": str(model_dir) if args.model else None,
            "seconds": args.seconds,
            "steps": args.steps,
            "resolution": args.resolution,
            "repeats": args.repeats,
        },
        "runs": runs,
        "peak_mb": peak,
        "animate_added_mb": added,
        "peak_ratio": peak["torch"] / peak["eager"],
        "animate_added_ratio": added["torch"] / added["eager"],
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"peak_memory-{args.preset}-cpu.json"
    write_json(out, report)
    out.with_suffix(".md").write_text(markdown(report))
    print(table(report))
    print(summary(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
