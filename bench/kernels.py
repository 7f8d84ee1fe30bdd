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
Device selection, event timing, run metadata and the shared options live in :mod:`bench.common` (with
:mod:`bench.unet_call`); importing this module imports no kernel and queries no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys

import torch

from bench.common import (
    CFG_ROWS,
    TINY,
    add_common_arguments,
    default_out,
    device_name,
    face_box_mask,
    fmt_table,
    gpu_main,
    parse_common,
    run_metadata,
    time_ms,
    tiny_heads,
    write_json,
)

# Audio attention's scale in the official pipeline (ip_audio_scale).
AUDIO_SCALE = 1.0
# Datasheet HBM bandwidth (TB/s) by device-name fragment, most specific first; --peak-tbs overrides.
PEAK_TBS = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0), ("B200", 8.0))
# The low-precision rule of docs/testing.md: |kernel - fp32| <= 2 |torch - fp32| + atol(precision).
TOLERANCE_ATOL = {"fp16": 1e-3, "bf16": 1e-2, "fp32": 1e-5}
# docs/development.md: the Triton interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584).
INTERPRETER_DTYPES = ("fp16",)


def peak_tbs(name: str) -> float | None:
    """Datasheet memory bandwidth of a known device, else None."""
    return next((tbs for fragment, tbs in PEAK_TBS if fragment.lower() in name.lower()), None)


