"""``torch.compile`` of the torch backend's UNet (``Runtime(..., compile=...)``, ``--compile``).

Three modes (:class:`CompileMode`):

- ``auto`` (the default): a UNet input shape runs compiled when its compiled code is already in the on-disk cache
  (:func:`cache_dir`; this runtime or an earlier process compiled it), else uncompiled, saying so once per shape.
  So nothing ever waits for a compile it did not ask for, and a warm cache is used without being asked:
  ``python -m sonic_rt serve`` warms it in the background for its default shape, and ``compile="on"`` once (or
  ``python -m sonic_rt animate --compile on``) warms it for a shape;
- ``on``: compile every new input shape (the first call of a shape compiles: minutes on a 2-core CPU);
- ``off``: never compile.

What compiling does:

- compiles the UNet module with inductor, ``dynamic=False``: every distinct input shape (windows per call,
  frames per window, resolution) is compiled once per process, then reused. A video has one or two UNet
  shapes (a smaller last batch when the windows of a step do not divide evenly). ``dynamic=True`` is not used:
  inductor (torch 2.13) fails to lower the UNet's temporal convolutions with symbolic height and width;
- keeps inductor's compiled artefacts in an on-disk cache (:func:`cache_dir`) and records in an index there
  (:data:`INDEX_NAME`) which (torch version, device, module, dtype, input shapes) it holds, which is what ``auto``
  reads. A later process with a recorded shape skips code generation but still traces the model and loads the
  artefacts (tens of seconds on a 2-core CPU, see the README's performance section);
- says so on stderr before compiling or loading a new shape, and reports how long it took
  (:attr:`CompiledCall.seconds`);
- on CUDA uses ``mode="reduce-overhead"`` (CUDA graphs: the shapes are static per compiled entry).

Compiled fp32 frames differ from uncompiled ones by fp32 rounding (within 2 uint8 levels, tested).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ENV_CACHE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own variable, read when it compiles
INDEX_NAME = "sonic_rt-compiled.json"  # in cache_dir(): the input shapes whose compiled code the cache holds
WARM_LOG = "sonic_rt-warm.log"  # in cache_dir(): what the last background warm-up printed
_SAID_UNCOMPILED: set[tuple[str, bool]] = set()  # (index key, cached): "running uncompiled" notices given
# compile="auto" loads a cached shape into a process only for a video of at least this many windows (steps x
# windows per step), or once the process is a server's. Measured on a 2-core CPU, structure preset
# (bench/results/compile_cache-structure-cpu.md, unet_cpu-structure-cpu.md): loading took 18 s per process and
# the compiled UNet saved ~4% of a 3.3 s window (0.14 s), so loading paid from ~130 windows (10 s of audio at 25
# steps is 125).
AUTO_MIN_WINDOWS = 150


class CompileMode(enum.Enum):
    """When the UNet runs under ``torch.compile`` (see the module docstring)."""

    AUTO = "auto"  # shapes already compiled in the on-disk cache; the others uncompiled
    ON = "on"  # every shape (compiles new ones)
    OFF = "off"

    @classmethod
    def parse(cls, value: CompileMode | bool | str | None) -> CompileMode:
        """``None`` -> AUTO, ``True`` -> ON, ``False`` -> OFF, or a name.

        Raises:
            ValueError: an unknown name (the message lists the names).
        """
        if value is None:
            return cls.AUTO
        if isinstance(value, bool):
            return cls.ON if value else cls.OFF
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"compile must be one of auto, on, off (or True/False), got {value!r}") from None


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
    """A module's call that runs compiled per input shape as :class:`CompileMode` says, and announces each
    compile.

    Args:
        module: the module to compile (left untouched: its eager ``forward`` stays available).
        what: its name in messages ("UNet").
        device: where it runs (picks the inductor mode).
        mode: ``ON`` compiles every new shape; ``AUTO`` only shapes recorded in the cache's index.
        say: where notices go (a line on stderr by default).

    Attributes:
        seconds: wall seconds of each first compiled call per input-shape key (compile or cache load + one run).
        uncompiled: the input-shape keys that run uncompiled (``AUTO``: not in the cache, or not worth loading).
        min_windows: ``AUTO`` loads a cached shape not yet loaded only for a video of at least this many windows
            (:data:`AUTO_MIN_WINDOWS`; a server sets 0: it keeps what it loads for every later job).
        planned_windows: the windows of the video being made (:meth:`plan`); None: unknown (loads).
    """

    def __init__(
        self,
        module: nn.Module,
        what: str,
        device: torch.device,
        mode: CompileMode = CompileMode.ON,
        say: Callable[[str], None] | None = None,
    ):
        self.module, self.what, self.device, self.mode = module, what, device, mode
        self.say = say or (lambda message: print(f"sonic_rt: {message}", file=sys.stderr, flush=True))
        compile_mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(module, dynamic=False, mode=compile_mode)
        self.seconds: dict[tuple, float] = {}
        self.uncompiled: set[tuple] = set()
        self.min_windows, self.planned_windows = AUTO_MIN_WINDOWS, None
        self._lock = threading.Lock()

    def plan(self, windows: int | None) -> None:
        """Start of a video of ``windows`` windows (steps x windows per step): look in the cache's index again for
        the shapes that ran uncompiled (``AUTO``), so a cache warmed meanwhile (``serve`` warms it in the
        background) is used from the next video on, never half-way through one; and remember the length, which
        decides whether loading a cached shape pays (:attr:`min_windows`)."""
        self.uncompiled.clear()
        self.planned_windows = windows

    def __call__(self, *args: torch.Tensor) -> Any:
        key = tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else a for a in args)
        if key in self.seconds:
            return self.compiled(*args)
        if key in self.uncompiled:
            return self.module(*args)
        shape = "x".join(str(d) for d in args[0].shape)
        entry = index_key(self.module, self.what, self.device, key)
        cached = entry in read_index()
        short = self.planned_windows is not None and self.planned_windows < self.min_windows
        if self.mode is CompileMode.AUTO and (not cached or short):
            self.uncompiled.add(key)
            if (entry, cached) in _SAID_UNCOMPILED:
                return self.module(*args)
            _SAID_UNCOMPILED.add((entry, cached))
            self.say(
                f"running the {self.what} uncompiled for input {shape}: its compiled code is not in the cache "
                f"({cache_dir()}); compile='on' (--compile on) compiles it once for later runs"
                if not cached
                else f"running the {self.what} uncompiled for input {shape}: loading its compiled code from the "
                f"cache costs more than it saves on a video of {self.planned_windows} windows (under "
                f"{self.min_windows}; {read_index()[entry]['seconds']:.0f} s last time); longer videos, a server "
                "or compile='on' use it"
            )
            return self.module(*args)
        self.say(
            f"loading the compiled {self.what} for input {shape} from the cache"
            if cached
            else f"compiling the {self.what} for input {shape} (once per shape: minutes on a 2-core CPU the first "
            f"time; later runs load it from {cache_dir()})"
        )
        started = time.perf_counter()
        out = self.compiled(*args)
        self.seconds[key] = time.perf_counter() - started
        with self._lock:
            record(entry, self.what, shape, self.seconds[key])
        self.say(f"{'loaded' if cached else 'compiled'} the {self.what} in {self.seconds[key]:.1f} s")
        return out


def index_key(module: nn.Module, what: str, device: torch.device, shapes: tuple) -> str:
    """The cache-index key of one compiled entry: sha256 of the torch version, device type, what, the module's
    class, config (``module.config`` where it has one), parameter dtype, audio-attention implementation
    (``module.attention``) and the input shapes and dtypes."""
    param = next(module.parameters(), None)
    identity = [
        torch.__version__,
        device.type,
        what,
        type(module).__qualname__,
        json.dumps(dict(getattr(module, "config", {}) or {}), sort_keys=True, default=str),
        str(param.dtype) if param is not None else None,
        str(getattr(getattr(module, "attention", None), "value", None)),
        repr(shapes),
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def read_index() -> dict[str, dict]:
    """The cache's index (key -> what, input shape, seconds, date); empty when absent or unreadable."""
    try:
        return json.loads((cache_dir() / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}


def record(key: str, what: str, shape: str, seconds: float) -> None:
    """Add ``key`` to the cache's index (rewritten atomically: a concurrent reader sees the old or new file)."""
    index = read_index()
    index[key] = {
        "what": what,
        "input": shape,
        "seconds": round(seconds, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = cache_dir() / INDEX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)


def warm_in_background(
    model_dir: str | os.PathLike, min_resolution: int, device: str | None = None, dtype: str | None = None
) -> subprocess.Popen:
    """Fill the on-disk cache for the UNet shape of a square video of ``min_resolution`` pixels, in a separate
    low-priority process, so that ``AUTO`` runtimes (a server's) run that shape compiled from their next video on.

    The child is this package's own CLI: one 1-step ``animate --compile on`` of a grey 2 s still with a given
    face box and 1 s of silence (the same UNet input shape as any square-cropped job at that resolution), its
    video discarded. It shares nothing with the caller but the cache; its stderr goes to :data:`WARM_LOG` in the
    cache directory, and its temporary directory is removed when it ends.

    Returns:
        the child process (``poll()`` / ``wait()``; exit status 0 when the cache holds the shape).
    """
    import numpy as np
    from PIL import Image

    from .media import write_wav

    work = Path(tempfile.mkdtemp(prefix="sonic_rt_warm_"))
    side = int(min_resolution)
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(work / "still.png")
    write_wav(work / "silence.wav", np.zeros(16_000, np.float32), 16_000)
    box = f"{side // 4},{side // 4},{side // 2},{side // 2}"
    command = [
        sys.executable, "-m", "sonic_rt", "animate", "--model", str(model_dir), "--compile", "on",
        "--image", str(work / "still.png"), "--audio", str(work / "silence.wav"), "--face-box", box,
        "--min-resolution", str(side), "--steps", "1", "--no-interpolate", "--quiet", "--out", str(work / "warm.mp4"),
    ]  # fmt: skip
    command += ["--device", device] if device else []
    command += ["--dtype", dtype] if dtype else []
    log = cache_dir() / WARM_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    script = f"{shlex.join(command)} 2> {shlex.quote(str(log))}; s=$?; rm -rf {shlex.quote(str(work))}; exit $s"
    return subprocess.Popen(
        ["nice", "-n", "10", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={**os.environ, ENV_CACHE: str(cache_dir())},
    )


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as --dtype takes them


def warm_key(model_dir: str | os.PathLike, min_resolution: int, device: str, dtype: str) -> str:
    """The cache-index key saying that :func:`warm_in_background` succeeded for these settings: sha256 of the
    torch version, the model directory (resolved), the resolution (pixels), device type and dtype name."""
    identity = ["warm-up", torch.__version__, str(Path(model_dir).resolve()), int(min_resolution), device, dtype]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def long_lived(runtime) -> CompiledCall | None:
    """Mark ``runtime`` as a server's (or a Ray replica's): it keeps a compiled shape it loads for every later job,
    so ``AUTO`` loads cached shapes whatever a video's length (:attr:`CompiledCall.min_windows` 0). Returns its
    compiled UNet call, or None where it has none (compile off, engines)."""
    call = getattr(runtime.components.graphs.unet, "call", None)
    if not isinstance(call, CompiledCall):
        return None
    call.min_windows = 0
    return call


def warm_for_serving(runtime, say: Callable[[str], None]) -> threading.Thread | None:
    """Start :func:`warm_in_background` for ``runtime``'s default square shape when that pays and is not done.

    Whatever it starts, a compiled UNet of ``runtime`` then loads cached shapes for videos of any length
    (:attr:`CompiledCall.min_windows` 0: the server keeps them for every later job).

    It starts only where ``runtime`` is a torch-backend CPU runtime whose UNet runs in ``AUTO`` mode, compiling
    works (a C++ compiler), and the cache's index has no :func:`warm_key` for the settings. A CUDA server is left
    alone: the child would hold a second copy of the model in GPU memory beside the server's (``--compile on``
    compiles there at the first job instead). A daemon thread waits for the child, records the key when it
    succeeds and says how it ended; :meth:`CompiledCall.plan` makes the runtime use the cache from its
    next video on.

    Args:
        runtime: a loaded :class:`~sonic_rt.Runtime`.
        say: where the one-line notices go (the server's log).

    Returns:
        the waiting thread, or None when nothing was started.
    """
    call = long_lived(runtime)
    device = torch.device(runtime.device)
    if not isinstance(call, CompiledCall) or call.mode is not CompileMode.AUTO or device.type != "cpu":
        return None
    if compile_unavailable_reason(device) is not None:
        return None
    dtype = DTYPE_NAMES.get(runtime.dtype, "fp32")
    key = warm_key(runtime.source, runtime.default_min_resolution, device.type, dtype)
    if key in read_index():
        return None
    side = runtime.default_min_resolution
    child = warm_in_background(runtime.source, side, device.type, dtype)
    say(
        f"compiling the UNet for {side}x{side} videos in the background (pid {child.pid}, low priority, log "
        f"{cache_dir() / WARM_LOG}); jobs run uncompiled until it is done, then compiled"
    )

    def wait() -> None:
        started = time.perf_counter()
        status = child.wait()
        if status == 0:
            record(key, "warm-up", f"{side}x{side}", time.perf_counter() - started)
            say(f"the background compile finished in {time.perf_counter() - started:.0f} s: the next job runs compiled")
        else:
            say(f"the background compile failed (exit {status}); jobs stay uncompiled (see {cache_dir() / WARM_LOG})")

    thread = threading.Thread(target=wait, name="sonic-warm", daemon=True)
    thread.start()
    return thread


def compile_module(
    module: nn.Module,
    what: str,
    device: torch.device,
    say: Callable[[str], None] | None = None,
    mode: CompileMode = CompileMode.ON,
) -> CompiledCall | None:
    """``torch.compile`` ``module`` for ``device`` with the on-disk cache of :func:`cache_dir`, as ``mode`` says.

    Returns:
        the compiled call, or None when ``mode`` is OFF or compiling cannot work here (no C++ compiler on CPU, no
        triton on CUDA): then, for ON, the reason and the fallback (the uncompiled module) are said once (AUTO
        says nothing: it promised nothing), and the caller keeps ``module``.
    """
    if mode is CompileMode.OFF:
        return None
    say = say or (lambda message: print(f"sonic_rt: {message}", file=sys.stderr, flush=True))
    reason = compile_unavailable_reason(device)
    if reason is not None:
        if mode is CompileMode.ON:
            say(f"not compiling the {what}: {reason}; running it uncompiled")
        return None
    os.environ[ENV_CACHE] = str(cache_dir())
    return CompiledCall(module, what, device, mode, say)
