"""``python -m bench.backends``: the torch backend against the onnxruntime backend on CPU, side by side.

What is measured, for each model size (``--sizes``), in one process:

- ``demo``: the random-weight demo checkpoint (:func:`sonic_rt.demo.write_demo_model`) at 128x128;
- ``mid``: a wider random-weight checkpoint in the same official layout (:func:`bench.presets.write_mid_model`: a 3-level,
  10 M-parameter UNet with 64-wide cross-attention) at 256x256.

The torch backend is ``Runtime(model_dir)``, the PyTorch reference exactly as it runs the pipeline (the UNet in
the official attention structure). The onnxruntime backend is ``Runtime(engine_dir)`` over an fp32 engine
directory built by :func:`export.build_engines.build_engines` (CPU execution provider; its UNet holds the
exact attention simplifications of docs/performance.md, savings 2-3). Engines and checkpoints are cached under
``engines/bench/`` and reused while their inputs are unchanged (build_engines checks the hashes).

1. **Per graph** (``graph <name>`` rows): each of the eight graphs of :mod:`sonic_rt.graphs`, both backends
   fed the same inputs (``spec.sample_inputs("opt")`` of the engine's spec: the workload's own shapes, e.g. the
   UNet at batch 3 x 25 frames). Two warm-up calls, then the median of ``--repeats`` calls (fewer for a graph
   whose call is so slow that the repeats would exceed ``--budget`` seconds; the count used is recorded).
   ``max|diff|`` is the largest absolute difference between the two backends' outputs.
2. **Whole video** (``video <stage>`` rows): a real portrait (skimage's astronaut) and ~3 s of real speech
   (espeak-ng) through ``Runtime.animate(out=None, steps=S)``: one warm-up call per backend at ``steps=1``, then
   one measured call. Seconds per stage from ``AnimateResult.timings`` (no ``encode``: nothing is written), and
   generated frames per second (N / total). ``max|diff|`` / PSNR compare the decoded uint8 frames.
3. **Efficiency**: achieved GFLOP/s of one UNet call per backend. FLOPs are counted once per attention
   structure with ``torch.utils.flop_counter.FlopCounterMode`` on the torch graph at the same inputs: the
   official structure (what the torch backend runs) and the exported one (what onnxruntime runs; a few %
   fewer FLOPs). Each backend's rate is its own FLOPs over its median time, also given as a fraction of this
   machine's measured fp32 GEMM rate (a 2048^3 ``torch.mm``, a practical ceiling for either backend).

How to read it: ``speedup`` = torch seconds / onnxruntime seconds (> 1: onnxruntime is faster). The sizes are
small random-weight models, so the numbers show backend overheads and kernel quality on CPU at these widths,
not the cost of the real 1.5 B-parameter Sonic UNet. A table per size goes to stdout, progress to stderr, and
everything (machine, date, command, settings, every time) to the JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    attention_structure,
    command_line,
    count_flops,
    load_average,
    log,
    machine_info,
    peak_tflops,
    utc_now,
    write_json,
)
from bench.presets import (
    DEFAULT_CACHE,
    SPEECH,
    Size,
    bench_threads,
    check_engines_match,
    ensure_engines,
    ensure_inputs,
    ensure_model,
)
from bench.presets import SIZES as ALL_SIZES
from sonic_rt.runtime import STAGES

SIZES = {name: size for name, size in ALL_SIZES.items() if not size.gpu_only}  # CPU sizes
DEFAULT_OUT = RESULTS / "backends-cpu.json"
BACKENDS = ("torch", "onnxruntime")
WARMUP = 2


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[Any, list[float], list[float]]:
    """:data:`WARMUP` calls, then up to ``repeats`` timed calls (at least 1; fewer when the last warm-up call
    says they would take more than ``budget_s``). Returns the last warm-up output and both lists of seconds."""
    warm = []
    for _ in range(WARMUP):
        start = time.perf_counter()
        out = fn()
        warm.append(time.perf_counter() - start)
    n = max(1, min(repeats, int(budget_s // max(warm[-1], 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, warm, times


def max_abs_diff(a, b) -> tuple[float, float]:
    """(max |a - b|, max |a|) over one tensor or matching tuples of tensors."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
    return diff, max(float(x.float().abs().max()) for x in a)


