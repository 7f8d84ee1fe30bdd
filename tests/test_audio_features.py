"""Audio timeline, per-frame Whisper windows and bucket post-processing (reference sections 2.6-2.8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonic_rt.audio_features import (
    BUCKET_PAD,
    BUCKET_WINDOW,
    TOKEN_PAD,
    TOKEN_WINDOW,
    audio_windows,
    encode_audio,
    num_generated_frames,
    whisper_hidden_states,
)


@pytest.mark.parametrize(
    "samples, frames", [(0, 0), (1279, 0), (1280, 1), (2559, 1), (2560, 2), (64_000, 50), (64_639, 50), (160_000, 125)]
)
def test_frame_count_is_samples_div_640_div_2(samples, frames):
    assert num_generated_frames(samples) == frames


def token_states(num_tokens: int, blocks: int = 2, channels: int = 3) -> torch.Tensor:
    """States whose every value is its token index + 1, so windows can be read back as token ids."""
    ids = torch.arange(1, num_tokens + 1, dtype=torch.float32)
    return ids.view(1, -1, 1, 1).expand(1, num_tokens, blocks, channels).clone()


@pytest.mark.parametrize("window, pad", [(TOKEN_WINDOW, TOKEN_PAD), (BUCKET_WINDOW, BUCKET_PAD)])
def test_windows_are_the_official_slices_with_zero_padding(window, pad):
    audio_frames = 23  # 11 generated frames; 46 tokens are kept, the rest of the chunk is trimmed
    states = token_states(1500)
    windows = audio_windows(states, audio_frames, audio_frames // 2, window, pad)
    assert windows.shape == (1, 11, window, 2, 3)
    for i in range(11):
        # official: padded[:, 4i : 4i + window] of cat(zeros(pad0), tokens[:2L], zeros(pad1))
        want = [t + 1 if 0 <= t < 2 * audio_frames else 0 for t in range(4 * i - pad[0], 4 * i - pad[0] + window)]
        assert windows[0, i, :, 0, 0].tolist() == want


class _CountingEncoder(torch.nn.Module):
    """Stand-in for the whisper_encoder graph: stacked hidden states are functions of the mel input; counts calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, features):
        self.calls += 1
        assert features.shape == (1, 80, 3000)
        base = features.mean(dim=1, keepdim=True).transpose(1, 2)[:, ::2]  # [1, 1500, 1]
        return torch.stack([base.expand(1, 1500, 4) * (k + 1) for k in range(3)], dim=2)  # [1, 1500, 3, 4]


def test_whisper_runs_once_per_30_s_chunk():
    from transformers import WhisperFeatureExtractor

    encoder = _CountingEncoder()
    samples = np.random.default_rng(0).standard_normal(16000 * 31).astype(np.float32) * 0.1
    hidden, last = whisper_hidden_states(
        samples, WhisperFeatureExtractor(feature_size=80), encoder, torch.device("cpu")
    )
    assert encoder.calls == 2
    assert hidden.shape == (1, 3000, 3, 4) and last.shape == (1, 3000, 1, 4)
    assert torch.equal(last, hidden[:, :, -1:])  # the official second encoder call returns exactly this


class _ConstBucket(torch.nn.Module):
    def forward(self, windows, clip):
        assert clip.shape == (1, 5)
        return torch.full((1, windows.shape[1], 2, 1), 0.5)


class _FirstToken(torch.nn.Module):
    def forward(self, windows):
        return windows[:, :, 0, :1, :1].expand(*windows.shape[:2], 32, 1).clone()  # [B, F, 32, 1]


def test_buckets_are_out_times_16_plus_16_times_dynamic_scale():
    states = token_states(1500, blocks=1)
    tokens, uncond, buckets = encode_audio(
        states, states, 40, torch.zeros(1, 5), _FirstToken(), _ConstBucket(), dynamic_scale=1.5, batch_frames=7
    )
    assert tokens.shape == (1, 20, 32, 1) and uncond.shape == (1, 1, 32, 1)
    assert buckets.shape == (1, 20, 2)
    assert torch.all(buckets == (0.5 * 16 + 16) * 1.5)
    assert torch.all(uncond == 0)  # audio2token of an all-zero window (here the stand-in returns its first token)
    # frame i's window starts 4 tokens before token 4i: token id 4i - 3 (id = index + 1), 0 for i = 0
    assert tokens[0, :, 0, 0].tolist() == [0.0] + [4.0 * i - 3 for i in range(1, 20)]
