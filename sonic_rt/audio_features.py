"""Whisper-tiny audio features and Sonic's per-frame audio windows (docs/official_algorithm.md 2.6-2.8).

Timeline: 16 kHz samples; 25 "audio frames" per second (640 samples each); Whisper tokens at 50 Hz
(2 per audio frame); one generated frame per 2 audio frames (12.5 fps), i.e. 4 Whisper tokens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

SAMPLE_RATE = 16_000  # Hz, Whisper's input rate
SAMPLES_PER_AUDIO_FRAME = 640  # 40 ms: official `audio_len = len(samples) // 640`
AUDIO_FRAMES_PER_FRAME = 2  # official config `step`: 25 fps audio frames -> 12.5 fps video frames
TOKENS_PER_FRAME = 4  # 50 Hz Whisper tokens per generated frame
WHISPER_CHUNK_SAMPLES = 480_000  # 30 s: each chunk is padded and encoded on its own
TOKEN_WINDOW, TOKEN_PAD = 10, (4, 6)  # audio2token: tokens [4i-4, 4i+6) of all hidden states
BUCKET_WINDOW, BUCKET_PAD = 50, (24, 26)  # audio2bucket: tokens [4i-24, 4i+26) of the last hidden state
BUCKET_SCALE, BUCKET_OFFSET = 16.0, 16.0  # official post-processing `out * 16 + 16`


def num_generated_frames(num_samples: int) -> int:
    """Frames generated for ``num_samples`` of 16 kHz audio: ``num_samples // 640 // 2`` (12.5 fps)."""
    return num_samples // SAMPLES_PER_AUDIO_FRAME // AUDIO_FRAMES_PER_FRAME


@torch.no_grad()
def whisper_hidden_states(
    samples: np.ndarray, feature_extractor, encoder: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Whisper encoder once per 30 s chunk.

    Args:
        samples: float32 mono audio at 16 kHz, shape [S].
        feature_extractor: ``transformers.WhisperFeatureExtractor`` (80 mel bins, 3000 frames per chunk).
        encoder: the ``whisper_encoder`` graph: input_features [1, 80, 3000] -> every hidden state stacked,
            [1, 1500, layers+1, d_model] (:class:`sonic_rt.graphs.modules.WhisperEncoderGraph`).

    Returns:
        ``hidden`` [1, 1500*n_chunks, layers+1, d_model] (every hidden state stacked on dim 2) and
        ``last`` [1, 1500*n_chunks, 1, d_model] (the final-LayerNorm output, equal to ``hidden[:, :, -1:]``;
        the official code computes it with a second encoder call), both fp32 on ``device``.
    """
    hidden, last = [], []
    for start in range(0, max(len(samples), 1), WHISPER_CHUNK_SAMPLES):
        chunk = samples[start : start + WHISPER_CHUNK_SAMPLES]
        features = feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        stacked = encoder(features.to(device)).float()  # [1, 1500, layers+1, d_model]
        hidden.append(stacked)
        last.append(stacked[:, :, -1:])
    return torch.cat(hidden, dim=1), torch.cat(last, dim=1)


def audio_windows(
    states: torch.Tensor, audio_frames: int, num_frames: int, window: int, pad: tuple[int, int]
) -> torch.Tensor:
    """Per-frame windows of Whisper tokens, as the official per-frame loop slices them.

    Args:
        states: [1, T, blocks, C] Whisper states (T >= 2 * audio_frames).
        audio_frames: official ``audio_len`` = samples // 640 (25 fps frames).
        num_frames: generated frames N = audio_frames // 2.
        window, pad: (10, (4, 6)) for audio2token, (50, (24, 26)) for audio2bucket.

    Returns:
        [1, N, window, blocks, C], a strided view: frame i holds tokens [4i - pad[0], 4i - pad[0] + window)
        of the trimmed sequence, zeros outside it.
    """
    trimmed = states[:, : audio_frames * 2]
    before = trimmed.new_zeros(1, pad[0], *trimmed.shape[2:])
    after = trimmed.new_zeros(1, pad[1], *trimmed.shape[2:])
    padded = torch.cat([before, trimmed, after], dim=1)  # [1, 2L + pad0 + pad1, blocks, C]
    # [1, P, blocks, C] -> unfold over tokens -> [1, n, blocks, C, window] -> [1, n, window, blocks, C]
    windows = padded.unfold(1, window, TOKENS_PER_FRAME).permute(0, 1, 4, 2, 3)
    return windows[:, :num_frames]


@torch.no_grad()
def encode_audio(
    hidden: torch.Tensor,
    last: torch.Tensor,
    audio_frames: int,
    clip_embeds: torch.Tensor,
    audio2token: torch.nn.Module,
    audio2bucket: torch.nn.Module,
    *,
    dynamic_scale: float = 1.0,
    batch_frames: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """audio2token and audio2bucket for every generated frame, batched over frames.

    Args:
        hidden, last: from :func:`whisper_hidden_states`.
        audio_frames: samples // 640.
        clip_embeds: [1, D_clip] CLIP image embedding.
        dynamic_scale: official ``motion_bucket_scale``; multiplies both buckets.
        batch_frames: frames per adapter call (memory only; results do not depend on it).

    Returns:
        ``cond_tokens`` [1, N, T, D] fp32, ``uncond_tokens`` [1, 1, T, D] = audio2token(zero window) (the same
        for every frame, not zero), ``buckets`` [1, N, 2] fp32 = (out * 16 + 16) * dynamic_scale.
    """
    num_frames = audio_frames // AUDIO_FRAMES_PER_FRAME
    token_windows = audio_windows(hidden, audio_frames, num_frames, TOKEN_WINDOW, TOKEN_PAD)
    bucket_windows = audio_windows(last, audio_frames, num_frames, BUCKET_WINDOW, BUCKET_PAD)
    clip = clip_embeds.float()
    tokens, buckets = [], []
    for start in range(0, num_frames, batch_frames):
        tokens.append(audio2token(token_windows[:, start : start + batch_frames].contiguous()))
        out = audio2bucket(bucket_windows[:, start : start + batch_frames].contiguous(), clip)  # [1, f, 2, 1]
        buckets.append(out[..., 0] * BUCKET_SCALE + BUCKET_OFFSET)
    uncond = audio2token(torch.zeros_like(token_windows[:, :1]))
    return torch.cat(tokens, dim=1), uncond, torch.cat(buckets, dim=1) * dynamic_scale
