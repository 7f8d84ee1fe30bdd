"""What every benchmark program shares: the error type, progress lines, machine and run metadata, the matmul
peak, FLOP counting, result files, and the device / timing / argument helpers of the GPU programs
(``bench.kernels``, ``bench.unet_call``).

Importing this module imports no kernel and queries no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
KERNEL_MODULE = "sonic_rt.kernels.audio_attention"


class BenchError(RuntimeError):
    """The benchmark cannot run here, or a setup problem the user can fix (the message says why and what to do)."""


def log(message: str) -> None:
    """Progress line on stderr (results go to stdout and files)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Run and machine metadata
# ---------------------------------------------------------------------------------------------------------
def utc_now() -> str:
    """Now, ISO 8601 in UTC to the second (``2026-01-01T12:00:00+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(program: str, argv: Sequence[str] | None) -> str:
    """The shell command that reruns ``python -m program`` with ``argv`` (``sys.argv[1:]`` when None)."""
    return shlex.join(["python", "-m", program, *(sys.argv[1:] if argv is None else argv)])


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the work tree has changes) of the checkout; (None, None) outside git."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared CPU shows here (and in every time)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name; ``platform.processor()`` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    """The CPU's matrix and vector extension flags that decide low-precision speed (``amx_*``, ``avx512_bf16``,
    ``avx512_fp16``, ``avx512f``, ``avx2``) from /proc/cpuinfo; [] where it cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16", "avx512f", "avx2")})


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Machine, library versions, thread counts, git state and load average of this run (``device``: adds the
    GPU's name, memory and CUDA version when it is a CUDA device)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for module in ("diffusers", "transformers", "onnxruntime", "tensorrt", "triton"):
        with contextlib.suppress(ImportError):
            info[module] = __import__(module).__version__
    info["onnxruntime_threads"] = os.environ.get("SONIC_RT_ORT_THREADS") or "default (physical cores)"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda)
    info["git_commit"], info["git_dirty"] = git_state()
    info["load_average"] = load_average()
    return info


# ---------------------------------------------------------------------------------------------------------
# The machine's matmul peak and FLOP counting
# ---------------------------------------------------------------------------------------------------------
def peak_tflops(device: torch.device, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """This machine's dense matmul rate: fp32 2048^3 ``torch.mm`` on CPU, fp16 8192^3 on CUDA (median of
    ``repeats`` timed calls after ``warmup`` untimed ones). Returns ``tflops`` and ``gemm`` (what was run)."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        torch.mm(a, a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"tflops": 2 * n**3 / statistics.median(times) / 1e12, "gemm": f"{n}^3 {str(dtype)[6:]} torch.mm"}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counts(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs (1 multiply or add = 1) of one call of ``fn``, counted by ``FlopCounterMode``: the total and the
    count per op, largest first. CPU's fused SDPA kernel, which torch's table lacks, is counted like the CUDA
    ones (QK^T and PV)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    by_op = sorted(counter.get_flop_counts().get("Global", {}).items(), key=lambda kv: -kv[1])
    return int(counter.get_total_flops()), {str(op): int(n) for op, n in by_op}


def count_flops(fn: Callable[[], Any]) -> int:
    """The total of :func:`flop_counts`."""
    return flop_counts(fn)[0]


@contextlib.contextmanager
def attention_structure(unet, attention) -> Iterator[None]:
    """Run a ``SonicUNet`` with audio attention ``attention`` (an ``AudioAttention``) in the block, and put its
    own back after: the FLOP counts of the official (REFERENCE) and simplified (SDPA) structures."""
    before = unet.attention
    unet.attention = attention
    try:
        yield
    finally:
        unet.attention = before


# ---------------------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict, *, indent: int = 1) -> Path:
    """``data`` as JSON at ``path`` (parent directories made), newline-terminated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------------------
# The GPU programs (bench.kernels, bench.unet_call): device, timing, run metadata, shared options
# ---------------------------------------------------------------------------------------------------------
# The workload (docs/performance.md, "The workload"): 512x512 crops, 3 CFG rows per UNet call.
RESOLUTION = 512
CFG_ROWS = 3
FACE_AREA = 0.35
# docs/performance.md: dense fp16/bf16 measured on one H100 (the "floor" of every figure there).
PEAK_TFLOPS = 800.0
# --tiny divides the resolution, the frame count and the head count by this (head dim kept: the kernel's
# supported head dims are the real constraint), and runs 1 warm-up + 2 timed calls.
TINY = 8
TINY_WARMUP, TINY_REPEATS = 1, 2


def select_device(interpret: bool) -> torch.device:
    """The device to benchmark on; with ``interpret`` the CPU under the Triton interpreter.

    Sets ``TRITON_INTERPRET=1`` for ``interpret`` (before the kernel module is imported, which is the only
    time Triton reads it). Raises :class:`BenchError` without CUDA, or when the kernel module was already
    imported in the other mode.
    """
    imported = KERNEL_MODULE in sys.modules
    if interpret:
        if imported and os.environ.get("TRITON_INTERPRET") != "1":
            raise BenchError(
                f"--interpret: {KERNEL_MODULE} was already imported without TRITON_INTERPRET=1; "
                "run the program in a fresh process"
            )
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BenchError(
            "no CUDA GPU available (torch.cuda.is_available() is False): this benchmark needs one; "
            "use --interpret --tiny to check the program logic on CPU"
        )
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


def time_ms(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, queue_behind_sleep: bool = False
) -> list[float]:
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


def run_metadata(device: torch.device, program: str, argv: list[str]) -> dict:
    """Device, library versions, date and the exact command of a GPU program's run (for the JSON)."""
    import triton

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": sys.version.split()[0],
        "date_utc": utc_now(),
        "command": command_line(program, argv),
        "git_commit": git_state()[0],
    }


