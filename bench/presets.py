"""Model sizes and inputs shared by the CPU/GPU benchmarks (``bench.backends``, ``bench.throughput``).

Every model here is a seeded random-weight checkpoint written in exactly the official Sonic file layout
(:func:`sonic_rt.demo.write_random_model`) and loaded by the same strict loader as the real release:

- ``demo``: the demo checkpoint itself (UNet [32, 32], cross-attention 32) at 128x128;
- ``mid``: the demo with a wider 3-level UNet (SVD's block types, one level fewer, 10 M parameters) and a
  64-wide cross-attention, at 256x256;
- ``widths``: the demo's narrow UNet at 128x128, but every width the official code hard-codes at full size:
  cross-attention 1024 (so 32 audio tokens x 1024 per frame), whisper-tiny (384-wide states), CLIP projection
  1024, the official adapter width (1024) and full-size RIFE. Its audio path has the real model's proportions,
  so it is the CPU workload for comparing the runtime with the official pipeline structure;
- ``structure``: **shaped like Sonic**, the preset every CPU speed claim uses. The official SVD-xt UNet config
  with every channel width divided by :data:`STRUCTURE_FACTOR` (5: ``[64, 128, 256, 256]``, so heads of 64
  channels as in the release, ``num_attention_heads`` ``[1, 2, 4, 4]``) and everything else official: 4 levels,
  block types, 2 layers per block, one transformer layer, temporal convolutions and transformers at every
  level, cross-attention 1024, addition-time embedding 256. Whisper-tiny, the official adapters and RIFE at
  full size; the temporal VAE at the official depth (4 levels, 2 layers per block) with widths ``[32, 64, 128,
  128]`` (/4: GroupNorm's 32 groups forbid /5); a small CLIP tower projecting to 1024 (it runs once per video).
  At 192x192 one UNet call's FLOP mix (convolution / linear / attention matmul) is within 3 points of the
  full model's at 512x512 (``python -m bench.flop_mix``, ``bench/results/flop_mix.md``);
- ``full``: the official architectures (:mod:`sonic_rt.architectures`: the 1.5 B-parameter SVD-xt UNet,
  ViT-H CLIP, the SVD temporal VAE, whisper-tiny, the official adapter and RIFE sizes) at 512x512. For GPUs:
  writing it needs ~6 GB of host memory and ~5 GB of disk (its ``unet.pth`` is stored in fp16; the
  release's is fp32, which the loader accepts equally).

Inputs: skimage's astronaut portrait and real speech (espeak-ng), tiled to any length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from bench.common import REPO, BenchError, log

if TYPE_CHECKING:
    from sonic_rt.graphs import Precision

DEFAULT_CACHE = REPO / "engines" / "bench"
SPEECH = "Hello, this is a benchmark of the sonic runtime."  # ~2.8 s with espeak-ng: 35 frames, 2 windows per step

MID_VERSION = 2
MID_RESOLUTION = 256
MID_UNET_OVERRIDES = {
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 2 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 2,
    "num_attention_heads": [2, 4, 4],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "sample_size": MID_RESOLUTION // 8,
}
WIDTHS_VERSION = 1
WIDTHS_RESOLUTION = 128
STRUCTURE_VERSION = 1
STRUCTURE_FACTOR = 5  # every UNet channel width / 5; head dim 64 as in the release
STRUCTURE_RESOLUTION = 192  # where its FLOP mix matches the full model's at 512x512 (bench/flop_mix.py)
STRUCTURE_VAE_WIDTHS = [32, 64, 128, 128]  # official [128, 256, 512, 512] / 4 (multiples of 32 for GroupNorm)
FULL_VERSION = 1
FULL_RESOLUTION = 512  # official min_resolution


def _marker(model_dir: Path) -> dict[str, Any] | None:
    from sonic_rt.checkpoint import DEMO_MARKER

    try:
        return json.loads((model_dir / DEMO_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _note(size: str) -> str:
    return (
        f"sonic_rt bench {size} checkpoint (bench/presets.py): RANDOM WEIGHTS in the official Sonic layout. "
        "Its video is not a talking face."
    )


def write_mid_model(out: str | os.PathLike) -> Path:
    """Write the mid-size random-weight checkpoint to ``out`` (replaced atomically; seeded).

    The demo's Whisper, VAE, CLIP tower and RIFE; the wider :data:`MID_UNET_OVERRIDES` UNet; CLIP's
    projection and the audio adapters at its 64-wide cross-attention (the loader is strict about widths).
    """
    from sonic_rt.demo import (
        DEMO_ADAPTER_HIDDEN,
        DEMO_CLIP,
        DEMO_RIFE_WIDTH,
        DEMO_SEED,
        DEMO_UNET_CONFIG,
        DEMO_VAE_CONFIG,
        DEMO_VERSION,
        DEMO_WHISPER,
        write_random_model,
    )

    marker = {
        "random_weights": True,
        "note": _note("mid"),
        "min_resolution": MID_RESOLUTION,
        "version": DEMO_VERSION,
        "bench_size": "mid",
        "bench_version": MID_VERSION,
    }
    return write_random_model(
        out,
        unet_config={**DEMO_UNET_CONFIG, **MID_UNET_OVERRIDES},
        vae_config=DEMO_VAE_CONFIG,
        clip=DEMO_CLIP,
        whisper=DEMO_WHISPER,
        adapter_hidden=DEMO_ADAPTER_HIDDEN,
        rife_width=DEMO_RIFE_WIDTH,
        marker=marker,
        seed=DEMO_SEED + 100,
        overwrite=True,
    )


def write_widths_model(out: str | os.PathLike) -> Path:
    """Write the official-widths random-weight checkpoint to ``out`` (seeded): the demo's narrow UNet and VAE
    with cross-attention 1024, whisper-tiny, a small CLIP tower projecting to 1024, adapters at the official
    ``intermediate_dim`` 1024 and RIFE at its official width."""
    from sonic_rt.architectures import AUDIO2TOKEN_ARGS, RIFE_WIDTH, WHISPER_TINY_CONFIG
    from sonic_rt.demo import DEMO_CLIP, DEMO_SEED, DEMO_UNET_CONFIG, DEMO_VAE_CONFIG, DEMO_VERSION, write_random_model

    whisper = {k: v for k, v in WHISPER_TINY_CONFIG.items() if k not in ("architectures", "model_type")}
    marker = {
        "random_weights": True,
        "note": _note("official-widths"),
        "min_resolution": WIDTHS_RESOLUTION,
        "version": DEMO_VERSION,
        "bench_size": "widths",
        "bench_version": WIDTHS_VERSION,
    }
    unet = {**DEMO_UNET_CONFIG, "cross_attention_dim": AUDIO2TOKEN_ARGS["output_dim"]}
    return write_random_model(
        out,
        unet_config=unet,
        vae_config=DEMO_VAE_CONFIG,
        clip=DEMO_CLIP,
        whisper=whisper,
        adapter_hidden=AUDIO2TOKEN_ARGS["intermediate_dim"],
        rife_width=RIFE_WIDTH,
        marker=marker,
        seed=DEMO_SEED + 300,
        overwrite=True,
    )


def structure_unet_config(factor: int = STRUCTURE_FACTOR) -> dict:
    """The official SVD-xt UNet config with every channel width divided by ``factor`` and the head count
    scaled with it (the official head dim, 64, kept); every other key official.

    Raises:
        ValueError: a width that is not a multiple of 64 (head dim) or 32 (GroupNorm groups) after division.
    """
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG

    official = SVD_XT_UNET_CONFIG
    widths = [c // factor for c in official["block_out_channels"]]
    head_dims = {c // h for c, h in zip(official["block_out_channels"], official["num_attention_heads"])}
    (head_dim,) = head_dims
    if any(c * factor != o or c % head_dim for c, o in zip(widths, official["block_out_channels"])):
        raise ValueError(f"factor {factor} gives widths {widths}: each must be a multiple of the head dim {head_dim}")
    return {**official, "block_out_channels": widths, "num_attention_heads": [c // head_dim for c in widths]}


def write_structure_model(out: str | os.PathLike) -> Path:
    """Write the Sonic-shaped random-weight checkpoint to ``out`` (seeded): :func:`structure_unet_config`,
    the temporal VAE at the official depth with :data:`STRUCTURE_VAE_WIDTHS`, whisper-tiny, a small CLIP tower
    projecting to 1024, the official adapters and RIFE."""
    from sonic_rt.architectures import AUDIO2TOKEN_ARGS, RIFE_WIDTH, SVD_XT_VAE_CONFIG, WHISPER_TINY_CONFIG
    from sonic_rt.demo import DEMO_CLIP, DEMO_SEED, DEMO_VERSION, write_random_model

    whisper = {k: v for k, v in WHISPER_TINY_CONFIG.items() if k not in ("architectures", "model_type")}
    marker = {
        "random_weights": True,
        "note": _note("Sonic-shaped (widths / 5)"),
        "min_resolution": STRUCTURE_RESOLUTION,
        "version": DEMO_VERSION,
        "bench_size": "structure",
        "bench_version": STRUCTURE_VERSION,
    }
    return write_random_model(
        out,
        unet_config=structure_unet_config(),
        vae_config={**SVD_XT_VAE_CONFIG, "block_out_channels": STRUCTURE_VAE_WIDTHS},
        clip=DEMO_CLIP,
        whisper=whisper,
        adapter_hidden=AUDIO2TOKEN_ARGS["intermediate_dim"],
        rife_width=RIFE_WIDTH,
        marker=marker,
        seed=DEMO_SEED + 400,
        overwrite=True,
    )


def write_full_model(out: str | os.PathLike) -> Path:
    """Write the full-size random-weight checkpoint (the official architectures) to ``out`` (seeded)."""
    from sonic_rt.architectures import (
        AUDIO2TOKEN_ARGS,
        RIFE_WIDTH,
        SVD_XT_IMAGE_ENCODER_CONFIG,
        SVD_XT_UNET_CONFIG,
        SVD_XT_VAE_CONFIG,
        WHISPER_TINY_CONFIG,
    )
    from sonic_rt.demo import DEMO_SEED, DEMO_VERSION, write_random_model

    def arguments(config: dict) -> dict:  # the config-file keys that are not constructor arguments
        return {k: v for k, v in config.items() if k not in ("architectures", "model_type")}

    marker = {
        "random_weights": True,
        "note": _note("full-size"),
        "min_resolution": FULL_RESOLUTION,
        "version": DEMO_VERSION,
        "bench_size": "full",
        "bench_version": FULL_VERSION,
    }
    return write_random_model(
        out,
        unet_config=SVD_XT_UNET_CONFIG,
        vae_config=SVD_XT_VAE_CONFIG,
        clip=arguments(SVD_XT_IMAGE_ENCODER_CONFIG),
        whisper=arguments(WHISPER_TINY_CONFIG),
        adapter_hidden=AUDIO2TOKEN_ARGS["intermediate_dim"],
        rife_width=RIFE_WIDTH,
        marker=marker,
        seed=DEMO_SEED + 200,
        unet_dtype=torch.float16,
        overwrite=True,
    )


def _write_demo(out: Path) -> Path:
    from sonic_rt.demo import write_demo_model

    return write_demo_model(out, overwrite=True)


def _current(size: str | None, version: int | None) -> Callable[[dict | None], bool]:
    def check(marker: dict | None) -> bool:
        from sonic_rt.demo import DEMO_VERSION

        return (
            bool(marker)
            and marker.get("version") == DEMO_VERSION
            and marker.get("bench_size") == size
            and marker.get("bench_version") == version
        )

    return check


@dataclass(frozen=True)
class Size:
    """One model size of the benchmarks.

    Attributes:
        name: ``demo``, ``mid``, ``widths``, ``structure`` or ``full``.
        resolution: video height = width in pixels (the engines' opt shape).
        steps: default denoising steps of a whole-video run in ``bench.backends``.
        write: writes the checkpoint into a directory.
        current: is a cached checkpoint (its marker) up to date.
        description: one line for tables and ``--help``.
        gpu_only: too large for the CPU benchmarks.
    """

    name: str
    resolution: int
    steps: int
    write: Callable[[Path], Path]
    current: Callable[[dict | None], bool]
    description: str
    gpu_only: bool = False


SIZES = {
    "demo": Size(
        "demo",
        128,
        25,
        _write_demo,
        _current(None, None),
        "demo checkpoint: UNet [32, 32], cross-attention 32; 128x128",
    ),
    "mid": Size(
        "mid",
        MID_RESOLUTION,
        2,
        write_mid_model,
        _current("mid", MID_VERSION),
        "UNet [64, 128, 128], heads [2, 4, 4], cross-attention 64; 256x256",
    ),
    "widths": Size(
        "widths",
        WIDTHS_RESOLUTION,
        25,
        write_widths_model,
        _current("widths", WIDTHS_VERSION),
        "demo UNet [32, 32] with the official widths: cross-attention 1024, whisper-tiny, CLIP "
        "projection 1024, adapters 1024, RIFE 90; 128x128",
    ),
    "structure": Size(
        "structure",
        STRUCTURE_RESOLUTION,
        25,
        write_structure_model,
        _current("structure", STRUCTURE_VERSION),
        "shaped like Sonic: the official 4-level UNet with widths / 5 ([64, 128, 256, 256], head dim 64), "
        "cross-attention 1024, whisper-tiny, adapters and RIFE official, VAE at the official depth; 192x192",
    ),
    "full": Size(
        "full",
        FULL_RESOLUTION,
        25,
        write_full_model,
        _current("full", FULL_VERSION),
        "the official architectures (SVD-xt UNet 1.5 B, ViT-H CLIP, whisper-tiny), random weights; 512x512",
        gpu_only=True,
    ),
}


def ensure_model(size: Size, cache: Path) -> Path:
    """The cached checkpoint of ``size`` under ``cache``, written when missing or outdated."""
    target = cache / f"{size.name}-model"
    if size.current(_marker(target)):
        log(f"{size.name}: reusing checkpoint {target}")
        return target
    log(f"{size.name}: writing checkpoint {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return size.write(target)


def ensure_inputs(cache: Path) -> tuple[Path, Path]:
    """skimage's astronaut as a PNG and ~2.8 s of espeak-ng speech, written once under ``cache/inputs``.

    Raises:
        BenchError: espeak-ng is not installed.
    """
    folder = cache / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "astronaut.png"
    audio = folder / f"speech-{hashlib.sha256(SPEECH.encode()).hexdigest()[:8]}.wav"  # named by its text
    if not image.is_file():
        from PIL import Image
        from skimage import data

        tmp = image.with_name(f".{image.stem}.{os.getpid()}.png")
        Image.fromarray(data.astronaut()).save(tmp)
        os.replace(tmp, image)
    if not audio.is_file():
        if shutil.which("espeak-ng") is None:
            raise BenchError(
                "espeak-ng is not installed: the whole-video runs need real speech (apt-get install espeak-ng)"
            )
        tmp = audio.with_name(f".{audio.stem}.{os.getpid()}.wav")
        subprocess.run(["espeak-ng", "-w", str(tmp), SPEECH], check=True, capture_output=True)
        os.replace(tmp, audio)
    return image, audio


def speech_of_length(cache: Path, seconds: float) -> Path:
    """A 16 kHz mono WAV of exactly ``seconds`` of speech: the espeak-ng sentence of :func:`ensure_inputs`
    repeated and cut (written once under ``cache/inputs``)."""
    from sonic_rt.media import load_audio, write_wav

    _, speech = ensure_inputs(cache)
    path = cache / "inputs" / f"{speech.stem}-{seconds:g}s.wav"
    if not path.is_file():
        samples = load_audio(speech, 16_000)
        total = int(round(seconds * 16_000))
        tiled = np.tile(samples, -(-total // len(samples)))[:total]
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.wav")
        write_wav(tmp, tiled, 16_000)
        os.replace(tmp, path)
    return path


def ensure_engines(
    model_dir: Path,
    out: Path,
    resolution: int,
    *,
    backend: str = "onnxruntime",
    precision: str | Precision = "fp32",
    device: torch.device | None = None,
    command: str = "bench",
) -> tuple[Path, dict[str, list[str]]]:
    """Build (or reuse unchanged) the engines of ``model_dir`` in ``out``: resolution range
    ``resolution..2*resolution`` (opt ``resolution``), one window per UNet call. Returns the directory and
    what was done per graph (built / reused, with the reason)."""
    from export.build_engines import BuildOptions, build_engines
    from sonic_rt.graphs import DimRange, Precision, ShapeOptions

    options = BuildOptions(
        backend=backend,
        precision=Precision.parse(precision),
        shapes=ShapeOptions(resolution=DimRange(resolution, resolution, 2 * resolution)),
    )
    report = build_engines(
        model_dir,
        out,
        options,
        log=lambda line: log(f"build: {line}"),
        device=device or torch.device("cpu"),
        command=command,
    )
    return report.out, {name: list(action) for name, action in report.actions.items()}


def check_engines_match(model_dir: Path, engine_dir: Path) -> None:
    """Refuse an engine directory built from other weights than ``model_dir`` (comparisons would be meaningless).

    Raises:
        BenchError: a source file's sha256 differs from the one the manifest recorded.
    """
    from sonic_rt.manifest import read_manifest, sha256_file

    files = read_manifest(engine_dir)["source"]["files"]
    for rel, digest in files.items():
        path = model_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise BenchError(
                f"{engine_dir} was not built from {model_dir} ({rel} differs); rebuild it with "
                f"python -m export.build_engines --model {model_dir} --out {engine_dir}, or drop --engines"
            )


@contextlib.contextmanager
def bench_threads(threads: int | None) -> Iterator[None]:
    """With ``threads``: torch.set_num_threads and ``SONIC_RT_ORT_THREADS`` (read when an onnxruntime session
    is created, so enter this before loading runtimes) for the block; both restored after."""
    saved = torch.get_num_threads(), os.environ.get("SONIC_RT_ORT_THREADS")
    if threads:
        torch.set_num_threads(threads)
        os.environ["SONIC_RT_ORT_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("SONIC_RT_ORT_THREADS", None)
        else:
            os.environ["SONIC_RT_ORT_THREADS"] = saved[1]
