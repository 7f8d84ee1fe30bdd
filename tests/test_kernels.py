"""The fused audio-attention Triton kernels against their PyTorch reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from sonic_rt.attention import resolve_attention
from sonic_rt.demo import DEMO_UNET_CONFIG
from sonic_rt.errors import InputError
from sonic_rt.models.unet import AudioAttention, SonicUNet, level_face_masks

kernels = pytest.importorskip("sonic_rt.kernels.audio_attention")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_kernels = pytest.mark.skipif(
    not INTERPRETED, reason="CPU kernel runs need TRITON_INTERPRET=1 (set by conftest where there is no GPU)"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, compiled")

# fp32 kernels (IEEE dots) match the fp32 reference to 2e-6 abs + rel here; fp16/bf16 follow the low-precision
# rule of docs/testing.md.
FP32_TOL = 2e-6
LOW_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _face_mask(length_h: int, length_w: int) -> torch.Tensor:
    """A real face-box mask on a level grid: bicubic-downsampled from pixels (overshoot included)."""
    mask = torch.zeros(1, 1, 8 * length_h, 8 * length_w)
    mask[..., 8 * length_h // 4 : 8 * length_h * 3 // 4, 8 * length_w // 3 : 8 * length_w * 2 // 3] = 1.0
    return level_face_masks(mask, (length_h, length_w), [0])[0].reshape(-1)


def _inputs(n, length, tokens, heads, head_dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    q, k, v = (torch.randn(n, size, c, generator=gen) for size in (length, tokens, tokens))
    clip_v = torch.randn(n, c, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v, clip_v)]


def _masks(h, w):
    gen = torch.Generator().manual_seed(7)
    return {
        "zeros": torch.zeros(h * w),
        "ones": torch.ones(h * w),
        "face": _face_mask(h, w),
        "random": torch.rand(h * w, generator=gen) * (torch.rand(h * w, generator=gen) > 0.5),
    }


def _check(got, want_fp32, same_dtype_ref, dtype):
    """fp32: tight. fp16/bf16 (the low-precision rule of docs/testing.md): at most 2x as far from the fp32
    reference as PyTorch's own result in the same dtype, plus a dtype-dependent atol."""
    err = (got.float() - want_fp32).abs().max()
    if dtype == torch.float32:
        assert err <= FP32_TOL * (1 + want_fp32.abs().max()), float(err)
    else:
        torch_err = (same_dtype_ref.float() - want_fp32).abs().max()
        assert err <= 2 * torch_err + LOW_ATOL[dtype], (float(err), float(torch_err))


# (n, h, w, tokens, heads, head_dim): odd query counts, non-power-of-two token counts, every head dim
SHAPES = [(3, 5, 7, 32, 2, 16), (2, 9, 9, 7, 1, 64), (4, 8, 8, 33, 2, 32), (1, 3, 11, 1, 1, 128)]


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["zeros", "ones", "face", "random"])
def test_spatial_kernel_matches_reference(dtype, shape, mask_kind):
    n, h, w, tokens, heads, d = shape
    q, k, v, clip_v = _inputs(n, h * w, tokens, heads, d, dtype)
    mask = _masks(h, w)[mask_kind]
    got = kernels.spatial_audio_attention(q, k, v, clip_v, mask, heads, scale=0.8, block_m=16)
    want = kernels.audio_attention_reference(*(t.float() for t in (q, k, v, clip_v)), mask, heads, 0.8)
    same = kernels.audio_attention_reference(q, k, v, clip_v, mask, heads, 0.8)
    assert got.shape == q.shape and got.dtype == dtype
    _check(got, want, same, dtype)


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_temporal_kernel_matches_reference(dtype, shape):
    n, h, w, tokens, heads, d = shape
    frames = 3
    q, k, v, clip_v = _inputs(n, h * w * frames, tokens, heads, d, dtype, seed=1)
    got = kernels.temporal_audio_attention(q, k, v, clip_v, heads, scale=1.0, block_m=32)
    want = kernels.audio_attention_reference(*(t.float() for t in (q, k, v, clip_v)), None, heads, 1.0)
    same = kernels.audio_attention_reference(q, k, v, clip_v, None, heads, 1.0)
    _check(got, want, same, dtype)


@cpu_kernels
def test_zero_mask_blocks_skip_the_attention_entirely():
    """Queries in a block whose mask is exactly 0 are never read: NaNs there do not reach the output, which is
    exactly clip_v; a block with one non-zero value is computed."""
    q, k, v, clip_v = _inputs(2, 64, 32, 2, 16, torch.float32)
    mask = torch.zeros(64)
    mask[40] = 0.5  # block 2 of 4 (rows 32..47) is active
    q[:, :32] = float("nan")
    got = kernels.spatial_audio_attention(q, k, v, clip_v, mask, 2, block_m=16)
    assert torch.equal(got[:, :32], clip_v[:, None, :].expand(-1, 32, -1))
    want = kernels.audio_attention_reference(q[:, 32:], k, v, clip_v, mask[32:], 2)
    torch.testing.assert_close(got[:, 32:], want, rtol=1e-5, atol=1e-5)


