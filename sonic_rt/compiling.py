"""Opt-in ``torch.compile`` of the torch backend's UNet (``Runtime(..., compile=True)``, ``--compile``).

What it does:

- compiles the UNet module with inductor, ``dynamic=False``: every distinct input shape (windows per call,
  frames per window, resolution) is compiled once per process, then reused. A video has one or two UNet
  shapes (a smaller last batch when the windows of a step do not divide evenly). ``dynamic=True`` is not used:
  inductor (torch 2.13) fails to lower the UNet's temporal convolutions with symbolic height and width;
- keeps inductor's compiled artefacts in an on-disk cache (:func:`cache_dir`), so a later process with the
  same shapes skips code generation (measured on the 2-core CPU, official-widths preset: about 100 s for the
  first compile of a shape, about 8 s in a later process);
- says so on stderr before compiling a new shape, and reports how long it took (:attr:`CompiledCall.seconds`);
- on CUDA uses ``mode="reduce-overhead"`` (CUDA graphs: the shapes are static per compiled entry).

Why it is not the default: on the 2-core CPU a compiled UNet call is about 1.3x faster than eager, but the
first compile costs more than a short clip's whole run, and compiled fp32 frames differ from eager ones by
fp32 rounding (within 2 uint8 levels). The README's performance section gives the measured trade-off.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ENV_CACHE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own variable, read when it compiles


def cache_dir() -> Path:
    """Where compiled artefacts are kept: ``$TORCHINDUCTOR_CACHE_DIR`` if the user set it, else
    ``$XDG_CACHE_HOME/sonic_rt/inductor`` (``~/.cache/sonic_rt/inductor``), which outlives reboots (inductor's
    own default is under /tmp). Inductor writes its default into the variable the first time it runs, so a
    value equal to that default counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get(ENV_CACHE)
    if value and value != default_cache_dir():
        return Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sonic_rt" / "inductor"


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here, or None: inductor generates C++ on CPU (needs a C++ compiler) and
    Triton kernels on CUDA (needs triton)."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or shutil.which(compiler) is None:
            return "no C++ compiler was found (inductor compiles C++ on CPU; install g++, e.g. apt-get install g++)"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (inductor generates Triton kernels on CUDA; pip install triton)"
        return None
    return f"torch.compile is not supported on {device.type} by this runtime"


class CompiledCall:
    """A compiled module's call that announces each new input shape before compiling it.

    Args:
        module: the module to compile (left untouched: its eager ``forward`` stays available).
        what: its name in messages ("UNet").
        device: where it runs (picks the inductor mode).
        say: where notices go (a line on stderr by default).

    Attributes:
        seconds: wall seconds of each first call per input-shape key (compile + one run).
    """

    def __init__(self, module: nn.Module, what: str, device: torch.device, say: Callable[[str], None] | None = None):
        self.module, self.what = module, what
        self.say = say or (lambda message: print(f"sonic_rt: {message}", file=sys.stderr, flush=True))
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(module, dynamic=False, mode=mode)
        self.seconds: dict[tuple, float] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key in self.seconds:
            return self.compiled(*args)
        shape = "x".join(str(d) for d in args[0].shape)
        self.say(
            f"compiling the {self.what} for input {shape} (once per shape: about 2 minutes on a 2-core CPU "
            f"the first time, seconds when cached in {cache_dir()})"
        )
        started = time.perf_counter()
        out = self.compiled(*args)
        self.seconds[key] = time.perf_counter() - started
        self.say(f"compiled the {self.what} in {self.seconds[key]:.1f} s")
        return out


def compile_module(
    module: nn.Module, what: str, device: torch.device, say: Callable[[str], None] | None = None
) -> CompiledCall | None:
    """``torch.compile`` ``module`` for ``device`` with the on-disk cache of :func:`cache_dir`.

    Returns:
        the compiled call, or None when compiling cannot work here (no C++ compiler on CPU, no triton on CUDA):
        then the reason and the fallback (the uncompiled module) are said once, and the caller keeps ``module``.
    """
    say = say or (lambda message: print(f"sonic_rt: {message}", file=sys.stderr, flush=True))
    reason = compile_unavailable_reason(device)
    if reason is not None:
        say(f"not compiling the {what}: {reason}; running it uncompiled")
        return None
    os.environ[ENV_CACHE] = str(cache_dir())
    return CompiledCall(module, what, device, say)
