"""Sonic's UNet: the diffusers SVD-xt ``UNetSpatioTemporalConditionModel`` plus audio cross-attention.

Sonic changes only the 32 ``attn2`` attention processors of the SVD UNet (sonic_reference.md 2.2-2.3):

- spatial ``transformer_blocks.0.attn2`` (query = the H_l*W_l tokens of one frame)::

      h = SDPA(q, to_k(clip), to_v(clip)) + scale * mask_l * SDPA(q, to_k_ip(audio_f), to_v_ip(audio_f))

  where ``audio_f`` are the frame's 32 audio tokens and ``mask_l`` the face mask bicubic-downsampled to
  the level's token grid (diffusers ``IPAdapterMaskProcessor.downsample``, overshoot included);
- temporal ``temporal_transformer_blocks.0.attn2`` (query = the F frames at one spatial position)::

      h = SDPA(q, to_k(clip_mean), to_v(clip_mean)) + scale * SDPA(q, to_k_ip(audio_mean), to_v_ip(audio_mean))

  with ``audio_mean`` the mean of the window's audio tokens over its frames (unmasked).

``to_k_ip.0`` / ``to_v_ip.0`` live on the processors, so the state-dict keys are exactly the official
``...attn2.processor.to_k_ip.0.weight``. Everything else is diffusers' own code.

The per-frame audio tokens and the face mask do not fit diffusers' UNet signature, so :class:`SonicUNet`
hands them to its processors through :class:`AudioConditioning`, a thread-local set for the duration of
one forward call (safe when several threads share one UNet). The processors here follow the official
structure (mask recomputed per layer, temporal context repeated per position): this is the reference.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention
from torch import nn


class AudioConditioning(threading.local):
    """Per-call, per-thread inputs of the audio attention processors.

    Attributes:
        audio_tokens: ``[B*F, T, D]`` audio tokens of every frame of the window (T = 32 officially).
        batch: B (3 with classifier-free guidance).
        frames: F (the window length).
        face_mask: ``[1, 1, H, W]`` face mask in [0, 1] at pixel resolution.
        scale: the audio branch scale (official ``ip_audio_scale`` = 1.0).
    """

    audio_tokens: torch.Tensor | None = None
    batch: int = 0
    frames: int = 0
    face_mask: torch.Tensor | None = None
    scale: float = 1.0


def _attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head SDPA at the default scale 1/sqrt(head_dim): [N, Lq, C], [N, Lk, C] -> [N, Lq, C]."""
    n, heads = query.shape[0], attn.heads
    head_dim = query.shape[-1] // heads
    # [N, L, heads*d] -> [N, heads, L, d]
    q = query.view(n, -1, heads, head_dim).transpose(1, 2)
    k = key.view(key.shape[0], -1, heads, head_dim).transpose(1, 2)
    v = value.view(value.shape[0], -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, -1, heads * head_dim).to(query.dtype)


