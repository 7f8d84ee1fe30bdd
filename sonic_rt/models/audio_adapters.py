"""Sonic's two audio adapters: ``audio2token`` and ``audio2bucket``.

Both are small MLPs over windows of Whisper-tiny hidden states. The parameter names match the
official ``Sonic/audio2token.pth`` and ``Sonic/audio2bucket.pth`` files (``proj1/2/3``, ``norm``), so
their state dicts load strictly. Sizes are constructor arguments: the loader derives them from the
Whisper and UNet config files and the checkpoint shapes, never from literals.

Source: official Sonic ``src/models/audio_adapter/audio_proj.py`` (``AudioProjModel``) and
``audio_to_bucket.py`` (``Audio2bucketModel``); docs/official_algorithm.md sections 2.7 and 2.8.
"""

from __future__ import annotations

import torch
from torch import nn


class AudioProjModel(nn.Module):
    """``audio2token``: per-frame audio window -> ``context_tokens`` cross-attention tokens.

    ``relu(proj1) -> relu(proj2) -> proj3 -> reshape [context_tokens, output_dim] -> LayerNorm``.

    Args:
        seq_len: Whisper tokens per window (official: 10).
        blocks: Whisper hidden states stacked per token (official: 5 = embedding + 4 layers).
        channels: Whisper ``d_model`` (official: 384).
        intermediate_dim: hidden width (official: 1024).
        output_dim: token width, equal to the UNet ``cross_attention_dim`` (official: 1024).
        context_tokens: tokens per frame (official: 32).
    """

    def __init__(
        self, seq_len: int, blocks: int, channels: int, intermediate_dim: int, output_dim: int, context_tokens: int
    ):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.input_dim = seq_len * blocks * channels
        self.proj1 = nn.Linear(self.input_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio_windows: torch.Tensor) -> torch.Tensor:
        """Map windows ``[B, F, seq_len, blocks, channels]`` to tokens ``[B, F, context_tokens, output_dim]``."""
        batch, frames = audio_windows.shape[:2]
        # [B, F, w, b, c] -> [B*F, w*b*c]
        x = audio_windows.reshape(batch * frames, self.input_dim)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        tokens = self.norm(self.proj3(x).reshape(batch * frames, self.context_tokens, self.output_dim))
        return tokens.reshape(batch, frames, self.context_tokens, self.output_dim)


class Audio2bucketModel(nn.Module):
    """``audio2bucket`` (the motion-decoupled controller): audio window + CLIP embedding -> 2 buckets.

    ``silu(proj1(cat[window, clip])) -> silu(proj2) -> proj3 -> reshape [context_tokens, output_dim]``.
    The caller applies the official post-processing ``bucket = out * 16 + 16``.

    Args:
        seq_len: Whisper tokens per window (official: 50).
        blocks: hidden states per token (official: 1, the last layer only).
        channels: Whisper ``d_model`` (official: 384).
        clip_channels: CLIP ``projection_dim`` (official: 1024).
        intermediate_dim: hidden width (official: 1024).
        output_dim: official 1.
        context_tokens: official 2 (the two motion buckets).
    """

    def __init__(
        self,
        seq_len: int,
        blocks: int,
        channels: int,
        clip_channels: int,
        intermediate_dim: int,
        output_dim: int,
        context_tokens: int,
    ):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.audio_dim = seq_len * blocks * channels
        self.proj1 = nn.Linear(self.audio_dim + clip_channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.act = nn.SiLU()

    def forward(self, audio_windows: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        """Windows ``[B, F, seq_len, blocks, channels]`` and CLIP ``[B*F, clip_channels]`` (or ``[1, C]``,
        broadcast) -> ``[B, F, context_tokens, output_dim]``."""
        batch, frames = audio_windows.shape[:2]
        x = audio_windows.reshape(batch * frames, self.audio_dim)
        clip = clip_embeds.to(x.dtype).expand(batch * frames, -1)
        x = self.act(self.proj1(torch.cat([x, clip], dim=-1)))
        x = self.act(self.proj2(x))
        out = self.proj3(x).reshape(batch * frames, self.context_tokens, self.output_dim)
        return out.reshape(batch, frames, self.context_tokens, self.output_dim)
