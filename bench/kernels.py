"""Audio cross-attention, one layer at a time: PyTorch versus the fused Triton kernel, at Sonic's real shapes.

What is measured
----------------
Every distinct audio-attention (``attn2``) layer shape of one SVD-xt UNet call for one official window at
512x512 (batch 3 CFG rows x 25 frames, latent 64x64, 32 audio tokens, head dim 64). The layer inventory
(kind, level, heads, channels, how many per call) is read from a full-size ``SonicUNet`` built on the meta
device, so it cannot drift from the model:

==========  ==========================  ======================================================
layer       N (batch rows)              L (queries per row)
==========  ==========================  ======================================================
spatial     B*F = 75 (one per frame)    H_l*W_l = 4096, 1024, 256, 64 at levels 0..3; face-masked
temporal    B = 3 (one per CFG row)     H_l*W_l*F (K/V shared by every position of a row)
==========  ==========================  ======================================================

The face mask is a centred square box covering ``--face-area`` (35%) of the frame, downsampled per level
with :func:`sonic_rt.models.unet.level_face_masks`, so the kernel's zero-block skipping is exercised.

Three implementations of ``clip_v + scale * mask * softmax(q k^T / sqrt(d)) v``, in fp16 and bf16:

- ``eager``: :func:`sonic_rt.kernels.audio_attention.audio_attention_reference` in the benchmark dtype (explicit
  matmul, softmax, matmul: the plain PyTorch definition);
- ``sdpa``: what ``AudioAttention.SDPA`` runs (``SpatialAudioAttnProcessor`` / ``TemporalAudioAttnProcessor``):
  ``F.scaled_dot_product_attention`` on ``[N, heads, L, d]`` views, then the mask multiply and the CLIP add;
- ``triton``: :func:`sonic_rt.kernels.audio_attention.spatial_audio_attention` / ``temporal_audio_attention``.

Timing: ``torch.cuda.Event`` pairs recorded on the current stream around each call; ``--warmup`` calls (5)
first, apart, then ``--repeats`` (20) timed calls queued behind a device-side sleep so that the events time
the GPU work, not the Python launch cost (the inputs stay in L2 where they fit: small layers read as fast
as they would right after the layer that produced them). The median is reported.

How to read the numbers
-----------------------
- ``ms``: median device time of one call of that layer.
- ``TFLOP/s`` = ``4*N*L*T*C`` / time: the two matmuls (QK^T and PV, 2 FLOP per multiply-add), every query
  counted, skipped or not; so the kernel's mask skipping shows as a higher figure.
- ``TB/s`` = bytes of q, k, v, clip_v and mask read plus out written (each once, in their dtypes) / time:
  the traffic a fused implementation needs; the eager paths move more (scores, the unmasked output).
- ``max|diff|``: max abs difference from the fp32 reference (the same inputs upcast). The kernel passes the
  project's rule if it is at most 2x the eager result's difference plus a small atol (``within_tolerance``).
- ``per UNet call``: each layer's time times how many such layers one UNet call has (32 in all), summed.
  The efficiency figure is the roofline floor of that work (the larger of necessary FLOPs / ``--peak-tflops``
  and necessary bytes / ``--peak-tbs``; "necessary" counts only queries whose mask is non-zero) divided by
  the Triton time: 1.0 would be at the hardware limit.

Usage::

    python -m bench.kernels                      # CUDA GPU: writes bench/results/kernels-<gpu>.json
    python -m bench.kernels --interpret --tiny   # no GPU: Triton interpreter on CPU, shapes / 8 (logic check)

Without CUDA (and without ``--interpret``) the program exits with status 2 and a one-line message.
The helpers here (device selection, event timing, run metadata) are shared with :mod:`bench.unet_call`;
importing this module imports no kernel and queries no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

RESULTS_DIR = Path(__file__).parent / "results"
KERNEL_MODULE = "sonic_rt.kernels.audio_attention"

# The workload (docs/performance.md, "The workload"): 512x512 crops, 3 CFG rows per UNet call.
RESOLUTION = 512
CFG_ROWS = 3
FACE_AREA = 0.35
AUDIO_SCALE = 1.0  # official ip_audio_scale
# docs/performance.md: dense fp16/bf16 measured on one H100 (the "floor" of every figure there).
PEAK_TFLOPS = 800.0
# Datasheet HBM bandwidth (TB/s) by device-name fragment, most specific first; --peak-tbs overrides.
PEAK_TBS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0), ("B200", 8.0))
# --tiny divides the resolution, the frame count and the head count by this (head dim kept: the kernel's
# supported head dims are the real constraint), and runs 1 warm-up + 2 timed calls.
TINY = 8
TINY_WARMUP, TINY_REPEATS = 1, 2
# The low-precision rule of docs/testing.md: |kernel - fp32| <= 2 |torch - fp32| + atol(dtype).
TOLERANCE_ATOL = {"fp16": 1e-3, "bf16": 1e-2, "fp32": 1e-5}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# docs/development.md: the Triton interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584).
INTERPRETER_DTYPES = ("fp16",)


class BenchError(RuntimeError):
    """The benchmark cannot run here (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------------------
# Helpers shared with bench.unet_call
# ---------------------------------------------------------------------------------------------------------

def select_device(interpret: bool) -> torch.device:
    """The device to benchmark on; with ``interpret`` the CPU under the Triton interpreter.

    Sets ``TRITON_INTERPRET=1`` for ``interpret`` (before the kernel module is imported, which is the only
    time Triton reads it). Raises :class:`BenchError` without CUDA, or when the kernel module was already
    imported in the other mode.
    """
    imported = KERNEL_MODULE in sys.modules
    if interpret:
        if imported and os.environ.get("TRITON_INTERPRET") != "1":
            raise BenchError(f"--interpret: {KERNEL_MODULE} was already imported without TRITON_INTERPRET=1; "
                             "run the program in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BenchError("no CUDA GPU available (torch.cuda.is_available() is False): this benchmark needs one; "
                         "use --interpret --tiny to check the program logic on CPU")
    if imported and os.environ.get("TRITON_INTERPRET") == "1":
        raise BenchError(f"{KERNEL_MODULE} was imported under TRITON_INTERPRET=1: unset it to benchmark the GPU")
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def cpu_threads_for(device: torch.device) -> Iterator[None]:
    """On the CPU (interpreter mode, a logic check), run torch single-threaded and restore the count after:
    on small shared CI machines OpenMP threads contending with other processes make tiny ops ~100x slower."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            queue_behind_sleep: bool = False) -> list[float]:
    """Device time of ``repeats`` calls of ``fn`` in ms, after ``warmup`` untimed calls (synchronises).

    On CUDA each call is bracketed by ``torch.cuda.Event`` records on the current stream. With
    ``queue_behind_sleep`` the timed calls are queued behind a device-side sleep, so that for short kernels
    the events measure GPU execution rather than gaps left by host-side launch overhead. On the CPU
    (interpreter mode) it is wall time of the synchronous call.
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    stream = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    if queue_behind_sleep and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles: the host enqueues the loop meanwhile
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (for result file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_tbs(name: str) -> float | None:
    """Datasheet memory bandwidth of a known device, else None."""
    return next((tbs for fragment, tbs in PEAK_TBS if fragment.lower() in name.lower()), None)


def run_metadata(device: torch.device, program: str, argv: list[str]) -> dict:
    """Device, library versions, date and the exact command of a run (for the JSON)."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": sys.version.split()[0],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", program, *argv]),
        "git_commit": commit,
    }


def default_out(program: str, device: torch.device) -> Path:
    name = "cpu-interpret" if device.type != "cuda" else slug(device_name(device))
    return RESULTS_DIR / f"{program}-{name}.json"


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def tiny_heads(heads: int) -> int:
    """Head count of a layer under ``--tiny`` (the head dim stays as in the model)."""
    return max(1, heads // TINY)


def face_box_mask(resolution: int, area: float) -> torch.Tensor:
    """``[1, 1, R, R]`` float32: 1 inside a centred square face box covering ``area`` of the frame, else 0."""
    side = max(1, round(math.sqrt(area) * resolution))
    top = (resolution - side) // 2
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., top:top + side, top:top + side] = 1.0
    return mask


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------------------
# The layer shapes
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One distinct audio-attention layer shape of a UNet call."""

    kind: str          # "spatial" | "temporal"
    level: int         # UNet level (0 = latent resolution)
    grid: tuple[int, int]  # latent grid of the level (h_l, w_l)
    heads: int
    head_dim: int
    count: int         # how many layers of this shape one UNet call runs
    rows: int          # N
    queries: int       # L
    tokens: int        # T

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def flops(self) -> int:
        """4*N*L*T*C: QK^T and PV, 2 FLOP per multiply-add, every query counted."""
        return 4 * self.rows * self.queries * self.tokens * self.channels


def audio_layers(latent: tuple[int, int], frames: int, tokens: int, tiny: bool) -> list[LayerShape]:
    """Every distinct attn2 shape of the full-size SVD-xt SonicUNet (built on the meta device) for one window."""
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG
    from sonic_rt.models.unet import SonicUNet, TemporalAudioAttnProcessor

    with torch.device("meta"):
        unet = SonicUNet.from_config(SVD_XT_UNET_CONFIG)
    counts: dict[tuple[str, int, int, int], int] = {}
    for name, module in unet.unet.named_modules():
        if name.endswith(".attn2"):
            kind = "temporal" if isinstance(module.processor, TemporalAudioAttnProcessor) else "spatial"
            head_dim = module.to_q.out_features // module.heads
            key = (kind, module.processor.level, module.heads, head_dim)
            counts[key] = counts.get(key, 0) + 1
    layers = []
    for (kind, level, heads, head_dim), count in sorted(counts.items(), key=lambda kv: (kv[0][0] != "spatial",
                                                                                          kv[0][1])):
        grid = (math.ceil(latent[0] / 2 ** level), math.ceil(latent[1] / 2 ** level))
        positions = grid[0] * grid[1]
        rows, queries = (CFG_ROWS * frames, positions) if kind == "spatial" else (CFG_ROWS, positions * frames)
        layers.append(LayerShape(kind, level, grid, tiny_heads(heads) if tiny else heads, head_dim, count,
                                 rows, queries, tokens))
    return layers


# ---------------------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------------------

def sdpa_audio_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, clip_v: torch.Tensor,
                         mask: torch.Tensor | None, heads: int, scale: float) -> torch.Tensor:
    """What ``AudioAttention.SDPA`` runs: torch SDPA on head views, then mask multiply and CLIP add."""
    n, length, c = q.shape
    d = c // heads
    # [N, L, C] -> [N, heads, L, d]
    qh = q.view(n, length, heads, d).transpose(1, 2)
    kh = k.view(n, -1, heads, d).transpose(1, 2)
    vh = v.view(n, -1, heads, d).transpose(1, 2)
    # [N, heads, L, d] -> [N, L, C]
    audio = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(n, length, c)
    if mask is not None:
        audio = audio * mask.to(q.dtype)[None, :, None]
    return clip_v[:, None, :] + scale * audio


def bench_layer(layer: LayerShape, dtype_name: str, mask: torch.Tensor | None, device: torch.device,
                warmup: int, repeats: int, peak: tuple[float, float | None], seed: int) -> dict:
    """Time eager, sdpa and triton on one layer shape; returns its JSON row."""
    from sonic_rt.kernels.audio_attention import (audio_attention_reference, spatial_audio_attention,
                                                  temporal_audio_attention)

    dtype = DTYPES[dtype_name]
    n, length, tokens, c, heads = layer.rows, layer.queries, layer.tokens, layer.channels, layer.heads
    gen = torch.Generator(device).manual_seed(seed)
    q = torch.randn(n, length, c, generator=gen, device=device, dtype=dtype)
    k = torch.randn(n, tokens, c, generator=gen, device=device, dtype=dtype)
    v = torch.randn(n, tokens, c, generator=gen, device=device, dtype=dtype)
    clip_v = torch.randn(n, c, generator=gen, device=device, dtype=dtype)
    mask = mask.to(device, dtype) if mask is not None else None  # the runtime holds masks in the model dtype

    if layer.kind == "spatial":
        triton_fn = lambda: spatial_audio_attention(q, k, v, clip_v, mask, heads, AUDIO_SCALE)  # noqa: E731
    else:
        triton_fn = lambda: temporal_audio_attention(q, k, v, clip_v, heads, AUDIO_SCALE)  # noqa: E731
    impls = {
        "eager": lambda: audio_attention_reference(q, k, v, clip_v, mask, heads, AUDIO_SCALE),
        "sdpa": lambda: sdpa_audio_attention(q, k, v, clip_v, mask, heads, AUDIO_SCALE),
        "triton": triton_fn,
    }
    want = audio_attention_reference(q.float(), k.float(), v.float(), clip_v.float(),
                                     mask.float() if mask is not None else None, heads, AUDIO_SCALE)
    tensors = [q, k, v, clip_v] + ([mask] if mask is not None else [])
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + q.numel() * q.element_size()  # + out

    # the roofline floor counts only the queries whose mask is non-zero (the others need no attention)
    active = float((mask != 0).float().mean()) if mask is not None else 1.0
    needed_flops = layer.flops * active
    needed_bytes = nbytes - (1.0 - active) * q.numel() * q.element_size()
    peak_tflops, peak_bw = peak
    floor_ms = max(needed_flops / (peak_tflops * 1e12), needed_bytes / (peak_bw * 1e12) if peak_bw else 0.0) * 1e3

    results = {}
    for name, fn in impls.items():
        diff = float((fn().float() - want).abs().max())
        times = time_ms(fn, device, warmup, repeats, queue_behind_sleep=True)
        ms = statistics.median(times)
        results[name] = {"ms": ms, "ms_all": times, "tflops": layer.flops / (ms * 1e-3) / 1e12,
                         "tbs": nbytes / (ms * 1e-3) / 1e12, "max_abs_diff": diff}
    for name in ("eager", "sdpa"):
        results["triton"][f"speedup_vs_{name}"] = results[name]["ms"] / results["triton"]["ms"]
    torch_diff = results["eager"]["max_abs_diff"]
    results["triton"]["within_tolerance"] = bool(
        results["triton"]["max_abs_diff"] <= 2 * torch_diff + TOLERANCE_ATOL[dtype_name])
    return {
        **dataclasses.asdict(layer), "channels": c, "dtype": dtype_name, "flops": layer.flops, "bytes": nbytes,
        "mask_nonzero_fraction": active, "floor_ms": floor_ms, "reference_max_abs": float(want.abs().max()),
        "impls": results,
    }


# ---------------------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------------------

def add_common_arguments(p: argparse.ArgumentParser, program: str, warmup: int, repeats: int) -> None:
    """The options every GPU benchmark here shares (shape, face box, floor, seed, output, tiny/interpreter mode);
    ``warmup`` / ``repeats`` are the program's defaults, shown in the help."""
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="square crop in pixels (default 512)")
    p.add_argument("--frames", type=int, default=None, help="frames per window (default: SVD-xt num_frames, 25)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed calls before timing (default {warmup}; {TINY_WARMUP} tiny)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls, the median is reported (default {repeats}; {TINY_REPEATS} tiny)")
    p.add_argument("--face-area", type=float, default=FACE_AREA,
                   help="fraction of the frame covered by the square face box (default 0.35)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help="dense fp16/bf16 peak for the efficiency figure "
                        "(default 800, docs/performance.md's H100 figure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default bench/results/{program}-<gpu-name>.json)")
    p.add_argument("--tiny", action="store_true",
                   help=f"shapes / {TINY} (resolution, frames, heads; head dim 64 kept), {TINY_WARMUP} warm-up + "
                        f"{TINY_REPEATS} timed calls: a quick logic check")
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: set TRITON_INTERPRET=1 and run on CPU in the Triton interpreter (implies --tiny)")


