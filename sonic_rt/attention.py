"""Choosing the audio-attention implementation of the torch backend (:class:`AudioAttention`).

=============  =========================================================  ==============================
name           what                                                       ``auto`` picks it
=============  =========================================================  ==============================
``reference``  the official structure (SDPA over the CLIP token, temporal  never (selectable, for checking:
               context projected at every position)                       every other path is tested
                                                                          against it)
``sdpa``       exact simplifications with torch SDPA (what the exported   on CPU, and on CUDA when Triton
               graphs contain); on CPU it also skips the queries whose    cannot be used
               face mask is exactly zero
``triton``     exact simplifications, one fused Triton kernel per layer   on CUDA where its constraints
               (``sonic_rt/kernels/audio_attention.py``), zero-mask       hold
               blocks skipped
=============  =========================================================  ==============================

``auto`` (None) never picks a slower implementation of the same function: the reference structure costs 1.7x
the sdpa path per UNet call on CPU at the official audio widths (``bench/results/``). When it cannot use Triton
on CUDA it prints the reason once. Asking for ``triton`` explicitly where it cannot run is an error that names
the reason.

Verify before use: on CUDA the compiled kernels are only used after a one-time self-check against the sdpa
path on a small problem (:func:`sonic_rt.attention_check.verify_triton`, cached per GPU model, Triton and torch
version under ``~/.cache/sonic_rt``). ``auto`` falls back to sdpa with a one-line reason when it fails; an
explicit ``triton`` fails with an :class:`InputError` that gives the failing case.
"""

from __future__ import annotations

import sys

import torch

from .errors import InputError
from .models.unet import AudioAttention

_REASONS_PRINTED: set[str] = set()


def triton_unusable_reason(device: torch.device, head_dims: set[int]) -> str | None:
    """Why the Triton kernels cannot run for this device and these head dims, or None when they can."""
    try:
        from .kernels.audio_attention import SUPPORTED_HEAD_DIMS, interpreting
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'sonic_rt[gpu]'"
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"Triton kernels need a CUDA device, this runtime runs on {device}"
    unsupported = sorted(d for d in head_dims if d not in SUPPORTED_HEAD_DIMS)
    if unsupported:
        return f"head dims {unsupported} are not supported by the kernels (supported: {SUPPORTED_HEAD_DIMS})"
    return None


def _selfcheck_failure(device: torch.device, head_dims: set[int], selfcheck) -> str | None:
    """The self-check's reason when the kernels failed it on ``device`` (CUDA only), else None."""
    if device.type != "cuda":
        return None  # the interpreter on CPU: tested by tests/test_kernels.py, not worth a check per process
    if selfcheck is None:
        from .attention_check import verify_triton as selfcheck
    verdict = selfcheck(device, head_dims)
    if verdict.passed:
        return None
    return f"the compiled kernel failed its self-check against sdpa ({verdict.reason})"


def resolve_attention(
    requested: str | AudioAttention | None, device: torch.device, head_dims: set[int], *, selfcheck=None
) -> AudioAttention:
    """The implementation to use for ``requested`` ("auto"/None, "reference", "sdpa", "triton").

    Args:
        requested: the name, an :class:`AudioAttention`, or None (= "auto").
        device: where the UNet runs.
        head_dims: the UNet's attention head dims (the kernels support 16, 32, 64, 128).
        selfcheck: ``selfcheck(device, head_dims) -> SelfCheck`` for CUDA devices (default
            :func:`sonic_rt.attention_check.verify_triton`, cached; tests inject a fake one).

    Raises:
        InputError: an unknown name, or "triton" where it cannot run or its kernel failed the self-check (the
            message gives the reason).
    """
    if requested is None or requested == "auto":
        if device.type != "cuda":
            return AudioAttention.SDPA
        reason = triton_unusable_reason(device, head_dims)
        if reason is None:
            reason = _selfcheck_failure(device, head_dims, selfcheck)
        if reason is None:
            return AudioAttention.TRITON
        if reason not in _REASONS_PRINTED:
            _REASONS_PRINTED.add(reason)
            print(f"sonic_rt: Triton attention not used ({reason}); using sdpa", file=sys.stderr)
        return AudioAttention.SDPA
    try:
        choice = AudioAttention(requested)
    except ValueError:
        raise InputError(
            f"unknown attention implementation {requested!r}; choose auto, {', '.join(a.value for a in AudioAttention)}"
        ) from None
    if choice is AudioAttention.TRITON:
        reason = triton_unusable_reason(device, head_dims)
        if reason is not None:
            raise InputError(f"attention='triton' cannot run here: {reason}")
        reason = _selfcheck_failure(device, head_dims, selfcheck)
        if reason is not None:
            raise InputError(f"attention='triton' cannot be used on {device}: {reason}; use attention='sdpa'")
    return choice
