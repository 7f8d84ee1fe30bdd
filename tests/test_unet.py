"""Sonic's audio attention processors against an explicit re-derivation of the reference math (2.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sonic_rt.demo import DEMO_UNET_CONFIG
from sonic_rt.models.unet import SonicUNet, SpatialAudioAttnProcessor, TemporalAudioAttnProcessor


def attention(q, k, v, heads):
    """Plain softmax attention with explicit heads: [N, Lq, C], [N, Lk, C] -> [N, Lq, C]."""
    n, lq, c = q.shape
    d = c // heads
    q = q.view(n, lq, heads, d).transpose(1, 2)
    k = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
    v = v.view(v.shape[0], -1, heads, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(n, lq, c)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return SonicUNet.from_config(DEMO_UNET_CONFIG).eval()


def find(unet, kind):
    for name, module in unet.unet.named_modules():
        if name.endswith(".attn2") and isinstance(module.processor, kind):
            return module
    raise AssertionError(kind)


def test_every_attn2_has_a_sonic_processor_and_attn1_is_plain(unet):
    names = [n for n, _ in unet.unet.named_modules() if n.endswith(".attn2")]
    assert len(names) == 8
    for name, module in unet.unet.named_modules():
        if name.endswith(".attn2"):
            want = TemporalAudioAttnProcessor if ".temporal_transformer_blocks." in name else SpatialAudioAttnProcessor
            assert type(module.processor) is want
        if name.endswith(".attn1"):
            assert not list(module.processor.parameters()) if isinstance(module.processor, torch.nn.Module) else True


@torch.no_grad()
def test_spatial_processor_matches_explicit_masked_attention(unet):
    attn = find(unet, SpatialAudioAttnProcessor)
    proc = attn.processor
    b, f, hw, c = 3, 4, 16 * 16, attn.to_q.out_features
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b * f, hw, c, generator=gen)
    clip = torch.randn(b * f, 1, 32, generator=gen)
    audio = torch.randn(b * f, 32, 32, generator=gen)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 30:90, 40:100] = 1.0
    cond = unet.conditioning
    cond.audio_tokens, cond.batch, cond.frames, cond.face_mask, cond.scale = audio, b, f, mask, 1.0
    got = attn(x, encoder_hidden_states=clip)
    q = attn.to_q(x)
    # one CLIP key: softmax over a single token is 1, so the CLIP branch is to_v(clip) at every query
    h = attn.to_v(clip).expand(-1, hw, -1)
    mask_l = F.interpolate(mask[:, 0].unsqueeze(0), size=(16, 16), mode="bicubic")[0].reshape(1, hw, 1)
    h = h + mask_l * attention(q, proc.to_k_ip[0](audio), proc.to_v_ip[0](audio), attn.heads)
    want = attn.to_out[0](h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # queries whose mask is exactly 0 ignore the audio entirely
    cond.audio_tokens = torch.randn_like(audio)
    other = attn(x, encoder_hidden_states=clip)
    outside = (mask_l[0, :, 0] == 0)
    assert outside.any() and not outside.all()
    torch.testing.assert_close(other[:, outside], got[:, outside], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, ~outside], got[:, ~outside])


@torch.no_grad()
def test_temporal_processor_attends_to_the_window_mean_audio(unet):
    attn = find(unet, TemporalAudioAttnProcessor)
    proc = attn.processor
    b, f, hw, c = 3, 5, 6, attn.to_q.out_features
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b * hw, f, c, generator=gen)
    clip = torch.randn(b * hw, 1, 32, generator=gen)
    audio = torch.randn(b * f, 32, 32, generator=gen)
    cond = unet.conditioning
    cond.audio_tokens, cond.batch, cond.frames, cond.face_mask, cond.scale = audio, b, f, None, 1.0
    got = attn(x, encoder_hidden_states=clip)
    mean = audio.view(b, f, 32, 32).mean(dim=1)  # [B, 32, D]
    want = torch.empty_like(got)
    for row in range(b):
        for pos in range(hw):
            i = row * hw + pos
            q = attn.to_q(x[i:i + 1])
            h = attn.to_v(clip[i:i + 1]) + attention(q, proc.to_k_ip[0](mean[row:row + 1]),
                                                     proc.to_v_ip[0](mean[row:row + 1]), attn.heads)
            want[i:i + 1] = attn.to_out[0](h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet_forward_shapes_and_audio_dependence(unet):
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(3, 25, 8, 8, 8, generator=gen)
    clip = torch.randn(3, 1, 32, generator=gen)
    audio = torch.randn(3, 25, 32, 32, generator=gen)
    ids = torch.tensor([[12.5, 20.0, 24.0]] * 3)
    mask = torch.ones(1, 1, 64, 64)
    out = unet(sample, torch.tensor(1.2), clip, audio, ids, mask)
    assert out.shape == (3, 25, 4, 8, 8)
    again = unet(sample, torch.tensor(1.2), clip, audio, ids, mask)
    assert torch.equal(out, again)
    changed = unet(sample, torch.tensor(1.2), clip, audio.flip(0), ids, mask)
    assert not torch.allclose(changed, out)
    assert unet.conditioning.audio_tokens is None  # cleared after the call