def parse_common(p: argparse.ArgumentParser, argv: list[str], warmup: int, repeats: int) -> argparse.Namespace:
    """Parse, then resolve --tiny (implied by --interpret) and the warm-up / repeat counts."""
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.interpret
    default_warmup, default_repeats = (TINY_WARMUP, TINY_REPEATS) if args.tiny else (warmup, repeats)
    args.warmup = default_warmup if args.warmup is None else args.warmup
    args.repeats = default_repeats if args.repeats is None else args.repeats
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description="Time Sonic's audio cross-attention layers at their real shapes (SVD-xt, one 25-frame "
                    "window, 3 CFG rows): PyTorch eager and SDPA versus the fused Triton kernel, fp16 and bf16. "
                    "Prints a table and writes JSON. See the module docstring for how to read the numbers.")
    add_common_arguments(p, "kernels", warmup=5, repeats=20)
    p.add_argument("--dtypes", default=None,
                   help="comma-separated, of fp16,bf16,fp32 (default fp16,bf16; fp16 only with --interpret, "
                        "where bf16 tl.dot is wrong)")
    p.add_argument("--peak-tbs", type=float, default=None,
                   help="memory bandwidth for the floor in TB/s (default: datasheet value of known GPUs)")
    return parse_common(p, argv, warmup=5, repeats=20)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        device = select_device(args.interpret)
    except BenchError as e:
        print(f"bench.kernels: error: {e}", file=sys.stderr)
        return 2
    with cpu_threads_for(device):
        return run(args, argv, device)


