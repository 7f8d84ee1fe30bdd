"""``python -m bench.throughput``: whole-video throughput of every backend against the eager baseline.

One process, one model, side by side. For a preset (model size + resolution), a set of audio lengths and a
set of backends:

- ``eager``: :class:`bench.eager.EagerPipeline`, the official pipeline's structure and cost (Whisper and
  CLIP twice, per-frame adapter loops, diffusers-style attention with per-layer mask downsampling, windows
  one after another, the whole video decoded and held before RIFE runs pair by pair). It runs on the
  *same loaded modules* as ``torch``, so both compute the same function.
- ``torch``: :class:`sonic_rt.Runtime` over the weights (the optimised PyTorch path: batched adapters,
  exact attention simplifications (``sdpa`` on CPU, Triton/sdpa on CUDA), streamed decode -> RIFE ->
  encode, default window scheduler).
- ``onnxruntime`` / ``tensorrt``: ``Runtime`` over engine directories built from the same weights with
  ``export.build_engines`` (cached and reused; fp32 on CPU, fp16 on CUDA; TensorRT only where it and a
  GPU are present, else the backend is listed as skipped with the reason).

For each backend: one warm-up call (shortest audio, 1 step) kept apart from measurement, then one measured
``animate`` per audio length that writes a real mp4 (H.264 + AAC), all stages included. Each run records:

- seconds per stage (:data:`sonic_rt.runtime.STAGES`; on CUDA timed by events on the working stream),
- output frames per second of wall time and the real-time factor (compute seconds per second of video),
- peak memory: process RSS sampled every 5 ms (peak, and peak minus the RSS before the call) and, on
  CUDA, ``torch.cuda.max_memory_allocated`` (peak, and added),
- achieved TFLOP/s of the denoise stage: FLOPs of one UNet call (``FlopCounterMode``, counted in the
  structure the backend runs: official for eager, simplified for the others) x calls / denoise seconds,
  and the **UNet floor**: the official FLOPs of the run's UNet calls at this machine's measured matmul
  peak (fp32 2048^3 GEMM on CPU; fp16 8192^3 on CUDA), docs/performance.md's definition,
- the speedup over eager at the same length (total and per stage).

**Scaling**: per backend, least-squares fits of total seconds and of added peak RSS against audio seconds
(slope, intercept, R^2) and the time per output second at each length; printed, and plotted with
matplotlib (time per output second and added memory against audio length, one line per backend). Time
should grow linearly; the runtime's memory should stay flat apart from its per-frame state (latents and
audio tokens: ``state_mb_per_audio_s``), while eager's holds the decoded video.

Results: ``bench/results/throughput-<preset>-<device>.{json,md,png}`` (machine, date, versions, command).
Presets use random-weight checkpoints in the official layout (``bench/presets.py``), so the times are those
of the real architecture only for ``full``; ``demo`` and ``mid`` show the pipeline's structure costs on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
    SIZES,
    Size,
    bench_threads,
    check_engines_match,
    ensure_engines,
    ensure_inputs,
    ensure_model,
    speech_of_length,
)

BACKENDS = ("eager", "torch", "reference", "compile", "bf16", "devices2", "onnxruntime", "tensorrt")
DEFAULT_BACKENDS = ("eager", "torch", "onnxruntime", "tensorrt")
# The torch Runtime with one option changed from its defaults (name -> (Runtime keyword arguments, description)).
OPTIONS = {
    "reference": ({"attention": "reference"}, "attention='reference' (the official attention structure)"),
    "compile": (
        {"compile": True},
        "compile=True (torch.compile of the UNet; what compile='auto' runs once the shape is in the compile cache)",
    ),
    "bf16": ({"dtype": "bf16"}, "dtype='bf16'"),
}
RSS_INTERVAL_S = 0.005
MB = 1024 * 1024


@dataclass(frozen=True)
class Preset:
    """A model size with its default audio lengths (seconds) and denoising steps for this benchmark."""

    size: Size
    seconds: tuple[float, ...]
    steps: int


PRESETS = {
    # 2 steps: time per step is constant, so the lengths, not the steps, show the scaling; a few minutes on 2 cores
    "demo": Preset(SIZES["demo"], (4.0, 10.0, 60.0), 2),
    "mid": Preset(SIZES["mid"], (2.0, 4.0, 10.0), 1),
    # narrow 2-level UNet with the official audio-path widths (not shaped like Sonic: kept for comparison)
    "widths": Preset(SIZES["widths"], (4.0, 10.0), 25),
    # shaped like Sonic (bench/presets.py, bench/flop_mix.py): the preset of every CPU speed claim
    "structure": Preset(SIZES["structure"], (4.0, 10.0), 25),
    "full": Preset(SIZES["full"], (4.0, 10.0, 60.0), 25),
}


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Samples :func:`rss_bytes` every :data:`RSS_INTERVAL_S` in a thread while the block runs.

    Attributes (after the block): ``before`` and ``peak`` in bytes.
    """

    def read(self) -> int:
        """The sampled quantity in bytes (here the RSS; subclasses sample something else)."""
        return rss_bytes()

    def __enter__(self) -> PeakRss:
        _release_memory()
        self.before = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so that one run's
    leftovers do not hide the next run's peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# FLOPs (the machine's matmul peak: bench.common.peak_tflops)