def unet_flops(graph, inputs) -> dict[str, int]:
    """FLOPs of one UNet call in both attention structures, on the torch graph (count once each)."""
    from sonic_rt.models.unet import AudioAttention

    counts = {}
    for structure, key in ((AudioAttention.REFERENCE, "torch"), (AudioAttention.SDPA, "onnxruntime")):
        with attention_structure(graph.module, structure):
            counts[key] = count_flops(lambda: graph(*inputs))
    return counts


def bench_graphs(runtimes: dict, names: Sequence[str], repeats: int, budget_s: float) -> dict[str, Any]:
    """Per graph: median seconds per backend at the engine spec's opt inputs, and the output difference."""
    results = {}
    for name in names:
        graphs = {backend: runtimes[backend].graphs.graphs[name] for backend in BACKENDS}
        inputs = graphs["onnxruntime"].spec.sample_inputs("opt", seed=0)
        entry: dict[str, Any] = {
            "inputs": {t.name: list(x.shape) for t, x in zip(graphs["onnxruntime"].spec.inputs, inputs)}
        }
        outputs = {}
        for backend, graph in graphs.items():
            outputs[backend], warm, times = time_calls(lambda: graph(*inputs), repeats, budget_s)
            entry[backend] = {
                "median_s": statistics.median(times),
                "times_s": times,
                "warmup_s": warm,
                "repeats": len(times),
            }
        entry["speedup"] = entry["torch"]["median_s"] / entry["onnxruntime"]["median_s"]
        entry["max_abs_diff"], entry["max_abs_torch"] = max_abs_diff(outputs["torch"], outputs["onnxruntime"])
        log(
            f"  graph {name}: torch {entry['torch']['median_s']:.4f} s, onnxruntime "
            f"{entry['onnxruntime']['median_s']:.4f} s (x{entry['speedup']:.2f}), max|diff| {entry['max_abs_diff']:.2g}"
        )
        results[name] = entry
    return results


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 videos (None when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def bench_video(runtimes: dict, image: Path, audio: Path, steps: int, resolution: int) -> dict[str, Any]:
    """One warm-up animate (steps=1) and one measured animate (``steps``) per backend; stage times and frames."""
    from sonic_rt.audio_features import SAMPLE_RATE
    from sonic_rt.media import load_audio
    from sonic_rt.sampling import SamplingConfig, window_starts

    common = dict(out=None, progress=False, min_resolution=resolution)
    entry: dict[str, Any] = {"steps": steps, "resolution": resolution}
    frames = {}
    for backend in BACKENDS:
        rt = runtimes[backend]
        log(f"  video {backend}: warm-up (steps=1)")
        rt.animate(image, audio, steps=1, **common)
        log(f"  video {backend}: measuring (steps={steps})")
        result = rt.animate(image, audio, steps=steps, return_frames=True, **common)
        frames[backend] = result.frames
        n = result.num_generated_frames
        config = SamplingConfig()  # animate's defaults: 25-frame windows
        unet_calls = steps * len(window_starts(n, config.frames_per_window, 0, config.shift_offset))
        entry[backend] = {
            "timings_s": dict(result.timings),
            "frames_per_s": n / result.timings["total"],
            "unet_calls": unet_calls,
            "denoise_per_unet_call_s": result.timings["denoise"] / unet_calls,
        }
        entry.update(num_generated_frames=n, size=[result.width, result.height])
        log(f"  video {backend}: {result.timings['total']:.2f} s, {entry[backend]['frames_per_s']:.2f} frames/s")
    entry["audio_s"] = len(load_audio(audio, SAMPLE_RATE)) / SAMPLE_RATE
    entry["speedup"] = {
        stage: entry["torch"]["timings_s"][stage] / entry["onnxruntime"]["timings_s"][stage]
        for stage in STAGES
        if stage in entry["torch"]["timings_s"] and entry["onnxruntime"]["timings_s"].get(stage)
    }
    a, b = frames["torch"], frames["onnxruntime"]
    entry["frames_max_abs_diff"] = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    entry["frames_psnr_db"] = psnr(a, b)
    return entry


def bench_size(size: Size, args, image_audio: tuple[Path, Path] | None, gemm: float) -> dict[str, Any]:
    import sonic_rt
    from sonic_rt.graphs.modules import GRAPH_NAMES

    started = time.perf_counter()
    # 1. Checkpoint and engines (cached, reused while unchanged)
    model_dir = Path(args.model).resolve() if args.model else ensure_model(size, args.cache)
    build = None
    if args.engines and (Path(args.engines) / "manifest.json").is_file():
        engine_dir = Path(args.engines).resolve()
        log(f"{size.name}: using engines {engine_dir}")
    else:
        engine_dir = Path(args.engines) if args.engines else args.cache / f"{size.name}-ort"
        log(f"{size.name}: building/reusing onnxruntime fp32 engines in {engine_dir}")
        t = time.perf_counter()
        engine_dir, actions = ensure_engines(model_dir, engine_dir, size.resolution)
        build = {"seconds": time.perf_counter() - t, "actions": actions}
    check_engines_match(model_dir, engine_dir)

    # 2. Both runtimes, loaded once
    log(f"{size.name}: loading the torch runtime ({model_dir}) and the onnxruntime runtime ({engine_dir})")
    runtimes = {
        "torch": sonic_rt.Runtime(model_dir, device="cpu"),
        "onnxruntime": sonic_rt.Runtime(engine_dir, device="cpu"),
    }
    result: dict[str, Any] = {
        "description": size.description,
        "model_dir": str(model_dir),
        "engine_dir": str(engine_dir),
        "build": build,
        "unet_config": dict(runtimes["torch"].graphs.unet.module.config),
    }

    # 3. Per graph
    names = GRAPH_NAMES if args.graphs is None else args.graphs
    log(f"{size.name}: timing {len(names)} graphs ({WARMUP} warm-up calls, median of up to {args.repeats})")
    result["graphs"] = bench_graphs(runtimes, names, args.repeats, args.budget)

    # 4. Efficiency: achieved GFLOP/s of the UNet call
    if "unet" in result["graphs"]:
        unet = result["graphs"]["unet"]
        inputs = runtimes["onnxruntime"].graphs.unet.spec.sample_inputs("opt", seed=0)
        flops = unet_flops(runtimes["torch"].graphs.unet, inputs)
        rates = {b: flops[b] / unet[b]["median_s"] / 1e9 for b in BACKENDS}
        result["efficiency"] = {
            "unet_flops": flops,
            "unet_gflops_per_s": rates,
            "gemm_gflops_per_s": gemm,
            "fraction_of_gemm": {b: rates[b] / gemm for b in BACKENDS},
            "note": "FLOPs counted with torch FlopCounterMode on the torch graph at the same inputs, once in the "
            "official attention structure (torch) and once in the exported one (onnxruntime); "
            "gemm = fp32 torch.mm 2048^3 on this machine",
        }

    # 5. Whole video
    if image_audio is not None:
        steps = args.steps or size.steps
        log(f"{size.name}: whole video, {steps} steps at {size.resolution}x{size.resolution}")
        result["video"] = bench_video(runtimes, *image_audio, steps, size.resolution)
    result["seconds"] = time.perf_counter() - started
    log(f"{size.name}: done in {result['seconds']:.1f} s")
    return result


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(name: str, result: dict[str, Any]) -> str:
    rows = []
    for graph, e in result["graphs"].items():
        rows.append(
            (
                f"graph {graph}",
                e["torch"]["median_s"],
                e["onnxruntime"]["median_s"],
                e["speedup"],
                f"{e['max_abs_diff']:.2g}",
            )
        )
    video = result.get("video")
    if video:
        t, o = video["torch"]["timings_s"], video["onnxruntime"]["timings_s"]
        for stage in STAGES:
            if stage in t or stage in o:
                speed = video["speedup"].get(stage)
                rows.append((f"video {stage}", t.get(stage), o.get(stage), speed, ""))
        rows.append(
            (
                "video frames/s",
                video["torch"]["frames_per_s"],
                video["onnxruntime"]["frames_per_s"],
                video["onnxruntime"]["frames_per_s"] / video["torch"]["frames_per_s"],
                f"{video['frames_max_abs_diff']} (PSNR {_psnr_text(video['frames_psnr_db'])})",
            )
        )
    eff = result.get("efficiency")
    if eff:
        rows.append(
            ("UNet GFLOP/s", eff["unet_gflops_per_s"]["torch"], eff["unet_gflops_per_s"]["onnxruntime"], None, "")
        )
    header = ("stage/graph", "torch s", "onnxruntime s", "speedup", "max|diff|")
    lines = [f"{header[0]:<22} {header[1]:>10} {header[2]:>14} {header[3]:>8}  {header[4]}"]
    for label, a, b, speed, diff in rows:
        if label == "UNet GFLOP/s" or label == "video frames/s":
            a_s, b_s = f"{a:.2f}", f"{b:.2f}"
        else:
            a_s, b_s = _fmt(a), _fmt(b)
        speed_s = "" if speed is None else f"x{speed:.2f}"
        lines.append(f"{label:<22} {a_s:>10} {b_s:>14} {speed_s:>8}  {diff}")
    title = f"== {name}: {result['description']}"
    if video:
        title += (
            f"; {video['audio_s']:.2f} s of speech = {video['num_generated_frames']} frames, {video['steps']} steps"
        )
    lines.insert(0, title + " ==")
    if eff:
        f = eff["fraction_of_gemm"]
        lines.append(
            f"efficiency: UNet call at {eff['unet_gflops_per_s']['torch']:.1f} GFLOP/s (torch, "
            f"{f['torch']:.0%} of this CPU's fp32 GEMM rate {eff['gemm_gflops_per_s']:.0f} GFLOP/s) vs "
            f"{eff['unet_gflops_per_s']['onnxruntime']:.1f} GFLOP/s (onnxruntime, {f['onnxruntime']:.0%})"
        )
    return "\n".join(lines)


def _psnr_text(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from sonic_rt.graphs.modules import GRAPH_NAMES

    sizes = "\n".join(f"  {s.name:<5} {s.description}; video at {s.steps} steps" for s in SIZES.values())
    p = argparse.ArgumentParser(
        prog="python -m bench.backends",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Time the torch backend (the PyTorch reference) against the onnxruntime backend (exported fp32 ONNX,
CPU execution provider) on CPU, in one process, for each model size:

  graph <name>   each of the eight graphs on the same inputs (the engine's opt shapes): {WARMUP} warm-up
                 calls, then the median of --repeats calls; max|diff| between the two outputs
  video <stage>  Runtime.animate on a real portrait and ~3 s of espeak-ng speech: one warm-up call at
                 steps=1, one measured call; seconds per stage, frames/s, max|diff| and PSNR of frames
  UNet GFLOP/s   the efficiency figure: FLOPs of one UNet call (torch FlopCounterMode) / median time,
                 also as a fraction of this CPU's measured fp32 GEMM rate

speedup = torch seconds / onnxruntime seconds (> 1: onnxruntime is faster). A table per size goes
to stdout, progress to stderr, all numbers with machine, date and command to --out (JSON).

sizes (random-weight checkpoints in the official layout, cached in --cache):
{sizes}""",
        epilog="example: python -m bench.backends --sizes demo --threads 2 --out bench/results/backends-cpu.json",
    )
    p.add_argument(
        "--sizes", default=",".join(SIZES), help=f"comma-separated model sizes from {', '.join(SIZES)} (default: all)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps of the measured whole-video run "
        "(default per size: " + ", ".join(f"{s.name} {s.steps}" for s in SIZES.values()) + ")",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed calls per graph and backend after the warm-up; the median is reported (default 5)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=12.0,
        help="seconds per graph and backend: a graph whose call is slower gets fewer repeats, at least 1 (default 12)",
    )
    p.add_argument(
        "--graphs",
        default="all",
        help=f"comma-separated graphs to time from {', '.join(GRAPH_NAMES)}, 'all' (default) or 'none'",
    )
    p.add_argument(
        "--video",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the whole-video comparison (needs espeak-ng; default: yes)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both backends: torch.set_num_threads and "
        "SONIC_RT_ORT_THREADS (default: each library's own default)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default: {DEFAULT_OUT.relative_to(REPO)})"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where checkpoints, engines and inputs are cached (default: {DEFAULT_CACHE.relative_to(REPO)})",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="use this checkpoint directory instead of the cached one (one size only)",
    )
    p.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="use this onnxruntime engine directory (built if it "
        "is not one yet) instead of the cached one (one size only); it must be built from the same "
        "weights",
    )
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from sonic_rt.graphs.modules import GRAPH_NAMES

    p = parser()
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if not args.sizes or unknown:
        p.error(f"--sizes takes {', '.join(SIZES)}; got {unknown or 'nothing'}")
    if (args.model or args.engines) and len(args.sizes) != 1:
        p.error("--model and --engines need exactly one size in --sizes")
    if args.graphs == "all":
        args.graphs = None
    elif args.graphs == "none":
        args.graphs = []
    else:
        args.graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
        unknown = [g for g in args.graphs if g not in GRAPH_NAMES]
        if unknown:
            p.error(f"unknown graphs {unknown}; choose from {', '.join(GRAPH_NAMES)}")
    for name in ("repeats", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")
    args.cache = args.cache.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    command = command_line("bench.backends", argv)
    with bench_threads(args.threads):  # before any runtime is loaded (onnxruntime reads it then)
        from sonic_rt.errors import SonicError

        try:
            image_audio = ensure_inputs(args.cache) if args.video else None
            machine = machine_info()
            machine["load_average_at_start"] = machine.pop("load_average")
            report: dict[str, Any] = {
                "benchmark": "bench.backends: torch vs onnxruntime (CPU)",
                "date": utc_now(),
                "command": command,
                "machine": machine,
                "settings": {
                    "sizes": args.sizes,
                    "steps": {s: args.steps or SIZES[s].steps for s in args.sizes},
                    "repeats": args.repeats,
                    "warmup": WARMUP,
                    "budget_s": args.budget,
                    "graphs": args.graphs,
                    "video": args.video,
                    "threads": args.threads,
                    "inputs": {"image": "skimage.data.astronaut", "speech": f"espeak-ng: {SPEECH!r}"},
                    "onnxruntime": "fp32 engines, CPUExecutionProvider",
                    "speedup": "torch seconds / onnxruntime seconds",
                },
                "sizes": {},
            }
            log(f"measuring the fp32 GEMM rate (2048^3 torch.mm, {torch.get_num_threads()} threads)")
            gemm = peak_tflops(torch.device("cpu"), repeats=max(args.repeats, 3))["tflops"] * 1e3  # GFLOP/s
            for name in args.sizes:
                report["sizes"][name] = bench_size(SIZES[name], args, image_audio, gemm)
                print(format_table(name, report["sizes"][name]), flush=True)
                print(flush=True)
        except (SonicError, BenchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["machine"]["load_average_at_end"] = load_average()
        write_json(args.out, report)
        log(f"wrote {args.out}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