def run(args: argparse.Namespace, argv: list[str], device: torch.device) -> int:
    """The benchmark proper, on a selected device (see :func:`main`)."""
    # 1. Settings
    from sonic_rt.architectures import AUDIO2TOKEN_ARGS, SVD_XT_UNET_CONFIG, SVD_XT_VAE_CONFIG
    from sonic_rt.models.unet import level_face_masks

    vae_factor = 2 ** (len(SVD_XT_VAE_CONFIG["block_out_channels"]) - 1)  # 8
    frames = args.frames or SVD_XT_UNET_CONFIG["num_frames"]
    resolution = args.resolution
    warmup, repeats = args.warmup, args.repeats
    if args.tiny:
        resolution, frames = max(vae_factor, resolution // TINY), math.ceil(frames / TINY)
    dtype_names = (args.dtypes.split(",") if args.dtypes else
                   list(INTERPRETER_DTYPES) if args.interpret else ["fp16", "bf16"])
    if unknown := [d for d in dtype_names if d not in DTYPES]:
        print(f"bench.kernels: error: unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}", file=sys.stderr)
        return 2
    latent = (resolution // vae_factor, resolution // vae_factor)
    tokens = AUDIO2TOKEN_ARGS["context_tokens"]
    bandwidth = args.peak_tbs or (peak_tbs(device_name(device)) if device.type == "cuda" else None)

    # 2. Shapes and the face mask of every level
    layers = audio_layers(latent, frames, tokens, args.tiny)
    masks = level_face_masks(face_box_mask(resolution, args.face_area), latent, sorted({layer.level for layer in layers}))
    print(f"{device_name(device)}: {resolution}x{resolution}, {CFG_ROWS} CFG rows x {frames} frames, "
          f"latent {latent[0]}x{latent[1]}, {tokens} audio tokens, face box {args.face_area:.0%} of the frame; "
          f"warm-up {warmup}, median of {repeats}")

    # 3. Measure
    results: dict[str, list[dict]] = {}
    with torch.inference_mode():
        for d_i, dtype_name in enumerate(dtype_names):
            results[dtype_name] = [
                bench_layer(layer, dtype_name, masks[layer.level].reshape(-1) if layer.kind == "spatial" else None,
                            device, warmup, repeats, (args.peak_tflops, bandwidth), args.seed + 100 * d_i + i)
                for i, layer in enumerate(layers)]

    # 4. Per UNet call: each shape times its layer count
    per_call = {}
    for dtype_name, rows in results.items():
        totals = {name: sum(r["count"] * r["impls"][name]["ms"] for r in rows) for name in ("eager", "sdpa", "triton")}
        floor = sum(r["count"] * r["floor_ms"] for r in rows)
        per_call[dtype_name] = {
            "layers": sum(r["count"] for r in rows), "ms": totals, "floor_ms": floor,
            "triton_speedup_vs_sdpa": totals["sdpa"] / totals["triton"],
            "triton_speedup_vs_eager": totals["eager"] / totals["triton"],
            "triton_efficiency": floor / totals["triton"],
        }

    # 5. Report
    header = ["dtype", "layer", "lvl", "grid", "x", "N", "L", "C", "mask%", "impl", "ms", "TFLOP/s", "TB/s",
              "max|diff|", "speedup"]
    table = []
    for dtype_name, rows in results.items():
        for r in rows:
            for name, m in r["impls"].items():
                speedup = f"{m['speedup_vs_sdpa']:.2f}x" if name == "triton" else ""
                table.append([dtype_name, r["kind"], r["level"], "x".join(map(str, r["grid"])), r["count"],
                              r["rows"], r["queries"], r["channels"], f"{100 * r['mask_nonzero_fraction']:.0f}",
                              name, f"{m['ms']:.4f}", f"{m['tflops']:.2f}", f"{m['tbs']:.3f}",
                              f"{m['max_abs_diff']:.2e}", speedup])
    print(fmt_table(header, table))
    print("\nper UNet call (each shape x its layer count); speedup = sdpa / triton; efficiency = floor / triton")
    print(fmt_table(["dtype", "layers", "eager ms", "sdpa ms", "triton ms", "speedup", "floor ms", "efficiency"],
                    [[k, v["layers"], f"{v['ms']['eager']:.3f}", f"{v['ms']['sdpa']:.3f}", f"{v['ms']['triton']:.3f}",
                      f"{v['triton_speedup_vs_sdpa']:.2f}x", f"{v['floor_ms']:.3f}",
                      f"{v['triton_efficiency']:.2f}" if bandwidth else "n/a (no --peak-tbs)"]
                     for k, v in per_call.items()]))
    failed = [(d, r["kind"], r["level"]) for d, rows in results.items() for r in rows
              if not r["impls"]["triton"]["within_tolerance"]]
    if failed:
        print(f"WARNING: triton outside the tolerance rule for {failed}", file=sys.stderr)

    data = {
        "benchmark": "kernels",
        "run": run_metadata(device, "bench.kernels", argv),
        "settings": {"resolution": resolution, "latent": list(latent), "batch": CFG_ROWS, "frames": frames,
                     "tokens": tokens, "face_area": args.face_area, "audio_scale": AUDIO_SCALE, "tiny": args.tiny,
                     "warmup": warmup, "repeats": repeats, "dtypes": dtype_names,
                     "peak_tflops": args.peak_tflops, "peak_tbs": bandwidth},
        "formulas": {
            "flops": "4*N*L*T*C (QK^T and PV matmuls, 2 FLOP per multiply-add, every query counted)",
            "tflops": "flops / median time",
            "bytes": "sizes of q [N,L,C], k and v [N,T,C], clip_v [N,C], mask [L] (spatial) read + out [N,L,C] "
                     "written, in their dtypes",
            "tbs": "bytes / median time",
            "max_abs_diff": "max |impl - audio_attention_reference in fp32 on the same inputs|",
            "within_tolerance": "triton max_abs_diff <= 2 * eager max_abs_diff + atol (fp16 1e-3, bf16 1e-2)",
            "floor_ms": "max(flops * f / peak_tflops, (bytes - (1 - f) * q bytes) / peak_tbs), f = fraction of "
                        "queries with a non-zero mask",
            "per_unet_call": "sum over shapes of count * ms; triton_efficiency = floor_ms / triton ms",
        },
        "layers": results,
        "per_unet_call": per_call,
    }
    out = write_json(args.out or default_out("kernels", device), data)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
