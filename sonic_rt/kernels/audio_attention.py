"""Fused audio cross-attention for Sonic's 32 ``attn2`` layers (Triton).

Datasheet
---------
Computes, per batch row ``n``, head ``h`` and query ``i`` (all math in fp32, one store)::

    out[n, i, h] = clip_v[n, h] + scale * mask[i] * softmax(q[n, i, h] . k[n, :, h]^T / sqrt(d)) @ v[n, :, h]

which is Sonic's audio attention after the exact simplifications of docs/performance.md (savings 2-4):

- **spatial** (:func:`spatial_audio_attention`): ``n`` = a frame of a window (B*F rows), ``i`` = its H_l*W_l
  latent positions, ``k, v`` = ``to_k_ip / to_v_ip`` of that frame's 32 audio tokens, ``mask`` = the level's face
  mask (:func:`sonic_rt.models.unet.level_face_masks`: bicubic, overshoot included), ``clip_v = to_v(clip)`` (the
  attention over the single CLIP token is exactly its value). **Query blocks whose mask is exactly zero skip the
  attention** (their output is ``clip_v``); the face box covers a minority of the frame.
- **temporal** (:func:`temporal_audio_attention`): ``n`` = a batch row (CFG row of a window), ``i`` = all
  H_l*W_l*F (position, frame) queries of that row, ``k, v`` = projections of the window-mean audio tokens, made
  once per window and shared by every position (the official code projects them H_l*W_l times); no mask.

======================  =============================================================================
inputs                  ``q`` [N, L, C], ``k``/``v`` [N, T, C], ``clip_v`` [N, C] (any strides; C = heads * d)
                        ``mask`` [L] (spatial only), ``scale`` (official ``ip_audio_scale`` = 1.0)
output                  [N, L, C], dtype of ``q``
dtypes                  fp16, bf16 (fp32 accumulation, softmax in fp32), fp32 (``tl.dot`` in IEEE fp32)
head dim d              16, 32, 64 (SVD: 64 at every level), 128
tokens T                1..256, any count (padded to a power of two >= 16 inside, padding masked to -inf)
batch N, queries L      any (L tiled by BLOCK_M rows)
mask                    any real values; a block is skipped iff every value in it is exactly 0
======================  =============================================================================

Limits: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before this module was imported
(the interpreter; bf16 ``tl.dot`` is wrong there, see docs/development.md). The wrappers raise
:class:`KernelUnsupported` on anything else, naming the constraint, so callers can fall back.

:func:`audio_attention_reference` is the plain PyTorch definition every test compares against.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_TOKENS = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelUnsupported(ValueError):
    """The inputs fall outside what the kernel supports (the message names the constraint)."""


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (CPU tensors; set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _audio_attention_kernel(
    Q,
    K,
    V,
    ClipV,
    Mask,
    Out,
    stride_qn,
    stride_ql,
    stride_qc,
    stride_kn,
    stride_kt,
    stride_kc,
    stride_vn,
    stride_vt,
    stride_vc,
    stride_cn,
    stride_cc,
    stride_on,
    stride_ol,
    stride_oc,
    L,
    T,
    sm_scale,
    audio_scale,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_nh // HEADS
    h = pid_nh % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_T)
    cols = h * HEAD_DIM + offs_d
    rows_ok = offs_m < L
    tokens_ok = offs_t < T

    clip = tl.load(ClipV + n * stride_cn + cols * stride_cc).to(tl.float32)  # [D]
    out = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32) + clip[None, :]
    if HAS_MASK:
        mask = tl.load(Mask + offs_m, mask=rows_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
        active = tl.max(tl.abs(mask), axis=0) > 0.0
    else:
        mask = tl.full((BLOCK_M,), 1.0, tl.float32)
        active = True
    if active:
        q = tl.load(
            Q + n * stride_qn + offs_m[:, None] * stride_ql + cols[None, :] * stride_qc,
            mask=rows_ok[:, None],
            other=0.0,
        )
        k = tl.load(
            K + n * stride_kn + offs_t[:, None] * stride_kt + cols[None, :] * stride_kc,
            mask=tokens_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            V + n * stride_vn + offs_t[:, None] * stride_vt + cols[None, :] * stride_vc,
            mask=tokens_ok[:, None],
            other=0.0,
        )
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_T], fp32 accumulation
        s = tl.where(tokens_ok[None, :], s * sm_scale, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        denom = tl.sum(p, axis=1)
        if IEEE:
            o = tl.dot(p, v, input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        out += (audio_scale * mask / denom)[:, None] * o
    tl.store(
        Out + n * stride_on + offs_m[:, None] * stride_ol + cols[None, :] * stride_oc,
        out.to(Out.dtype.element_ty),
        mask=rows_ok[:, None],
    )


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, clip_v: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> int:
    """Validate the inputs; returns the head dim. Raises :class:`KernelUnsupported`."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or clip_v.dim() != 2:
        raise KernelUnsupported(
            f"expected q [N, L, C], k/v [N, T, C], clip_v [N, C]; got {list(q.shape)}, "
            f"{list(k.shape)}, {list(v.shape)}, {list(clip_v.shape)}"
        )
    n, _, c = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != c or tuple(clip_v.shape) != (n, c):
        raise KernelUnsupported(
            f"inconsistent shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, clip_v {list(clip_v.shape)}"
        )
    if c % heads:
        raise KernelUnsupported(f"channels {c} are not divisible by {heads} heads")
    head_dim = c // heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise KernelUnsupported(f"head dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    if not 1 <= k.shape[1] <= MAX_TOKENS:
        raise KernelUnsupported(f"{k.shape[1]} audio tokens: the kernel takes 1..{MAX_TOKENS}")
    tensors = [q, k, v, clip_v] + ([mask] if mask is not None else [])
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in (k, v, clip_v)):
        raise KernelUnsupported(
            f"dtypes must be one of fp16/bf16/fp32 and equal, got {[str(t.dtype) for t in (q, k, v, clip_v)]}"
        )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelUnsupported(f"tensors are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise KernelUnsupported(f"Triton kernels run on CUDA tensors (CPU only in interpreter mode), got {device}")
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != q.shape[1]):
        raise KernelUnsupported(f"mask must be [L] = [{q.shape[1]}], got {list(mask.shape)}")
    return head_dim


