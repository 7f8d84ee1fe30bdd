"""Sonic's UNet: the diffusers SVD-xt ``UNetSpatioTemporalConditionModel`` plus audio cross-attention.

Sonic changes only the 32 ``attn2`` attention processors of the SVD UNet (docs/official_algorithm.md 2.2-2.3):

- spatial ``transformer_blocks.0.attn2`` (query = the H_l*W_l tokens of one frame)::

      h = SDPA(q, to_k(clip), to_v(clip)) + scale * mask_l * SDPA(q, to_k_ip(audio_f), to_v_ip(audio_f))

  where ``audio_f`` are the frame's 32 audio tokens and ``mask_l`` the face mask bicubic-downsampled to
  the level's token grid (diffusers ``IPAdapterMaskProcessor.downsample``, overshoot included);
- temporal ``temporal_transformer_blocks.0.attn2`` (query = the F frames at one spatial position)::

      h = SDPA(q, to_k(clip_mean), to_v(clip_mean)) + scale * SDPA(q, to_k_ip(audio_mean), to_v_ip(audio_mean))

  with ``audio_mean`` the mean of the window's audio tokens over its frames (unmasked).

``to_k_ip.0`` / ``to_v_ip.0`` live on the processors, so the state-dict keys are exactly the official
``...attn2.processor.to_k_ip.0.weight``. Everything else is diffusers' own code.

Three implementations of the same function (:class:`AudioAttention`):

- ``REFERENCE`` follows the official structure: full SDPA over the single CLIP token, and the temporal
  window-mean context repeated for and projected at every spatial position;
- ``SDPA`` uses the exact simplifications of docs/performance.md (exact-math savings 2-3): softmax over one
  key is exactly 1, so the CLIP branch is ``to_v(clip)`` broadcast to every query; the temporal audio K/V
  are projected once per window and shared by all positions; on CPU the spatial audio attention skips the
  queries whose face mask is exactly zero. This is what the exported graphs contain (without the skipping).
- ``TRITON`` computes the same as ``SDPA`` with one fused kernel per layer
  (``sonic_rt/kernels/audio_attention.py``), which also skips the query blocks whose face mask is exactly zero.

Outside ``REFERENCE`` the GEGLU feed-forwards run as :class:`SplitGEGLU` (two contiguous matmuls instead of
one matmul and two strided elementwise passes; same parameters, same values up to fp32 summation order).

All three read the face mask of their level from :func:`level_face_masks`, computed once per resolution with
the official downsampling (docs/performance.md saving 4) instead of once per layer and call. Only a call with
``face_mask=`` (the official structure, REFERENCE) downsamples the pixel-resolution mask in every layer.

The per-frame audio tokens and the masks do not fit diffusers' UNet signature, so :class:`SonicUNet`
hands them to its processors through :class:`AudioConditioning`, a thread-local set for the duration of
one forward call (safe when several threads share one UNet; captured as graph inputs by ONNX tracing).
Batch and frame counts are read from tensor shapes, never stored as Python ints, so a traced graph keeps
them dynamic.
"""

from __future__ import annotations

import enum
import math
import re
import threading
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from torch import nn

from .batch_invariant import linear


class AudioAttention(enum.Enum):
    """Implementation of Sonic's audio attention (same function, different cost)."""

    REFERENCE = "reference"  # the official structure
    SDPA = "sdpa"  # exact simplifications, torch SDPA
    TRITON = "triton"  # exact simplifications, fused Triton kernels (sonic_rt/kernels/)


