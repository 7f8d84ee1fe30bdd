"""Loading: a weights directory or an engine directory -> one :class:`Components` object.

Both kinds of directory end in the same object (the eight graphs behind one interface, the Whisper feature
extractor, diffusers' noise-schedule config, the face detector), so nothing after loading asks which
backend runs the graphs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backends import Graphs
from ..compiling import CompileMode
from ..errors import InputError
from ..face import load_face_detector
from ..graphs import Precision
from ..manifest import is_engine_dir, open_engine_dir
from .memory import OFFLOADED_GRAPHS, decode_frames, feed_forward_chunk
from .options import DEFAULT_MIN_RESOLUTION


@dataclass
class Components:
    """Everything the pipeline runs, loaded once.

    Attributes:
        graphs: the eight graphs (:class:`~sonic_rt.backends.Graphs`: Whisper encoder, CLIP, VAE encoder,
            audio2token, audio2bucket, UNet, VAE decoder, RIFE) on one backend.
        device: the working device.
        feature_extractor: ``transformers.WhisperFeatureExtractor`` (80 mel bins, 3000 frames per 30 s).
        noise_schedule_config: diffusers' ``EulerDiscreteScheduler`` config (the checkpoint's
            ``scheduler/scheduler_config.json``: Karras sigmas, v-prediction); not the window scheduler
            (:mod:`sonic_rt.scheduler`).
        face_detector: YOLOv5-face when ``yoloface_v5m.pt`` is present, else the OpenCV Haar fallback.
        source: the loaded directory (absolute).
        demo: the demo checkpoint's marker (``random_weights``, ``min_resolution``), or None.
        low_memory: the ``low_memory`` plan is on (:mod:`sonic_rt.pipeline.memory`): the graphs of
            :data:`~sonic_rt.pipeline.memory.OFFLOADED_GRAPHS` wait in host memory (torch backend on CUDA),
            the UNet's feed-forward runs in chunks, the VAE decodes fewer frames per call.
        devices: the devices the window scheduler runs UNet calls on, the first being :attr:`device` (where
            every other graph and the latents live).
        unets: the UNet on each of :attr:`devices` (the graph of ``graphs`` on the first; a device named twice
            shares one replica).
    """

    graphs: Graphs
    device: torch.device
    feature_extractor: Any
    noise_schedule_config: dict[str, Any]
    face_detector: Any
    source: Path
    demo: dict[str, Any] | None
    low_memory: bool = False
    devices: list[torch.device] = field(default_factory=list)
    unets: list[Any] = field(default_factory=list)

    def __post_init__(self):
        self.devices = self.devices or [self.device]
        self.unets = self.unets or [self.graphs.unet] * len(self.devices)

    @property
    def backend(self) -> str:
        """The backend's registry name: "torch", "onnxruntime" or "tensorrt"."""
        return self.graphs.backend.name

    @property
    def attention(self) -> str:
        """The torch backend's audio-attention implementation ("reference", "sdpa", "triton"), or "engine"."""
        module = getattr(self.graphs.unet, "module", None)
        return module.attention.value if module is not None else "engine"

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype of the latents (the UNet's first input; official: fp16)."""
        return self.graphs.unet.spec.inputs[0].torch_dtype

    @property
    def is_demo(self) -> bool:
        """Whether these are the random-weight demo checkpoint's graphs."""
        return bool(self.demo and self.demo.get("random_weights"))

    @property
    def default_min_resolution(self) -> int:
        """Short side in pixels when ``min_resolution`` is None: 512, or the demo checkpoint's own."""
        return int(self.demo["min_resolution"]) if self.is_demo else DEFAULT_MIN_RESOLUTION

    @property
    def decode_frames(self) -> int:
        """Frames per VAE decode call (8, official ``decode_chunk_size``; 4 under ``low_memory``)."""
        frames = self.graphs.vae_decoder.spec.dims["frames"]
        return decode_frames(self.low_memory, frames.min, frames.max)

    def prepare_unet(self, frames_per_window: int) -> None:
        """Set the torch UNet's feed-forward chunking for windows of ``frames_per_window`` frames: chunks of
        :func:`~sonic_rt.pipeline.memory.feed_forward_chunk` frames under ``low_memory``, none otherwise
        (engines: nothing to set)."""
        module = getattr(self.graphs.unet, "module", None)
        if module is not None:
            module.set_feed_forward_chunk(feed_forward_chunk(frames_per_window) if self.low_memory else None)

    def check_batching(self, windows_per_call: int) -> None:
        """The UNet graph must take a batch of 3 x ``windows_per_call`` (engines are built for a range).

        Raises:
            InputError: the engines were built for fewer or more windows per call (says how to rebuild).
        """
        batch = self.graphs.unet.spec.dims["batch"]
        if self.graphs.backend.is_exported and not batch.min <= 3 * windows_per_call <= batch.max:
            raise InputError(
                f"the engines in {self.source} take {batch.min // 3}..{batch.max // 3} windows per UNet "
                f"call, {windows_per_call} were asked for; rebuild them with --windows "
                f"1:{windows_per_call}:{windows_per_call} (python -m export.build_engines)"
            )

    def check_shapes(self, width: int, height: int, frames_per_window: int) -> None:
        """Engines with optimisation profiles (TensorRT) accept only the shapes they were built for: say so
        before any model runs.

        Args:
            width, height: the generated video's size in pixels; frames_per_window: the window length T.

        Raises:
            InputError: a size or window length outside the built range (says how to rebuild).
        """
        unet = self.graphs.unet
        if not unet.check_ranges:
            return
        factor = self.graphs.config.vae_scale_factor
        for dim, value in (("height", height // factor), ("width", width // factor), ("frames", frames_per_window)):
            rng = unet.spec.dims[dim]
            if not rng.min <= value <= rng.max:
                unit = "frames" if dim == "frames" else "pixels"
                scale = 1 if dim == "frames" else factor
                raise InputError(
                    f"the engines in {self.source} take a {dim} of {rng.min * scale}..{rng.max * scale} "
                    f"{unit}, this video needs {value * scale}; rebuild them with a wider range "
                    "(python -m export.build_engines --resolution/--frames)"
                )


def load_components(
    model_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    trust_pickle: bool = False,
    providers: list[str] | None = None,
    attention: str | None = None,
    compile: bool | str | None = None,
    low_memory: bool = False,
    devices: list[torch.device] | None = None,
) -> Components:
    """Load a weights directory (torch backend) or an engine directory (the backend its manifest names), and a
    UNet replica on each other device of ``devices`` (:func:`resolve_devices`; the first is where everything loads).

    Args: as :class:`sonic_rt.Runtime`.

    Raises:
        CheckpointError, EngineError, BackendUnavailableError, InputError: as :class:`sonic_rt.Runtime`.
    """
    try:
        mode = CompileMode.parse(compile)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if devices:
        device = devices[0]
    components = _load(model_dir, device, dtype, trust_pickle, providers, attention, compile, mode, low_memory)
    if devices:
        components.devices, components.unets = list(devices), _unet_replicas(components, devices, mode)
    return components


def _load(model_dir, device, dtype, trust_pickle, providers, attention, compile, mode, low_memory) -> Components:
    if is_engine_dir(model_dir):
        if attention not in (None, "auto"):
            raise InputError(
                f"attention={attention!r} applies to the torch backend; {model_dir} holds exported "
                "engines, which keep standard ops"
            )
        if mode is CompileMode.ON:
            raise InputError(
                f"compile={compile!r} applies to the torch backend; {model_dir} holds exported engines, "
                "which their own runtime optimises"
            )
        return _load_engines(model_dir, device, dtype, providers, low_memory)
    return _load_weights(model_dir, device, dtype, trust_pickle, attention, mode, low_memory)


def _unet_replicas(c: Components, devices: list[torch.device], mode: CompileMode) -> list:
    """The UNet graph on each device: the loaded one on the first device (and wherever a device repeats), a copy
    of the torch module on each other device.

    Raises:
        InputError: a second device for exported engines (each engine is built for one device).
    """
    replicas = {devices[0]: c.graphs.unet}
    for device in devices[1:]:
        if device in replicas:
            continue
        if c.backend != "torch":
            raise InputError(
                f"{c.source} holds {c.backend} engines, which run on the device they were loaded on; UNet "
                f"replicas on {device} need the torch backend (a weights directory)"
            )
        replicas[device] = c.graphs.unet.replicate(device, mode)
    return [replicas[d] for d in devices]


def resolve_devices(
    devices: str | torch.device | list[str | torch.device] | tuple | None, device: str | torch.device | None = None
) -> list[torch.device] | None:
    """The devices of ``Runtime(devices=...)``: a list (``["cuda:0", "cuda:1"]``; ``["cpu", "cpu"]`` for two CPU
    replicas splitting the cores), a comma-separated string (the CLI's ``--devices``), or ``"all"`` (every CUDA GPU;
    the CPU alone where there is none). None: only ``device``.

    Raises:
        InputError: an unknown or missing device, a mix of CPU and CUDA, or a ``device`` that is not the first.
    """
    if devices is None:
        return None
    if isinstance(devices, str) and devices.strip().lower() == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names: list = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    elif isinstance(devices, str):
        names = [d.strip() for d in devices.split(",") if d.strip()]
    elif isinstance(devices, torch.device):
        names = [devices]
    else:
        names = list(devices)
    if not names:
        raise InputError("devices is empty: name at least one device (e.g. cuda:0,cuda:1), or 'all'")
    try:
        resolved = [torch.device(d) for d in names]
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"devices: {exc}") from None
    resolved = [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in resolved]
    if len({d.type for d in resolved}) > 1 or resolved[0].type not in ("cpu", "cuda"):
        raise InputError(f"devices must be all CUDA GPUs or all CPU, got {', '.join(map(str, resolved))}")
    for d in resolved:
        default_device(d)  # CUDA present
        if d.type == "cuda" and d.index >= torch.cuda.device_count():
            raise InputError(f"device {d} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device is not None and default_device(device) != resolved[0]:
        raise InputError(f"device={device} is not the first of devices ({resolved[0]}): give one or the other")
    return resolved


def _load_engines(model_dir, device, dtype, providers, low_memory) -> Components:
    requested = Precision.parse(dtype)
    precision = requested.value if requested is not None else None
    engine = open_engine_dir(model_dir, default_device(device) if device is not None else None, precision, providers)
    return Components(
        graphs=engine.graphs,
        device=engine.graphs.unet.device,
        feature_extractor=engine.feature_extractor(),
        noise_schedule_config=engine.scheduler_config,
        face_detector=load_face_detector(engine.root),
        source=engine.root,
        demo=engine.demo,
        low_memory=low_memory,
    )


def _load_weights(model_dir, device, dtype, trust_pickle, attention, compile, low_memory) -> Components:
    from ..attention import resolve_attention
    from ..backends.torch_backend import TorchBackend
    from ..checkpoint import resolve_model_dir
    from ..loading import load_models

    device = default_device(device)
    paths = resolve_model_dir(model_dir)
    models = load_models(paths, device, default_dtype(dtype, device), trust_pickle=trust_pickle)
    models.unet.attention = resolve_attention(attention, device, models.unet.head_dims)
    graphs = TorchBackend.from_models(models)
    graphs.unet.compile("UNet", mode=compile)  # ON says why and stays eager where compiling cannot work
    if low_memory:
        for name in OFFLOADED_GRAPHS:
            graphs.graphs[name].offload("cpu")  # a no-op on the CPU
    demo = json.loads(paths.demo_marker.read_text()) if paths.demo_marker else None
    return Components(
        graphs=graphs,
        device=device,
        feature_extractor=models.feature_extractor,
        noise_schedule_config=models.scheduler_config,
        face_detector=load_face_detector(paths.root),
        source=paths.root,
        demo=demo,
        low_memory=low_memory,
    )


def default_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA when available, else the CPU.

    Raises:
        InputError: CUDA was asked for and this machine or torch build has none.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device 'cuda' requested but no CUDA GPU is available (this torch build: {torch.__version__})"
        )
    return device


def rank_device() -> torch.device:
    """A torchrun rank's device: ``cuda:$LOCAL_RANK`` where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``dtype`` (a name or torch dtype, :meth:`Precision.parse`), or fp16 on CUDA (official)
    and fp32 on the CPU when None.

    On the CPU a half-precision dtype (bf16, fp16) is only as fast as the CPU's support for it (bf16 runs on AMX
    tiles ~7x faster than fp32 where present, and several times slower than fp32 where neither AMX nor
    ``avx512_bf16`` is): :func:`cpu_speedup_over_fp32` measures it, and where it is slower than fp32 this says so on
    stderr and returns fp32 instead (an opt-in never makes a run slower without saying so).

    Raises:
        InputError: an unknown dtype name.
    """
    precision = Precision.parse(dtype) or (Precision.FP16 if device.type == "cuda" else Precision.FP32)
    if device.type == "cpu" and precision in (Precision.BF16, Precision.FP16):
        speedup = cpu_speedup_over_fp32(precision.torch_dtype)
        if speedup < 1.0:
            print(
                f"sonic_rt: {precision.value} is {1 / speedup:.1f}x slower than fp32 on this CPU (measured: "
                f"{PROBE_WHAT}): running fp32 instead",
                file=sys.stderr,
                flush=True,
            )
            return torch.float32
    return precision.torch_dtype


PROBE_WHAT = "a UNet-shaped linear [6400, 256] -> 1024 and 3x3 convolution [16, 128, 24, 24]"


@functools.cache
def cpu_speedup_over_fp32(dtype: torch.dtype, repeats: int = 3) -> float:
    """How much faster ``dtype`` runs than fp32 on this CPU: fp32 seconds / ``dtype`` seconds of a small probe
    shaped like the UNet's work (:data:`PROBE_WHAT`: its matmuls and convolutions are ~90% of a call's FLOPs),
    best of ``repeats`` after one warm-up, with the current torch threads. Measured once per process (~0.1 s).

    Flags in /proc/cpuinfo do not settle this: the speed depends on which oneDNN kernels run (AMX, avx512_bf16,
    or a plain fallback), which a VM or ``ONEDNN_MAX_CPU_ISA`` may restrict.
    """
    import time

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6400, 256, generator=gen), torch.randn(1024, 256, generator=gen)
    image, kernel = torch.randn(16, 128, 24, 24, generator=gen), torch.randn(128, 128, 3, 3, generator=gen)

    def seconds(dt: torch.dtype) -> float:
        args = [t.to(dt) for t in (x, w, image, kernel)]
        best = float("inf")
        with torch.inference_mode():
            for i in range(repeats + 1):
                started = time.perf_counter()
                torch.nn.functional.linear(args[0], args[1])
                torch.nn.functional.conv2d(args[2], args[3], padding=1)
                if i:  # the first call is a warm-up (kernel selection, weight packing)
                    best = min(best, time.perf_counter() - started)
        return best

    return seconds(torch.float32) / seconds(dtype)


__all__ = [
    "Components",
    "load_components",
    "resolve_devices",
    "default_device",
    "default_dtype",
    "cpu_speedup_over_fp32",
]
