"""Batch-invariant linear layers: a row's result does not depend on how many rows share the matmul.

The window scheduler batches several windows into one UNet call and promises the same latents as one
window per call, bit for bit on CPU in fp32. Most UNet ops are batch-invariant there (convolutions,
GroupNorm, SDPA and large matmuls compute each row the same way whatever the batch), but MKL takes another
GEMM path for matmuls with few rows (the time embeddings have 3 rows per window, the temporal ``to_v(clip)``
3, ``to_k_ip`` 96), with another summation order: a batched call then differs by fp32 rounding (measured
1.4e-6 on v).

:class:`BatchInvariantLinear` pads such a matmul to :data:`MIN_ROWS` rows, so every call takes the large-M
path; the padding rows are zeros and are dropped. The cost is negligible (these matmuls are tiny). It is
applied on CPU only, and never while tracing for export (the graph must not bake a row count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 256  # small-M matmuls are padded up to this many rows (checked sufficient by tests/test_scheduler.py)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` whose CPU matmul never takes MKL's small-M path (padded to :data:`MIN_ROWS` rows there).

    Args:
        x: ``[..., in]``; weight: ``[out, in]``; bias: ``[out]`` or None.

    Returns:
        ``[..., out]``, each row computed the same way whatever the number of rows.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= MIN_ROWS or rows == 0 or x.device.type != "cpu" or torch.jit.is_tracing():
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(MIN_ROWS - rows, flat.shape[1])])
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose CPU matmuls never take MKL's small-M path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def make_batch_invariant(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`BatchInvariantLinear` (in place; the
    weights and keys are unchanged). Returns ``module``."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = BatchInvariantLinear
    return module
