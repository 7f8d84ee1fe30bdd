"""Triton kernels used by the torch backend (see :mod:`sonic_rt.kernels.audio_attention`).

Importing this package imports nothing heavy: the kernel module imports ``triton``, and callers import it lazily
(:mod:`sonic_rt.attention`, :mod:`sonic_rt.models.unet`) so that the runtime works where Triton is absent.
"""