# ---------------------------------------------------------------------------------------------------------
def unet_call_flops(runtime, resolution: int, frames: int = 25) -> dict[str, int]:
    """FLOPs of one UNet call (3 CFG rows x ``frames``) at ``resolution``, in the official structure
    (REFERENCE attention, masks downsampled per layer) and in the simplified one the runtime and the
    exported graphs run (SDPA), counted on the torch runtime's UNet with random inputs."""
    from sonic_rt.models.unet import AudioAttention, level_face_masks

    unet = runtime.graphs.unet.module
    cfg, device, dtype = runtime.graphs.config, runtime.device, runtime.dtype
    h = w = resolution // cfg.vae_scale_factor
    dim, tokens = cfg.cross_attention_dim, cfg.audio_context_tokens
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 1
    args = (
        rand(3, frames, unet.config.in_channels, h, w),
        torch.tensor([0.4], device=device),
        rand(3, 1, dim),
        rand(3, frames, tokens, dim),
        torch.tensor([[12.5, 20.0, 24.0]] * 3, device=device),
    )
    masks = [m.to(device, dtype) for m in level_face_masks(mask, (h, w), unet.attention_levels)]
    with torch.inference_mode():
        official = count_flops(lambda: unet(*args, face_mask=mask.to(device, dtype)))  # face_mask=: REFERENCE
        with attention_structure(unet, AudioAttention.SDPA):
            simplified = count_flops(lambda: unet(*args, *masks))
    return {"official": official, "simplified": simplified}


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Backend:
    """A loaded backend: its ``animate`` (``Runtime.animate`` signature) and what it runs."""

    name: str
    animate: Callable[..., Any]
    description: str
    flops_structure: str  # "official" or "simplified"
    runtime: Any