def default_out(program: str, device: torch.device) -> Path:
    name = "cpu-interpret" if device.type != "cuda" else slug(device_name(device))
    return RESULTS / f"{program}-{name}.json"


def tiny_heads(heads: int) -> int:
    """Head count of a layer under ``--tiny`` (the head dim stays as in the model)."""
    return max(1, heads // TINY)


def face_box_mask(resolution: int, area: float) -> torch.Tensor:
    """``[1, 1, R, R]`` float32: 1 inside a centred square face box covering ``area`` of the frame, else 0."""
    side = max(1, round(math.sqrt(area) * resolution))
    top = (resolution - side) // 2
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., top : top + side, top : top + side] = 1.0
    return mask


def add_common_arguments(p: argparse.ArgumentParser, program: str, warmup: int, repeats: int) -> None:
    """The options every GPU benchmark here shares (shape, face box, floor, seed, output, tiny/interpreter mode);
    ``warmup`` / ``repeats`` are the program's defaults, shown in the help."""
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="square crop in pixels (default 512)")
    p.add_argument("--frames", type=int, default=None, help="frames per window (default: SVD-xt num_frames, 25)")
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed calls before timing (default {warmup}; {TINY_WARMUP} tiny)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed calls, the median is reported (default {repeats}; {TINY_REPEATS} tiny)",
    )
    p.add_argument(
        "--face-area",
        type=float,
        default=FACE_AREA,
        help="fraction of the frame covered by the square face box (default 0.35)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_TFLOPS,
        help="dense fp16/bf16 peak for the efficiency figure (default 800, docs/performance.md's H100 figure)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON path (default bench/results/{program}-<gpu-name>.json)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"shapes / {TINY} (resolution, frames, heads; head dim 64 kept), {TINY_WARMUP} warm-up + "
        f"{TINY_REPEATS} timed calls: a quick logic check",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="no GPU: set TRITON_INTERPRET=1 and run on CPU in the Triton interpreter (implies --tiny)",
    )


def parse_common(p: argparse.ArgumentParser, argv: list[str], warmup: int, repeats: int) -> argparse.Namespace:
    """Parse, then resolve --tiny (implied by --interpret) and the warm-up / repeat counts."""
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.interpret
    default_warmup, default_repeats = (TINY_WARMUP, TINY_REPEATS) if args.tiny else (warmup, repeats)
    args.warmup = default_warmup if args.warmup is None else args.warmup
    args.repeats = default_repeats if args.repeats is None else args.repeats
    return args


def gpu_main(
    program: str,
    argv: list[str] | None,
    parse: Callable[[list[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace, list[str], torch.device], int],
) -> int:
    """``main`` of a GPU program: parse ``argv``, select the device (exit status 2 with a one-line message
    when it cannot run here), then ``run(args, argv, device)`` (single-threaded on the CPU)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:
        device = select_device(args.interpret)
    except BenchError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    with cpu_threads_for(device):
        return run(args, argv, device)