class AudioConditioning(threading.local):
    """Per-call, per-thread inputs of the audio attention processors.

    Attributes:
        audio_tokens: ``[B, F, T, D]`` audio tokens of every frame of the window (T = 32 officially).
        face_masks: per UNet level l, ``[1, 1, h_l, w_l]`` face mask on the level's token grid
            (:func:`level_face_masks`).
        face_mask: instead of ``face_masks``, the ``[1, 1, H, W]`` pixel-resolution mask, downsampled in
            every spatial layer call as the official processors do (the eager baseline; REFERENCE only).
        scale: the audio branch scale (official ``ip_audio_scale`` = 1.0).
        attention: which implementation the processors run.
    """

    audio_tokens: torch.Tensor | None = None
    face_masks: Sequence[torch.Tensor] | None = None
    face_mask: torch.Tensor | None = None
    scale: float = 1.0
    attention: AudioAttention = AudioAttention.REFERENCE

    def __deepcopy__(self, memo) -> AudioConditioning:
        return AudioConditioning()  # per-call state only: a copied UNet gets its own, empty


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
    """Shared weights of Sonic's audio processors: ``to_k_ip.0`` and ``to_v_ip.0`` (Linear, no bias).

    Args:
        level: the UNet resolution level of the layer (0 = latent resolution), see :func:`attention_level`.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, conditioning: AudioConditioning, level: int):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.conditioning = conditioning
        self.level = level

    def _finish(self, attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class SpatialAudioAttnProcessor(_AudioAttnProcessor):
    """Spatial attn2: CLIP cross-attention plus face-masked per-frame audio attention.

    hidden_states ``[B*F, H_l*W_l, C]``; encoder_hidden_states (CLIP) ``[B*F, 1, D]``.
    """

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = self.conditioning
        query = attn.to_q(hidden_states)
        if cond.attention is AudioAttention.TRITON:
            from ..kernels.audio_attention import spatial_audio_attention

            audio = cond.audio_tokens.flatten(0, 1)  # [B*F, T, D]
            mask = cond.face_masks[self.level].reshape(-1)  # [H_l*W_l]
            out = spatial_audio_attention(
                query,
                self.to_k_ip[0](audio),
                self.to_v_ip[0](audio),
                attn.to_v(encoder_hidden_states)[:, 0],
                mask,
                attn.heads,
                cond.scale,
            )
            return self._finish(attn, out)
        if cond.attention is AudioAttention.REFERENCE:
            out = _attention(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states))
        else:  # one CLIP key: its softmax weight is exactly 1
            out = attn.to_v(encoder_hidden_states)
            if cond.face_mask is None and _skips_zero_mask(query):
                return self._finish(attn, self._masked_only(attn, query, out, cond))
        audio = cond.audio_tokens.flatten(0, 1)  # [B*F, T, D]
        audio_out = _attention(attn, query, self.to_k_ip[0](audio), self.to_v_ip[0](audio))
        if cond.face_mask is not None:  # official: downsampled here, per layer and call, [B*F, H_l*W_l, C]
            mask = IPAdapterMaskProcessor.downsample(cond.face_mask[:, 0], *audio_out.shape)
        else:
            mask = cond.face_masks[self.level].reshape(1, -1, 1).to(query.dtype)  # [1, H_l*W_l, 1]
        out = out + cond.scale * (audio_out * mask)
        return self._finish(attn, out)

    def _masked_only(
        self, attn: Attention, query: torch.Tensor, clip_v: torch.Tensor, cond: AudioConditioning
    ) -> torch.Tensor:
        """The SDPA path computing the audio attention only at positions whose face mask is non-zero.

        Where the mask is exactly 0 the audio term ``scale * (attn * 0)`` adds exactly 0, so those positions are
        ``to_v(clip)`` alone; the others get the same operations as the full path, row for row (attention rows
        are independent), so the result equals the full path's.

        Args:
            query: ``[B*F, H_l*W_l, C]``; clip_v: ``to_v(clip)`` ``[B*F, 1, C]``.

        Returns:
            ``[B*F, H_l*W_l, C]`` before ``to_out``.
        """
        mask = cond.face_masks[self.level].reshape(-1).to(query.dtype)  # [H_l*W_l]
        keep = mask.nonzero().flatten()  # host sync: CPU only (see _skips_zero_mask)
        out = clip_v.expand(-1, query.shape[1], -1).clone()  # [B*F, H_l*W_l, C]
        if len(keep) == 0:
            return out
        audio = cond.audio_tokens.flatten(0, 1)  # [B*F, T, D]
        key, value = self.to_k_ip[0](audio), self.to_v_ip[0](audio)
        if len(keep) == len(mask):  # no zero in the mask: nothing to skip
            return clip_v + cond.scale * (_attention(attn, query, key, value) * mask.reshape(1, -1, 1))
        # [B*F, K, C]: the K positions inside the face
        audio_out = _attention(attn, query[:, keep], key, value)
        out[:, keep] = clip_v + cond.scale * (audio_out * mask[keep].reshape(1, -1, 1))
        return out


class TemporalAudioAttnProcessor(_AudioAttnProcessor):
    """Temporal attn2: cross-attention to the window-mean CLIP and audio context, no mask.

    hidden_states ``[B*H_l*W_l, F, C]``; encoder_hidden_states (CLIP of the window) ``[B*H_l*W_l, 1, D]``,
    both ordered batch-major (row ``b * H_l*W_l + p``), as diffusers builds them.
    """

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = self.conditioning
        audio = cond.audio_tokens  # [B, F, T, D]
        batch = audio.shape[0]
        audio_mean = audio.mean(dim=1)  # [B, T, D]
        query = attn.to_q(hidden_states)
        if cond.attention is AudioAttention.REFERENCE:
            out = _attention(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states))
            # the window-mean context repeated for every position: [B, T, D] -> [B*HW, T, D]
            positions = hidden_states.shape[0] // batch
            audio_ctx = audio_mean.repeat_interleave(positions, dim=0)
            out = out + cond.scale * _attention(attn, query, self.to_k_ip[0](audio_ctx), self.to_v_ip[0](audio_ctx))
            return self._finish(attn, out)
        # every position of batch row b attends to the same K/V: fold positions into the query length
        channels = query.shape[-1]
        clip = encoder_hidden_states.reshape(batch, -1, encoder_hidden_states.shape[-1])[:, :1]  # [B, 1, D]
        q = query.reshape(batch, -1, channels)  # [B, HW*F, C]
        if cond.attention is AudioAttention.TRITON:
            from ..kernels.audio_attention import temporal_audio_attention

            out = temporal_audio_attention(
                q,
                self.to_k_ip[0](audio_mean),
                self.to_v_ip[0](audio_mean),
                attn.to_v(clip)[:, 0],
                attn.heads,
                cond.scale,
            )
            return self._finish(attn, out.reshape(query.shape))
        audio_out = _attention(attn, q, self.to_k_ip[0](audio_mean), self.to_v_ip[0](audio_mean))
        out = attn.to_v(clip) + cond.scale * audio_out  # [B, HW*F, C]
        return self._finish(attn, out.reshape(query.shape))


class SplitGEGLU(GEGLU):
    """diffusers ``GEGLU`` (same ``proj`` parameters and keys) computing its two halves as two matmuls.

    diffusers projects to ``[..., 2n]`` and then multiplies the two strided halves of that tensor
    (``chunk(2, dim=-1)``); on CPU those strided elementwise passes cost more than the matmul itself for the
    temporal blocks (measured 19 vs 8.5 ms per call for ``[768, 25, 32] -> 128``). Here each half is its own
    matmul with a contiguous output, from the row halves of the same weight (views, no copy): every output
    value is the same dot product, so the result equals diffusers' up to fp32 summation order.

    With the REFERENCE attention (the official structure, and the eager baseline) diffusers' own forward runs.
    """

    conditioning: AudioConditioning  # set by SonicUNet; tells which structure this call runs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.conditioning.attention is AudioAttention.REFERENCE:
            return super().forward(hidden_states, *args, **kwargs)
        half = self.proj.out_features // 2
        weight, bias = self.proj.weight, self.proj.bias
        value = linear(hidden_states, weight[:half], None if bias is None else bias[:half])  # [..., n]
        gate = linear(hidden_states, weight[half:], None if bias is None else bias[half:])  # [..., n]
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.is_inference_mode_enabled():
            # in place: two fewer [..., n] tensors per call (on CPU each new large tensor is page-faulted in);
            # the same elementwise operations, so the same values bit for bit
            return value.mul_(torch._C._nn.gelu_(gate))
        return value * self.gelu(gate)


def _skips_zero_mask(query: torch.Tensor) -> bool:
    """Whether the SDPA path skips the zero-mask positions: on CPU in eager mode only (finding the positions is a
    host sync on CUDA, where the Triton kernel skips them instead; traced and compiled graphs keep static work)."""
    return query.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


def attention_level(name: str, num_levels: int) -> int:
    """UNet resolution level of an attention module from its diffusers name (0 = latent resolution).

    ``down_blocks.i`` run at level i, ``mid_block`` at the lowest level ``num_levels - 1`` and
    ``up_blocks.j`` at ``num_levels - 1 - j`` (each downsampler halves, each upsampler doubles).
    """
    if name.startswith("mid_block."):
        return num_levels - 1
    match = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"cannot place attention module {name!r} on a UNet level")
    index = int(match.group(2))
    return index if match.group(1) == "down" else num_levels - 1 - index


def level_face_masks(
    face_mask: torch.Tensor, latent_size: tuple[int, int], levels: Sequence[int]
) -> list[torch.Tensor]:
    """The face mask of every UNet level, exactly as the official processors downsample it per layer.

    Args:
        face_mask: ``[1, 1, H, W]`` face mask at pixel resolution, values in [0, 1].
        latent_size: (h, w) of the latents (H/8, W/8 for SVD).
        levels: the levels that hold audio attention (``SonicUNet.attention_levels``).

    Returns:
        one ``[1, 1, h_l, w_l]`` tensor per level in 0..max(levels) (h_l = ceil(h / 2**l)): diffusers
        ``IPAdapterMaskProcessor.downsample(mask, 1, h_l * w_l, 1)`` (bicubic, overshoot included, padded
        or cut to the query count), laid out on the level grid. Levels without attention get a tensor too,
        so the list index is the level.
    """
    h, w = latent_size
    masks = []
    for level in range(max(levels) + 1):
        h_l, w_l = math.ceil(h / 2**level), math.ceil(w / 2**level)
        flat = IPAdapterMaskProcessor.downsample(face_mask[:, 0], 1, h_l * w_l, 1)  # [1, h_l*w_l, 1]
        masks.append(flat.reshape(1, 1, h_l, w_l))
    return masks


class SonicUNet(nn.Module):
    """SVD UNet with Sonic's audio attention. ``state_dict()`` of ``.unet`` has the official unet.pth keys.

    Args:
        unet: a diffusers ``UNetSpatioTemporalConditionModel`` (built from the SVD-xt ``unet/config.json``).
        audio_scale: scale of the audio branch (official ``ip_audio_scale`` = 1.0).
        attention: which audio-attention implementation runs (:class:`AudioAttention`).
    """

    def __init__(
        self,
        unet: UNetSpatioTemporalConditionModel,
        audio_scale: float = 1.0,
        attention: AudioAttention = AudioAttention.REFERENCE,
    ):
        super().__init__()
        self.unet = unet
        self.conditioning = AudioConditioning()
        self.audio_scale = audio_scale
        self.attention = AudioAttention(attention)
        cross_dim = unet.config.cross_attention_dim
        num_levels = len(unet.config.block_out_channels)
        levels = set()
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and name.endswith(".attn2"):
                level = attention_level(name, num_levels)
                levels.add(level)
                cls = (
                    TemporalAudioAttnProcessor if ".temporal_transformer_blocks." in name else SpatialAudioAttnProcessor
                )
                module.set_processor(cls(module.to_q.out_features, cross_dim, self.conditioning, level))
            elif type(module) is GEGLU:
                module.__class__ = SplitGEGLU  # same parameters; diffusers' forward in the REFERENCE structure
                module.conditioning = self.conditioning
        self.attention_levels: tuple[int, ...] = tuple(sorted(levels))

    @classmethod
    def from_config(
        cls, config: dict[str, Any], audio_scale: float = 1.0, attention: AudioAttention = AudioAttention.REFERENCE
    ) -> SonicUNet:
        """Build with random weights from an SVD ``unet/config.json`` dict (use ``torch.device('meta')``
        as a context to build without allocating)."""
        return cls(UNetSpatioTemporalConditionModel.from_config(config), audio_scale, attention)

    @property
    def config(self):
        return self.unet.config

    @property
    def head_dims(self) -> set[int]:
        """Head dims of the audio attention layers (64 at every level of SVD-xt)."""
        return {
            m.to_q.out_features // m.heads
            for n, m in self.unet.named_modules()
            if isinstance(m, Attention) and n.endswith(".attn2")
        }

    def set_feed_forward_chunk(self, frames: int | None) -> None:
        """Run every transformer block's feed-forward over chunks of ``frames`` frames (None: unchunked).

        diffusers' forward chunking (``set_chunk_feed_forward``): spatial blocks chunk their ``[B*F, tokens, C]``
        rows over dim 0 (whole frames), temporal blocks their ``[B*tokens, F, C]`` rows over dim 1 (frames), so
        ``frames`` must divide the window length. The feed-forward acts on each token alone: chunking changes
        which rows share a matmul, not the arithmetic of a row (bit-identical on CPU, by test).
        """
        for module in self.unet.modules():
            if hasattr(module, "set_chunk_feed_forward"):
                module.set_chunk_feed_forward(chunk_size=frames, dim=0)

    @property
    def num_face_masks(self) -> int:
        """How many per-level masks :meth:`forward` takes (levels 0..max attention level)."""
        return max(self.attention_levels) + 1

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        clip_embeds: torch.Tensor,
        audio_tokens: torch.Tensor,
        added_time_ids: torch.Tensor,
        *face_masks: torch.Tensor,
        face_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict v for one window (or a batch of windows).

        Args:
            sample: ``[B, F, in_channels, h, w]`` scaled noisy latents concatenated with image latents.
            timestep: ``[1]`` (or 0-dim) float32, ``0.25 * ln(sigma)``.
            clip_embeds: ``[B, 1, D]`` CLIP image embedding per batch row (zeros for the uncond row).
            audio_tokens: ``[B, F, T, D]`` audio tokens per frame.
            added_time_ids: ``[B, 3]`` = (fps, bucket0, bucket1).
            face_masks: :attr:`num_face_masks` tensors ``[1, 1, h_l, w_l]`` from :func:`level_face_masks`.
            face_mask: the official call instead (keyword, no ``face_masks``): the ``[1, 1, H, W]``
                pixel-resolution mask, downsampled in every spatial layer call with the REFERENCE attention
                structure whatever :attr:`attention` is, as the official processors do. Same function, the
                official cost; used by the eager baseline (``bench/eager.py``).

        Returns:
            ``[B, F, out_channels, h, w]`` v-prediction.

        Raises:
            ValueError: the wrong number of per-level masks, or both ``face_masks`` and ``face_mask``.
        """
        if face_mask is not None and face_masks:
            raise ValueError("pass either the per-level face_masks or the pixel-resolution face_mask, not both")
        if face_mask is None and len(face_masks) != self.num_face_masks:
            raise ValueError(f"SonicUNet takes {self.num_face_masks} per-level face masks, got {len(face_masks)}")
        cond = self.conditioning
        cond.audio_tokens, cond.face_masks, cond.face_mask = audio_tokens, face_masks, face_mask
        cond.scale = self.audio_scale
        cond.attention = AudioAttention.REFERENCE if face_mask is not None else self.attention
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states=clip_embeds, added_time_ids=added_time_ids, return_dict=False
            )[0]
        finally:
            cond.audio_tokens = cond.face_masks = cond.face_mask = None
