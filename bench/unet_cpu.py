"""``python -m bench.unet_cpu``: one UNet call on the CPU, official structure against the runtime's paths, and the
distance to this CPU's matmul peak.

The sibling of ``bench.unet_call`` (which times the GPU). What is measured: one call of the SonicUNet on the
inputs of one official window (3 CFG rows x 25 frames, 8 input channels, ``audio_tokens [3, 25, 32, 1024]``, the
per-level face masks of a centred box covering 35% of the frame), random weights, ``torch.inference_mode()``:

- ``--model full`` (default): the real-size SVD-xt UNet (1.5 B parameters, ``SVD_XT_UNET_CONFIG``) at a small
  resolution (default 128x128: latents 16x16), about 6 GB of fp32 weights in memory;
- ``--model structure``: the UNet of the Sonic-shaped benchmark preset (``bench/presets.py``) at its 192x192.

Variants (``--variants``), each on the same weights and inputs:

- ``reference``: the official structure, as the eager baseline runs it (``bench/eager.py``: REFERENCE attention
  with the pixel face mask downsampled in every layer);
- ``default``: what ``sonic_rt.Runtime`` runs by default on this CPU (``attention="auto"``, fp32);
- ``bf16``: the default path with bf16 weights and inputs (the speed of ``dtype="bf16"``; not exact);
- ``compile``: the default path under ``torch.compile`` (inductor), timed after its first call; the first call
  (compiling) is reported apart.

Figures: median ms of ``--repeats`` calls after ``--warmup``; ``TFLOP/s`` = FLOPs the variant executes (counted
by ``bench.flop_mix`` on fake tensors in its own structure) / time; ``of fp32 peak`` = that / this CPU's
measured fp32 matmul rate (``bench.common.peak_tflops``: a 2048^3 fp32 GEMM), the distance to the physical limit
for this FLOP count; ``speedup`` = reference ms / variant ms; ``max|diff|`` = the largest difference of the
v-prediction from the reference's (fp32).

Results: ``bench/results/unet_cpu-<model>-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.common import (
    RESULTS,
    command_line,
    face_box_mask,
    fmt_table,
    log,
    machine_info,
    peak_tflops,
    utc_now,
    write_json,
)

VARIANTS = ("reference", "default", "bf16", "compile")
DEFAULT_VARIANTS = "reference,default,bf16"
FACE_AREA = 0.35


def model_config(model: str) -> dict:
    """The UNet config of ``full`` (the release's) or ``structure`` (the Sonic-shaped preset's)."""
    if model == "full":
        from sonic_rt.architectures import SVD_XT_UNET_CONFIG

        return dict(SVD_XT_UNET_CONFIG)
    from bench.presets import structure_unet_config

    return structure_unet_config()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.unet_cpu",
        description="Time one SonicUNet call (3 CFG rows x 25 frames) on the CPU: the official structure against "
        "the runtime's default path, bf16 and torch.compile; achieved TFLOP/s against this CPU's measured fp32 "
        "matmul peak. See the module docstring.",
    )
    p.add_argument("--model", choices=("full", "structure"), default="full", help="UNet size (default full)")
    p.add_argument(
        "--resolution", type=int, default=None, help="square crop in pixels (default 128 full, 192 structure)"
    )
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/unet_cpu-<model>-cpu.json)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants takes {', '.join(VARIANTS)}; got {unknown or 'nothing'}")
    args.resolution = args.resolution or (128 if args.model == "full" else 192)
    if args.resolution % 64:
        p.error("--resolution must be a multiple of 64 (the official rounding)")
    args.out = args.out or RESULTS / f"unet_cpu-{args.model}-cpu.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args, command_line("bench.unet_cpu", argv))
    write_json(args.out, report)
    markdown = format_markdown(report)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    log(f"wrote {args.out} (.md beside it)")
    return 0


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-ready dict."""
    from bench.flop_mix import count_call
    from bench.unet_call import make_inputs
    from sonic_rt.attention import resolve_attention
    from sonic_rt.models.unet import AudioAttention, SonicUNet

    device = torch.device("cpu")
    config = model_config(args.model)
    frames = config["num_frames"]

    # 1. Model and one window's inputs
    log(f"building the {args.model} UNet (random weights, fp32)")
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        unet = SonicUNet.from_config(config).eval()
    default_attention = resolve_attention(None, device, unet.head_dims)
    inputs = make_inputs(unet, config, args.resolution, frames, FACE_AREA, torch.float32, device, args.seed + 1)
    pixel_mask = face_box_mask(args.resolution, FACE_AREA)
    params = sum(p.numel() for p in unet.parameters())

    # 2. FLOPs per structure (fake tensors) and this CPU's peaks
    log("counting FLOPs and measuring the matmul peak")
    flops = {s: count_call(config, args.resolution, s)["total"] for s in ("official", "simplified")}
    peak = peak_tflops(device)

    def call_reference() -> torch.Tensor:
        unet.attention = AudioAttention.REFERENCE
        return unet(*inputs[:5], face_mask=pixel_mask)

    def caller(module, dtype: torch.dtype):
        # sample, CLIP, audio tokens and masks in ``dtype``; timestep and added_time_ids stay fp32 (as the runtime)
        cast = [t.to(dtype) if i in (0, 2, 3) or i >= 5 else t for i, t in enumerate(inputs)]
        module.attention = default_attention
        return lambda: module(*cast)

    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        reference_v = None
        for name in args.variants if "reference" in args.variants else ["reference", *args.variants]:
            first_s = None
            if name == "reference":
                fn, structure = call_reference, "official"
            elif name == "default":
                fn, structure = caller(unet, torch.float32), "simplified"
            elif name == "bf16":
                fn, structure = caller(copy.deepcopy(unet).to(torch.bfloat16), torch.bfloat16), "simplified"
            else:  # compile
                unet.attention = default_attention
                compiled = torch.compile(unet, dynamic=False)
                log("compile: first call (compiling)")
                started = time.perf_counter()
                compiled(*inputs)
                first_s = time.perf_counter() - started
                fn, structure = (lambda: compiled(*inputs)), "simplified"
            log(f"{name}: {args.warmup} warm-up + {args.repeats} timed calls")
            v = None
            for _ in range(args.warmup):
                v = fn()
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                v = fn()
                times.append(time.perf_counter() - started)
            v = v.float()
            if reference_v is None:
                reference_v = v
            ms = statistics.median(times) * 1e3
            results[name] = {
                "ms": ms,
                "ms_all": [t * 1e3 for t in times],
                "structure": structure,
                "executed_flops": flops[structure],
                "tflops": flops[structure] / (ms * 1e-3) / 1e12,
                "fraction_of_fp32_peak": flops[structure] / (ms * 1e-3) / 1e12 / peak["tflops"],
                "max_abs_diff_vs_reference": float((v - reference_v).abs().max()),
                "first_call_s": first_s,
            }
            log(f"{name}: {ms:.0f} ms")
    base = results["reference"]["ms"]
    for r in results.values():
        r["speedup_vs_reference"] = base / r["ms"]
    return {
        "benchmark": "bench.unet_cpu",
        "date": utc_now(),
        "command": command,
        "machine": machine_info(device),
        "settings": {
            "model": args.model,
            "block_out_channels": config["block_out_channels"],
            "params": params,
            "resolution": args.resolution,
            "batch": 3,
            "frames": frames,
            "face_area": FACE_AREA,
            "default_attention": default_attention.value,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "flops": flops,
        "peak": peak,
        "reference_max_abs_v": float(reference_v.abs().max()),
        "variants": results,
    }


def format_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = [
        [
            name,
            f"{r['ms']:.0f}",
            f"x{r['speedup_vs_reference']:.2f}",
            r["structure"],
            f"{r['tflops']:.3f}",
            f"{100 * r['fraction_of_fp32_peak']:.0f}%",
            f"{r['max_abs_diff_vs_reference']:.2e}",
            "-" if r["first_call_s"] is None else f"{r['first_call_s']:.0f}",
        ]
        for name, r in report["variants"].items()
    ]
    return "\n".join(
        [
            f"# bench.unet_cpu: one {s['model']} UNet call on the CPU",
            "",
            f"- date: {report['date']}",
            f"- command: `{report['command']}`",
            f"- machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} threads, torch "
            f"{report['machine']['torch']}; flags {' '.join(report['machine']['cpu_flags'])}",
            f"- model: UNet {s['block_out_channels']} ({s['params'] / 1e6:,.0f} M parameters), {s['resolution']}x"
            f"{s['resolution']}, {s['batch']} CFG rows x {s['frames']} frames; default attention "
            f"`{s['default_attention']}`",
            f"- FLOPs per call: {report['flops']['official'] / 1e9:,.1f} GFLOP official structure, "
            f"{report['flops']['simplified'] / 1e9:,.1f} GFLOP simplified (bench.flop_mix's count)",
            f"- fp32 matmul peak measured here: {report['peak']['tflops']:.3f} TFLOP/s ({report['peak']['gemm']})",
            f"- median of {s['repeats']} calls after {s['warmup']} warm-up; reference max|v| "
            f"{report['reference_max_abs_v']:.3g}",
            "",
            "```",
            fmt_table(
                ["variant", "ms", "speedup", "structure", "TFLOP/s", "of fp32 peak", "max|diff|", "first call s"],
                rows,
            ),
            "```",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
