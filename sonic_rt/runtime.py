"""``sonic_rt.Runtime``: load Sonic once, animate many portraits.

The pipeline is a short list of steps (:meth:`Runtime.animate`), each its own unit in :mod:`sonic_rt.pipeline`:

0. loading: weights or engines -> :class:`~sonic_rt.pipeline.components.Components` (once per Runtime),
1. :func:`~sonic_rt.pipeline.inputs.check_inputs`: every input, and the face crop, before any model runs,
2. :func:`~sonic_rt.pipeline.steps.audio_features`: Whisper,
3. :func:`~sonic_rt.pipeline.steps.encode_reference`: CLIP and VAE latents of the reference,
4. :func:`~sonic_rt.pipeline.steps.encode_audio`: audio tokens and motion buckets of every frame,
5. :func:`~sonic_rt.pipeline.steps.guided_denoiser`: the guided UNet over the CFG rows
   (:class:`~sonic_rt.pipeline.guidance.GuidedDenoiser`),
6. :func:`~sonic_rt.pipeline.steps.prepare_latents`: the official seeded noise on the reference latents,
7. :func:`~sonic_rt.pipeline.steps.denoise` with :class:`~sonic_rt.pipeline.output.StreamingOutput`: the
   shift-fusion loop (in wavefront order by default: the first frames are final early), decode -> interpolate
   -> encode streamed in VAE chunks as soon as their frames are final (memory does not grow with video length
   beyond the latents).

Stage timing is :mod:`sonic_rt.pipeline.timing` (:data:`STAGES`), the out-of-memory policy
:mod:`sonic_rt.pipeline.memory`, the options :mod:`sonic_rt.pipeline.options` (:class:`AnimateOptions`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError
from .face import Reference

if TYPE_CHECKING:
    from .paste_back import PasteGeometry
from .pipeline import inputs as input_checks
from .pipeline import steps
from .pipeline.components import Components, load_components, rank_device, resolve_devices
from .pipeline.inputs import PreparedInputs
from .pipeline.memory import is_out_of_memory, notifier
from .pipeline.options import DEFAULT_MIN_RESOLUTION, DEFAULT_SEED, AnimateOptions
from .pipeline.output import OUTPUT_FPS, output_fps
from .pipeline.timing import STAGES, StageTimer
from .sampling import window_starts
from .scheduler import Distributed, SchedulerConfig, WindowScheduler

FALLBACK_DETECTOR_NOTE = (
    "no yoloface_v5m.pt in {root}: the face was found with OpenCV's Haar cascade, not the "
    "official YOLOv5-face detector, so the crop and face mask differ slightly from the "
    "official ones"
)


@dataclass
class AnimateResult:
    """What :meth:`Runtime.animate` produced.

    Attributes:
        path: the written ``.mp4`` (None when ``out`` was None).
        fps: output frame rate (25.0 with interpolation, 12.5 without).
        num_frames: frames in the output video (2N-1 with interpolation, N without).
        num_generated_frames: N, frames generated at 12.5 fps (``samples // 640 // 2``).
        width, height: output size in pixels (with ``paste_back``, the photo's even size, at most
            ``max_output_side``).
        timings: seconds per stage, in pipeline order (:data:`STAGES`: ``preprocess``, ``audio_features``,
            ``image_encode``, ``audio_adapters``, ``denoise``, ``decode``, ``interpolate``, ``encode``, ``total``).
        frames: decoded frames before interpolation, uint8 [N, H, W, 3] RGB (when requested).
        seed: the seed the initial noise was drawn from (None when ``latents`` was given).
        reference: the prepared reference (crop box, face box, detector used).
        notes: what the user should know about this run that is not an error, e.g. that the face was found by
            the OpenCV fallback detector because ``yoloface_v5m.pt`` is absent (also said once on stderr).
        paste: with ``paste_back``, the :class:`sonic_rt.paste_back.PasteGeometry` used (crop box and face box in
            the photo's pixels, output size, feather width); None otherwise.
    """

    path: Path | None
    fps: float
    num_frames: int
    num_generated_frames: int
    width: int
    height: int
    timings: dict[str, float]
    frames: np.ndarray | None
    seed: int | None
    reference: Reference = field(repr=False)
    notes: tuple[str, ...] = ()
    paste: PasteGeometry | None = None


class Runtime:
    """Sonic inference runtime.

    Args:
        model_dir: an official-layout Sonic weights directory (see :mod:`sonic_rt.checkpoint`), the demo
            checkpoint (``python -m sonic_rt demo-model``), or an engine directory written by
            ``python -m export.build_engines`` (its ``manifest.json`` picks the backend: onnxruntime or
            tensorrt). A weights directory runs on the torch backend (the reference).
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available; for engines, when the backend can use it).
        dtype: UNet/VAE/CLIP dtype; None means fp16 on CUDA (official) and fp32 on CPU for weights, and the
            manifest's precision for engines (asking for another precision than an engine's is an error).
        trust_pickle: allow checkpoint pickles that need arbitrary code (only for trusted files).
        providers: ONNX Runtime execution providers for an onnxruntime engine directory (None: CPU on CPU,
            CUDA on CUDA; e.g. ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``).
        attention: the torch backend's audio-attention implementation (:mod:`sonic_rt.attention`): None/"auto"
            (Triton on CUDA where it can run, else the reason is printed once; sdpa on CPU, which skips zero-mask queries),
            "reference", "sdpa" or "triton". Engines keep standard ops: only None/"auto" is accepted there.
        compile: when the torch backend's UNet runs under ``torch.compile`` (:mod:`sonic_rt.compiling`):
            None/"auto" (default): the input shapes whose compiled code is already in the on-disk cache run
            compiled where loading it pays (a video of at least ``compiling.AUTO_MIN_WINDOWS`` windows, or a
            long-lived process such as ``serve``), the others uncompiled (nothing waits for a compile it did not
            ask for); True/"on": every new
            shape compiles once per process (minutes on a 2-core CPU the first time, then loaded from the cache);
            False/"off": never. CUDA graphs on CUDA. Where no C++ compiler (CPU) or triton (CUDA) is present "on"
            says so and runs uncompiled. The README's performance section gives the measured trade-off.
        low_memory: aim at 12 GB GPUs at 512x512 (:mod:`sonic_rt.pipeline.memory`): every model but the UNet
            waits in host memory and is moved to the GPU only while it runs (torch backend), one window per
            UNet call, the UNet's feed-forward in chunks of 5 frames (torch backend), 4 frames per VAE decode
            call instead of 8 (frames near those chunk edges differ slightly). Off by default: it is slower
            (weights cross PCIe for each decoded chunk) and a large GPU does not need it.
        scheduler: how the windows run (:class:`~sonic_rt.scheduler.SchedulerConfig`: windows per UNet call,
            parallel lanes, guidance-row splits, and the order: ``"wavefront"`` by default, which writes the first
            frames after a fixed amount of work whatever the length, docs/wavefront.md; or ``"steps"``). Under
            ``torchrun`` (``WORLD_SIZE`` > 1) each rank owns a range of frames and exchanges only their edges with
            its neighbours (gloo on CPU, NCCL on CUDA, one GPU per rank: ``cuda:$LOCAL_RANK``); rank 0 decodes and
            writes. Results do not depend on lanes, devices or ranks (:mod:`sonic_rt.scheduler`).
        devices: run the UNet calls of one video on several devices: a list (``["cuda:0", "cuda:1"]``), a
            comma-separated string, or ``"all"`` (every CUDA GPU). Each device holds a UNet replica (torch backend)
            and takes whichever window is ready when it is free; the latents, and every other model, stay on the
            first device. On the CPU, ``["cpu", "cpu"]`` runs two replicas that split the cores. None: ``device``
            alone. Not under torchrun (one device per rank there).

    Raises:
        CheckpointError: a model file is missing or does not match (names the file and the keys).
        EngineError: an engine directory is corrupted or built for another GPU, TensorRT version or precision.
        BackendUnavailableError: the engine's backend library or device is missing here.
        InputError: an unusable device or dtype; ``low_memory`` with more than one window per UNet call; devices
            that do not exist, mix CPU and CUDA, or are several under torchrun.

    Attributes:
        components: what was loaded (:class:`~sonic_rt.pipeline.components.Components`); ``graphs``,
            ``device``, ``dtype``, ``feature_extractor``, ``noise_schedule_config``, ``face_detector``,
            ``source``, ``backend``, ``attention``, ``is_demo`` and ``default_min_resolution`` read it.
        noise_schedule_config: diffusers' ``EulerDiscreteScheduler`` config (the checkpoint's
            ``scheduler/scheduler_config.json``): the noise schedule, not the window scheduler.
        scheduling: the window scheduler's :class:`~sonic_rt.scheduler.SchedulerConfig` (``scheduler=``).
        distributed: this process's rank and world size (:class:`~sonic_rt.scheduler.Distributed`).

    One Runtime may be shared between threads: :meth:`animate` calls are serialised by a lock.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        trust_pickle: bool = False,
        providers: list[str] | None = None,
        attention: str | None = None,
        scheduler: SchedulerConfig | None = None,
        compile: bool | str | None = None,
        low_memory: bool = False,
        devices: str | list[str | torch.device] | None = None,
    ):
        if low_memory and scheduler is not None and scheduler.windows_per_call > 1:
            raise InputError(
                f"low_memory runs one window per UNet call; {scheduler.windows_per_call} windows per call were "
                "asked for (leave windows_per_call at 1, or turn low_memory off)"
            )
        placed = resolve_devices(devices, device)
        if device is None and placed is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = rank_device()  # torchrun: one GPU per rank (LOCAL_RANK), as NCCL needs
        self.components: Components = load_components(
            model_dir,
            device,
            dtype,
            trust_pickle=trust_pickle,
            providers=providers,
            attention=attention,
            compile=compile,
            low_memory=low_memory,
            devices=placed,
        )
        self.scheduling = scheduler or SchedulerConfig()
        self.components.check_batching(self.scheduling.windows_per_call)
        self.distributed = Distributed.from_environment(self.device)
        self._scheduler = WindowScheduler(
            self.scheduling, self.device, self.distributed, devices=self.components.devices
        )
        self._lock = threading.Lock()
        self._said_fallback_detector = False

    # What was loaded (see Components): read-only views, so there is one source of truth.
    graphs = property(lambda self: self.components.graphs, doc="the eight graphs (sonic_rt.backends.Graphs)")
    device = property(lambda self: self.components.device, doc="the working device (the first of devices)")
    devices = property(lambda self: self.components.devices, doc="the devices running UNet calls (one replica each)")
    dtype = property(lambda self: self.components.dtype, doc="the working dtype of the latents (official: fp16)")
    feature_extractor = property(lambda self: self.components.feature_extractor, doc="Whisper's feature extractor")
    noise_schedule_config = property(
        lambda self: self.components.noise_schedule_config,
        doc="diffusers' EulerDiscreteScheduler config (not the window scheduler)",
    )
    face_detector = property(lambda self: self.components.face_detector, doc="YOLOv5-face or the Haar fallback")
    source = property(lambda self: self.components.source, doc="the loaded directory")
    backend = property(lambda self: self.components.backend, doc='"torch", "onnxruntime" or "tensorrt"')
    attention = property(
        lambda self: self.components.attention,
        doc='the audio-attention implementation ("reference", "sdpa", "triton"; "engine")',
    )
    low_memory = property(lambda self: self.components.low_memory, doc="whether the low_memory plan is on")
    is_demo = property(lambda self: self.components.is_demo, doc="whether this is the random-weight demo")
    default_min_resolution = property(
        lambda self: self.components.default_min_resolution, doc="short side in pixels when min_resolution is None"
    )

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def animate(
        self,
        image,
        audio,
        out: str | os.PathLike | None = None,
        options: AnimateOptions | None = None,
        *,
        latents: torch.Tensor | None = None,
        events=None,
        **overrides,
    ) -> AnimateResult:
        """Animate ``image`` with ``audio`` and write an H.264 + AAC mp4 to ``out``.

        Args:
            image: portrait path (PNG/JPEG/WebP...), PIL image, or uint8 array (HxW, HxWx3 RGB, HxWx4).
            audio: speech file (anything PyAV decodes: wav, mp3, m4a, flac, a video's audio track), or a
                float32 mono array at 16 kHz.
            out: ``.mp4`` path, or None to write nothing (the decoded frames are then returned).
            options: an :class:`~sonic_rt.pipeline.options.AnimateOptions` (None: the official defaults).
            latents: initial noise ``[1, N, 4, H/8, W/8]`` as diffusers pipelines accept it; None draws
                it from ``seed`` (the official seeded noise, :func:`sonic_rt.sampling.initial_noise`).
            events: optional ``events(kind, info)`` callback: ``("window", {"step", "index"})`` after each
                window, ``("frames", {"generated", "written", "video_seconds", "elapsed_seconds"})`` after each
                chunk is written (as soon as its frames are final: in the default wavefront order after a fixed
                amount of work whatever the length, see :mod:`sonic_rt.scheduler`), and
                ``("memory", {"what", "failed", "retry"})`` when an out-of-memory error made the runtime retry
                with fewer windows per UNet call, VAE frames or RIFE pairs per call (also said on stderr).
            **overrides: any option by name, over ``options``: ``steps`` (25), ``seed`` (72589),
                ``dynamic_scale`` (1.0), ``shift_offset`` (7 frames), ``frames_per_window`` (25 frames),
                ``min_resolution`` (pixels; None: 512 or the demo's own), ``interpolate`` (True),
                ``face_box`` (None), ``crop`` (True), ``progress`` (True), ``return_frames`` (False); units and
                sources in :class:`AnimateOptions`.

        Returns:
            an :class:`AnimateResult`.

        Raises:
            TypeError: an override that is not an option.
            ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: bad input, raised
            before any model runs; no output file is left behind on any error or interruption.
            OutOfMemoryError: the device ran out of memory even with one window per UNet call (or one frame
                per VAE / RIFE call); the message names the setting to lower. Before that, an out-of-memory
                error halves the batch and retries, saying so.
        """
        options = AnimateOptions.resolve(options, overrides, "animate()")
        with self._lock:
            return self._animate(image, audio, out, options, latents, events)

    def _animate(self, image, audio, out, options: AnimateOptions, latents, events) -> AnimateResult:
        c, timer, started = self.components, StageTimer(self.device), time.perf_counter()
        say, write = notifier(events), self.distributed.rank == 0  # rank 0 decodes and writes
        with timer.stage("preprocess"):  # 1. every input and the face crop, before any model runs
            inputs = self.check_inputs(image, audio, out, options, latents=latents)
        compiled = getattr(c.graphs.unet, "call", None)  # a CompiledCall with compile on/auto; engines have none
        if hasattr(compiled, "plan"):  # compile="auto": a cache warmed meanwhile, and is loading worth it
            per_step = window_starts(inputs.num_frames, options.frames_per_window, 0, options.shift_offset)
            compiled.plan(len(per_step) * options.steps)
        with timer.stage("audio_features"):  # 2. Whisper once per 30 s chunk
            features = steps.audio_features(c, inputs.samples)
        with timer.stage("image_encode"):  # 3. CLIP embedding and VAE latents of the reference
            reference = steps.encode_reference(c, inputs.reference)
        with timer.stage("audio_adapters"):  # 4. audio tokens and buckets of every frame, 5. the guided UNet
            audio_cond = steps.encode_audio(
                c, features, inputs.audio_frames, reference.clip_embeds, options.dynamic_scale
            )
            del features
            denoiser = steps.guided_denoiser(c, inputs, reference, audio_cond, say)
        init = steps.prepare_latents(c, inputs, reference, options.seed, latents)  # 6. noise on the reference
        with ExitStack() as stack:  # 7. denoise; decode -> interpolate -> encode from the last step on
            output = steps.open_output(stack, c, inputs, options, audio, timer, events, say, write, started)
            final = steps.denoise(
                c,
                self._scheduler,
                init,
                inputs,
                denoiser,
                output,
                timer,
                progress=options.progress,
                events=events,
                write=write,
            )
            if write:
                output.finish(final)
        timer.add("total", time.perf_counter() - started)
        width, height = output.paste.output_size if output.paste is not None else inputs.size
        return AnimateResult(
            path=inputs.out_path if write else None,
            fps=float(output_fps(options.interpolate)),
            num_frames=output.num_out,
            num_generated_frames=inputs.num_frames,
            width=width,
            height=height,
            timings=timer.ordered(),
            frames=output.frames() if write else None,
            seed=init.seed,
            reference=inputs.reference,
            notes=self._notes(inputs.reference),
            paste=output.paste.geometry if output.paste is not None else None,
        )

    def check_inputs(
        self,
        image,
        audio,
        out,
        options: AnimateOptions | None = None,
        *,
        latents: torch.Tensor | None = None,
        **overrides,
    ) -> PreparedInputs:
        """Step 1 of :meth:`animate`: check every input and prepare the reference, before any model runs
        (:func:`sonic_rt.pipeline.inputs.check_inputs`; also used by the eager baseline, so both refuse the
        same inputs with the same errors). Says once per Runtime when the fallback face detector found the face.

        Raises:
            ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: as :meth:`animate`.
        """
        options = AnimateOptions.resolve(options, overrides, "check_inputs()")
        prepared = input_checks.check_inputs(self.components, image, audio, out, options, latents)
        if prepared.reference.detector == "haar" and not self._said_fallback_detector:
            self._said_fallback_detector = True  # once per Runtime, after the input checks (errors stay one line)
            print(f"sonic_rt: {FALLBACK_DETECTOR_NOTE.format(root=self.source)}", file=sys.stderr, flush=True)
        return prepared

    def close(self) -> None:
        """Stop the scheduler's worker lanes and, under torchrun, leave the distributed job."""
        self._scheduler.close()
        self.distributed.shutdown()

    def _notes(self, reference: Reference) -> tuple[str, ...]:
        """The :attr:`AnimateResult.notes` of a run on ``reference``."""
        return (FALLBACK_DETECTOR_NOTE.format(root=self.source),) if reference.detector == "haar" else ()


__all__ = [
    "Runtime",
    "AnimateResult",
    "AnimateOptions",
    "PreparedInputs",
    "STAGES",
    "DEFAULT_SEED",
    "DEFAULT_MIN_RESOLUTION",
    "OUTPUT_FPS",
    "FALLBACK_DETECTOR_NOTE",
    "is_out_of_memory",
]
