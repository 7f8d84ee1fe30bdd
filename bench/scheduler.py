"""``python -m bench.scheduler``: denoising time and frames/s against lanes, windows per call and ranks (CPU).

What is measured: the same video (demo checkpoint, astronaut portrait, espeak speech; default 6 s of audio =
75 frames = 3 windows per step) through ``Runtime(model, scheduler=SchedulerConfig(...))`` for each
combination of lanes (worker threads on CPU) and windows per UNet call, one warm-up call (1 step) then one
measured call; and the same through ``torchrun --nproc_per_node R python -m sonic_rt animate`` for R ranks
(gloo), where the CLI reports its own stage timings (model loading excluded). Reported: denoise seconds,
seconds per step, generated frames per second of denoising, and whether the frames equal the sequential ones.

How to read it: on a CPU the lanes and ranks share the same cores as the intra-op threads of one call, so
parallel windows mostly trade intra-op parallelism for inter-window parallelism; the interesting GPU figures
(streams, several GPUs) need a GPU run. Writes a table and JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, log, machine_info, utc_now, write_json


def _speech(path: Path, seconds: float) -> Path:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: bench.scheduler needs espeak-ng for real speech (apt-get install espeak-ng)")
    text = "Hello, this is a benchmark of the sonic runtime window scheduler. " * 4
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    from sonic_rt.media import load_audio, write_wav

    samples = load_audio(path, 16000)
    samples = np.pad(samples, (0, max(0, int(seconds * 16000) - len(samples))))[: int(seconds * 16000)]
    return write_wav(path.with_name("speech_cut.wav"), samples, 16000)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scheduler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=None, help="weights directory (default: the demo checkpoint)")
    p.add_argument("--seconds", type=float, default=6.0, help="audio length (default 6 s = 75 frames)")
    p.add_argument("--steps", type=int, default=5, help="denoising steps of the measured call (default 5)")
    p.add_argument("--lanes", default="1,2", help="lane counts to try (default 1,2)")
    p.add_argument("--windows-per-call", default="1,2,3", help="windows per UNet call to try (default 1,2,3)")
    p.add_argument("--ranks", default="1,2", help="torchrun rank counts to try (gloo; default 1,2; '' to skip)")
    p.add_argument("--out", type=Path, default=Path("bench/results/scheduler-cpu.json"))
    args = p.parse_args(argv)

    import sonic_rt
    from sonic_rt.demo import ensure_demo_model
    from sonic_rt.scheduler import SchedulerConfig

    model = args.model or ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="sonic_bench_sched_"))
    from PIL import Image
    from skimage import data

    image = work / "astronaut.png"
    Image.fromarray(data.astronaut()).save(image)
    audio = _speech(work / "speech.wav", args.seconds)
    rows, reference = [], None
    for lanes in [int(v) for v in args.lanes.split(",") if v]:
        for per_call in [int(v) for v in args.windows_per_call.split(",") if v]:
            runtime = sonic_rt.Runtime(model, scheduler=SchedulerConfig(windows_per_call=per_call, lanes=lanes))
            runtime.animate(image, audio, None, steps=1, progress=False)  # warm-up
            result = runtime.animate(image, audio, None, steps=args.steps, progress=False)
            runtime.close()
            if reference is None:
                reference = result.frames
            diff = int(np.abs(result.frames.astype(int) - reference.astype(int)).max())
            denoise = result.timings["denoise"]
            rows.append(
                {
                    "ranks": 1,
                    "lanes": lanes,
                    "windows_per_call": per_call,
                    "denoise_s": round(denoise, 3),
                    "s_per_step": round(denoise / args.steps, 3),
                    "frames_per_s": round(result.num_generated_frames / denoise, 3),
                    "max_frame_diff_vs_first": diff,
                }
            )
            log(
                f"lanes {lanes}, windows/call {per_call}: denoise {denoise:.2f} s "
                f"({denoise / args.steps:.2f} s/step), max frame diff {diff}"
            )
    for ranks in [int(v) for v in args.ranks.split(",") if v]:
        out = work / f"r{ranks}.mp4"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "sonic_rt",
            "animate",
            "--model",
            str(model),
            "--image",
            str(image),
            "--audio",
            str(audio),
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--quiet",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        started = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"error: torchrun with {ranks} ranks failed:\n{run.stderr[-2000:]}")
        match = re.search(r"denoise ([0-9.]+)s", run.stdout)
        denoise = float(match.group(1)) if match else float("nan")
        rows.append(
            {
                "ranks": ranks,
                "lanes": 1,
                "windows_per_call": 1,
                "denoise_s": denoise,
                "s_per_step": round(denoise / args.steps, 3),
                "omp_threads_per_rank": env["OMP_NUM_THREADS"],
                "wall_s_with_loading": round(time.perf_counter() - started, 2),
            }
        )
        log(f"{ranks} ranks (gloo): denoise {denoise:.2f} s")
    print(f"{'ranks':>5} {'lanes':>5} {'win/call':>8} {'denoise s':>10} {'s/step':>7} {'frames/s':>9}")
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['lanes']:>5} {r['windows_per_call']:>8} {r['denoise_s']:>10} {r['s_per_step']:>7} "
            f"{r.get('frames_per_s', ''):>9}"
        )
    report = {
        "benchmark": "bench.scheduler (CPU)",
        "date": utc_now(),
        "command": command_line("bench.scheduler", argv),
        "machine": machine_info(),
        "settings": {"model": str(model), "audio_seconds": args.seconds, "steps": args.steps},
        "results": rows,
    }
    write_json(args.out, report)
    log(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
