"""Sonic's audio attention processors against an explicit re-derivation of the reference math (2.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor

from sonic_rt.demo import DEMO_UNET_CONFIG
from sonic_rt.models.unet import (
    AudioAttention,
    SonicUNet,
    SpatialAudioAttnProcessor,
    TemporalAudioAttnProcessor,
    level_face_masks,
)


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
@pytest.mark.parametrize("impl", list(AudioAttention))
def test_spatial_processor_matches_explicit_masked_attention(unet, impl):
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
    masks = level_face_masks(mask, (16, 16), [proc.level])
    cond.audio_tokens, cond.face_masks, cond.scale, cond.attention = audio.view(b, f, 32, 32), masks, 1.0, impl
    got = attn(x, encoder_hidden_states=clip)
    q = attn.to_q(x)
    # one CLIP key: softmax over a single token is 1, so the CLIP branch is to_v(clip) at every query
    h = attn.to_v(clip).expand(-1, hw, -1)
    mask_l = F.interpolate(mask[:, 0].unsqueeze(0), size=(16, 16), mode="bicubic")[0].reshape(1, hw, 1)
    h = h + mask_l * attention(q, proc.to_k_ip[0](audio), proc.to_v_ip[0](audio), attn.heads)
    want = attn.to_out[0](h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # queries whose mask is exactly 0 ignore the audio entirely
    cond.audio_tokens = torch.randn_like(audio).view(b, f, 32, 32)
    other = attn(x, encoder_hidden_states=clip)
    outside = mask_l[0, :, 0] == 0
    assert outside.any() and not outside.all()
    torch.testing.assert_close(other[:, outside], got[:, outside], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, ~outside], got[:, ~outside])


@torch.no_grad()
@pytest.mark.parametrize("impl", list(AudioAttention))
def test_temporal_processor_attends_to_the_window_mean_audio(unet, impl):
    attn = find(unet, TemporalAudioAttnProcessor)
    proc = attn.processor
    b, f, hw, c = 3, 5, 6, attn.to_q.out_features
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b * hw, f, c, generator=gen)
    # diffusers repeats each batch row's CLIP context for all of its positions
    clip = torch.randn(b, 1, 1, 32, generator=gen).expand(b, hw, 1, 32).reshape(b * hw, 1, 32)
    audio = torch.randn(b * f, 32, 32, generator=gen)
    cond = unet.conditioning
    cond.audio_tokens, cond.face_masks, cond.scale, cond.attention = audio.view(b, f, 32, 32), None, 1.0, impl
    got = attn(x, encoder_hidden_states=clip)
    mean = audio.view(b, f, 32, 32).mean(dim=1)  # [B, 32, D]
    want = torch.empty_like(got)
    for row in range(b):
        for pos in range(hw):
            i = row * hw + pos
            q = attn.to_q(x[i : i + 1])
            h = attn.to_v(clip[i : i + 1]) + attention(
                q, proc.to_k_ip[0](mean[row : row + 1]), proc.to_v_ip[0](mean[row : row + 1]), attn.heads
            )
            want[i : i + 1] = attn.to_out[0](h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet_forward_shapes_and_audio_dependence(unet):
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(3, 25, 8, 8, 8, generator=gen)
    clip = torch.randn(3, 1, 32, generator=gen)
    audio = torch.randn(3, 25, 32, 32, generator=gen)
    ids = torch.tensor([[12.5, 20.0, 24.0]] * 3)
    masks = level_face_masks(torch.ones(1, 1, 64, 64), (8, 8), unet.attention_levels)
    out = unet(sample, torch.tensor(1.2), clip, audio, ids, *masks)
    assert out.shape == (3, 25, 4, 8, 8)
    again = unet(sample, torch.tensor(1.2), clip, audio, ids, *masks)
    assert torch.equal(out, again)
    changed = unet(sample, torch.tensor(1.2), clip, audio.flip(0), ids, *masks)
    assert not torch.allclose(changed, out)
    assert unet.conditioning.audio_tokens is None  # cleared after the call


@torch.no_grad()
@pytest.mark.parametrize("size", [(8, 8), (8, 12), (16, 8)])
def test_level_masks_equal_the_per_layer_downsampling_of_every_attention_layer(unet, size):
    """The masks computed once per resolution are exactly what each spatial layer's official
    IPAdapterMaskProcessor.downsample call gives for its own query count (the per-layer computation)."""
    gen = torch.Generator().manual_seed(4)
    h, w = size
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 5 : 8 * h - 9, 13 : 8 * w - 3] = 1.0
    masks = level_face_masks(mask, size, unet.attention_levels)
    seen = []

    def spy(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(module.processor, SpatialAudioAttnProcessor):
            level = module.processor.level
            want = IPAdapterMaskProcessor.downsample(mask[:, 0], 1, hidden.shape[1], 1)
            assert torch.equal(masks[level].reshape(1, -1, 1), want)
            seen.append(level)

    handles = [
        m.register_forward_pre_hook(spy, with_kwargs=True) for n, m in unet.unet.named_modules() if n.endswith(".attn2")
    ]
    try:
        unet(
            torch.randn(3, 2, 8, h, w, generator=gen),
            torch.tensor(0.3),
            torch.randn(3, 1, 32, generator=gen),
            torch.randn(3, 2, 32, 32, generator=gen),
            torch.tensor([[12.5, 20.0, 24.0]] * 3),
            *masks,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(seen)) == list(unet.attention_levels) and len(seen) == 4


@torch.no_grad()
@pytest.mark.parametrize("batch,frames,size", [(3, 25, (8, 8)), (6, 7, (8, 12)), (3, 1, (16, 8))])
def test_simplified_attention_unet_matches_the_reference_structure(unet, batch, frames, size):
    """AudioAttention.SDPA (to_v(clip) broadcast, temporal K/V once per window) is the same function as the
    official structure: equal to fp32 rounding (tolerance 1e-5 abs+rel on v of magnitude ~1)."""
    gen = torch.Generator().manual_seed(5)
    h, w = size
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 8:40, 16:48] = 1.0
    masks = level_face_masks(mask, size, unet.attention_levels)
    args = (
        torch.randn(batch, frames, 8, h, w, generator=gen),
        torch.tensor([0.7]),
        torch.randn(batch, 1, 32, generator=gen),
        torch.randn(batch, frames, 32, 32, generator=gen),
        torch.tensor([[12.5, 20.0, 24.0]] * batch),
        *masks,
    )
    try:
        unet.attention = AudioAttention.REFERENCE
        want = unet(*args)
        unet.attention = AudioAttention.SDPA
        got = unet(*args)
    finally:
        unet.attention = AudioAttention.REFERENCE
    assert got.shape == (batch, frames, 4, h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_default_path_matches_the_reference_structure_on_the_official_4_level_unet():
    """On Sonic's real UNet structure (the official SVD-xt config, 4 levels, cross-attention 1024; only the widths
    narrowed to [32, 64, 64, 64]), one call of the default path (sdpa, zero-mask skip, SplitGEGLU in place under
    inference mode) equals the official structure to fp32 rounding (tolerance 1e-5 abs+rel on v of magnitude ~1),
    and the in-place GEGLU changes nothing at all (bit-identical to the same path outside inference mode)."""
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG

    torch.manual_seed(0)
    config = {**SVD_XT_UNET_CONFIG, "block_out_channels": [32, 64, 64, 64], "num_attention_heads": [1, 2, 2, 2]}
    model = SonicUNet.from_config(config).eval()
    assert len(model.unet.down_blocks) == 4 and model.unet.config.cross_attention_dim == 1024
    gen = torch.Generator().manual_seed(5)
    # 16x16 latents (128 px): the lowest level is 2x2. At 8x8 it is 1x1, where GroupNorm over 2 channels x 1 pixel
    # per group turns fp32 rounding differences into 1e-2 (ill-conditioned; the real widths have 40 per group).
    h = w = 16
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 16:80, 32:96] = 1.0
    args = (
        torch.randn(3, 25, 8, h, w, generator=gen),
        torch.tensor([0.7]),
        torch.randn(3, 1, 1024, generator=gen),
        torch.randn(3, 25, 32, 1024, generator=gen),
        torch.tensor([[12.5, 20.0, 24.0]] * 3),
        *level_face_masks(mask, (h, w), model.attention_levels),
    )
    with torch.no_grad():
        model.attention = AudioAttention.REFERENCE
        want = model(*args)
        model.attention = AudioAttention.SDPA
        copying = model(*args)
    with torch.inference_mode():
        got = model(*args)
    assert got.shape == (3, 25, 4, h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, copying)


@torch.no_grad()
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_official_per_layer_mask_call_equals_the_per_level_masks(unet, size):
    """``face_mask=`` (the eager baseline: the pixel mask downsampled in every spatial layer call, reference
    structure whatever ``unet.attention`` is) computes the same v as the per-level masks computed once
    (tolerance 1e-5: only the reduction order of the simplified structure differs)."""
    gen = torch.Generator().manual_seed(9)
    h, w = size
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 8:40, 16:48] = 1.0
    args = (
        torch.randn(3, 5, 8, h, w, generator=gen),
        torch.tensor([0.7]),
        torch.randn(3, 1, 32, generator=gen),
        torch.randn(3, 5, 32, 32, generator=gen),
        torch.tensor([[12.5, 20.0, 24.0]] * 3),
    )
    masks = level_face_masks(mask, size, unet.attention_levels)
    calls = []
    original = IPAdapterMaskProcessor.downsample

    def counting(*a, **k):
        calls.append(a[1:])
        return original(*a, **k)

    want = unet(*args, *masks)  # REFERENCE with the per-level masks
    try:
        unet.attention = AudioAttention.SDPA
        IPAdapterMaskProcessor.downsample = staticmethod(counting)
        got = unet(*args, face_mask=mask)
    finally:
        IPAdapterMaskProcessor.downsample = staticmethod(original)
        unet.attention = AudioAttention.REFERENCE
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    spatial = sum(
        isinstance(m.processor, SpatialAudioAttnProcessor) for n, m in unet.unet.named_modules() if n.endswith(".attn2")
    )
    assert len(calls) == spatial  # once per spatial layer of the call, at [B*F, queries, channels]
    assert all(batch == 15 for batch, _, _ in calls)
    with pytest.raises(ValueError, match="not both"):
        unet(*args, *masks, face_mask=mask)


@torch.no_grad()
@pytest.mark.parametrize("box", [(30, 90, 40, 100), (0, 128, 0, 128), (0, 0, 0, 0)])
def test_sdpa_skips_zero_mask_queries_on_cpu_with_bit_identical_output(unet, box, monkeypatch):
    """On CPU the SDPA path attends to the audio only at positions whose face mask is non-zero: the output is
    bit for bit the full computation's (face box, whole frame, no face), and a NaN planted in a zero-mask
    query never reaches the output, so those positions are really skipped."""
    import sonic_rt.models.unet as unet_module

    attn = find(unet, SpatialAudioAttnProcessor)
    b, f, hw, c = 3, 4, 16 * 16, attn.to_q.out_features
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(b * f, hw, c, generator=gen)
    clip = torch.randn(b * f, 1, 32, generator=gen)
    audio = torch.randn(b, f, 32, 32, generator=gen)
    mask = torch.zeros(1, 1, 128, 128)
    y0, y1, x0, x1 = box
    mask[..., y0:y1, x0:x1] = 1.0
    cond = unet.conditioning
    cond.audio_tokens, cond.scale, cond.attention = audio, 1.0, AudioAttention.SDPA
    cond.face_masks = level_face_masks(mask, (16, 16), [attn.processor.level])
    skipped = attn(x, encoder_hidden_states=clip)
    monkeypatch.setattr(unet_module, "_skips_zero_mask", lambda query: False)
    full = attn(x, encoder_hidden_states=clip)
    assert torch.equal(skipped, full)
    outside = cond.face_masks[attn.processor.level].reshape(-1) == 0
    if outside.any() and not outside.all():
        monkeypatch.undo()
        poisoned = x.clone()
        # to_q is linear without bias, so a NaN input row gives a NaN query row at that position only
        poisoned[:, outside.nonzero()[0, 0]] = float("nan")
        out = attn(poisoned, encoder_hidden_states=clip)
        assert not out.isnan().any()  # the full path would give NaN there (NaN * 0)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(768, 25, 32), (75, 256, 32), (2, 7, 32)])
def test_split_geglu_is_diffusers_geglu_up_to_summation_order_and_reference_runs_diffusers_own(unet, shape):
    """Every GEGLU of the UNet computes its two halves as two matmuls outside the REFERENCE structure (same
    parameters; tolerance 1e-6 abs + rel on values of magnitude ~1), and runs diffusers' own forward, bit for bit,
    in the REFERENCE structure (the official structure, which the eager baseline uses)."""
    from diffusers.models.activations import GEGLU

    from sonic_rt.models.unet import SplitGEGLU

    gegs = [m for m in unet.unet.modules() if isinstance(m, GEGLU)]
    assert gegs and all(type(m) is SplitGEGLU for m in gegs)
    geglu = gegs[0]
    x = torch.randn(*shape[:-1], geglu.proj.in_features, generator=torch.Generator().manual_seed(12))
    official = GEGLU.forward(geglu, x)
    cond = unet.conditioning
    try:
        cond.attention = AudioAttention.REFERENCE
        assert torch.equal(geglu(x), official)
        cond.attention = AudioAttention.SDPA
        split = geglu(x)
    finally:
        cond.attention = AudioAttention.REFERENCE
    assert split.shape == official.shape == (*shape[:-1], geglu.proj.out_features // 2)
    torch.testing.assert_close(split, official, rtol=1e-6, atol=1e-6)


def _unet_rows(config: dict, h: int, rows: int = 6) -> tuple:
    """Random UNet inputs of ``rows`` guidance rows at ``h x h`` latents (a face box in the middle)."""
    gen = torch.Generator().manual_seed(11)
    cross = config["cross_attention_dim"]
    mask = torch.zeros(1, 1, 8 * h, 8 * h)
    mask[..., 2 * h : 6 * h, 2 * h : 6 * h] = 1.0
    model_levels = len(config["block_out_channels"])
    return (
        torch.randn(rows, 25, 8, h, h, generator=gen),
        torch.tensor([0.7]),
        torch.randn(rows, 1, cross, generator=gen),
        torch.randn(rows, 25, 32, cross, generator=gen),
        torch.tensor([[12.5, 20.0, 24.0]] * rows),
        *level_face_masks(mask, (h, h), [i for i in range(model_levels) if i < model_levels - 1] or [0]),
    )


def _call_with_threads(model, args, threads: int) -> torch.Tensor:
    """``model(*args)`` on a fresh thread running ``threads`` intra-op threads (as a replica's worker does)."""
    import threading

    out = {}

    def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out["v"] = model(*args)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out["v"]


def _rows_of(args: tuple, rows: slice) -> tuple:
    return tuple(a[rows] if i in (0, 2, 3, 4) else a for i, a in enumerate(args))


@pytest.mark.parametrize(
    "name,h",
    [("demo", 8), ("demo", 16), ("4-level", 16)],
    ids=lambda v: str(v),
)
def test_a_guidance_row_gives_the_same_v_alone_or_batched_and_on_one_or_two_threads(unet, name, h):
    """The scheduler splits a window's rows over devices, batches windows, and runs replicas with fewer threads:
    on the CPU a row's v must not depend on any of that (sonic_rt.models.batch_invariant). Rows alone, 2 of 3, 3
    and 6 per call, on 1 and 2 threads: bit for bit, on the demo UNet and on the official 4-level structure.
    (At 4 threads the 4-level UNet's 2x2 deepest level differs by ~2e-7: oneDNN's kernel choice.)"""
    from sonic_rt.architectures import SVD_XT_UNET_CONFIG
    from sonic_rt.models.batch_invariant import make_batch_invariant

    if name == "demo":
        config, model = DEMO_UNET_CONFIG, unet
    else:
        torch.manual_seed(0)
        config = {**SVD_XT_UNET_CONFIG, "block_out_channels": [32, 64, 64, 64], "num_attention_heads": [1, 2, 2, 2]}
        model = SonicUNet.from_config(config).eval()
    make_batch_invariant(model)  # as the loader does on the CPU
    args = _unet_rows(config, h)
    args = args[:5] + tuple(level_face_masks(torch.ones(1, 1, 8 * h, 8 * h), (h, h), model.attention_levels))
    three = _call_with_threads(model, _rows_of(args, slice(0, 3)), 2)
    assert torch.equal(_call_with_threads(model, args, 2)[:3], three)  # 6 rows: two windows per call
    assert torch.equal(_call_with_threads(model, _rows_of(args, slice(0, 2)), 1), three[:2])
    for row in range(3):
        alone = _call_with_threads(model, _rows_of(args, slice(row, row + 1)), 1)
        assert torch.equal(alone, three[row : row + 1]), row
    assert torch.equal(_call_with_threads(model, _rows_of(args, slice(0, 3)), 1), three)


def test_plain_layers_give_back_diffusers_linear_and_conv3d_for_the_eager_baseline(monkeypatch):
    """Inside ``plain_layers()`` (the eager baseline's UNet calls) the batch-invariant layers run ``F.linear`` on the
    input as given and one ``conv3d``; outside, the contiguous padded matmul and a ``conv2d`` per sample."""
    import torch.nn.functional as F

    from sonic_rt.models import batch_invariant
    from sonic_rt.models.batch_invariant import make_batch_invariant, plain_layers

    torch.manual_seed(0)
    model = make_batch_invariant(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)))
    )
    linear, conv = model[0], model[1]
    calls = []
    for name in ("linear", "conv2d", "conv3d"):
        real = getattr(F, name)
        monkeypatch.setattr(batch_invariant.F, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    x, video = torch.randn(3, 5, 8), torch.randn(3, 8, 4, 2, 2)
    with plain_layers():
        plain = linear(x), conv(video)
    assert calls == ["linear", "conv3d"]
    calls.clear()
    invariant = linear(x), conv(video)
    assert calls == ["linear", "conv2d", "conv2d", "conv2d"]
    for a, b in zip(plain, invariant):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same function up to summation order
