"""The graphs the Sonic pipeline calls, as exportable modules with one :class:`GraphSpec` each.

Every backend runs these same eight graphs with these same signatures (torch tensors in, torch tensors
out), so the pipeline never branches on the backend:

=================  ==========================================================  ========================
graph              inputs -> outputs                                           precision
=================  ==========================================================  ========================
whisper_encoder    input_features [B, 80, 3000] -> hidden_states [B, 1500,      build precision
                   layers+1, d] (every hidden state stacked on dim 2)
image_encoder      pixel_values [1, 3, 224, 224] -> image_embeds [1, D_clip]    build precision
vae_encoder        image [1, 3, H, W] -> latents [1, 4, H/8, W/8] (mean)        build precision
audio2token        windows [1, n, 10, layers+1, d] -> tokens [1, n, 32, D]      fp32 (official)
audio2bucket       windows [1, n, 50, 1, d], clip [1, D_clip] -> [1, n, 2, 1]   fp32 (official)
unet               sample, timestep, clip_embeds, audio_tokens, added_time_ids, build precision
                   face_mask_0.. -> v [B, F, 4, h, w]
vae_decoder        latents [F, 4, h, w] -> frames [F, 3, H, W] (one chunk)      build precision
rife               img0, img1 [n, 3, H, W] -> middle [n, 3, H, W]               fp32 (official)
=================  ==========================================================  ========================

The exported UNet uses :attr:`AudioAttention.SDPA` (exact simplifications); the torch backend defaults to
the reference structure. Sizes come from :class:`PipelineConfig` (read from the checkpoint's configs) and
:class:`ShapeOptions` (the ranges an engine is built for).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from .spec import DimRange, GraphSpec, Precision, TensorSpec

if TYPE_CHECKING:
    from ..loading import SonicModels

GRAPH_NAMES = (
    "whisper_encoder",
    "image_encoder",
    "vae_encoder",
    "audio2token",
    "audio2bucket",
    "unet",
    "vae_decoder",
    "rife",
)
FP32_GRAPHS = frozenset({"audio2token", "audio2bucket", "rife"})  # official: always fp32
DECODE_CHUNK_SIZE = 8  # official `decode_chunk_size`: the temporal VAE mixes frames within a chunk
ADAPTER_FRAMES = 64  # frames per audio-adapter call (memory only; results do not depend on it)


@dataclass(frozen=True)
class PipelineConfig:
    """Model sizes and constants the pipeline needs besides the graphs, read from the checkpoint's configs.

    Stored in an engine manifest so an engine directory needs no weights. Attributes are the official
    config keys they come from (``unet/config.json``, ``vae/config.json``, CLIP/Whisper ``config.json``).
    """

    latent_channels: int  # unet out_channels (4)
    unet_in_channels: int  # unet in_channels (8 = noisy + image latents)
    cross_attention_dim: int  # unet cross_attention_dim (1024)
    audio_context_tokens: int  # audio2token tokens per frame (32)
    attention_levels: tuple[int, ...]  # UNet levels holding audio attention
    vae_scale_factor: int  # 2 ** (len(vae block_out_channels) - 1) (8)
    vae_scaling_factor: float  # vae scaling_factor (0.18215)
    clip_image_size: int  # CLIP vision image_size (224)
    clip_embed_dim: int  # CLIP projection_dim (1024)
    whisper_mel_bins: int  # num_mel_bins (80)
    whisper_positions: int  # max_source_positions (1500); input frames are twice that
    whisper_states: int  # encoder_layers + 1 hidden states
    whisper_d_model: int  # d_model (384)
    token_window: int  # audio2token window (10)
    bucket_window: int  # audio2bucket window (50)
    num_buckets: int  # 2
    audio_scale: float = 1.0  # official ip_audio_scale

    @classmethod
    def from_models(cls, models: SonicModels) -> PipelineConfig:
        from ..loading import AUDIO2BUCKET_WINDOW, AUDIO2TOKEN_WINDOW, NUM_BUCKETS

        unet, whisper = models.unet, models.whisper_encoder.config
        return cls(
            latent_channels=unet.config.out_channels,
            unet_in_channels=unet.config.in_channels,
            cross_attention_dim=unet.config.cross_attention_dim,
            audio_context_tokens=models.audio2token.context_tokens,
            attention_levels=unet.attention_levels,
            vae_scale_factor=models.vae_scale_factor,
            vae_scaling_factor=float(models.vae.config.scaling_factor),
            clip_image_size=models.image_encoder.config.image_size,
            clip_embed_dim=models.image_encoder.config.projection_dim,
            whisper_mel_bins=whisper.num_mel_bins,
            whisper_positions=whisper.max_source_positions,
            whisper_states=whisper.encoder_layers + 1,
            whisper_d_model=whisper.d_model,
            token_window=AUDIO2TOKEN_WINDOW,
            bucket_window=AUDIO2BUCKET_WINDOW,
            num_buckets=NUM_BUCKETS,
            audio_scale=unet.audio_scale,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "attention_levels": list(self.attention_levels)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PipelineConfig:
        return cls(**{**data, "attention_levels": tuple(data["attention_levels"])})

    @property
    def num_face_masks(self) -> int:
        return max(self.attention_levels) + 1


@dataclass(frozen=True)
class ShapeOptions:
    """The shapes an engine is built for (TensorRT profiles; recorded for every backend).

    Attributes:
        frames: window length in frames at 12.5 fps (official 25): the most frames one UNet call takes
            (a video shorter than a window uses fewer, down to 1).
        resolution: pixel height and width of the generated video (multiples of 64), min/opt/max.
        windows: windows per UNet call (the UNet batch is 3 x windows: the three CFG rows).
    """

    frames: int = 25
    resolution: DimRange = field(default_factory=lambda: DimRange(512, 512, 1024))
    windows: DimRange = field(default_factory=lambda: DimRange(1, 1, 1))

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        for value in (self.resolution.min, self.resolution.max):
            if value % 64:
                raise ValueError(f"resolution {value} is not a multiple of 64 (the face crop is resized to one)")

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "resolution": list(asdict(self.resolution).values()),
            "windows": list(asdict(self.windows).values()),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShapeOptions:
        return cls(data["frames"], DimRange(*data["resolution"]), DimRange(*data["windows"]))


# ---------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------
def _unet_io(
    config: PipelineConfig, shapes: ShapeOptions, latent: DimRange, frames: DimRange
) -> tuple[list[tuple], list[tuple], dict[str, DimRange], dict[str, tuple[str, int, int]]]:
    """The UNet graph's inputs, outputs, dims and derived dims: the batch is 3 CFG rows per window, and one face
    mask per level ``l`` on the level grid ``ceil(latent / 2**l)``."""
    unet_dims = {"batch": shapes.windows.scaled(3), "frames": frames, "height": latent, "width": latent}
    masks, unet_derived = [], {}
    for level in range(config.num_face_masks):
        step = 2**level
        unet_dims[f"height_{level}"] = DimRange(*(math.ceil(v / step) for v in (latent.min, latent.opt, latent.max)))
        unet_dims[f"width_{level}"] = unet_dims[f"height_{level}"]
        unet_derived[f"height_{level}"] = ("height", 1, step)
        unet_derived[f"width_{level}"] = ("width", 1, step)
        masks.append((f"face_mask_{level}", (1, 1, f"height_{level}", f"width_{level}"), None, (0.0, 1.0)))
    inputs = [
        ("sample", ("batch", "frames", config.unet_in_channels, "height", "width"), None),
        ("timestep", (1,), "float32", (-1.5, 1.6)),
        ("clip_embeds", ("batch", 1, config.cross_attention_dim), None),
        ("audio_tokens", ("batch", "frames", config.audio_context_tokens, config.cross_attention_dim), None),
        ("added_time_ids", ("batch", 3), "float32", (8.0, 40.0)),
        *masks,
    ]
    outputs = [("v", ("batch", "frames", config.latent_channels, "height", "width"), None)]
    return inputs, outputs, unet_dims, unet_derived


def graph_specs(
    config: PipelineConfig, shapes: ShapeOptions, precision: Precision, fp32_graphs: frozenset[str] = FP32_GRAPHS
) -> dict[str, GraphSpec]:
    """The :class:`GraphSpec` of every graph for a model (``config``), shape ranges and precision.

    Graphs in ``fp32_graphs`` keep fp32 tensors whatever ``precision`` is.
    """

    def dtype(graph: str) -> str:
        return "float32" if graph in fp32_graphs else precision.dtype

    f = config.vae_scale_factor
    pixels = shapes.resolution
    latent = DimRange(pixels.min // f, pixels.opt // f, pixels.max // f)
    frames = DimRange(1, shapes.frames, shapes.frames)
    specs: dict[str, GraphSpec] = {}

    def add(
        name: str,
        inputs: list[tuple],
        outputs: list[tuple],
        dims: dict[str, DimRange],
        derived: dict[str, tuple[str, int, int]] | None = None,
    ) -> None:
        t = dtype(name)
        specs[name] = GraphSpec(
            name,
            tuple(TensorSpec(n, tuple(d), t if dt is None else dt, *rest) for n, d, dt, *rest in inputs),
            tuple(TensorSpec(n, tuple(d), t if dt is None else dt) for n, d, dt in outputs),
            dims,
            derived or {},
        )

    add(
        "whisper_encoder",
        [("input_features", (1, config.whisper_mel_bins, 2 * config.whisper_positions), None, (-1.0, 1.0))],
        [("hidden_states", (1, config.whisper_positions, config.whisper_states, config.whisper_d_model), None)],
        {},
    )
    size = config.clip_image_size
    add(
        "image_encoder",
        [("pixel_values", (1, 3, size, size), None, (-2.0, 2.0))],
        [("image_embeds", (1, config.clip_embed_dim), None)],
        {},
    )
    add(
        "vae_encoder",
        [("image", (1, 3, "height", "width"), None, (-1.0, 1.0))],
        [("latents", (1, config.latent_channels, "latent_height", "latent_width"), None)],
        {"height": pixels, "width": pixels, "latent_height": latent, "latent_width": latent},
        {"latent_height": ("height", 1, f), "latent_width": ("width", 1, f)},
    )
    adapter = DimRange(1, ADAPTER_FRAMES, ADAPTER_FRAMES)
    add(
        "audio2token",
        [("windows", (1, "frames", config.token_window, config.whisper_states, config.whisper_d_model), None)],
        [("tokens", (1, "frames", config.audio_context_tokens, config.cross_attention_dim), None)],
        {"frames": adapter},
    )
    add(
        "audio2bucket",
        [
            ("windows", (1, "frames", config.bucket_window, 1, config.whisper_d_model), None),
            ("clip_embeds", (1, config.clip_embed_dim), None),
        ],
        [("buckets", (1, "frames", config.num_buckets, 1), None)],
        {"frames": adapter},
    )

    add("unet", *_unet_io(config, shapes, latent, frames))
    chunk = DimRange(1, DECODE_CHUNK_SIZE, DECODE_CHUNK_SIZE)
    add(
        "vae_decoder",
        [("latents", ("frames", config.latent_channels, "latent_height", "latent_width"), None)],
        [("frames", ("frames", 3, "height", "width"), None)],
        {"frames": chunk, "latent_height": latent, "latent_width": latent, "height": pixels, "width": pixels},
        {"height": ("latent_height", f, 1), "width": ("latent_width", f, 1)},
    )
    add(
        "rife",
        [
            ("img0", ("pairs", 3, "height", "width"), None, (0.0, 1.0)),
            ("img1", ("pairs", 3, "height", "width"), None, (0.0, 1.0)),
        ],
        [("middle", ("pairs", 3, "height", "width"), None)],
        {"pairs": chunk, "height": pixels, "width": pixels},
    )
    return specs


# ---------------------------------------------------------------------------------------------------------
# Modules: the exact functions the graphs compute
# ---------------------------------------------------------------------------------------------------------
class WhisperEncoderGraph(nn.Module):
    """Whisper encoder -> every hidden state stacked: [B, 80, 3000] -> [B, 1500, layers+1, d_model]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.encoder(input_features, output_hidden_states=True).hidden_states, dim=2)


