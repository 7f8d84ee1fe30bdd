"""Build every Sonic model from an official-layout directory (see :mod:`sonic_rt.checkpoint`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import ModelPaths, load_into, read_config, read_state_dict, strip_prefix
from .errors import CheckpointError
from .models.audio_adapters import Audio2bucketModel, AudioProjModel
from .models.batch_invariant import make_batch_invariant
from .models.rife import IFNet, ifnet_width_from_state_dict
from .models.unet import SonicUNet

logger = logging.getLogger(__name__)

# Window lengths of the two adapters: algorithm constants of official sonic.py (docs/official_algorithm.md 2.6).
AUDIO2TOKEN_WINDOW = 10
AUDIO2BUCKET_WINDOW = 50
NUM_BUCKETS = 2


@dataclass
class SonicModels:
    """Every network of the Sonic pipeline, loaded and in eval mode.

    dtypes follow the official split: UNet, VAE and CLIP in ``dtype`` (fp16 on CUDA); Whisper, the audio
    adapters and RIFE in fp32.
    """

    paths: ModelPaths
    unet: SonicUNet
    vae: nn.Module
    image_encoder: nn.Module
    whisper_encoder: nn.Module
    feature_extractor: object
    audio2token: AudioProjModel
    audio2bucket: Audio2bucketModel
    rife: IFNet
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2 ** (len(vae block_out_channels) - 1) (8 for SVD-xt)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load_diffusers_vae(vae_dir: Path, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKLTemporalDecoder

    config = read_config(vae_dir / "config.json")
    for name in (
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.bin",
        "diffusion_pytorch_model.bin",
    ):
        weights = vae_dir / name
        if weights.is_file():
            break
    else:
        raise CheckpointError("no VAE weights (diffusion_pytorch_model[.fp16].safetensors)", vae_dir)
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder.from_config(config)
    load_into(vae, read_state_dict(weights), weights)
    return vae.to(dtype)


def _from_pretrained(cls, directory: Path, dtype: torch.dtype, allow_unexpected: tuple[str, ...] = ()):
    """transformers ``from_pretrained`` from a local directory, made strict: any missing or mismatched
    key (and any unexpected key not starting with ``allow_unexpected``) is a CheckpointError."""
    variant = "fp16" if any(directory.glob("*.fp16.safetensors")) else None
    try:
        model, info = cls.from_pretrained(
            directory, variant=variant, dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load {cls.__name__} ({type(exc).__name__}: {exc})", directory) from None
    missing = list(info.get("missing_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allow_unexpected)]
    if missing or mismatched or unexpected:
        raise CheckpointError(
            f"weights do not match {cls.__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, mismatched {mismatched[:5]}",
            directory,
        )
    return model


def load_models(
    paths: ModelPaths, device: torch.device, dtype: torch.dtype, *, trust_pickle: bool = False, audio_scale: float = 1.0
) -> SonicModels:
    """Load every model of ``paths`` strictly and move it to ``device``.

    Args:
        paths: from :func:`sonic_rt.checkpoint.resolve_model_dir`.
        device: where the models run.
        dtype: dtype of the UNet, VAE and CLIP (official: fp16); the rest stays fp32.
        trust_pickle: allow pickles that need arbitrary code (see :func:`read_state_dict`).
        audio_scale: official ``ip_audio_scale`` (1.0).

    Raises:
        CheckpointError: any file missing, unreadable or not matching its model.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPVisionModelWithProjection, WhisperFeatureExtractor, WhisperModel
    from transformers.utils import logging as transformers_logging

    # Library chatter (per-file "Loading weights" bars, dtype-cast notes) is not for our users.
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()

    # 1. Whisper-tiny (fp32): only the encoder is used; the decoder is loaded strictly and dropped.
    whisper = _from_pretrained(WhisperModel, paths.whisper, torch.float32, allow_unexpected=("proj_out.",))
    whisper_encoder = whisper.get_encoder().eval()
    del whisper
    try:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(paths.whisper, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load the Whisper feature extractor ({exc})", paths.whisper) from None
    whisper_cfg = whisper_encoder.config
    whisper_blocks = whisper_cfg.encoder_layers + 1  # embeddings + each layer's output

    # 2. CLIP image encoder and VAE (svd-xt, fp16 variants when present).
    image_encoder = _from_pretrained(CLIPVisionModelWithProjection, paths.image_encoder, dtype).eval()
    vae = _load_diffusers_vae(paths.vae, dtype).eval()

    # 3. Sonic UNet: the SVD-xt config, all weights from Sonic/unet.pth.
    unet_config = read_config(paths.unet_config)
    with torch.device("meta"):
        unet = SonicUNet.from_config(unet_config, audio_scale=audio_scale)
    load_into(unet.unet, read_state_dict(paths.unet, trust_pickle=trust_pickle), paths.unet)
    unet = unet.to(dtype).eval()
    if device.type == "cpu":
        make_batch_invariant(unet)  # the same latents whatever the batching, row split or threads (scheduler)

    # 4. Audio adapters (fp32). No config files: sizes from Whisper/UNet/CLIP configs + checkpoint shapes.
    cross_dim = unet_config["cross_attention_dim"]
    token_state = read_state_dict(paths.audio2token, trust_pickle=trust_pickle)
    hidden = _shape(token_state, "proj1.weight", paths.audio2token)[0]
    context_tokens = _shape(token_state, "proj3.weight", paths.audio2token)[0] // cross_dim
    with torch.device("meta"):
        audio2token = AudioProjModel(
            AUDIO2TOKEN_WINDOW, whisper_blocks, whisper_cfg.d_model, hidden, cross_dim, context_tokens
        )
    load_into(audio2token, token_state, paths.audio2token)

    bucket_state = read_state_dict(paths.audio2bucket, trust_pickle=trust_pickle)
    hidden = _shape(bucket_state, "proj1.weight", paths.audio2bucket)[0]
    with torch.device("meta"):
        audio2bucket = Audio2bucketModel(
            AUDIO2BUCKET_WINDOW, 1, whisper_cfg.d_model, image_encoder.config.projection_dim, hidden, 1, NUM_BUCKETS
        )
    load_into(audio2bucket, bucket_state, paths.audio2bucket)

    # 5. RIFE: keys carry 'module.' (stripped exactly as official load_model does); width from the shapes.
    rife_state = strip_prefix(read_state_dict(paths.rife, trust_pickle=trust_pickle), "module.", paths.rife)
    try:
        width = ifnet_width_from_state_dict(rife_state)
    except KeyError:
        raise CheckpointError("not a RIFE IFNet checkpoint (no block0.conv0.0.0.weight)", paths.rife) from None
    with torch.device("meta"):
        rife = IFNet(width)
    load_into(rife, rife_state, paths.rife)

    scheduler_config = read_config(paths.scheduler / "scheduler_config.json")
    models = SonicModels(
        paths=paths,
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        whisper_encoder=whisper_encoder,
        feature_extractor=feature_extractor,
        audio2token=audio2token.eval(),
        audio2bucket=audio2bucket.eval(),
        rife=rife.eval(),
        scheduler_config=scheduler_config,
        device=device,
        dtype=dtype,
    )
    for module in (unet, vae, image_encoder):
        module.to(device)
    for module in (whisper_encoder, models.audio2token, models.audio2bucket, rife):
        module.to(device=device, dtype=torch.float32)
    return models


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"missing key {key}", path)
    return tuple(state[key].shape)