def test_wrapper_refuses_what_the_datasheet_excludes():
    q, k, v, clip_v = _inputs(2, 16, 8, 2, 16, torch.float32)
    with pytest.raises(kernels.KernelUnsupported, match="head dim 12"):
        kernels.temporal_audio_attention(q[..., :24], k[..., :24], v[..., :24], clip_v[..., :24], 2)
    with pytest.raises(kernels.KernelUnsupported, match="dtypes"):
        kernels.temporal_audio_attention(q, k.half(), v, clip_v, 2)
    with pytest.raises(kernels.KernelUnsupported, match="mask must be"):
        kernels.spatial_audio_attention(q, k, v, clip_v, torch.ones(15), 2)
    with pytest.raises(kernels.KernelUnsupported, match="audio tokens"):
        big = torch.zeros(2, 300, 32)
        kernels.temporal_audio_attention(q, big, big, clip_v, 2)
    with pytest.raises(kernels.KernelUnsupported, match="inconsistent"):
        kernels.temporal_audio_attention(q, k, v[:1], clip_v, 2)


@cpu_kernels
@torch.no_grad()
@pytest.mark.parametrize("batch,frames,size", [(3, 3, (8, 8)), (6, 2, (8, 12))])
def test_demo_unet_with_triton_attention_matches_the_reference_unet(batch, frames, size):
    """The whole demo UNet with AudioAttention.TRITON against the reference structure (fp32, 1e-4)."""
    torch.manual_seed(0)
    unet = SonicUNet.from_config(DEMO_UNET_CONFIG).eval()
    gen = torch.Generator().manual_seed(1)
    h, w = size
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 8:40, 16:48] = 1.0
    args = (
        torch.randn(batch, frames, 8, h, w, generator=gen),
        torch.tensor([0.4]),
        torch.randn(batch, 1, 32, generator=gen),
        torch.randn(batch, frames, 32, 32, generator=gen),
        torch.tensor([[12.5, 20.0, 24.0]] * batch),
        *level_face_masks(mask, size, unet.attention_levels),
    )
    want = unet(*args)
    fused = copy.deepcopy(unet)
    fused.attention = AudioAttention.TRITON
    got = fused(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_registry_defaults_and_explicit_choices():
    """auto on CPU is the fastest exact path (sdpa, which also skips zero-mask queries there); the reference
    structure stays selectable for checking."""
    cpu = torch.device("cpu")
    assert resolve_attention(None, cpu, {64}) is AudioAttention.SDPA
    assert resolve_attention("auto", cpu, {64}) is AudioAttention.SDPA
    assert resolve_attention("reference", cpu, {64}) is AudioAttention.REFERENCE
    assert resolve_attention("sdpa", cpu, {64}) is AudioAttention.SDPA
    with pytest.raises(InputError, match="unknown attention"):
        resolve_attention("flash", cpu, {64})
    if INTERPRETED:
        assert resolve_attention("triton", cpu, {64}) is AudioAttention.TRITON
        with pytest.raises(InputError, match=r"head dims \[24\]"):
            resolve_attention("triton", cpu, {24})


def test_cli_selects_the_implementation(demo_dir, portrait, speech, tmp_path):
    """--attention reaches the Runtime: triton without a GPU (and not interpreting) is a clear error, exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine triton is available")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sonic_rt",
            "animate",
            "--model",
            str(demo_dir),
            "--image",
            str(portrait),
            "--audio",
            str(speech),
            "--out",
            str(tmp_path / "o.mp4"),
            "--attention",
            "triton",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2 and "attention='triton' cannot run here" in run.stderr and "CUDA" in run.stderr
    helped = subprocess.run([sys.executable, "-m", "sonic_rt", "animate", "--help"], capture_output=True, text=True)
    assert "--attention" in helped.stdout and "triton" in helped.stdout


# --- GPU (compiled kernels, full size) -------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_full_size_kernels_on_gpu(dtype, level):
    """SVD-xt at 512x512: 75 frame rows (3 CFG x 25), 32 tokens, head dim 64, channels 320/640/1280/1280."""
    side = 64 // 2**level
    channels = (320, 640, 1280, 1280)[level]
    heads = channels // 64
    q, k, v, clip_v = _inputs(75, side * side, 32, heads, 64, dtype, device="cuda")
    mask = _face_mask(side, side).cuda()
    got = kernels.spatial_audio_attention(q, k, v, clip_v, mask, heads)
    want = kernels.audio_attention_reference(*(t.float() for t in (q, k, v, clip_v)), mask, heads)
    _check(got, want, kernels.audio_attention_reference(q, k, v, clip_v, mask.to(dtype), heads), dtype)
    qt, kt, vt, ct = _inputs(3, side * side * 25, 32, heads, 64, dtype, device="cuda", seed=2)
    got = kernels.temporal_audio_attention(qt, kt, vt, ct, heads)
    want = kernels.audio_attention_reference(*(t.float() for t in (qt, kt, vt, ct)), None, heads)
    _check(got, want, kernels.audio_attention_reference(qt, kt, vt, ct, None, heads), dtype)