class ImageEncoderGraph(nn.Module):
    """CLIP vision tower with projection: [1, 3, 224, 224] -> image_embeds [1, projection_dim]."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixel_values).image_embeds


class VaeEncoderGraph(nn.Module):
    """Temporal-VAE encoder, posterior mean (= mode; official noise_aug_strength 0): [1,3,H,W] -> [1,4,H/8,W/8]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean


class VaeDecoderGraph(nn.Module):
    """Temporal-VAE decoder of one chunk (its frames mix): [F, 4, h, w] (already / scaling_factor) -> [F, 3, H, W].

    Under ``torch.inference_mode`` the decoder's SiLUs, residual sums and spatial/temporal blends work in place
    (:mod:`sonic_rt.models.vae`: the same values bit for bit, a quarter less peak memory per call); traced,
    exported and compiled graphs, and the eager baseline's own ``vae.decode``, keep diffusers' form.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        from ..models.vae import make_in_place

        self.vae = vae
        make_in_place(vae.decoder)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        from ..models.vae import in_place_decoding

        with in_place_decoding():
            return self.vae.decode(latents, num_frames=latents.shape[0]).sample


class Audio2TokenGraph(nn.Module):
    def __init__(self, audio2token: nn.Module):
        super().__init__()
        self.audio2token = audio2token

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.audio2token(windows)


class Audio2BucketGraph(nn.Module):
    def __init__(self, audio2bucket: nn.Module):
        super().__init__()
        self.audio2bucket = audio2bucket

    def forward(self, windows: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        return self.audio2bucket(windows, clip_embeds)


class RifeGraph(nn.Module):
    def __init__(self, rife: nn.Module):
        super().__init__()
        self.rife = rife

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        return self.rife(img0, img1)


def graph_modules(models: SonicModels) -> dict[str, nn.Module]:
    """The eight graph modules over loaded models (weights shared, nothing copied). The UNet graph is the
    :class:`SonicUNet` itself (its forward already has the graph signature)."""
    return {
        "whisper_encoder": WhisperEncoderGraph(models.whisper_encoder),
        "image_encoder": ImageEncoderGraph(models.image_encoder),
        "vae_encoder": VaeEncoderGraph(models.vae),
        "audio2token": Audio2TokenGraph(models.audio2token),
        "audio2bucket": Audio2BucketGraph(models.audio2bucket),
        "unet": models.unet,
        "vae_decoder": VaeDecoderGraph(models.vae),
        "rife": RifeGraph(models.rife),
    }
