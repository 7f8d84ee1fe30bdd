"""One full-size SonicUNet call per audio-attention implementation (REFERENCE, SDPA, TRITON).

What is measured
----------------
The SVD-xt UNet with Sonic's audio attention, built from ``SVD_XT_UNET_CONFIG`` with random weights in
``--dtype`` (fp16) on the GPU, called on the inputs of one official window: 3 CFG rows x 25 frames, 8 input
channels, latent 64x64 (512x512), ``clip_embeds [3, 1, 1024]``, ``audio_tokens [3, 25, 32, 1024]``,
``added_time_ids [3, 3]`` and the per-level face masks of a centred square face box covering 35% of the frame
(:func:`sonic_rt.models.unet.level_face_masks`). The same weights and inputs run once per
:class:`sonic_rt.models.unet.AudioAttention` implementation, under ``torch.inference_mode()``:

- ``reference``: the official structure (SDPA over the single CLIP token; temporal audio context repeated and
  projected at every position);
- ``sdpa``: the exact simplifications (docs/performance.md savings 2-3), torch SDPA;
- ``triton``: the same with the fused kernel of ``sonic_rt/kernels/audio_attention.py`` (skips zero-mask blocks).

Timing: ``torch.cuda.Event`` pairs recorded on the current stream around each call, ``--warmup`` (3) untimed
calls first, then ``--repeats`` (10) timed calls; the median is reported. Host launch overhead is included
(this is the eager model as the pipeline runs it). The FLOPs of one call are counted once, on the
``reference`` call, with ``torch.utils.flop_counter.FlopCounterMode`` (1 FLOP = 1 multiply or add, as in
docs/performance.md: ~100 TFLOP at 512x512).

How to read the numbers
-----------------------
- ``ms``: median time of one UNet call; ``speedup`` = reference ms / this ms.
- ``TFLOP/s`` = reference FLOPs / time: *effective* throughput of the same function (the simplified paths do a
  few % fewer FLOPs, so their figure is what the reference would have needed to reach to be as fast).
- ``efficiency`` = that / ``--peak-tflops`` (800, the dense fp16 figure of docs/performance.md); equivalently the
  floor (reference FLOPs / peak, ~125 ms on an H100) divided by the time.
- ``max|diff|``: max abs difference of the v-prediction from the ``reference`` implementation's (fp32 math on
  the outputs); ``ref max|v|`` gives its scale. Differences come from reduction order in fp16/bf16.
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` during the timed calls.

Usage::

    python -m bench.unet_call                          # CUDA GPU: bench/results/unet_call-<gpu>.json
    python -m bench.unet_call --dtype bf16 --repeats 20
    python -m bench.unet_call --interpret --tiny       # no GPU: a UNet / 8 on CPU, Triton interpreter

Without CUDA (and without ``--interpret``) the program exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
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
    flop_counts,
    fmt_table,
    gpu_main,
    parse_common,
    run_metadata,
    time_ms,
    tiny_heads,
    write_json,
)

DTYPES = ("fp16", "bf16")  # Precision names (the efficiency figure is against the fp16/bf16 peak)
SIGMA = 5.0  # a mid-schedule noise level; timestep = 0.25 * ln(sigma) (cost does not depend on it)
FPS_ID = 12.5  # added_time_ids = (fps, bucket0, bucket1), as the runtime builds them
BUCKETS = (20.0, 24.0)


def unet_config(tiny: bool) -> dict:
    """The full-size SVD-xt UNet config; with ``tiny`` the head counts (head dim 64 kept, min 1 head) and the
    cross-attention (CLIP / audio token) width / 8."""
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG

    config = dict(SVD_XT_UNET_CONFIG)
    if tiny:
        heads = [tiny_heads(h) for h in config["num_attention_heads"]]
        head_dims = [c // h for c, h in zip(config["block_out_channels"], config["num_attention_heads"])]
        config.update(
            num_attention_heads=heads,
            block_out_channels=[h * d for h, d in zip(heads, head_dims)],
            cross_attention_dim=config["cross_attention_dim"] // TINY,
        )
    return config


def make_inputs(
    unet,
    config: dict,
    resolution: int,
    frames: int,
    face_area: float,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> tuple:
    """The positional arguments of ``SonicUNet.forward`` for one window (3 CFG rows)."""
    from sonic_rt.architectures import AUDIO2TOKEN_ARGS, SVD_XT_VAE_CONFIG
    from sonic_rt.models.unet import level_face_masks

    vae_factor = 2 ** (len(SVD_XT_VAE_CONFIG["block_out_channels"]) - 1)  # 8
    latent = (resolution // vae_factor, resolution // vae_factor)
    dim, tokens = config["cross_attention_dim"], AUDIO2TOKEN_ARGS["context_tokens"]
    gen = torch.Generator(device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    sample = rand(CFG_ROWS, frames, config["in_channels"], *latent)  # [B, F, 8, h, w]
    timestep = torch.tensor([0.25 * math.log(SIGMA)], device=device)  # [1] float32
    clip_embeds = rand(CFG_ROWS, 1, dim)  # [B, 1, 1024]
    audio_tokens = rand(CFG_ROWS, frames, tokens, dim)  # [B, F, 32, 1024]
    added_time_ids = torch.tensor([[FPS_ID, *BUCKETS]] * CFG_ROWS, device=device)  # [B, 3] float32
    masks = [
        m.to(device, dtype)
        for m in level_face_masks(face_box_mask(resolution, face_area), latent, unet.attention_levels)
    ]  # [1, 1, h_l, w_l] each
    return (sample, timestep, clip_embeds, audio_tokens, added_time_ids, *masks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.unet_call",
        description="Time one full-size SonicUNet call (SVD-xt, random weights, one 25-frame window x 3 CFG "
        "rows) for each audio-attention implementation (reference, sdpa, triton); prints a table and "
        "writes JSON. See the module docstring for how to read the numbers.",
    )
    add_common_arguments(p, "unet_call", warmup=3, repeats=10)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="model dtype (default fp16)")
    p.add_argument(
        "--impls",
        default="reference,sdpa,triton",
        help="comma-separated AudioAttention values to time (reference always runs: it is the baseline)",
    )
    return parse_common(p, argv, warmup=3, repeats=10)


def main(argv: list[str] | None = None) -> int:
    return gpu_main("bench.unet_call", argv, parse_args, run)


def run(args: argparse.Namespace, argv: list[str], device: torch.device) -> int:
    """The benchmark proper, on a selected device (see :func:`main`); exit status 2 for unknown ``--impls``."""
    from sonic_rt.graphs.spec import Precision
    from sonic_rt.models.unet import AudioAttention, SonicUNet

    try:
        impls = [AudioAttention(name) for name in args.impls.split(",")]
    except ValueError as e:
        print(f"bench.unet_call: error: --impls: {e}; choose from {[a.value for a in AudioAttention]}", file=sys.stderr)
        return 2
    # REFERENCE first: the baseline of every speedup and difference
    impls = [AudioAttention.REFERENCE] + [a for a in dict.fromkeys(impls) if a is not AudioAttention.REFERENCE]

    # 1. Settings
    config = unet_config(args.tiny)
    dtype = Precision(args.dtype).torch_dtype
    frames = args.frames or config["num_frames"]
    resolution = args.resolution
    warmup, repeats = args.warmup, args.repeats
    if args.tiny:
        resolution, frames = max(8, resolution // TINY), math.ceil(frames / TINY)

    # 2. Model with random weights, and one window's inputs
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []), device:
        torch.manual_seed(args.seed)
        unet = SonicUNet.from_config(config).to(dtype).eval()
    params = sum(p.numel() for p in unet.parameters())
    inputs = make_inputs(unet, config, resolution, frames, args.face_area, dtype, device, args.seed + 1)
    print(
        f"{device_name(device)}: SonicUNet {params / 1e9:.3f} B params ({args.dtype}), {resolution}x{resolution}, "
        f"{CFG_ROWS} CFG rows x {frames} frames, sample {list(inputs[0].shape)}; warm-up {warmup}, "
        f"median of {repeats}"
    )

    def call(impl: AudioAttention) -> torch.Tensor:
        unet.attention = impl
        return unet(*inputs)

    with torch.inference_mode():
        # 3. FLOPs of one call, counted once on the reference implementation
        flops, by_op = flop_counts(lambda: call(AudioAttention.REFERENCE))

        # 4. Each implementation: its output, then warm-up and timed calls
        results, reference = {}, None
        for impl in impls:
            v = call(impl).float()
            if reference is None:
                reference = v
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = time_ms(lambda: call(impl), device, warmup, repeats)
            ms = statistics.median(times)
            results[impl.value] = {
                "ms": ms,
                "ms_all": times,
                "speedup_vs_reference": None,
                "tflops": flops / (ms * 1e-3) / 1e12,
                "efficiency": flops / (ms * 1e-3) / 1e12 / args.peak_tflops,
                "max_abs_diff_vs_reference": float((v - reference).abs().max()),
                "finite": bool(torch.isfinite(v).all()),
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        base = results[AudioAttention.REFERENCE.value]["ms"]
        for r in results.values():
            r["speedup_vs_reference"] = base / r["ms"]
        reference_max = float(reference.abs().max())

    # 5. Report
    floor_ms = flops / (args.peak_tflops * 1e12) * 1e3
    print(
        f"FLOPs per call (reference, FlopCounterMode): {flops / 1e12:.3f} TFLOP; floor at {args.peak_tflops:g} "
        f"TFLOP/s: {floor_ms:.2f} ms; reference max|v| = {reference_max:.3g}"
    )
    print("  by op (TFLOP): " + ", ".join(f"{op.removeprefix('aten.')} {n / 1e12:.3g}" for op, n in by_op.items()))
    print(
        fmt_table(
            ["impl", "ms", "speedup", "TFLOP/s", "efficiency", "max|diff|", "finite", "peak GiB"],
            [
                [
                    name,
                    f"{r['ms']:.2f}",
                    f"{r['speedup_vs_reference']:.2f}x",
                    f"{r['tflops']:.3g}",
                    f"{r['efficiency']:.1%}",
                    f"{r['max_abs_diff_vs_reference']:.2e}",
                    r["finite"],
                    f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
                ]
                for name, r in results.items()
            ],
        )
    )
    if not all(r["finite"] for r in results.values()):
        print("WARNING: non-finite values in the output (random weights in low precision)", file=sys.stderr)

    data = {
        "benchmark": "unet_call",
        "run": run_metadata(device, "bench.unet_call", argv),
        "settings": {
            "config": "SVD_XT_UNET_CONFIG" + (f" (heads / {TINY})" if args.tiny else ""),
            "block_out_channels": config["block_out_channels"],
            "num_attention_heads": config["num_attention_heads"],
            "params": params,
            "dtype": args.dtype,
            "resolution": resolution,
            "batch": CFG_ROWS,
            "frames": frames,
            "input_shapes": {
                name: list(t.shape)
                for name, t in zip(["sample", "timestep", "clip_embeds", "audio_tokens", "added_time_ids"], inputs)
            },
            "face_mask_shapes": [list(m.shape) for m in inputs[5:]],
            "face_area": args.face_area,
            "tiny": args.tiny,
            "warmup": warmup,
            "repeats": repeats,
            "peak_tflops": args.peak_tflops,
        },
        "formulas": {
            "flops": "torch.utils.flop_counter.FlopCounterMode total of one reference call (1 FLOP = 1 multiply "
            "or add), counted once and used for every implementation",
            "tflops": "flops / median ms",
            "efficiency": "tflops / peak_tflops = floor_ms / ms",
            "max_abs_diff_vs_reference": "max |v_impl - v_reference| in fp32",
        },
        "flops": flops,
        "flops_by_op": by_op,
        "floor_ms": floor_ms,
        "reference_max_abs_v": reference_max,
        "implementations": results,
    }
    out = write_json(args.out or default_out("unet_call", device), data, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
