"""Verify before use: a one-time self-check of the compiled Triton audio-attention kernels on this GPU.

A Triton kernel is compiled for the GPU it first runs on, by the Triton version installed there; a compiler or
hardware difference can make it wrong without any error. So before ``attention="auto"`` picks the kernels on
CUDA (and before an explicit ``attention="triton"`` is accepted), :func:`verify_triton` runs both kernels
(spatial, with a face mask that has zero and non-zero blocks, and temporal) on a small problem and compares them
with the sdpa path of the UNet (``F.scaled_dot_product_attention``, then mask, scale and the CLIP value, what
``AudioAttention.SDPA`` computes) in each dtype the GPU runtime uses, against an fp32 reference:

    pass  <=>  finite, and |kernel - fp32| <= 2 |sdpa - fp32| + atol(dtype)   (docs/testing.md's rule)

with ``atol`` 1e-3 (fp16), 8e-3 (bf16), 1e-5 (fp32, relative to the output scale). The verdict is cached per
GPU model, compute capability, Triton, torch version and head dims, in memory and in a JSON file
(``$SONIC_RT_CACHE_DIR`` or ``$XDG_CACHE_HOME/sonic_rt`` or ``~/.cache/sonic_rt``:
``triton_selfcheck.json``), so the check costs its ~1 s of compiling once per machine. An unwritable cache only
means the check runs again next process.

Everything that touches a GPU is injectable (``run``, ``identity``), so the logic is tested on CPU; on CPU
with ``TRITON_INTERPRET=1`` :func:`run_selfcheck` runs the real kernels in the interpreter.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .graphs.spec import Precision

CACHE_FILE = "triton_selfcheck.json"
CACHE_VERSION = 1
# The low-precision rule of docs/testing.md (same constants as tests/test_kernels.py).
ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}

_MEMO: dict[str, SelfCheck] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SelfCheck:
    """The verdict of one self-check.

    Attributes:
        passed: the kernels matched the sdpa path in every case.
        reason: why not (one line; empty when passed).
        key: what the verdict is cached under (GPU model, capability, Triton, torch, head dims).
        cases: per case (``"spatial fp16 d64"`` ...) the max abs error of the kernel and of sdpa from fp32.
        cached: the verdict came from the in-memory or on-disk cache, not from running the kernels now.
    """

    passed: bool
    reason: str
    key: str
    cases: dict = field(default_factory=dict)
    cached: bool = False


def cache_dir() -> Path:
    """``$SONIC_RT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sonic_rt``, else ``~/.cache/sonic_rt``."""
    if os.environ.get("SONIC_RT_CACHE_DIR"):
        return Path(os.environ["SONIC_RT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sonic_rt"


def device_identity(device: torch.device) -> dict:
    """What a compiled kernel depends on: the GPU model and compute capability, Triton's and torch's versions.

    On CPU (the interpreter) the "GPU" is ``cpu (Triton interpreter)``."""
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu, capability = props.name, f"{props.major}.{props.minor}"
    else:
        gpu, capability = "cpu (Triton interpreter)", "-"
    return {"gpu": gpu, "capability": capability, "triton": triton.__version__, "torch": torch.__version__}


def _sdpa_path(q, k, v, clip_v, mask, heads: int, scale: float) -> torch.Tensor:
    """What ``AudioAttention.SDPA`` computes for one layer: SDPA per head, then mask, scale and the CLIP value.
    q [N, L, C], k/v [N, T, C], clip_v [N, C], mask [L] or None -> [N, L, C] in q's dtype."""
    n, length, c = q.shape
    d = c // heads
    heads_view = lambda t: t.view(t.shape[0], -1, heads, d).transpose(1, 2)  # noqa: E731
    audio = torch.nn.functional.scaled_dot_product_attention(heads_view(q), heads_view(k), heads_view(v))
    audio = audio.transpose(1, 2).reshape(n, length, c).to(q.dtype)
    if mask is not None:
        audio = audio * mask.to(audio.dtype)[None, :, None]
    return clip_v[:, None, :] + scale * audio