def load_backends(
    names: Sequence[str], model_dir: Path, args, device: torch.device
) -> tuple[dict[str, Backend], dict[str, str], dict[str, Any], Any]:
    """Load the requested backends; returns (loaded, skipped name -> reason, engine build info, the torch
    Runtime over the weights, which eager shares and FLOPs are counted on)."""
    import sonic_rt
    from bench.eager import EagerPipeline

    loaded: dict[str, Backend] = {}
    skipped: dict[str, str] = {}
    builds: dict[str, Any] = {}
    torch_rt = sonic_rt.Runtime(model_dir, device=device)  # default settings
    if "eager" in names:
        loaded["eager"] = Backend(
            "eager",
            EagerPipeline(torch_rt).animate,
            "official structure, PyTorch eager (bench/eager.py)",
            "official",
            torch_rt,
        )
    if "torch" in names:
        loaded["torch"] = Backend(
            "torch",
            torch_rt.animate,
            f"sonic_rt Runtime, default settings (torch backend, "
            f"attention {torch_rt.attention}, {str(torch_rt.dtype)[6:]})",
            "simplified",
            torch_rt,
        )
    if "devices2" in names:  # two workers sharing the device (the multi-device path one GPU can run)
        rt = sonic_rt.Runtime(model_dir, devices=[device, device])
        what = f"devices=[{device}, {device}] (two workers, lone windows split by guidance row)"
        loaded["devices2"] = Backend("devices2", rt.animate, f"sonic_rt Runtime, defaults but {what}", "simplified", rt)
    for name, (kwargs, what) in OPTIONS.items():
        if name in names:
            rt = sonic_rt.Runtime(model_dir, device=device, **kwargs)
            structure = "official" if rt.attention == "reference" else "simplified"
            loaded[name] = Backend(name, rt.animate, f"sonic_rt Runtime, defaults but {what}", structure, rt)
    precision = "fp16" if device.type == "cuda" else "fp32"
    for name in ("onnxruntime", "tensorrt"):
        if name not in names:
            continue
        reason = _unavailable(name, device)
        if reason:
            skipped[name] = reason
            log(f"{name}: skipped ({reason})")
            continue
        given = args.engines if name == "onnxruntime" else None
        if given is not None and (given / "manifest.json").is_file():
            engine_dir = given.resolve()
        else:
            engine_dir = given or args.cache / f"{args.preset}-{name}-{precision}"
            log(f"{name}: building/reusing {precision} engines in {engine_dir}")
            started = time.perf_counter()
            engine_dir, actions = ensure_engines(
                model_dir,
                engine_dir,
                args.resolution,
                backend=name,
                precision=precision,
                device=device,
                command="bench.throughput",
            )
            builds[name] = {"seconds": time.perf_counter() - started, "actions": actions}
        check_engines_match(model_dir, engine_dir)
        rt = sonic_rt.Runtime(engine_dir, device=device)
        loaded[name] = Backend(
            name, rt.animate, f"sonic_rt Runtime over {rt.dtype} {name} engines ({engine_dir.name})", "simplified", rt
        )
    return {n: loaded[n] for n in names if n in loaded}, skipped, builds, torch_rt


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run here (None when it can)."""
    if name == "tensorrt":
        if device.type != "cuda":
            return "needs a CUDA GPU"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (pip install -e '.[tensorrt]')"
    if name == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed (pip install -e '.[onnx]' or '.[gpu]')"
        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu: '.[gpu]')"
    return None


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------
def measure(
    backend: Backend,
    image: Path,
    audio: Path,
    seconds: float,
    steps: int,
    resolution: int,
    device: torch.device,
    flops: dict[str, int],
    peak: float,
    work: Path,
) -> dict[str, Any]:
    """One measured ``animate`` writing an mp4; every figure of the run (see the module docstring)."""
    from sonic_rt.sampling import SamplingConfig, window_starts

    out = work / f"{backend.name}-{seconds:g}s.mp4"
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    with PeakRss() as rss:
        result = backend.animate(image, audio, out, steps=steps, progress=False, min_resolution=resolution)
    timings = dict(result.timings)
    total = timings["total"]
    video_s = result.num_frames / result.fps
    n = result.num_generated_frames
    config = SamplingConfig()
    calls = steps * len(window_starts(n, config.frames_per_window, 0, config.shift_offset))
    executed = flops[backend.flops_structure] * calls
    floor_s = flops["official"] * calls / (peak * 1e12)
    entry = {
        "audio_s": seconds,
        "steps": steps,
        "num_generated_frames": n,
        "num_output_frames": result.num_frames,
        "video_s": video_s,
        "size": [result.width, result.height],
        "timings_s": timings,
        "frames_per_s": result.num_frames / total,
        "real_time_factor": total / video_s,
        "unet_calls": calls,
        "unet_tflops_per_s": executed / timings["denoise"] / 1e12,
        "unet_floor_s": floor_s,
        "unet_fraction_of_floor": floor_s / timings["denoise"],
        "rss_peak_mb": rss.peak / MB,
        "rss_added_mb": (rss.peak - rss.before) / MB,
        "output_bytes": out.stat().st_size,
    }
    if cuda:
        entry["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        entry["cuda_added_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / MB
    out.unlink()
    return entry


def fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    """Least-squares line ``y = intercept + slope * x`` and its R^2 (None with fewer than 2 points)."""
    if len(xs) < 2:
        return {"slope": None, "intercept": None, "r2": None}
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    pred = intercept + slope * np.asarray(xs, float)
    ss_res = float(np.sum((np.asarray(ys) - pred) ** 2))
    ss_tot = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def state_mb_per_audio_s(runtime, resolution: int) -> float:
    """MB of per-frame state the runtime holds per second of audio: latents (working dtype) and the
    conditioned audio tokens of every generated frame (12.5 frames per second)."""
    cfg = runtime.graphs.config
    h = w = resolution // cfg.vae_scale_factor
    itemsize = torch.empty((), dtype=runtime.dtype).element_size()
    per_frame = (cfg.latent_channels * h * w + cfg.audio_context_tokens * cfg.cross_attention_dim) * itemsize
    return 12.5 * per_frame / MB


def derive(report: dict[str, Any]) -> None:
    """Speedups over eager and the scaling fits, added to ``report`` in place."""
    runs = report["runs"]
    for entries in runs.values():
        for key, entry in entries.items():
            base = runs.get("eager", {}).get(key)
            if base is None:
                continue
            entry["speedup_vs_eager"] = base["timings_s"]["total"] / entry["timings_s"]["total"]
            entry["stage_speedup_vs_eager"] = {
                stage: base["timings_s"][stage] / t
                for stage, t in entry["timings_s"].items()
                if t > 0 and stage in base["timings_s"]
            }
    scaling = {}
    for name, entries in runs.items():
        points = sorted(entries.values(), key=lambda e: e["audio_s"])
        xs = [e["audio_s"] for e in points]
        scaling[name] = {
            "audio_s": xs,
            "seconds_per_output_second": [e["real_time_factor"] for e in points],
            "total_s": fit(xs, [e["timings_s"]["total"] for e in points]),
            "rss_added_mb": fit(xs, [e["rss_added_mb"] for e in points]),
        }
        if points and "cuda_added_mb" in points[0]:
            scaling[name]["cuda_added_mb"] = fit(xs, [e["cuda_added_mb"] for e in points])
    report["scaling"] = scaling


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 0.01 and x != 0 else f"{x:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (also printed to stdout)."""
    s = report["settings"]
    lines = [
        f"# bench.throughput: preset `{s['preset']}` on {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine'].get('gpu') or report['machine']['cpu']}, "
        f"torch {report['machine']['torch']}, {report['machine']['torch_threads']} threads",
        f"- model: {s['description']}; {s['steps']} denoising steps; audio: {s['inputs']}",
        f"- matmul peak measured here: {report['peak']['tflops']:.3g} TFLOP/s ({report['peak']['gemm']}); "
        f"one UNet call = {report['unet_call_flops']['official'] / 1e12:.4g} TFLOP official, "
        f"{report['unet_call_flops']['simplified'] / 1e12:.4g} TFLOP simplified",
    ]
    for name, reason in report["skipped"].items():
        lines.append(f"- {name}: skipped, {reason}")
    for name, what in report["backends"].items():
        first = report.get("first_call_s", {}).get(name)
        lines.append(
            f"- {name}: {what}"
            + (f"; first call (warm-up, 1 step, compiling included) {first:.1f} s" if first is not None else "")
        )
    backends = list(report["runs"])
    lines += [
        "",
        "## Per run",
        "",
        "| backend | audio s | total s | frames/s | s per video s | speedup vs eager | UNet TFLOP/s | "
        "% of UNet floor | peak RSS MB | RSS added MB |" + (" CUDA peak MB |" if report["cuda"] else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if report["cuda"] else ""),
    ]
    for seconds in s["seconds"]:
        for name in backends:
            e = report["runs"][name].get(f"{seconds:g}")
            if e is None:
                continue
            row = (
                f"| {name} | {seconds:g} | {e['timings_s']['total']:.2f} | {e['frames_per_s']:.2f} | "
                f"{e['real_time_factor']:.2f} | {_f(e.get('speedup_vs_eager'))} | "
                f"{_f(e['unet_tflops_per_s'], 3)} | {100 * e['unet_fraction_of_floor']:.2g} | "
                f"{e['rss_peak_mb']:.0f} | {e['rss_added_mb']:.0f} |"
            )
            if report["cuda"]:
                row += f" {e['cuda_peak_mb']:.0f} |"
            lines.append(row)
    from sonic_rt.runtime import STAGES

    for seconds in s["seconds"]:
        present = [n for n in backends if f"{seconds:g}" in report["runs"][n]]
        lines += [
            "",
            f"## Stages, {seconds:g} s of audio (seconds; x = speedup over eager)",
            "",
            "| stage | " + " | ".join(present) + " |",
            "|---|" + "---:|" * len(present),
        ]
        for stage in STAGES:
            cells = []
            for n in present:
                e = report["runs"][n][f"{seconds:g}"]
                t = e["timings_s"].get(stage)
                x = e.get("stage_speedup_vs_eager", {}).get(stage)
                cells.append("-" if t is None else f"{t:.3f}" + (f" (x{x:.2f})" if x and n != "eager" else ""))
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Scaling with audio length (least-squares fits)",
        "",
        "| backend | total s per audio s | intercept s | R^2 | s per video s at each length | "
        "RSS added MB per audio s |" + (" CUDA added MB per audio s |" if report["cuda"] else ""),
        "|---|---:|---:|---:|---|---:|" + ("---:|" if report["cuda"] else ""),
    ]
    for name, sc in report["scaling"].items():
        t, m = sc["total_s"], sc["rss_added_mb"]
        row = (
            f"| {name} | {_f(t['slope'], 3)} | {_f(t['intercept'])} | {_f(t['r2'], 4)} | "
            + ", ".join(f"{x:.2f}" for x in sc["seconds_per_output_second"])
            + f" | {_f(m['slope'], 3)} |"
        )
        if report["cuda"]:
            row += f" {_f(sc.get('cuda_added_mb', {}).get('slope'), 3)} |"
        lines.append(row)
    lines += [
        "",
        f"Per-frame state the runtime keeps (latents + audio tokens): "
        f"{report['state_mb_per_audio_s']:.3g} MB per audio second.",
        "",
    ]
    if report.get("plot"):
        lines += [f"![time and memory against audio length]({Path(report['plot']).name})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """PNG: seconds of compute per second of video, and added peak memory, against audio length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_key = "cuda_added_mb" if report["cuda"] else "rss_added_mb"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entries in report["runs"].items():
        points = sorted(entries.values(), key=lambda e: e["audio_s"])
        xs = [e["audio_s"] for e in points]
        ax_t.plot(xs, [e["real_time_factor"] for e in points], marker="o", label=name)
        ax_m.plot(xs, [e[memory_key] for e in points], marker="o", label=name)
    ax_t.set(xlabel="audio length (s)", ylabel="compute s per s of video", title="time per output second")
    ax_m.set(
        xlabel="audio length (s)",
        ylabel=f"peak {'CUDA' if report['cuda'] else 'RSS'} added (MB)",
        title="peak memory added by the call",
    )
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    s = report["settings"]
    fig.suptitle(f"bench.throughput {s['preset']} on {report['device']}, {s['steps']} steps ({report['date'][:10]})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {name:<5} {p.size.description}; audio {', '.join(f'{x:g}' for x in p.seconds)} s; "
        f"{p.steps} steps" + ("; GPU only" if p.size.gpu_only else "")
        for name, p in PRESETS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Whole-video throughput of each backend against the eager baseline (the official pipeline's structure on
the same weights), side by side in one process: per-stage seconds, frames/s, real-time factor, peak
memory (RSS; CUDA), UNet TFLOP/s against the measured matmul floor, speedup over eager, and the scaling of
time and memory with audio length (fits printed, PNG plotted). One warm-up call per backend, then one
measured call per audio length, each writing a real mp4.

backends: eager, torch (sonic_rt Runtime over the weights, default settings), one option changed from
the defaults: reference (attention='reference'), compile (compile=True), bf16 (dtype='bf16'), devices2 (two
workers on the device: devices=[device, device]); onnxruntime,
tensorrt (engines built from the same weights with export.build_engines and cached; skipped with the reason
where unavailable). The first call of each (the warm-up, compiling included) is timed and reported.

presets (random-weight checkpoints in the official layout, cached in --cache):
{presets}""",
        epilog="example: python -m bench.throughput --preset demo\n"
        "results: bench/results/throughput-<preset>-<device>.{json,md,png} (see --out)",
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="model size (default: full on a CUDA GPU, demo on CPU)"
    )
    p.add_argument("--seconds", default=None, help="comma-separated audio lengths in seconds (default: the preset's)")
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated from "
        f"{', '.join(BACKENDS)} (default: {','.join(DEFAULT_BACKENDS)}; eager is the baseline of every "
        "speedup)",
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps per run (default: the preset's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch (and onnxruntime) threads on CPU")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results path; the .md and .png go beside it "
        "(default: bench/results/throughput-<preset>-<device>.json)",
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
        help="use this weights directory instead of the preset's "
        "cached checkpoint (its resolution is still the preset's)",
    )
    p.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="use this onnxruntime engine directory (built from the same weights) instead of the cached one",
    )
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.device.type == "cuda" and not cuda:
        p.error("--device cuda: no CUDA GPU is available here")
    args.preset = args.preset or ("full" if args.device.type == "cuda" else "demo")
    preset = PRESETS[args.preset]
    if preset.size.gpu_only and args.device.type != "cuda":
        p.error(f"--preset {args.preset} is for GPUs (the full-size model); use demo or mid on CPU")
    try:
        args.seconds = (
            tuple(sorted({float(x) for x in args.seconds.split(",") if x.strip()})) if args.seconds else preset.seconds
        )
    except ValueError:
        p.error(f"--seconds takes comma-separated numbers, got {args.seconds!r}")
    if not args.seconds or min(args.seconds) < 0.08:
        p.error("--seconds: every length must be at least 0.08 s (one generated frame)")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if not args.backends or unknown:
        p.error(f"--backends takes {', '.join(BACKENDS)}; got {unknown or 'nothing'}")
    args.steps = args.steps or preset.steps
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        p.error("--steps and --threads must be >= 1")
    args.resolution = preset.size.resolution
    args.cache = args.cache.resolve()
    device_name = "cpu" if args.device.type == "cpu" else torch.cuda.get_device_name(args.device).replace(" ", "-")
    args.out = args.out or RESULTS / f"throughput-{args.preset}-{device_name.lower()}.json"
    return args


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Everything the module docstring lists, as a JSON-ready dict (files are written by :func:`main`)."""
    preset = PRESETS[args.preset]
    device = args.device
    model_dir = args.model.resolve() if args.model else ensure_model(preset.size, args.cache)
    image, _ = ensure_inputs(args.cache)
    audios = {seconds: speech_of_length(args.cache, seconds) for seconds in args.seconds}
    backends, skipped, builds, torch_rt = load_backends(args.backends, model_dir, args, device)
    if not backends:
        raise BenchError("no backend could run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    log("counting the FLOPs of one UNet call and measuring the matmul peak")
    flops = unet_call_flops(torch_rt, args.resolution)
    peak = peak_tflops(device)
    report: dict[str, Any] = {
        "benchmark": "bench.throughput",
        "date": utc_now(),
        "command": command,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cuda": device.type == "cuda",
        "machine": machine_info(device),
        "settings": {
            "preset": args.preset,
            "description": preset.size.description,
            "resolution": args.resolution,
            "seconds": list(args.seconds),
            "steps": args.steps,
            "model_dir": str(model_dir),
            "inputs": "skimage astronaut + espeak-ng speech tiled to each length",
            "warmup": f"one animate per backend: {min(args.seconds):g} s of audio, 1 step",
        },
        "backends": {n: b.description for n, b in backends.items()},
        "skipped": skipped,
        "engine_builds": builds,
        "unet_call_flops": flops,
        "peak": peak,
        "state_mb_per_audio_s": state_mb_per_audio_s(torch_rt, args.resolution),
        "first_call_s": {},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="sonic_rt_throughput_") as tmp:
        work = Path(tmp)
        for name, backend in backends.items():
            log(f"{name}: warm-up")
            started = time.perf_counter()
            backend.animate(
                image,
                audios[min(args.seconds)],
                work / "warmup.mp4",
                steps=1,
                progress=False,
                min_resolution=args.resolution,
            )
            report["first_call_s"][name] = time.perf_counter() - started  # includes any compile
            report["runs"][name] = {}
            for seconds in args.seconds:
                log(f"{name}: {seconds:g} s of audio, {args.steps} steps")
                entry = measure(
                    backend,
                    image,
                    audios[seconds],
                    seconds,
                    args.steps,
                    args.resolution,
                    device,
                    flops,
                    peak["tflops"],
                    work,
                )
                report["runs"][name][f"{seconds:g}"] = entry
                log(
                    f"{name}: {seconds:g} s: {entry['timings_s']['total']:.2f} s, {entry['frames_per_s']:.2f} "
                    f"frames/s, peak RSS +{entry['rss_added_mb']:.0f} MB"
                )
    derive(report)
    report["machine"]["load_average_at_end"] = load_average()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    command = command_line("bench.throughput", argv)
    from sonic_rt.compiling import ENV_CACHE

    # An empty compile cache of its own: "torch" is the default a new user gets (compile="auto", nothing cached:
    # uncompiled), and "compile" pays its first compile in its warm-up call (reported as its first call).
    cache = tempfile.mkdtemp(prefix="sonic_rt_bench_inductor_")
    os.environ[ENV_CACHE] = cache
    try:
        return _main(args, command)
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


def _main(args: argparse.Namespace, command: str) -> int:
    with bench_threads(args.threads):  # before any runtime is loaded (onnxruntime reads it then)
        from sonic_rt.errors import SonicError

        try:
            report = run(args, command)
        except (SonicError, BenchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["plot"] = str(plot(report, args.out.with_suffix(".png")))  # plot() makes the directory
        write_json(args.out, report)
        markdown = format_markdown(report)
        args.out.with_suffix(".md").write_text(markdown)
        print(markdown, flush=True)
        log(f"wrote {args.out} (.md, .png beside it)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
