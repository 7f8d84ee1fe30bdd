"""Invariant CPU layers: a row's result depends neither on the rows that share the call nor on the thread count.

The window scheduler batches several windows into one UNet call, splits a window's three guidance rows over
several devices, and runs replicas with fewer threads each; it promises the latents of one window per call on one
device, bit for bit on the CPU in fp32. Most UNet ops already compute each row the same way whatever the batch and
the threads (spatial convolutions, GroupNorm, LayerNorm, SDPA and large matmuls), but two do not:

- **Small or strided matmuls.** MKL takes another GEMM path for matmuls with few rows (the time embeddings have 3
  rows per window, the temporal ``to_v(clip)`` 3, ``to_k_ip`` 96) and for inputs that are strided views (the
  transformers' ``proj_in`` reads a permuted view), with another summation order: a batched call then differs by
  fp32 rounding (measured 1.4e-6 on v). :func:`linear` always hands MKL a contiguous matrix of at least
  :data:`MIN_ROWS` rows (zero rows padded and dropped).
- **Temporal convolutions.** oneDNN's ``conv3d`` with a ``(3, 1, 1)`` kernel (SVD's temporal ResNet blocks) picks
  its kernel by batch size and thread count (measured: one guidance row alone differs from the same row in a batch
  of three by ~1e-6, and one thread from two). :class:`TemporalConv` computes it per sample as the equal ``conv2d``
  over ``[1, C, T, H*W]`` with a ``(3, 1)`` kernel, which gave the same values at every batch size and for 1 and 2
  threads at the shapes tested (``tests/test_unet.py``: the demo UNet at 64 and 128 pixels, the official 4-level
  structure at 128; the Sonic-shaped preset at 128 and 192 pixels by hand).

oneDNN chooses kernels by shape and thread count, so this is a property checked at those shapes, not a proof for
every shape: the Sonic-shaped UNet at 64 pixels (its deepest level 1x1) still differs by ~1e-6 between a row alone
and in a batch, and 4 threads differ from 2 at a 2x2 deepest level. The scheduler's promise is therefore made for
equal threads per worker (:mod:`sonic_rt.scheduler`). The cost is small: the padded matmuls are tiny, and the temporal convolutions (~5% of a UNet call) run about as
fast as ``conv3d`` (a Sonic-shaped UNet call at 192x192 pixels, best of 5 interleaved on a 2-core EPYC: 4.76 s
against 4.70 s with ``conv3d`` and the old strided matmuls). Applied on the CPU only, never while tracing for
export (the graph must not bake a row count), and not inside :func:`plain_layers` (the eager baseline).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 256  # small-M matmuls are padded up to this many rows (checked sufficient by tests/test_scheduler.py)

_PLAIN = contextvars.ContextVar("sonic_rt_plain_layers", default=False)


@contextlib.contextmanager
def plain_layers() -> Iterator[None]:
    """Within this block (this thread or task only), :func:`linear`, :class:`BatchInvariantLinear` and
    :class:`TemporalConv` compute as plain ``F.linear`` and ``nn.Conv3d`` do. The eager baseline (``bench/eager.py``)
    runs its UNet calls so: it stands for the official code, which has none of this."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def _plain(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or torch.jit.is_tracing() or _PLAIN.get()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` whose CPU matmul sees a contiguous matrix of at least :data:`MIN_ROWS` rows.

    Args:
        x: ``[..., in]``; weight: ``[out, in]``; bias: ``[out]`` or None.

    Returns:
        ``[..., out]``, each row computed the same way whatever the number of rows and the layout of ``x``.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or _plain(x):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).contiguous()  # a strided view takes another MKL path
    if rows < MIN_ROWS:
        flat = torch.cat([flat, flat.new_zeros(MIN_ROWS - rows, flat.shape[1])])
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear` on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class TemporalConv(nn.Conv3d):
    """``nn.Conv3d`` with a ``(k, 1, 1)`` kernel (same parameters and keys), computed on the CPU sample by sample as
    the equal ``conv2d`` over ``[1, C, T, H*W]`` with a ``(k, 1)`` kernel, so that a sample's result does not depend
    on the batch or the thread count (module docstring). ``x``: ``[B, C, T, H, W]`` -> ``[B, C_out, T, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain(x):
            return super().forward(x)
        batch, channels, frames, height, width = x.shape
        weight = self.weight.reshape(self.out_channels, channels // self.groups, self.kernel_size[0], 1)
        samples = [
            F.conv2d(
                x[b : b + 1].reshape(1, channels, frames, height * width),  # [1, C, T, H*W]
                weight,
                self.bias,
                padding=(self.padding[0], 0),
                dilation=(self.dilation[0], 1),
                groups=self.groups,
            )
            for b in range(batch)
        ]
        return torch.cat(samples).reshape(batch, self.out_channels, -1, height, width)


def _is_temporal(conv: nn.Conv3d) -> bool:
    """A ``(k, 1, 1)`` convolution over time only, stride 1, zero padding in time only."""
    return (
        conv.kernel_size[1:] == (1, 1)
        and conv.stride == (1, 1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.padding[1:] == (0, 0)
        and conv.dilation[1:] == (1, 1)
    )


def make_batch_invariant(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`BatchInvariantLinear` and every temporal
    ``nn.Conv3d`` into a :class:`TemporalConv` (in place; the weights and keys are unchanged). Returns ``module``."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = BatchInvariantLinear
        elif type(sub) is nn.Conv3d and _is_temporal(sub):
            sub.__class__ = TemporalConv
    return module