# ---------------------------------------------------------------------------------------------------------
# The layer shapes
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One distinct audio-attention layer shape of a UNet call."""

    kind: str  # "spatial" | "temporal"
    level: int  # UNet level (0 = latent resolution)
    grid: tuple[int, int]  # latent grid of the level (h_l, w_l)
    heads: int
    head_dim: int
    count: int  # how many layers of this shape one UNet call runs
    rows: int  # N
    queries: int  # L
    tokens: int  # T

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
    for (kind, level, heads, head_dim), count in sorted(
        counts.items(), key=lambda kv: (kv[0][0] != "spatial", kv[0][1])
    ):
        grid = (math.ceil(latent[0] / 2**level), math.ceil(latent[1] / 2**level))
        positions = grid[0] * grid[1]
        rows, queries = (CFG_ROWS * frames, positions) if kind == "spatial" else (CFG_ROWS, positions * frames)
        layers.append(
            LayerShape(kind, level, grid, tiny_heads(heads) if tiny else heads, head_dim, count, rows, queries, tokens)
        )
    return layers


# ---------------------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------------------


def sdpa_audio_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    clip_v: torch.Tensor,
    mask: torch.Tensor | None,
    heads: int,
    scale: float,
) -> torch.Tensor:
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


def bench_layer(
    layer: LayerShape,
    dtype_name: str,
    mask: torch.Tensor | None,
    device: torch.device,
    warmup: int,
    repeats: int,
    peak: tuple[float, float | None],
    seed: int,
) -> dict:
    """Time eager, sdpa and triton on one layer shape; returns its JSON row."""
    from sonic_rt.graphs.spec import Precision
    from sonic_rt.kernels.audio_attention import (
        audio_attention_reference,
        spatial_audio_attention,
        temporal_audio_attention,
    )

    dtype = Precision(dtype_name).torch_dtype
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
    want = audio_attention_reference(
        q.float(), k.float(), v.float(), clip_v.float(), mask.float() if mask is not None else None, heads, AUDIO_SCALE
    )
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
        results[name] = {
            "ms": ms,
            "ms_all": times,
            "tflops": layer.flops / (ms * 1e-3) / 1e12,
            "tbs": nbytes / (ms * 1e-3) / 1e12,
            "max_abs_diff": diff,
        }
    for name in ("eager", "sdpa"):
        results["triton"][f"speedup_vs_{name}"] = results[name]["ms"] / results["triton"]["ms"]
    torch_diff = results["eager"]["max_abs_diff"]
    results["triton"]["within_tolerance"] = bool(
        results["triton"]["max_abs_diff"] <= 2 * torch_diff + TOLERANCE_ATOL[dtype_name]
    )
    return {
        **dataclasses.asdict(layer),
        "channels": c,
        "dtype": dtype_name,
        "flops": layer.flops,
        "bytes": nbytes,
        "mask_nonzero_fraction": active,
        "floor_ms": floor_ms,
        "reference_max_abs": float(want.abs().max()),
        "impls": results,
    }


# ---------------------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description="Time Sonic's audio cross-attention layers at their real shapes (SVD-xt, one 25-frame "
        "window, 3 CFG rows): PyTorch eager and SDPA versus the fused Triton kernel, fp16 and bf16. "
        "Prints a table and writes JSON. See the module docstring for how to read the numbers.",
    )
    add_common_arguments(p, "kernels", warmup=5, repeats=20)
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated, of fp16,bf16,fp32 (default fp16,bf16; fp16 only with --interpret, "
        "where bf16 tl.dot is wrong)",
    )
    p.add_argument(
        "--peak-tbs",
        type=float,
        default=None,
        help="memory bandwidth for the floor in TB/s (default: datasheet value of known GPUs)",
    )
    return parse_common(p, argv, warmup=5, repeats=20)


def main(argv: list[str] | None = None) -> int:
    return gpu_main("bench.kernels", argv, parse_args, run)


def run(args: argparse.Namespace, argv: list[str], device: torch.device) -> int:
    """The benchmark proper, on a selected device (see :func:`main`)."""
    # 1. Settings
    from sonic_rt.architectures import AUDIO2TOKEN_ARGS, SVD_XT_UNET_CONFIG, SVD_XT_VAE_CONFIG
    from sonic_rt.errors import InputError
    from sonic_rt.graphs.spec import Precision
    from sonic_rt.models.unet import level_face_masks

    vae_factor = 2 ** (len(SVD_XT_VAE_CONFIG["block_out_channels"]) - 1)  # 8
    frames = args.frames or SVD_XT_UNET_CONFIG["num_frames"]
    resolution = args.resolution
    warmup, repeats = args.warmup, args.repeats
    if args.tiny:
        resolution, frames = max(vae_factor, resolution // TINY), math.ceil(frames / TINY)
    try:  # the short names (fp16, bf16, fp32) key the JSON
        dtype_names = (
            [Precision.parse(d).value for d in args.dtypes.split(",")]
            if args.dtypes
            else (list(INTERPRETER_DTYPES) if args.interpret else ["fp16", "bf16"])
        )
    except InputError as e:
        print(f"bench.kernels: error: --dtypes: {e}", file=sys.stderr)
        return 2
    latent = (resolution // vae_factor, resolution // vae_factor)
    tokens = AUDIO2TOKEN_ARGS["context_tokens"]
    bandwidth = args.peak_tbs or (peak_tbs(device_name(device)) if device.type == "cuda" else None)

    # 2. Shapes and the face mask of every level
    layers = audio_layers(latent, frames, tokens, args.tiny)
    masks = level_face_masks(
        face_box_mask(resolution, args.face_area), latent, sorted({layer.level for layer in layers})
    )
    print(
        f"{device_name(device)}: {resolution}x{resolution}, {CFG_ROWS} CFG rows x {frames} frames, "
        f"latent {latent[0]}x{latent[1]}, {tokens} audio tokens, face box {args.face_area:.0%} of the frame; "
        f"warm-up {warmup}, median of {repeats}"
    )

    # 3. Measure
    results: dict[str, list[dict]] = {}
    with torch.inference_mode():
        for d_i, dtype_name in enumerate(dtype_names):
            results[dtype_name] = [
                bench_layer(
                    layer,
                    dtype_name,
                    masks[layer.level].reshape(-1) if layer.kind == "spatial" else None,
                    device,
                    warmup,
                    repeats,
                    (args.peak_tflops, bandwidth),
                    args.seed + 100 * d_i + i,
                )
                for i, layer in enumerate(layers)
            ]

    # 4. Per UNet call: each shape times its layer count
    per_call = {}
    for dtype_name, rows in results.items():
        totals = {name: sum(r["count"] * r["impls"][name]["ms"] for r in rows) for name in ("eager", "sdpa", "triton")}
        floor = sum(r["count"] * r["floor_ms"] for r in rows)
        per_call[dtype_name] = {
            "layers": sum(r["count"] for r in rows),
            "ms": totals,
            "floor_ms": floor,
            "triton_speedup_vs_sdpa": totals["sdpa"] / totals["triton"],
            "triton_speedup_vs_eager": totals["eager"] / totals["triton"],
            "triton_efficiency": floor / totals["triton"],
        }

    # 5. Report
    header = [
        "dtype",
        "layer",
        "lvl",
        "grid",
        "x",
        "N",
        "L",
        "C",
        "mask%",
        "impl",
        "ms",
        "TFLOP/s",
        "TB/s",
        "max|diff|",
        "speedup",
    ]
    table = []
    for dtype_name, rows in results.items():
        for r in rows:
            for name, m in r["impls"].items():
                speedup = f"{m['speedup_vs_sdpa']:.2f}x" if name == "triton" else ""
                table.append(
                    [
                        dtype_name,
                        r["kind"],
                        r["level"],
                        "x".join(map(str, r["grid"])),
                        r["count"],
                        r["rows"],
                        r["queries"],
                        r["channels"],
                        f"{100 * r['mask_nonzero_fraction']:.0f}",
                        name,
                        f"{m['ms']:.4f}",
                        f"{m['tflops']:.2f}",
                        f"{m['tbs']:.3f}",
                        f"{m['max_abs_diff']:.2e}",
                        speedup,
                    ]
                )
    print(fmt_table(header, table))
    print("\nper UNet call (each shape x its layer count); speedup = sdpa / triton; efficiency = floor / triton")
    print(
        fmt_table(
            ["dtype", "layers", "eager ms", "sdpa ms", "triton ms", "speedup", "floor ms", "efficiency"],
            [
                [
                    k,
                    v["layers"],
                    f"{v['ms']['eager']:.3f}",
                    f"{v['ms']['sdpa']:.3f}",
                    f"{v['ms']['triton']:.3f}",
                    f"{v['triton_speedup_vs_sdpa']:.2f}x",
                    f"{v['floor_ms']:.3f}",
                    f"{v['triton_efficiency']:.2f}" if bandwidth else "n/a (no --peak-tbs)",
                ]
                for k, v in per_call.items()
            ],
        )
    )
    failed = [
        (d, r["kind"], r["level"])
        for d, rows in results.items()
        for r in rows
        if not r["impls"]["triton"]["within_tolerance"]
    ]
    if failed:
        print(f"WARNING: triton outside the tolerance rule for {failed}", file=sys.stderr)

    data = {
        "benchmark": "kernels",
        "run": run_metadata(device, "bench.kernels", argv),
        "settings": {
            "resolution": resolution,
            "latent": list(latent),
            "batch": CFG_ROWS,
            "frames": frames,
            "tokens": tokens,
            "face_area": args.face_area,
            "audio_scale": AUDIO_SCALE,
            "tiny": args.tiny,
            "warmup": warmup,
            "repeats": repeats,
            "dtypes": dtype_names,
            "peak_tflops": args.peak_tflops,
            "peak_tbs": bandwidth,
        },
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
    out = write_json(args.out or default_out("kernels", device), data, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