def _problem(n: int, length: int, tokens: int, heads: int, head_dim: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    q = torch.randn(n, length, c, generator=gen)
    k, v = (torch.randn(n, tokens, c, generator=gen) for _ in range(2))
    clip_v = torch.randn(n, c, generator=gen)
    return [t.to(device) for t in (q, k, v, clip_v)]


def _face_mask(side: int) -> torch.Tensor:
    """[side*side]: a soft box (values in (0, 1]) over the middle, exact zeros elsewhere (so blocks are skipped)."""
    mask = torch.zeros(side, side)
    lo, hi = side // 4, side - side // 4
    mask[lo:hi, lo:hi] = 1.0
    mask[lo, lo:hi] = 0.5
    return mask.reshape(-1)


def run_selfcheck(
    device: torch.device,
    head_dims: set[int] | tuple[int, ...] = (64,),
    dtypes: tuple[torch.dtype, ...] | None = None,
    *,
    kernels=None,
) -> dict:
    """Run both kernels on a small problem per head dim and dtype and compare them with the sdpa path.

    Spatial: 3 rows x 16x16 queries (a face mask with zero and non-zero blocks), 32 audio tokens, 2 heads;
    temporal: 2 rows x 16x16x2 queries, 32 tokens.

    Args:
        device: a CUDA device, or the CPU under ``TRITON_INTERPRET=1``.
        head_dims: the model's attention head dims (each supported one is checked).
        dtypes: default fp16, bf16 and fp32 on CUDA; fp16 and fp32 in the interpreter (it computes bf16
            ``tl.dot`` wrongly, docs/development.md).
        kernels: the kernel module (default :mod:`sonic_rt.kernels.audio_attention`; tests inject a broken one).

    Returns:
        ``{"passed": bool, "reason": str, "cases": {name: {"kernel_err", "sdpa_err", "bound"}}}``; an exception
        raised by a kernel is a failed check with the exception as its reason.
    """
    if kernels is None:
        from .kernels import audio_attention as kernels
    if dtypes is None:
        dtypes = (
            (torch.float16, torch.float32) if device.type == "cpu" else (torch.float16, torch.bfloat16, torch.float32)
        )
    dims = sorted(d for d in head_dims if d in kernels.SUPPORTED_HEAD_DIMS) or [64]
    cases: dict[str, dict] = {}
    side, frames, tokens, heads = 16, 2, 32, 2
    mask32 = _face_mask(side).to(device)
    for d in dims:
        for dtype in dtypes:
            for kind in ("spatial", "temporal"):
                name = f"{kind} {Precision.from_torch(dtype).value} d{d}"
                if kind == "spatial":
                    q, k, v, clip_v = _problem(3, side * side, tokens, heads, d, device, seed=d)
                    mask = mask32
                else:
                    q, k, v, clip_v = _problem(2, side * side * frames, tokens, heads, d, device, seed=d + 1)
                    mask = None
                low = [t.to(dtype) for t in (q, k, v, clip_v)]
                try:
                    with torch.no_grad():
                        if kind == "spatial":
                            got = kernels.spatial_audio_attention(*low, mask.to(dtype), heads, 0.8)
                        else:
                            got = kernels.temporal_audio_attention(*low, heads, 0.8)
                        want = _sdpa_path(*(t.float() for t in low), mask, heads, 0.8)
                        same = _sdpa_path(*low, None if mask is None else mask.to(dtype), heads, 0.8)
                except Exception as exc:  # noqa: BLE001 - any failure of the kernel is a failed check
                    return {
                        "passed": False,
                        "cases": cases,
                        "reason": f"{name}: the kernel raised {type(exc).__name__}: {str(exc).splitlines()[0]}",
                    }
                kernel_err = float((got.float() - want).abs().max())
                sdpa_err = float((same.float() - want).abs().max())
                scale_of = (1 + float(want.abs().max())) if dtype == torch.float32 else 1.0
                bound = 2 * sdpa_err + ATOL[dtype] * scale_of
                cases[name] = {"kernel_err": kernel_err, "sdpa_err": sdpa_err, "bound": bound}
                if got.shape != q.shape or got.dtype != dtype:
                    return {
                        "passed": False,
                        "cases": cases,
                        "reason": f"{name}: the kernel returned {tuple(got.shape)} {got.dtype}, expected "
                        f"{tuple(q.shape)} {dtype}",
                    }
                if not math.isfinite(kernel_err) or kernel_err > bound:
                    return {
                        "passed": False,
                        "cases": cases,
                        "reason": f"{name}: max|kernel - fp32| = {kernel_err:.3g} > {bound:.3g} "
                        f"(2 x sdpa's {sdpa_err:.3g} + atol)",
                    }
    return {"passed": True, "reason": "", "cases": cases}


def _key(identity: dict, head_dims) -> str:
    return (
        f"{identity['gpu']} | sm {identity['capability']} | triton {identity['triton']} | "
        f"torch {identity['torch']} | head dims {sorted(head_dims)}"
    )


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("checks"), dict):
        return {}
    return data["checks"]


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` (atomic replace; silently skipped where the cache cannot be written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checks = _read_cache(path)
        checks[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "checks": checks}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def verify_triton(
    device: torch.device,
    head_dims: set[int],
    *,
    run: Callable[[torch.device, set[int]], dict] | None = None,
    identity: Callable[[torch.device], dict] = device_identity,
    cache: Path | None = None,
) -> SelfCheck:
    """The cached verdict of the kernels' self-check on ``device`` (runs :func:`run_selfcheck` at most once per
    GPU model / Triton / torch / head dims: in-memory, then ``cache`` (default :func:`cache_dir`), then run).

    Args:
        device: a CUDA device (or the CPU under the interpreter).
        head_dims: the model's attention head dims.
        run: the check (default :func:`run_selfcheck`); ``run(device, head_dims) -> {"passed", "reason", "cases"}``.
        identity: what the verdict is keyed on (default :func:`device_identity`).
        cache: the JSON file (default ``cache_dir() / "triton_selfcheck.json"``).

    Returns:
        a :class:`SelfCheck`. Never raises for a failing kernel: a failure is a verdict with its reason.
    """
    run = run or (lambda dev, dims: run_selfcheck(dev, dims))
    path = cache or cache_dir() / CACHE_FILE
    ident = identity(device)
    key = _key(ident, head_dims)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("passed"), bool):
            verdict = SelfCheck(entry["passed"], str(entry.get("reason", "")), key, entry.get("cases", {}), True)
        else:
            result = run(device, set(head_dims))
            verdict = SelfCheck(
                bool(result["passed"]), str(result.get("reason", "")), key, result.get("cases", {}), False
            )
            _write_cache(
                path,
                key,
                {
                    "passed": verdict.passed,
                    "reason": verdict.reason,
                    "cases": verdict.cases,
                    "identity": ident,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            )
        _MEMO[key] = verdict
        return verdict


def clear_memo() -> None:
    """Forget the in-memory verdicts (tests; the on-disk cache is kept)."""
    with _LOCK:
        _MEMO.clear()
