"""``python -m bench.flop_mix``: the FLOP mix of one UNet call by op class, full model against the presets.

A benchmark model is only evidence about Sonic if its work is made of the same ops in the same proportions.
This counts the FLOPs of one UNet call (3 CFG rows x 25 frames, the official window) with
``torch.utils.flop_counter.FlopCounterMode`` on fake tensors (no memory, no arithmetic: the full 1.5 B-parameter
model is counted in seconds) and splits them into four classes:

- ``conv``: ``aten.convolution`` (the ResNets' 2-D and temporal 3-D convolutions, conv_in/out, samplers);
- ``linear``: ``aten.addmm`` and ``aten.mm`` (every ``nn.Linear``: attention projections, feed-forwards,
  proj_in/out, time embeddings, the audio K/V projections);
- ``attention``: the attention matmuls (QK^T and PV inside SDPA, counted as torch counts the CUDA kernels,
  and ``aten.bmm``);
- ``rest``: anything else FlopCounterMode counts (nothing, in this UNet: normalisations and elementwise ops
  are not counted).

Two structures are counted: ``simplified`` (what the runtime and the exported graphs run: the CLIP branch as
``to_v(clip)``, temporal audio K/V once per window; ``sonic_rt.models.unet.AudioAttention.SDPA``, without the
CPU's data-dependent zero-mask skipping, which a count on fake tensors cannot follow) and ``official``
(``REFERENCE``: the official code's structure, what the eager baseline runs).

The full model is counted at 512x512 (the official resolution); each preset at its bench resolution and any
``--resolutions``. The table gives every class's share in percent and its distance in points from the full
model's share in the same structure; the preset matches when every distance is at most ``--points`` (5).

Results: ``bench/results/flop_mix.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Iterator, Sequence

import torch

from bench.common import RESULTS, command_line, flop_counts, log, machine_info, utc_now, write_json

CLASSES = ("conv", "linear", "attention", "rest")
STRUCTURES = ("simplified", "official")
FULL_RESOLUTION = 512
OP_CLASS = {
    "aten.convolution": "conv",
    "aten.addmm": "linear",
    "aten.mm": "linear",
    "aten.bmm": "attention",
    "aten._scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten._scaled_dot_product_efficient_attention": "attention",
    "aten._scaled_dot_product_flash_attention": "attention",
    "aten._scaled_dot_product_cudnn_attention": "attention",
}


def op_class(op: str) -> str:
    """The class (:data:`CLASSES`) of a FlopCounterMode op name such as ``aten.addmm``."""
    return OP_CLASS.get(op, "rest")


@contextlib.contextmanager
def _no_zero_mask_skipping() -> Iterator[None]:
    """Count the simplified structure as compiled and exported graphs run it: without the CPU's skipping of
    zero-mask queries (which needs the mask's values, absent from fake tensors)."""
    import sonic_rt.models.unet as unet_module

    saved = unet_module._skips_zero_mask
    unet_module._skips_zero_mask = lambda query: False
    try:
        yield
    finally:
        unet_module._skips_zero_mask = saved


def count_call(config: dict, resolution: int, structure: str, frames: int = 25) -> dict[str, Any]:
    """FLOPs of one UNet call of ``config`` at ``resolution`` (square, pixels) in ``structure``.

    Returns:
        ``{"total": int, "by_op": {op: int}, "by_class": {class: int}, "percent": {class: float}}``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sonic_rt.models.unet import AudioAttention, SonicUNet, level_face_masks

    attention = AudioAttention.SDPA if structure == "simplified" else AudioAttention.REFERENCE
    latent = resolution // 8  # SVD's VAE: 8x
    dim = config["cross_attention_dim"]
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 1
    with FakeTensorMode(allow_non_fake_inputs=True), _no_zero_mask_skipping(), torch.inference_mode():
        unet = SonicUNet.from_config(config, attention=attention).eval()
        args = (
            torch.randn(3, frames, config["in_channels"], latent, latent),  # [B, F, 8, h, w]
            torch.tensor([0.4]),
            torch.randn(3, 1, dim),  # CLIP [B, 1, D]
            torch.randn(3, frames, 32, dim),  # audio tokens [B, F, 32, D]
            torch.tensor([[12.5, 20.0, 24.0]] * 3),
        )
        masks = level_face_masks(mask, (latent, latent), unet.attention_levels)
        total, by_op = flop_counts(lambda: unet(*args, *masks))
    by_class = dict.fromkeys(CLASSES, 0)
    for op, n in by_op.items():
        by_class[op_class(op)] += n
    return {
        "total": total,
        "by_op": by_op,
        "by_class": by_class,
        "percent": {c: 100 * n / total for c, n in by_class.items()},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.flop_mix",
        description="FLOP mix of one UNet call by op class (conv / linear / attention / rest), the full SVD-xt "
        "model at 512x512 against benchmark presets, in the simplified (runtime) and official structures. "
        "Counted on fake tensors: needs no memory and no GPU.",
    )
    p.add_argument(
        "--presets",
        default="structure,widths",
        help="comma-separated bench/presets.py sizes (default structure,widths)",
    )
    p.add_argument(
        "--resolutions",
        default="",
        help="extra resolutions (pixels) to count each preset at, besides its bench resolution, e.g. 128,256",
    )
    p.add_argument("--points", type=float, default=5.0, help="largest share difference that counts as a match")
    p.add_argument("--out", default=str(RESULTS / "flop_mix.json"), help="JSON path; the .md goes beside it")
    return p.parse_args(argv)


def preset_unet_config(name: str) -> dict:
    """The UNet config a preset's checkpoint is written with."""
    from bench import presets
    from sonic_rt.demo import DEMO_UNET_CONFIG

    configs = {
        "structure": presets.structure_unet_config,
        "widths": lambda: {**DEMO_UNET_CONFIG, "cross_attention_dim": 1024},
        "mid": lambda: {**DEMO_UNET_CONFIG, **presets.MID_UNET_OVERRIDES},
        "demo": lambda: dict(DEMO_UNET_CONFIG),
    }
    if name not in configs:
        raise SystemExit(f"bench.flop_mix: error: unknown preset {name!r}; choose from {sorted(configs)}")
    return configs[name]()


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from bench.presets import SIZES
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG

    args = parse_args(argv)
    extra = [int(r) for r in args.resolutions.split(",") if r.strip()]
    rows: list[dict[str, Any]] = []
    log("counting the full model at 512x512")
    full = {s: count_call(SVD_XT_UNET_CONFIG, FULL_RESOLUTION, s) for s in STRUCTURES}
    for s in STRUCTURES:
        rows.append({"model": "full", "resolution": FULL_RESOLUTION, "structure": s, **full[s]})
    for name in [n.strip() for n in args.presets.split(",") if n.strip()]:
        config = preset_unet_config(name)
        for resolution in dict.fromkeys([SIZES[name].resolution, *extra]):
            for s in STRUCTURES:
                log(f"counting {name} at {resolution}x{resolution}, {s}")
                counted = count_call(config, resolution, s)
                points = {c: counted["percent"][c] - full[s]["percent"][c] for c in CLASSES}
                rows.append(
                    {
                        "model": name,
                        "resolution": resolution,
                        "bench_resolution": resolution == SIZES[name].resolution,
                        "structure": s,
                        **counted,
                        "points_from_full": points,
                        "matches": max(abs(v) for v in points.values()) <= args.points,
                    }
                )
    report = {
        "benchmark": "bench.flop_mix",
        "date": utc_now(),
        "command": command_line("bench.flop_mix", argv),
        "machine": machine_info(),
        "points": args.points,
        "formulas": {
            "count": "torch.utils.flop_counter.FlopCounterMode (1 FLOP = 1 multiply or add) of one UNet call, "
            "3 CFG rows x 25 frames, on fake tensors",
            "classes": {c: sorted(op for op, k in OP_CLASS.items() if k == c) for c in CLASSES},
            "points_from_full": "share (percent) minus the full model's share at 512x512 in the same structure",
        },
        "rows": rows,
    }
    out = Path(args.out)
    write_json(out, report)
    markdown = format_markdown(report)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (also printed)."""
    lines = [
        "# bench.flop_mix: FLOP mix of one UNet call (3 CFG rows x 25 frames)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        "- counted with FlopCounterMode on fake tensors; classes: conv = aten.convolution, linear = addmm + mm, "
        "attention = SDPA's QK^T and PV + bmm",
        "- simplified = the structure the runtime runs; official = the official code's (the eager baseline's)",
        f"- a preset matches when every class is within {report['points']:g} points of the full model's share",
        "",
        "| model | resolution | structure | GFLOP | conv % | linear % | attention % | rest % | "
        "points from full (conv / linear / attention) | matches |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        pct = r["percent"]
        points = r.get("points_from_full")
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['structure']} | {r['total'] / 1e9:,.1f} | "
            f"{pct['conv']:.1f} | {pct['linear']:.1f} | {pct['attention']:.1f} | {pct['rest']:.1f} | "
            + (
                " / ".join(f"{points[c]:+.1f}" for c in ("conv", "linear", "attention"))
                + f" | {'yes' if r['matches'] else 'no'} |"
                if points
                else "- | - |"
            )
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