class _AudioAttnProcessor(nn.Module):
    """Shared weights of Sonic's audio processors: ``to_k_ip.0`` and ``to_v_ip.0`` (Linear, no bias)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, conditioning: AudioConditioning):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.conditioning = conditioning

    @staticmethod
    def _clip_branch(attn: Attention, hidden_states: torch.Tensor,
                     encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SVD cross-attention to the CLIP token: returns (query, SDPA(q, to_k(clip), to_v(clip)))."""
        query = attn.to_q(hidden_states)
        return query, _attention(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states))

    def _finish(self, attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class SpatialAudioAttnProcessor(_AudioAttnProcessor):
    """Spatial attn2: CLIP cross-attention plus face-masked per-frame audio attention.

    hidden_states ``[B*F, H_l*W_l, C]``; encoder_hidden_states (CLIP) ``[B*F, 1, D]``.
    """

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.conditioning
        query, out = self._clip_branch(attn, hidden_states, encoder_hidden_states)
        audio = cond.audio_tokens
        audio_out = _attention(attn, query, self.to_k_ip[0](audio), self.to_v_ip[0](audio))
        # [1, 1, H, W] -> [B*F, H_l*W_l, C], recomputed every call exactly as the official processor does
        mask = IPAdapterMaskProcessor.downsample(cond.face_mask[:, 0], audio_out.shape[0], audio_out.shape[1],
                                                 audio_out.shape[2]).to(dtype=query.dtype, device=query.device)
        out = out + cond.scale * (audio_out * mask)
        return self._finish(attn, out)


class TemporalAudioAttnProcessor(_AudioAttnProcessor):
    """Temporal attn2: cross-attention to the window-mean CLIP and audio context, no mask.

    hidden_states ``[B*H_l*W_l, F, C]``; encoder_hidden_states (CLIP of the window) ``[B*H_l*W_l, 1, D]``.
    """

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.conditioning
        query, out = self._clip_branch(attn, hidden_states, encoder_hidden_states)
        audio = cond.audio_tokens
        tokens, dim = audio.shape[-2:]
        positions = hidden_states.shape[0] // cond.batch
        # [B*F, T, D] -> [B, 1, T, D] mean over the window's frames -> repeated per position [B*HW, T, D]
        audio_mean = audio.reshape(cond.batch, cond.frames, tokens, dim).mean(dim=1, keepdim=True)
        audio_ctx = audio_mean.repeat(1, positions, 1, 1).reshape(cond.batch * positions, tokens, dim)
        out = out + cond.scale * _attention(attn, query, self.to_k_ip[0](audio_ctx), self.to_v_ip[0](audio_ctx))
        return self._finish(attn, out)


class SonicUNet(nn.Module):
    """SVD UNet with Sonic's audio attention. ``state_dict()`` of ``.unet`` has the official unet.pth keys.

    Args:
        unet: a diffusers ``UNetSpatioTemporalConditionModel`` (built from the SVD-xt ``unet/config.json``).
        audio_scale: scale of the audio branch (official ``ip_audio_scale`` = 1.0).
    """

    def __init__(self, unet: UNetSpatioTemporalConditionModel, audio_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.conditioning = AudioConditioning()
        self.audio_scale = audio_scale
        cross_dim = unet.config.cross_attention_dim
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and name.endswith(".attn2"):
                cls = TemporalAudioAttnProcessor if ".temporal_transformer_blocks." in name else SpatialAudioAttnProcessor
                module.set_processor(cls(module.to_q.out_features, cross_dim, self.conditioning))

    @classmethod
    def from_config(cls, config: dict[str, Any], audio_scale: float = 1.0) -> "SonicUNet":
        """Build with random weights from an SVD ``unet/config.json`` dict (use ``torch.device('meta')``
        as a context to build without allocating)."""
        return cls(UNetSpatioTemporalConditionModel.from_config(config), audio_scale)

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, clip_embeds: torch.Tensor,
                audio_tokens: torch.Tensor, added_time_ids: torch.Tensor, face_mask: torch.Tensor) -> torch.Tensor:
        """Predict v for one window.

        Args:
            sample: ``[B, F, in_channels, h, w]`` scaled noisy latents concatenated with image latents.
            timestep: 0-dim float tensor, ``0.25 * ln(sigma)``.
            clip_embeds: ``[B, 1, D]`` CLIP image embedding per batch row (zeros for the uncond row).
            audio_tokens: ``[B, F, T, D]`` audio tokens per frame.
            added_time_ids: ``[B, 3]`` = (fps, bucket0, bucket1).
            face_mask: ``[1, 1, H, W]`` face mask at pixel resolution, values in [0, 1].

        Returns:
            ``[B, F, out_channels, h, w]`` v-prediction.
        """
        batch, frames = sample.shape[:2]
        cond = self.conditioning
        cond.audio_tokens = audio_tokens.reshape(batch * frames, *audio_tokens.shape[2:])
        cond.batch, cond.frames = batch, frames
        cond.face_mask, cond.scale = face_mask, self.audio_scale
        try:
            return self.unet(sample, timestep, encoder_hidden_states=clip_embeds, added_time_ids=added_time_ids,
                             return_dict=False)[0]
        finally:
            cond.audio_tokens = cond.face_mask = None
