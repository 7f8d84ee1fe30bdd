"""The temporal VAE decoder's blocks with their elementwise work done in place (the runtime's decode graph).

diffusers' ``AutoencoderKLTemporalDecoder`` decoder allocates a new full-size activation for every SiLU, every
residual sum and its division by an output scale of 1.0, and for each product and the sum of the
spatial/temporal blend of every ``SpatioTemporalResBlock``. On a CPU each new large tensor is also page-faulted
in. Inside :func:`in_place_decoding` (the runtime's ``VaeDecoderGraph`` under ``torch.inference_mode``; not when
tracing, exporting or compiling) the classes here do the same operations, in the same order, writing into
tensors nothing else reads: the same values bit for bit (IEEE addition and multiplication commute, and dividing
by 1.0 is the identity). Measured on the structure preset's decoder, one 8-frame call at 512x512: 20% less CPU
time and 11% less memory added at its peak (``python -m bench.vae_decode``; docs/performance.md, "The output
stages and peak memory against eager's").
Everywhere else, including the eager baseline's own ``vae.decode``, diffusers' forward runs unchanged.

:func:`make_in_place` swaps the classes of a decoder's modules (same parameters, same state-dict keys).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.resnet import AlphaBlender, ResnetBlock2D, TemporalResnetBlock
from torch import nn

_IN_PLACE = contextvars.ContextVar("sonic_rt_vae_in_place", default=False)


@contextlib.contextmanager
def in_place_decoding() -> Iterator[None]:
    """Within this block (this thread or task only), swapped decoder modules work in place."""
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def _active() -> bool:
    """In place only inside :func:`in_place_decoding`, under inference mode, and not when tracing or compiling
    (exported and compiled graphs keep diffusers' functional form)."""
    return (
        _IN_PLACE.get()
        and torch.is_inference_mode_enabled()
        and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
    )


def _residual(hidden: torch.Tensor, shortcut: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """diffusers' ``(shortcut + hidden) / scale``, written into ``hidden`` (the last convolution's fresh output)."""
    if hidden.shape != shortcut.shape or hidden.dtype != shortcut.dtype:
        return (shortcut + hidden) / scale
    hidden.add_(shortcut)
    return hidden if scale == 1.0 else hidden.div_(scale)


class InPlaceSiLU(nn.SiLU):
    """``nn.SiLU`` that overwrites its input inside :func:`in_place_decoding`: in the decoder every SiLU follows a
    GroupNorm whose output nothing else reads."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace or _active())


class InPlaceResnetBlock2D(ResnetBlock2D):
    """diffusers ``ResnetBlock2D`` (the decoder's kind: no time embedding, no resampling) with its SiLUs and its
    residual sum in place."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        plain = self.upsample is None and self.downsample is None and self.time_emb_proj is None
        if not (
            _active() and plain and temb is None and not args and not kwargs and self.time_embedding_norm == "default"
        ):
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return _residual(hidden, shortcut, self.output_scale_factor)


class InPlaceTemporalResnetBlock(TemporalResnetBlock):
    """diffusers ``TemporalResnetBlock`` (no time embedding) with its SiLUs and its residual sum in place."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if not (_active() and temb is None and self.time_emb_proj is None):
            return super().forward(input_tensor, temb)
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return _residual(hidden, shortcut)


class InPlaceAlphaBlender(AlphaBlender):
    """diffusers ``AlphaBlender``: ``alpha * x_spatial + (1 - alpha) * x_temporal``, written into ``x_temporal`` (in
    ``SpatioTemporalResBlock`` the temporal block's fresh output, read by nothing else)."""

    def forward(
        self, x_spatial: torch.Tensor, x_temporal: torch.Tensor, image_only_indicator: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not _active():
            return super().forward(x_spatial, x_temporal, image_only_indicator)
        alpha = self.get_alpha(image_only_indicator, x_spatial.ndim).to(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        spatial = alpha * x_spatial
        if spatial.shape != x_temporal.shape or x_temporal.dtype != spatial.dtype:
            return spatial + (1.0 - alpha) * x_temporal
        return x_temporal.mul_(1.0 - alpha).add_(spatial)


_SWAPS: dict[type, type] = {
    nn.SiLU: InPlaceSiLU,
    ResnetBlock2D: InPlaceResnetBlock2D,
    TemporalResnetBlock: InPlaceTemporalResnetBlock,
    AlphaBlender: InPlaceAlphaBlender,
}


def make_in_place(decoder: nn.Module) -> int:
    """Swap the class of every SiLU, ``ResnetBlock2D``, ``TemporalResnetBlock`` and ``AlphaBlender`` in ``decoder``
    (exactly those classes, not subclasses) for its in-place form; returns how many were swapped. Outside
    :func:`in_place_decoding` they behave as before."""
    swapped = 0
    for module in decoder.modules():
        cls = _SWAPS.get(type(module))
        if cls is not None:
            module.__class__ = cls
            swapped += 1
    return swapped


__all__ = [
    "in_place_decoding",
    "make_in_place",
    "InPlaceSiLU",
    "InPlaceResnetBlock2D",
    "InPlaceTemporalResnetBlock",
    "InPlaceAlphaBlender",
]