def _launch(q, k, v, clip_v, mask, heads: int, scale: float, block_m: int | None) -> torch.Tensor:
    head_dim = _check(q, k, v, clip_v, heads, mask)
    n, length, c = q.shape
    out = torch.empty((n, length, c), dtype=q.dtype, device=q.device)
    if n == 0 or length == 0:
        return out
    block_t = max(16, triton.next_power_of_2(k.shape[1]))
    block_m = block_m or (64 if interpreting() or head_dim >= 128 else 128)
    mask_arg = mask.contiguous() if mask is not None else q  # unused pointer when HAS_MASK is False
    grid = (n * heads, triton.cdiv(length, block_m))
    _audio_attention_kernel[grid](
        q,
        k,
        v,
        clip_v,
        mask_arg,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *clip_v.stride(),
        *out.stride(),
        length,
        k.shape[1],
        1.0 / math.sqrt(head_dim),
        float(scale),
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_T=block_t,
        HAS_MASK=mask is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=4 if block_m <= 64 else 8,
    )
    return out


def spatial_audio_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    clip_v: torch.Tensor,
    mask: torch.Tensor,
    heads: int,
    scale: float = 1.0,
    *,
    block_m: int | None = None,
) -> torch.Tensor:
    """Spatial audio attention of one layer, fused (see the module datasheet).

    Args:
        q: ``[B*F, H_l*W_l, C]`` queries (``to_q`` of the frame tokens).
        k, v: ``[B*F, T, C]`` ``to_k_ip`` / ``to_v_ip`` of each frame's T audio tokens.
        clip_v: ``[B*F, C]`` ``to_v`` of the frame's CLIP token.
        mask: ``[H_l*W_l]`` the level's face mask; blocks of exact zeros skip the attention.
        heads: attention heads (C = heads * d).
        scale: audio branch scale (official ``ip_audio_scale`` 1.0).

    Returns:
        ``[B*F, H_l*W_l, C]`` in q's dtype: the attention output before ``to_out``.

    Raises:
        KernelUnsupported: shapes, dtypes, head dim, token count or device outside the datasheet.
    """
    return _launch(q, k, v, clip_v, mask, heads, scale, block_m)


def temporal_audio_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    clip_v: torch.Tensor,
    heads: int,
    scale: float = 1.0,
    *,
    block_m: int | None = None,
) -> torch.Tensor:
    """Temporal audio attention of one layer, fused, K/V shared by every position of a batch row.

    Args:
        q: ``[B, H_l*W_l*F, C]``: the ``[B*H_l*W_l, F, C]`` temporal queries viewed per batch row.
        k, v: ``[B, T, C]`` projections of the window-mean audio tokens (once per window).
        clip_v: ``[B, C]`` ``to_v`` of the batch row's CLIP token.
        heads, scale: as in :func:`spatial_audio_attention`.

    Returns:
        ``[B, H_l*W_l*F, C]`` in q's dtype.

    Raises:
        KernelUnsupported: as in :func:`spatial_audio_attention`.
    """
    return _launch(q, k, v, clip_v, None, heads, scale, block_m)


def audio_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    clip_v: torch.Tensor,
    mask: torch.Tensor | None,
    heads: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """The plain PyTorch definition (in the inputs' dtype): ``clip_v + scale * mask * softmax(q k^T/sqrt(d)) v``.

    Shapes as in :func:`spatial_audio_attention` (``mask`` None for the temporal layers).
    """
    n, length, c = q.shape
    d = c // heads
    qh = q.view(n, length, heads, d).transpose(1, 2)
    kh = k.view(n, -1, heads, d).transpose(1, 2)
    vh = v.view(n, -1, heads, d).transpose(1, 2)
    weights = torch.softmax((qh @ kh.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    audio = (weights @ vh).transpose(1, 2).reshape(n, length, c)
    if mask is not None:
        audio = audio * mask.to(audio.dtype)[None, :, None]
    return clip_v[:, None, :] + scale * audio
