"""A small random-weight checkpoint in exactly the official Sonic layout.

RANDOM WEIGHTS: the demo checkpoint exists to check an install and to test every code path (same file
names, formats and key names as the release, small widths in its config files). Its video is not a
talking face, only structured noise. It is seeded and deterministic.

Because its VAE and UNet are tiny, the demo is meant to run at a small resolution:
:data:`DEMO_MIN_RESOLUTION` (written to the marker file, used as the default min_resolution when the
model directory is a demo).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .architectures import SVD_XT_SCHEDULER_CONFIG, SVD_XT_UNET_CONFIG, SVD_XT_VAE_CONFIG
from .checkpoint import DEMO_MARKER, SVD_DIR, WHISPER_DIR
from .face import clip_image_processor
from .models.audio_adapters import Audio2bucketModel, AudioProjModel
from .models.rife import IFNet
from .models.unet import SonicUNet

DEMO_SEED = 0
DEMO_MIN_RESOLUTION = 128
DEMO_VERSION = 1

DEMO_UNET_CONFIG = {
    **SVD_XT_UNET_CONFIG,
    "block_out_channels": [32, 32],
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "num_attention_heads": [2, 2],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "sample_size": 16,
}
DEMO_VAE_CONFIG = {
    **SVD_XT_VAE_CONFIG,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "sample_size": 128,
}
DEMO_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=224,
    patch_size=14,
    projection_dim=32,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
DEMO_WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=1500,
    max_target_positions=32,
    vocab_size=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
    decoder_start_token_id=3,
)
DEMO_ADAPTER_HIDDEN = 64
DEMO_RIFE_WIDTH = 8


def write_demo_model(out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the demo checkpoint to ``out`` (created atomically: built in a temporary sibling, then renamed).

    Returns the directory. Raises FileExistsError if ``out`` exists and ``overwrite`` is False.
    """
    marker = {
        "random_weights": True,
        "note": "sonic_rt demo checkpoint: RANDOM WEIGHTS in the official Sonic layout, for checking an "
        "install and for tests. Its video is not a talking face.",
        "min_resolution": DEMO_MIN_RESOLUTION,
        "version": DEMO_VERSION,
        "seed": DEMO_SEED,
    }
    return write_random_model(
        out,
        unet_config=DEMO_UNET_CONFIG,
        vae_config=DEMO_VAE_CONFIG,
        clip=DEMO_CLIP,
        whisper=DEMO_WHISPER,
        adapter_hidden=DEMO_ADAPTER_HIDDEN,
        rife_width=DEMO_RIFE_WIDTH,
        marker=marker,
        overwrite=overwrite,
    )


def write_random_model(
    out: str | Path,
    *,
    unet_config: dict,
    vae_config: dict,
    clip: dict,
    whisper: dict,
    adapter_hidden: int,
    rife_width: int,
    marker: dict,
    seed: int = DEMO_SEED,
    unet_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a seeded random-weight checkpoint of any size in exactly the official Sonic layout.

    Used for the demo (:func:`write_demo_model`) and for the benchmarks' mid-size and full-size models
    (``bench/presets.py``; the full size uses the official configs of :mod:`sonic_rt.architectures`).

    Args:
        out: the directory to create (built in a temporary sibling, then renamed).
        unet_config: SVD ``unet/config.json``; its ``cross_attention_dim`` sets CLIP's ``projection_dim``,
            the audio2token width and the audio2bucket CLIP input (the loader checks they agree).
        vae_config: SVD ``vae/config.json``.
        clip: ``CLIPVisionConfig`` arguments (``projection_dim`` is overridden as above).
        whisper: ``WhisperConfig`` arguments.
        adapter_hidden: ``intermediate_dim`` of audio2token and audio2bucket (official 1024).
        rife_width: IFNet block width (official 90).
        marker: contents of the ``sonic_rt_demo.json`` marker (must say ``random_weights``).
        seed: each file is drawn after seeding torch with ``seed + k`` (k fixed per file).
        unet_dtype: dtype of ``Sonic/unet.pth`` (the release stores fp32; fp16 halves a full-size file).
        overwrite: replace an existing ``out``.

    Returns:
        ``out`` resolved. Raises FileExistsError if it exists and ``overwrite`` is False.
    """
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )
    from transformers.utils import logging as transformers_logging

    # Library chatter (save progress bars, the torchvision fallback notice) is not for our users.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()

    def seeded(offset: int) -> None:
        torch.manual_seed(seed + offset)

    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    cross = unet_config["cross_attention_dim"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        svd = tmp / SVD_DIR
        # SVD-xt parts: unet config only (its weights come from Sonic/unet.pth), VAE, CLIP, scheduler.
        (svd / "unet").mkdir(parents=True)
        (svd / "unet/config.json").write_text(json.dumps(unet_config, indent=2))
        seeded(1)
        AutoencoderKLTemporalDecoder.from_config(vae_config).half().save_pretrained(svd / "vae", variant="fp16")
        seeded(2)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**clip, "projection_dim": cross})).half()
        image_encoder.save_pretrained(svd / "image_encoder", variant="fp16")
        del image_encoder
        EulerDiscreteScheduler.from_config(SVD_XT_SCHEDULER_CONFIG).save_pretrained(svd / "scheduler")
        clip_image_processor().save_pretrained(svd / "feature_extractor")  # CLIPImageProcessor defaults

        # whisper-tiny layout: a WhisperForConditionalGeneration save (keys model.encoder.* / model.decoder.*).
        seeded(3)
        WhisperForConditionalGeneration(WhisperConfig(**whisper)).save_pretrained(tmp / WHISPER_DIR)
        WhisperFeatureExtractor(feature_size=whisper["num_mel_bins"]).save_pretrained(tmp / WHISPER_DIR)

        # Sonic's own files: plain torch.save(state_dict) pickles, no key prefix.
        (tmp / "Sonic").mkdir()
        seeded(4)
        state = SonicUNet.from_config(unet_config).unet.state_dict()
        if unet_dtype != torch.float32:
            state = {k: v.to(unet_dtype) for k, v in state.items()}
        torch.save(state, tmp / "Sonic/unet.pth")
        del state
        blocks = whisper["encoder_layers"] + 1
        seeded(5)
        a2t = AudioProjModel(10, blocks, whisper["d_model"], adapter_hidden, cross, 32)
        torch.save(a2t.state_dict(), tmp / "Sonic/audio2token.pth")
        seeded(6)
        a2b = Audio2bucketModel(50, 1, whisper["d_model"], cross, adapter_hidden, 1, 2)
        torch.save(a2b.state_dict(), tmp / "Sonic/audio2bucket.pth")
        # RIFE: keys stored with the 'module.' prefix, like the official flownet.pkl.
        (tmp / "RIFE").mkdir()
        seeded(7)
        rife = IFNet(rife_width)
        torch.save({f"module.{k}": v for k, v in rife.state_dict().items()}, tmp / "RIFE/flownet.pkl")

        (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    """``$SONIC_RT_CACHE`` or ``~/.cache/sonic_rt``."""
    return Path(os.environ.get("SONIC_RT_CACHE", Path.home() / ".cache" / "sonic_rt")).expanduser()


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return the cached demo checkpoint, writing it on first use (or when its version is outdated)."""
    target = Path(cache_dir or default_cache_dir()) / f"demo-model-v{DEMO_VERSION}"
    if not (target / DEMO_MARKER).is_file():
        write_demo_model(target, overwrite=True)
    return target
