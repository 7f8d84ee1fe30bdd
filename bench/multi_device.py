"""One video on several devices or ranks: measured on this CPU, predicted by the scheduler's model, projected to H100s.

``measure`` makes one whole video (the Sonic-shaped ``structure`` preset, 25 steps, real speech of ``--seconds``) in
four configurations, each alone on the machine in a process of its own:

- ``1dev-2thr``: one device, 2 threads; ``1dev-1thr``: one device, 1 thread;
- ``2dev-1thr``: two CPU replicas of 1 thread each (``Runtime(devices=["cpu", "cpu"])``);
- ``2ranks-1thr``: ``torchrun`` with 2 ranks (gloo, 1 thread each), each owning half of the frames.

For each: seconds to the first written frame and in all (from the ``animate`` call; model loading apart), peak RSS
(every process of the run), the stage timings and a digest of the generated frames (equal digests: the same video).

Before them it **calibrates** the model on this CPU, from pieces only: one UNet call (3 guidance rows of one window)
on 2 threads, on 1 thread alone, and on 1 thread while a second thread runs another (as two replicas or two ranks
do); 2 rows and 1 row side by side (a row split over two workers); and the stages before and after the loop
(per output chunk of 8 frames) from a 1-step run of the same video on 2 and on 1 thread. The discrete-event model
(:mod:`bench.simulator`: the runtime's own placement, readiness and rank messages, timed) then predicts each run's
total and first frame, written beside the measured ones with their error.

``project`` runs the same model for H100s: a UNet call's ~100 TFLOP and an 8-frame VAE decode's ~24 TFLOP at a stated
share of the 800 TFLOP/s fp16 peak, links at nominal NVLink (900 GB/s) or PCIe Gen5 x16 (64 GB/s) bandwidth, for 1 to
16 devices and 10 s, 1 min and 10 min of audio. A projection, not a measurement.

Usage::

    python -m bench.multi_device measure                 # ~1 h on a 2-core CPU: results/multi_device-structure-25steps-cpu.*
    python -m bench.multi_device measure --preset demo --seconds 4 --steps 2 --resolution 64   # a quick look
    python -m bench.multi_device project                 # results/multi_device-h100-projection.*
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import RESULTS, command_line, fmt_table, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, REPO, SIZES, ensure_inputs, ensure_model, speech_of_length
from bench.simulator import CostModel, Prediction, simulate_devices, simulate_ranks

RUNS = {
    "1dev-2thr": {"devices": None, "threads": 2, "ranks": 1},
    "1dev-1thr": {"devices": None, "threads": 1, "ranks": 1},
    "2dev-1thr": {"devices": "cpu,cpu", "threads": 2, "ranks": 1},  # two replicas split the 2 threads
    "2ranks-1thr": {"devices": None, "threads": 1, "ranks": 2},
}
BEFORE_STAGES = ("preprocess", "audio_features", "image_encode", "audio_adapters")
OUTPUT_STAGES = ("decode", "interpolate", "encode")
CHUNK = 8
# links of the CPU runs: threads of one process share memory; torchrun ranks on loopback gloo (both assumed, and
# negligible next to a UNet call of seconds: the model's messages are a few hundred kB)
LOOPBACK = {"latency_s": 2e-4, "bandwidth_gbs": 1.0}
# the H100 projection
H100_PEAK_TFLOPS = 800.0
UNET_CALL_TFLOP = 100.0  # one window, 3 guidance rows x 25 frames at 512x512 (docs/performance.md)
DECODE_FRAME_TFLOP = 3.0  # VAE decode of one 512x512 frame
LINKS = {"nvlink": {"bandwidth_gbs": 900.0, "latency_s": 1e-5}, "pcie5": {"bandwidth_gbs": 64.0, "latency_s": 1e-5}}
LENGTHS_S = (10, 60, 600)
DEVICE_COUNTS = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------------------------------------ one run (a child)
def _digest(frames) -> str:
    import numpy as np

    frames = np.ascontiguousarray(frames)
    return hashlib.sha256(str(frames.shape).encode() + frames.tobytes()).hexdigest()


def run_one(args: argparse.Namespace) -> None:
    """One whole video in this process (or this rank), its figures to ``args.out`` (``.rank<r>`` under torchrun)."""
    import torch

    import sonic_rt

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runtime = sonic_rt.Runtime(args.model, devices=args.devices)
    load_s = time.perf_counter() - started
    first: list[float] = []
    units = [0]

    def events(kind: str, info: dict) -> None:
        if kind == "frames" and not first:
            first.append(info["elapsed_seconds"])
        elif kind == "window":
            units[0] += 1

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = runtime.animate(
            args.image,
            args.audio,
            Path(tmp) / "out.mp4",
            steps=args.steps,
            min_resolution=args.resolution,
            progress=False,
            return_frames=runtime.distributed.rank == 0,
            events=events,
        )
        total_s = time.perf_counter() - started
    rank = runtime.distributed.rank
    record = {
        "rank": rank,
        "threads": args.threads,
        "devices": [str(d) for d in runtime.devices],
        "workers": len(runtime._scheduler.workers),
        "load_s": round(load_s, 2),
        "total_s": round(total_s, 2),
        "first_frame_s": round(first[0], 2) if first else None,
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
        "units_here": units[0],
        "num_generated_frames": result.num_generated_frames,
        "frames_sha256": _digest(result.frames) if result.frames is not None else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    runtime.close()
    out = Path(args.out) if rank == 0 else Path(f"{args.out}.rank{rank}")
    out.write_text(json.dumps(record))


def _child(command: list[str], env: dict[str, str] | None = None) -> None:
    log("  " + " ".join(command[2:]))
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **(env or {})})


def measure_run(name: str, model: Path, image: Path, audio: Path, steps: int, resolution: int) -> dict[str, Any]:
    """One configuration of :data:`RUNS`, in its own process(es)."""
    spec = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        args = ["--model", str(model), "--image", str(image), "--audio", str(audio), "--steps", str(steps)]
        args += ["--resolution", str(resolution), "--threads", str(spec["threads"]), "--out", str(out)]
        if spec["devices"]:
            args += ["--devices", spec["devices"]]
        if spec["ranks"] > 1:
            port = _free_port()
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(spec["ranks"])]
            launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "bench.multi_device"]
            _child(launcher + ["run-one", *args], {"OMP_NUM_THREADS": str(spec["threads"])})
        else:
            _child([sys.executable, "-m", "bench.multi_device", "run-one", *args])
        record = json.loads(out.read_text())
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("run.json.rank*"))]
    record["peak_rss_mb_per_process"] = [record["peak_rss_mb"]] + [r["peak_rss_mb"] for r in ranks]
    record["peak_rss_mb_all"] = round(sum(record["peak_rss_mb_per_process"]), 1)
    record["units_per_rank"] = [record["units_here"]] + [r["units_here"] for r in ranks]
    return record


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- calibration
def calibrate_one(args: argparse.Namespace) -> None:
    """The model's durations on this CPU (a child: its own process, nothing else running), to ``args.out``."""
    import torch

    import sonic_rt

    torch.set_num_threads(2)
    runtime = sonic_rt.Runtime(args.model)
    unet = runtime.graphs.unet
    h = args.resolution // 8
    inputs = list(unet.spec.sample_inputs("opt"))
    gen = torch.Generator().manual_seed(0)
    inputs[0] = torch.randn(3, 25, 8, h, h, generator=gen)
    for k in range(5, len(inputs)):  # the face mask of each attention level
        inputs[k] = torch.rand(1, 1, h >> (k - 5), h >> (k - 5), generator=gen)

    def rows(n: int) -> list:
        return [x[:n] if i in (0, 2, 3, 4) else x for i, x in enumerate(inputs)]

    def timed(calls: list[tuple[int, int]], repeats: int = 3) -> list[float]:
        """Each ``(rows, threads)`` call on its own thread, all at once; the best of ``repeats`` per call."""
        best = [float("inf")] * len(calls)
        for _ in range(repeats + 1):  # the first round warms up
            seconds = [0.0] * len(calls)
            barrier = threading.Barrier(len(calls))

            def one(i: int, n: int, threads: int) -> None:
                torch.set_num_threads(threads)
                args_ = rows(n)
                barrier.wait()
                started = time.perf_counter()
                with torch.inference_mode():
                    unet(*args_)
                seconds[i] = time.perf_counter() - started

            workers = [threading.Thread(target=one, args=(i, n, t)) for i, (n, t) in enumerate(calls)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = [min(b, s) for b, s in zip(best, seconds)]
        return best

    log("calibrating: UNet calls")
    unit = {
        "unit_2thr_s": timed([(3, 2)])[0],
        "unit_1thr_s": timed([(3, 1)])[0],
        "unit_1thr_pair_s": sum(timed([(3, 1), (3, 1)])) / 2,
    }
    two, one = timed([(2, 1), (1, 1)])
    unit.update(row_split_2rows_s=two, row_split_1row_s=one)
    log("calibrating: the stages around the loop (1-step runs)")
    stages = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            result = runtime.animate(
                args.image, args.audio, Path(tmp) / "o.mp4", steps=1, min_resolution=args.resolution, progress=False
            )
        chunks = -(-result.num_generated_frames // CHUNK)
        stages[f"{threads}thr"] = {
            "before_s": sum(result.timings[s] for s in BEFORE_STAGES),
            "chunk_s": sum(result.timings[s] for s in OUTPUT_STAGES) / chunks,
            "timings": result.timings,
        }
    Path(args.out).write_text(json.dumps({"unet": unit, "stages": stages}))


def cost_models(calibration: dict[str, Any], frame_bytes: int) -> dict[str, CostModel]:
    """The :class:`CostModel` of each run of :data:`RUNS`, from the calibration."""
    u, s2, s1 = calibration["unet"], calibration["stages"]["2thr"], calibration["stages"]["1thr"]
    row_s = u["row_split_2rows_s"] / 2  # a 2 + 1 split ends with its 2-row part
    return {
        # one device: its only worker is the calling thread, which also decodes, so the output holds up its calls
        "1dev-2thr": CostModel(
            u["unit_2thr_s"], u["unit_2thr_s"] / 3, s2["chunk_s"], s2["before_s"], output_blocks="all", name="1dev-2thr"
        ),
        "1dev-1thr": CostModel(
            u["unit_1thr_s"], u["unit_1thr_s"] / 3, s1["chunk_s"], s1["before_s"], output_blocks="all", name="1dev-1thr"
        ),
        # the main thread decodes on 2 threads while the replicas compute on the same 2 cores
        "2dev-1thr": CostModel(
            u["unit_1thr_pair_s"], row_s, s2["chunk_s"], s2["before_s"], output_blocks="all", name="2dev-1thr"
        ),
        # each rank prepares its inputs on 1 thread at once; rank 0 decodes on its own core
        "2ranks-1thr": CostModel(
            u["unit_1thr_pair_s"],
            row_s,
            s1["chunk_s"],
            s1["before_s"],
            frame_bytes=frame_bytes,
            output_blocks="home",
            name="2ranks-1thr",
            **LOOPBACK,
        ),
    }


def predict(name: str, model: CostModel, num_frames: int, steps: int) -> Prediction:
    spec = RUNS[name]
    if spec["ranks"] > 1:
        return simulate_ranks(num_frames, steps, spec["ranks"], model)
    workers = len(spec["devices"].split(",")) if spec["devices"] else 1
    return simulate_devices(num_frames, steps, workers, model)


# -------------------------------------------------------------------------------------------------------- measure
def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    size = SIZES[args.preset]
    model = ensure_model(size, args.cache)
    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    resolution = args.resolution or size.resolution
    report: dict[str, Any] = {
        "date_utc": utc_now(),
        "command": command,
        "machine": machine_info(),
        "preset": args.preset,
        "seconds": args.seconds,
        "steps": args.steps,
        "resolution": resolution,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "calibration.json"
        log("calibration (a child process)")
        common = ["--model", str(model), "--image", str(image), "--audio", str(audio), "--out", str(out)]
        _child([sys.executable, "-m", "bench.multi_device", "calibrate-one", *common, "--resolution", str(resolution)])
        report["calibration"] = json.loads(out.read_text())
    runs = {}
    for name in args.runs.split(","):
        log(f"run {name}")
        runs[name] = measure_run(name, model, image, audio, args.steps, resolution)
    report["num_generated_frames"] = next(iter(runs.values()))["num_generated_frames"]
    report["runs"] = runs
    return predict_runs(report)


def predict_runs(report: dict[str, Any]) -> dict[str, Any]:
    """Each measured run's prediction from the report's calibration, its errors and frame comparisons (in place)."""
    runs, num_frames, resolution = report["runs"], report["num_generated_frames"], report["resolution"]
    latent = resolution // 8
    models = cost_models(report["calibration"], frame_bytes=4 * latent * latent * 4)  # fp32 latents on the CPU
    for name, record in runs.items():
        predicted = predict(name, models[name], num_frames, report["steps"])
        record["predicted"] = predicted.to_json()
        record["cost_model"] = vars(models[name])
        for key in ("total_s", "first_frame_s"):
            measured, model_s = record[key], predicted.to_json()[key]
            record[f"{key}_error"] = round(model_s / measured - 1, 4) if measured else None
    base = runs.get("1dev-2thr")
    if base:
        for record in runs.values():
            record["same_frames_as_1dev_2thr"] = record["frames_sha256"] == base["frames_sha256"]
            record["speedup_vs_1dev_2thr"] = round(base["total_s"] / record["total_s"], 3)
    same_threads = runs.get("1dev-1thr")
    if same_threads:  # workers of 1 intra-op thread each, as the 1-thread device
        for record in runs.values():
            record["same_frames_as_1dev_1thr"] = record["frames_sha256"] == same_threads["frames_sha256"]
    return report


def format_measure(report: dict[str, Any]) -> str:
    c = report["calibration"]["unet"]
    lines = [
        f"# One video on several CPU devices and ranks: measured and predicted ({report['preset']} preset)",
        "",
        f"{report['seconds']:g} s of speech ({report['num_generated_frames']} frames), {report['steps']} steps, "
        f"{report['resolution']}x{report['resolution']}; {report['machine']['cpu']}, "
        f"{report['machine']['cpus_usable']} cores; {report['date_utc']}",
        "",
        f"Command: `{report['command']}`"
        + (
            f"; predictions recomputed from its calibration by `{report['predicted_by']}`"
            if "predicted_by" in report
            else ""
        ),
        "",
        "Each run alone on the machine, in its own process(es); seconds from the `animate` call (model loading apart). "
        "`predicted`: the discrete-event model (`bench/simulator.py`) on durations calibrated from single UNet calls "
        "and a 1-step run, not from these runs.",
        "",
    ]
    header = ["run", "first frame s", "predicted", "error", "total s", "predicted", "error", "speedup", "peak RSS MB",
              "frames = 1dev-2thr", "frames = 1dev-1thr"]  # fmt: skip
    rows = []
    for name, r in report["runs"].items():
        p = r["predicted"]
        rows.append(
            [
                name,
                f"{r['first_frame_s']:.1f}",
                f"{p['first_frame_s']:.1f}",
                f"{100 * r['first_frame_s_error']:+.1f}%",
                f"{r['total_s']:.1f}",
                f"{p['total_s']:.1f}",
                f"{100 * r['total_s_error']:+.1f}%",
                f"x{r.get('speedup_vs_1dev_2thr', 1):.2f}",
                " + ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_process"]),
                "yes" if r.get("same_frames_as_1dev_2thr") else "no",
                "yes" if r.get("same_frames_as_1dev_1thr") else "no",
            ]
        )
    lines += [fmt_table(header, rows), ""]
    lines += [
        "Calibration (seconds; best of 3): UNet call of one window (3 rows) "
        f"on 2 threads {c['unit_2thr_s']:.2f}, on 1 thread {c['unit_1thr_s']:.2f}, on 1 thread beside another "
        f"{c['unit_1thr_pair_s']:.2f}; a row split over two workers: 2 rows {c['row_split_2rows_s']:.2f} beside 1 row "
        f"{c['row_split_1row_s']:.2f}. Around the loop (2 / 1 threads): before "
        + " / ".join(f"{report['calibration']['stages'][k]['before_s']:.1f}" for k in ("2thr", "1thr"))
        + " s, output per 8-frame chunk "
        + " / ".join(f"{report['calibration']['stages'][k]['chunk_s']:.2f}" for k in ("2thr", "1thr"))
        + " s.",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- project
def h100_cost(efficiency: float, link: str, ranks: bool) -> CostModel:
    """The :class:`CostModel` of H100s at ``efficiency`` of the fp16 peak (module docstring)."""
    rate = H100_PEAK_TFLOPS * efficiency
    unit_s = UNET_CALL_TFLOP / rate
    latent = 512 // 8
    frame_bytes = 4 * latent * latent * 2  # fp16 latents
    # a window's UNet inputs (latents + image latents, audio tokens) and its v, for a device other than the first
    call_bytes = 3 * 25 * (8 * latent * latent + 32 * 1024 + 4 * latent * latent) * 2
    return CostModel(
        unit_s=unit_s,
        row_s=unit_s / 3,
        chunk_s=CHUNK * DECODE_FRAME_TFLOP / rate,
        frame_bytes=frame_bytes,
        call_bytes=0 if ranks else call_bytes,
        output_blocks="home",
        name=f"h100-{link}-{int(100 * efficiency)}%",
        **LINKS[link],
    )


def project(args: argparse.Namespace, command: str) -> dict[str, Any]:
    rows = []
    for mode in ("devices", "ranks"):
        for link in LINKS:
            cost = h100_cost(args.efficiency, link, mode == "ranks")
            for seconds in args.lengths:
                num_frames = int(seconds * 12.5)
                for count in args.devices:
                    simulate = simulate_ranks if mode == "ranks" else simulate_devices
                    p = simulate(num_frames, 25, count, cost)
                    rows.append({"mode": mode, "link": link, "audio_s": seconds, "devices": count, **p.to_json()})
            log(f"projected {mode} over {link}")
    return {
        "date_utc": utc_now(),
        "command": command,
        "projection": True,
        "efficiency": args.efficiency,
        "assumptions": {
            "peak_tflops": H100_PEAK_TFLOPS,
            "unet_call_tflop": UNET_CALL_TFLOP,
            "decode_frame_tflop": DECODE_FRAME_TFLOP,
            "links": LINKS,
            "not_modelled": "model loading, the stages before the loop (Whisper, CLIP, VAE encode, adapters: "
            "under 1% of the FLOPs), RIFE and the H.264 encode",
        },
        "rows": rows,
    }


def format_project(report: dict[str, Any]) -> str:
    eff = report["efficiency"]
    lines = [
        "# One video on several H100s: a PROJECTION (not measured)",
        "",
        f"The scheduler's discrete-event model (`bench/simulator.py`) with H100s at {100 * eff:.0f}% of the "
        f"{report['assumptions']['peak_tflops']:.0f} TFLOP/s fp16 peak: a UNet call (one window, 3 guidance rows) "
        f"~{report['assumptions']['unet_call_tflop']:.0f} TFLOP, an 8-frame VAE decode "
        f"~{8 * report['assumptions']['decode_frame_tflop']:.0f} TFLOP on the first device (rank 0); links at nominal "
        "NVLink 4 (900 GB/s) or PCIe Gen5 x16 (64 GB/s). Not modelled: "
        f"{report['assumptions']['not_modelled']}. 512x512, 25 steps. {report['date_utc']}; `{report['command']}`.",
        "",
        "rtf: seconds of work per second of video (below 1: faster than real time); busy: the mean share of the "
        "time the devices spend in UNet calls.",
        "",
    ]
    for mode, link, title in (
        ("devices", "nvlink", "One process, several GPUs (`Runtime(devices=...)`), NVLink"),
        ("ranks", "pcie5", "torchrun ranks (each owning a range of frames), PCIe Gen5"),
    ):
        table = [r for r in report["rows"] if r["mode"] == mode and r["link"] == link]
        other = {(r["audio_s"], r["devices"]): r for r in report["rows"] if r["mode"] == mode and r["link"] != link}
        worst = max(abs(r["total_s"] / other[(r["audio_s"], r["devices"])]["total_s"] - 1) for r in table)
        lines += [f"## {title}", ""]
        header = ["audio", "devices", "first frame s", "total s", "rtf", "busy"]
        body = [
            [
                f"{r['audio_s']:g} s",
                str(r["devices"]),
                f"{r['first_frame_s']:.1f}",
                f"{r['total_s']:.1f}",
                f"{r['rtf']:.2f}",
                f"{sum(r['busy']) / len(r['busy']):.0%}",
            ]
            for r in table
        ]
        lines += [fmt_table(header, body), "", f"The other link changes a total by {100 * worst:.1f}% at most.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.multi_device", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="the four CPU runs, calibrated and predicted")
    m.add_argument(
        "--preset", default="structure", choices=sorted(SIZES), help="model size (structure: Sonic's UNet layout)"
    )
    m.add_argument("--seconds", type=float, default=10.0, help="seconds of speech")
    m.add_argument("--steps", type=int, default=25, help="denoising steps (Sonic's: 25)")
    m.add_argument("--resolution", type=int, default=None, help="pixels (default: the preset's)")
    m.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    m.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the bench checkpoint and inputs are kept")
    m.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: results/multi_device-<preset>-<steps>steps-cpu.json)",
    )
    r = sub.add_parser("repredict", help="the predictions of a measure report again, from its own calibration")
    r.add_argument("report", type=Path, help="a measure JSON (rewritten, with its .md)")
    j = sub.add_parser("project", help="the H100 projection table")
    j.add_argument("--efficiency", type=float, default=0.4, help="share of the fp16 peak a UNet call reaches")
    j.add_argument("--lengths", type=_numbers(float), default=LENGTHS_S, help="seconds of audio, comma-separated")
    j.add_argument("--devices", type=_numbers(int), default=DEVICE_COUNTS, help="device counts, comma-separated")
    j.add_argument("--out", type=Path, default=RESULTS / "multi_device-h100-projection.json")
    for name, fn in (("run-one", run_one), ("calibrate-one", calibrate_one)):  # children of measure
        c = sub.add_parser(name)
        for flag in ("--model", "--image", "--audio", "--out"):
            c.add_argument(flag, required=True)
        c.add_argument("--steps", type=int, default=25)
        c.add_argument("--resolution", type=int, required=True)
        c.add_argument("--threads", type=int, default=2)
        c.add_argument("--devices", default=None)
        c.set_defaults(child=fn)
    return p


def _numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "child"):
        args.child(args)
        return 0
    command = command_line("bench.multi_device", argv)
    if args.command == "measure":
        report = measure(args, command)
        out = args.out or RESULTS / f"multi_device-{args.preset}-{args.steps}steps-cpu.json"
        text = format_measure(report)
    elif args.command == "repredict":
        out = args.report
        report = predict_runs(json.loads(out.read_text()))
        report["predicted_by"] = command  # the model as of this command; the runs and calibration as measured
        text = format_measure(report)
    else:
        report = project(args, command)
        out = args.out
        text = format_project(report)
    write_json(out, report)
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
