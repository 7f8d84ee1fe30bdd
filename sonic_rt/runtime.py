"""``sonic_rt.Runtime``: load Sonic once, animate many portraits.

The pipeline reads as numbered steps (:meth:`Runtime.animate`): 1. check inputs, 2. reference image,
3. audio features, 4. conditioning, 5. initial latents, 6. denoising loop, 7. decode -> interpolate -> encode
(streamed in VAE chunks, so memory does not grow with video length beyond the latents).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import media
from .audio_features import SAMPLE_RATE, SAMPLES_PER_AUDIO_FRAME, encode_audio, num_generated_frames, \
    whisper_hidden_states
from .attention import resolve_attention
from .backends import Graphs
from .checkpoint import resolve_model_dir
from .errors import AudioError, InputError, OutOfMemoryError
from .face import FaceBox, Reference, load_face_detector, prepare_reference
from .manifest import is_engine_dir, open_engine_dir
from .models.unet import level_face_masks
from .scheduler import Distributed, SchedulerConfig, WindowScheduler
from .sampling import SamplingConfig, Window, combine_guidance, initial_noise, karras_schedule, sample, \
    scale_model_input, window_starts

DEFAULT_SEED = 72589          # official config `seed`
DEFAULT_MIN_RESOLUTION = 512  # official `image_size` / `min_resolution`
FALLBACK_DETECTOR_NOTE = ("no yoloface_v5m.pt in {root}: the face was found with OpenCV's Haar cascade, not the "
                          "official YOLOv5-face detector, so the crop and face mask differ slightly from the "
                          "official ones")
OUTPUT_FPS = Fraction(25)     # after RIFE x2; Fraction(25, 2) without interpolation
# Stages of AnimateResult.timings, in pipeline order: input checks + face crop; Whisper; CLIP + VAE encoder;
# audio2token + audio2bucket; the UNet steps; VAE decode; RIFE; mp4 encode; wall time of the whole call.
STAGES = ("preprocess", "audio_features", "image_encode", "audio_adapters", "denoise", "decode", "interpolate",
          "encode", "total")


@dataclass
class AnimateResult:
    """What :meth:`Runtime.animate` produced.

    Attributes:
        path: the written ``.mp4`` (None when ``out`` was None).
        fps: output frame rate (25.0 with interpolation, 12.5 without).
        num_frames: frames in the output video (2N-1 with interpolation, N without).
        num_generated_frames: N, frames generated at 12.5 fps (``samples // 640 // 2``).
        width, height: output size in pixels.
        timings: seconds per stage, in pipeline order (:data:`STAGES`: ``preprocess``, ``audio_features``,
            ``image_encode``, ``audio_adapters``, ``denoise``, ``decode``, ``interpolate``, ``encode``, ``total``).
        frames: decoded frames before interpolation, uint8 [N, H, W, 3] RGB (when requested).
        seed: the seed the initial noise was drawn from (None when ``latents`` was given).
        reference: the prepared reference (crop box, face box, detector used).
        notes: what the user should know about this run that is not an error, e.g. that the face was found by
            the OpenCV fallback detector because ``yoloface_v5m.pt`` is absent (also said once on stderr).
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


@dataclass
class PreparedInputs:
    """Checked inputs of one animation (:meth:`Runtime.prepare`).

    Attributes:
        config: the sampling settings.
        out_path: the checked ``.mp4`` path, or None.
        samples: float32 mono audio at 16 kHz, ``[S]``.
        audio_frames: official ``audio_len`` = S // 640 (25 fps audio frames).
        num_frames: N generated frames (12.5 fps), >= 1.
        reference: the prepared portrait.
    """

    config: SamplingConfig
    out_path: Path | None
    samples: np.ndarray
    audio_frames: int
    num_frames: int
    reference: Reference


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available (this torch build: "
                         f"{torch.__version__})")
    return device


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        dtype = names[dtype]
    return dtype


def _default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32  # official: fp16 on GPU
    return _parse_dtype(dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``torch.cuda.OutOfMemoryError``, or a backend's error whose
    message says so (ONNX Runtime "Failed to allocate memory", TensorRT / CPU allocator "out of memory")."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "failed to allocate memory", "can't allocate memory"))


class _MemoryFallback:
    """Runs a batched call in smaller pieces after an out-of-memory error, and keeps the smaller size.

    Args:
        what: the batched thing, for messages ("windows per UNet call").
        exact: whether splitting the batch leaves the result unchanged (windows and RIFE pairs are
            independent; VAE chunks are not: the temporal decoder mixes the frames of a chunk).
        failure: the message of the :class:`OutOfMemoryError` raised when a batch of 1 still fails (names
            the setting to lower).
        say: where the retry notice goes (stderr, and the ``events`` callback as ``("memory", info)``).
    """

    def __init__(self, what: str, exact: bool, failure: str, say):
        self.what, self.exact, self.failure, self.say = what, exact, failure, say
        self.limit: int | None = None

    def run(self, size: int, call) -> torch.Tensor:
        """``call(slice)`` -> the outputs of that part of the batch of ``size``; concatenated along dim 0."""
        limit = min(size, self.limit or size)
        while True:
            try:
                if limit >= size:
                    return call(slice(0, size))
                return torch.cat([call(slice(s, min(s + limit, size))) for s in range(0, size, limit)])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if limit == 1:
                    raise OutOfMemoryError(self.failure) from exc
                failed, limit = limit, limit // 2
                self.limit = limit
                effect = "same result" if self.exact else "frames at the chunk edges differ slightly"
                self.say(f"out of memory with {failed} {self.what}; retrying with {limit} ({effect})",
                         {"what": self.what, "failed": failed, "retry": limit})


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds

    def ordered(self) -> dict[str, float]:
        """Seconds per stage in pipeline order (decode work done during the last step is counted as decode)."""
        order = STAGES
        return {k: self.times[k] for k in order if k in self.times} | {
            k: v for k, v in self.times.items() if k not in order}

    def stage(self, name: str):
        timer = self

        class _Ctx:
            # On CUDA a stage is timed by events recorded on the current stream (the stream doing the work;
            # window lanes join it before sampling returns), and its end is the only sync we add.
            def __enter__(self):
                self.t = time.perf_counter()
                if timer.device.type == "cuda":
                    self.start = torch.cuda.Event(enable_timing=True)
                    self.start.record()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    end.synchronize()
                    timer.add(name, self.start.elapsed_time(end) / 1000.0)
                else:
                    timer.add(name, time.perf_counter() - self.t)

        return _Ctx()


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
        compile: run the torch backend's UNet under ``torch.compile`` (:mod:`sonic_rt.compiling`): each input
            shape compiles once per process (about 2 minutes on a 2-core CPU; seconds from the on-disk cache in a
            later process), then UNet calls are about 1.3x faster on CPU; CUDA graphs on CUDA. Off by default
            (see the README's performance section). Where no C++ compiler (CPU) or triton (CUDA) is present it
            says so and runs uncompiled.
        scheduler: how the windows of a step run (:class:`~sonic_rt.scheduler.SchedulerConfig`: windows per
            UNet call, parallel lanes). Under ``torchrun`` (``WORLD_SIZE`` > 1) the windows are also sharded
            over the ranks (gloo on CPU, NCCL on CUDA); rank 0 decodes and writes. Results do not depend on
            lanes or ranks (see :mod:`sonic_rt.scheduler` for batching).

    Raises:
        CheckpointError: a model file is missing or does not match (names the file and the keys).
        EngineError: an engine directory is corrupted or built for another GPU, TensorRT version or precision.
        BackendUnavailableError: the engine's backend library or device is missing here.
        InputError: an unusable device or dtype.

    One Runtime may be shared between threads: :meth:`animate` calls are serialised by a lock.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *, trust_pickle: bool = False,
                 providers: list[str] | None = None, attention: str | None = None,
                 scheduler: SchedulerConfig | None = None, compile: bool = False):
        if is_engine_dir(model_dir):
            if attention not in (None, "auto"):
                raise InputError(f"attention={attention!r} applies to the torch backend; {model_dir} holds exported "
                                 "engines, which keep standard ops")
            if compile:
                raise InputError(f"compile=True applies to the torch backend; {model_dir} holds exported engines, "
                                 "which their own runtime optimises")
            requested = _parse_dtype(dtype)
            precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(requested)
            engine = open_engine_dir(model_dir, _default_device(device) if device is not None else None, precision,
                                     providers)
            self.graphs: Graphs = engine.graphs
            self.device = engine.graphs.unet.device
            self.feature_extractor = engine.feature_extractor()
            self.scheduler_config = engine.scheduler_config
            self.face_detector = load_face_detector(engine.root)
            marker = engine.demo
            self.source = engine.root
        else:
            from .backends.torch_backend import TorchBackend
            from .loading import load_models

            self.device = _default_device(device)
            paths = resolve_model_dir(model_dir)
            models = load_models(paths, self.device, _default_dtype(dtype, self.device), trust_pickle=trust_pickle)
            models.unet.attention = resolve_attention(attention, self.device, models.unet.head_dims)
            self.graphs = TorchBackend.from_models(models)
            if compile:
                self.graphs.unet.compile("UNet")  # says why and stays eager where compiling cannot work
            self.feature_extractor = models.feature_extractor
            self.scheduler_config = models.scheduler_config
            self.face_detector = load_face_detector(paths.root)
            marker = json.loads(paths.demo_marker.read_text()) if paths.demo_marker else None
            self.source = paths.root
        self.backend = self.graphs.backend.name  # "torch", "onnxruntime", "tensorrt"; the class: self.graphs.backend
        unet_module = getattr(self.graphs.unet, "module", None)
        self.attention = unet_module.attention.value if unet_module is not None else "engine"
        self.dtype = self.graphs.unet.spec.inputs[0].torch_dtype  # the working dtype of latents (official: fp16)
        self.is_demo = bool(marker and marker.get("random_weights"))
        self.default_min_resolution = int(marker["min_resolution"]) if self.is_demo else DEFAULT_MIN_RESOLUTION
        self.scheduling = scheduler or SchedulerConfig()
        self._check_batching(self.scheduling.windows_per_call)
        self.distributed = Distributed.from_environment(self.device)
        self._scheduler = WindowScheduler(self.scheduling, self.device, self.distributed)
        self._lock = threading.Lock()
        self._said_fallback_detector = False

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def animate(self, image, audio, out: str | os.PathLike | None = None, *, steps: int = 25,
                seed: int = DEFAULT_SEED, dynamic_scale: float = 1.0, shift_offset: int = 7,
                frames_per_window: int = 25, min_resolution: int | None = None, interpolate: bool = True,
                face_box=None, crop: bool = True, latents: torch.Tensor | None = None, progress: bool = True,
                return_frames: bool = False, events=None) -> AnimateResult:
        """Animate ``image`` with ``audio`` and write an H.264 + AAC mp4 to ``out``.

        Args:
            image: portrait path (PNG/JPEG/WebP...), PIL image, or uint8 array (HxW, HxWx3 RGB, HxWx4).
            audio: speech file (anything PyAV decodes: wav, mp3, m4a, flac, a video's audio track), or a
                float32 mono array at 16 kHz.
            out: ``.mp4`` path, or None to write nothing (the decoded frames are then returned).
            steps: denoising steps (official 25).
            seed: seed of the initial noise (CPU generator, so the same seed gives the same noise on any
                machine). The official code ignores its seed; this one is honoured.
            dynamic_scale: motion bucket scale (official ``dynamic_scale``, 1.0; gradio allows 0.5-2.0).
            shift_offset: window shift per step in frames (official 7).
            frames_per_window: window length in frames at 12.5 fps (official 25).
            min_resolution: short side of the generated video in pixels, rounded to multiples of 64
                (None: 512, or the demo checkpoint's own small default).
            interpolate: RIFE x2 to 25 fps (2N-1 frames); False writes N frames at 12.5 fps.
            face_box: explicit face ``(x, y, w, h)`` in image pixels (or "x,y,w,h"); skips detection.
            crop: square-crop around the face (official gradio behaviour) or use the whole image.
            latents: initial noise ``[1, N, 4, H/8, W/8]`` as diffusers pipelines accept it; None draws
                it from ``seed``.
            progress: show progress bars on stderr.
            return_frames: also return the decoded frames before interpolation (always when out is None).
            events: optional ``events(kind, info)`` callback: ``("window", {"step", "index"})`` after each
                window, ``("frames", {"generated", "written"})`` after each chunk is written (during the last
                step for finished chunks, so output starts before the last window ends), and
                ``("memory", {"what", "failed", "retry"})`` when an out-of-memory error made the runtime retry
                with fewer windows per UNet call, VAE frames or RIFE pairs per call (also said on stderr).

        Returns:
            an :class:`AnimateResult`.

        Raises:
            ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: bad input, raised
            before any model runs; no output file is left behind on any error or interruption.
            OutOfMemoryError: the device ran out of memory even with one window per UNet call (or one frame
                per VAE / RIFE call); the message names the setting to lower. Before that, an out-of-memory
                error halves the batch and retries, saying so.
        """
        with self._lock:
            return self._animate(image, audio, out, steps=steps, seed=seed, dynamic_scale=dynamic_scale,
                                 shift_offset=shift_offset, frames_per_window=frames_per_window,
                                 min_resolution=min_resolution, interpolate=interpolate, face_box=face_box,
                                 crop=crop, latents=latents, progress=progress, return_frames=return_frames,
                                 events=events)

    def _animate(self, image, audio, out, *, steps, seed, dynamic_scale, shift_offset, frames_per_window,
                 min_resolution, interpolate, face_box, crop, latents, progress, return_frames,
                 events) -> AnimateResult:
        from tqdm.auto import tqdm

        g, device, dtype = self.graphs, self.device, self.dtype
        cfg = g.config
        timer = _Timer(device)
        t_start = time.perf_counter()

        # 1. Check inputs (cheap, before any model runs)
        with timer.stage("preprocess"):
            prepared = self.prepare(image, audio, out, steps=steps, frames_per_window=frames_per_window,
                                    shift_offset=shift_offset, dynamic_scale=dynamic_scale,
                                    min_resolution=min_resolution, face_box=face_box, crop=crop)
            config, out_path, samples = prepared.config, prepared.out_path, prepared.samples
            audio_frames, num_frames, reference = prepared.audio_frames, prepared.num_frames, prepared.reference
            width, height = reference.size
            self._check_engine_shapes(width, height, config.frames_per_window)
            factor = cfg.vae_scale_factor
            latent_shape = (1, num_frames, cfg.latent_channels, height // factor, width // factor)
            if latents is not None and tuple(latents.shape) != latent_shape:
                raise InputError(f"latents must have shape {list(latent_shape)} for this image and audio, "
                                 f"got {list(latents.shape)}")

        # 3. Audio features: Whisper once per 30 s chunk, then the per-frame adapter windows
        with timer.stage("audio_features"):
            hidden, last = whisper_hidden_states(samples, self.feature_extractor, g.whisper_encoder, device)

        # 4. Conditioning: CLIP embedding and VAE latents of the reference (once each; official: twice each),
        # then the audio tokens and buckets of every frame
        with timer.stage("image_encode"):
            clip_embeds = g.image_encoder(reference.clip_pixels).to(dtype)  # [1, D]
            image_latents = g.vae_encoder(reference.ref_img).to(dtype)  # [1, 4, h, w]; mean, noise_aug_strength 0
        with timer.stage("audio_adapters"):
            cond_tokens, uncond_tokens, buckets = encode_audio(
                hidden, last, audio_frames, clip_embeds, g.audio2token, g.audio2bucket, dynamic_scale=dynamic_scale)
            del hidden, last
            ref_latents = image_latents * cfg.vae_scaling_factor
            # CFG rows [uncond, drop_audio, cond]: image latents and CLIP are zero for uncond only
            image_rows = torch.cat([torch.zeros_like(image_latents), image_latents, image_latents])  # [3, 4, h, w]
            clip_rows = torch.cat([torch.zeros_like(clip_embeds), clip_embeds, clip_embeds]).unsqueeze(1)  # [3,1,D]
            cond_tokens, uncond_tokens = cond_tokens.to(dtype), uncond_tokens.to(dtype)
            # the face mask of every UNet level, once per resolution (official: per layer and call)
            face_masks = [mask.to(device, dtype) for mask in level_face_masks(
                reference.face_mask, latent_shape[-2:], cfg.attention_levels)]
            fps_id = torch.tensor([config.fps], device=device)

        # 5. Initial latents: reference latents + sigma_max * noise (scheduler.add_noise at t[0])
        sigmas, timesteps = karras_schedule(self.scheduler_config, config.steps)
        if latents is None:
            noise = initial_noise(seed, tuple(reference.ref_img.shape), latent_shape, device, dtype)
        else:
            noise, seed = latents, None
        # diffusers add_noise: the schedule's sigmas are cast to the latents' dtype
        init = ref_latents.unsqueeze(1) + noise.to(device, dtype) * sigmas[0].to(device, dtype)

        def say(message: str, info: dict) -> None:
            print(f"sonic_rt: {message}", file=sys.stderr, flush=True)
            if events is not None:
                events("memory", info)

        where = f"at {width}x{height}; lower --min-resolution or free device memory"
        unet_memory = _MemoryFallback("windows per UNet call", True, "out of memory in a UNet call of one window "
                                      f"(3 x {config.frames_per_window} frames) {where}, or run in fp16", say)

        def guided_v(x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
            n, frames = x.shape[:2]
            # [n, T, 4, h, w] -> [3n, T, 8, h, w]: rows [uncond x n, drop-audio x n, cond x n], + image latents
            inp = scale_model_input(torch.cat([x] * 3), windows[0].sigma)
            image = image_rows.repeat_interleave(n, dim=0).unsqueeze(1).expand(-1, frames, -1, -1, -1)
            inp = torch.cat([inp, image], dim=2)
            uncond = uncond_tokens.expand(n, frames, -1, -1)
            audio_rows = torch.cat([uncond, uncond, *(cond_tokens[:, w.index] for w in windows)])  # [3n, T, 32, D]
            # per-window mean buckets; official builds added_time_ids in the working dtype (fp16 rounds them)
            ids = torch.stack([torch.cat([fps_id, buckets[0, w.index].mean(dim=0)]) for w in windows])  # [n, 3]
            time_ids = ids.to(dtype).float().repeat(3, 1)  # [3n, 3]
            v = g.unet(inp, windows[0].timestep.reshape(1).float(), clip_rows.repeat_interleave(n, dim=0),
                       audio_rows, time_ids, *face_masks)
            return combine_guidance(v, config.image_guidance_scale, config.audio_guidance_scale)

        def denoise(x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
            # windows are independent: on out-of-memory, fewer per call (same result)
            return unet_memory.run(len(windows), lambda part: guided_v(x[part], windows[part]))

        # 6 + 7. Denoising loop with time-aware position shift fusion; decode -> interpolate -> encode streamed
        # in VAE chunks, starting during the last step as soon as a chunk's frames are final.
        fps = OUTPUT_FPS if interpolate else OUTPUT_FPS / 2
        keep = [] if (return_frames or out_path is None) else None
        is_writer = self.distributed.rank == 0
        windows_per_step = len(window_starts(num_frames, config.frames_per_window, 0, config.shift_offset))
        with ExitStack() as stack:
            writer = None
            if out_path is not None and is_writer:
                writer = stack.enter_context(media.VideoWriter(out_path, fps=fps, width=width, height=height,
                                                               audio=self._audio_for_mux(audio, samples, stack)))
            bar = stack.enter_context(tqdm(total=config.steps * windows_per_step, desc="denoising", unit="window",
                                           disable=not progress, dynamic_ncols=True))
            output = _StreamingOutput(self, timer, interpolate, writer, keep, events, say, where)

            def on_window(window: Window) -> None:
                bar.update()
                if events is not None:
                    events("window", {"step": window.step, "index": window.index.tolist()})

            started = time.perf_counter()
            final = sample(init, sigmas, timesteps, config, denoise, on_window=on_window, scheduler=self._scheduler,
                           on_final_frames=output.push if is_writer else None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # stage boundary, as _Timer.stage does
            timer.add("denoise", time.perf_counter() - started - output.seconds)
            if is_writer:
                output.push(final, torch.ones(num_frames, dtype=torch.bool))
        timer.add("total", time.perf_counter() - t_start)
        return AnimateResult(path=out_path if is_writer else None, fps=float(fps), num_frames=output.num_out,
                             num_generated_frames=num_frames, width=width, height=height, timings=timer.ordered(),
                             frames=np.concatenate(keep) if keep and is_writer else None, seed=seed,
                             reference=reference, notes=self._notes(reference))

    def close(self) -> None:
        """Stop the scheduler's worker lanes and, under torchrun, leave the distributed job."""
        self._scheduler.close()
        self.distributed.shutdown()

    # ------------------------------------------------------------------------------------------------
    def prepare(self, image, audio, out, *, steps: int, frames_per_window: int, shift_offset: int,
                dynamic_scale: float, min_resolution: int | None, face_box, crop: bool) -> "PreparedInputs":
        """Step 1-2 of :meth:`animate`: check every input and prepare the reference, before any model runs
        (also used by the eager baseline, so both refuse the same inputs with the same errors).

        Raises:
            ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: as :meth:`animate`.
        """
        try:
            config = SamplingConfig(steps=steps, frames_per_window=frames_per_window, shift_offset=shift_offset)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not (isinstance(dynamic_scale, (int, float)) and math.isfinite(dynamic_scale) and dynamic_scale >= 0):
            raise InputError(f"dynamic_scale must be a finite number >= 0, got {dynamic_scale!r}")
        out_path = media.check_output_path(out) if out is not None else None
        image_source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        pil_image = media.load_image(image)
        samples, audio_source = self._load_audio(audio)
        num_frames = num_generated_frames(len(samples))
        if num_frames < 1:
            raise AudioError(f"audio is {len(samples) / SAMPLE_RATE:.3f} s long, shorter than one generated "
                             "frame (80 ms)", audio_source)
        # Reference image: detect the face, crop, mask, resize, CLIP pixels
        reference = prepare_reference(
            pil_image, self.face_detector, face_box=FaceBox.from_user(face_box) if face_box is not None else None,
            crop=crop, min_resolution=min_resolution or self.default_min_resolution, source=image_source)
        if reference.detector == "haar" and not self._said_fallback_detector:
            self._said_fallback_detector = True  # once per Runtime, after the input checks (errors stay one line)
            print(f"sonic_rt: {FALLBACK_DETECTOR_NOTE.format(root=self.source)}", file=sys.stderr, flush=True)
        return PreparedInputs(config, out_path, samples, len(samples) // SAMPLES_PER_AUDIO_FRAME, num_frames,
                              reference)

    def _notes(self, reference: Reference) -> tuple[str, ...]:
        """The :attr:`AnimateResult.notes` of a run on ``reference``."""
        return (FALLBACK_DETECTOR_NOTE.format(root=self.source),) if reference.detector == "haar" else ()

    def _check_batching(self, windows_per_call: int) -> None:
        """The UNet graph must take a batch of 3 x windows_per_call (engines are built for a range)."""
        batch = self.graphs.unet.spec.dims["batch"]
        if self.graphs.backend.is_exported and not batch.min <= 3 * windows_per_call <= batch.max:
            raise InputError(f"the engines in {self.source} take {batch.min // 3}..{batch.max // 3} windows per UNet "
                             f"call, {windows_per_call} were asked for; rebuild them with --windows "
                             f"1:{windows_per_call}:{windows_per_call} (python -m export.build_engines)")

    def _check_engine_shapes(self, width: int, height: int, frames_per_window: int) -> None:
        """Engines with optimisation profiles (TensorRT) accept only the shapes they were built for: say so
        before any model runs."""
        unet = self.graphs.unet
        if not unet.check_ranges:
            return
        factor = self.graphs.config.vae_scale_factor
        for dim, value in (("height", height // factor), ("width", width // factor), ("frames", frames_per_window)):
            rng = unet.spec.dims[dim]
            if not rng.min <= value <= rng.max:
                unit = "frames" if dim == "frames" else "pixels"
                scale = 1 if dim == "frames" else factor
                raise InputError(f"the engines in {self.source} take a {dim} of {rng.min * scale}..{rng.max * scale} "
                                 f"{unit}, this video needs {value * scale}; rebuild them with a wider range "
                                 "(python -m export.build_engines --resolution/--frames)")

    def _load_audio(self, audio) -> tuple[np.ndarray, str | None]:
        """Audio as float32 mono 16 kHz samples, plus the source path (None for arrays)."""
        if isinstance(audio, (str, os.PathLike)):
            media.probe_audio(audio)
            return media.load_audio(audio, SAMPLE_RATE), os.fspath(audio)
        array = np.asarray(audio)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
            raise AudioError(f"an audio array must be 1-D float mono at {SAMPLE_RATE} Hz, got shape "
                             f"{array.shape} dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise AudioError("the audio array contains NaN or infinite samples")
        return array.astype(np.float32), None

    @staticmethod
    def _audio_for_mux(audio, samples: np.ndarray, stack: ExitStack) -> str | os.PathLike:
        """The file to mux: the input file itself, or a temporary 16 kHz WAV of an input array."""
        if isinstance(audio, (str, os.PathLike)):
            return audio
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sonic_rt_audio_"))
        return media.write_wav(Path(tmp) / "audio.wav", samples, SAMPLE_RATE)

class _StreamingOutput:
    """Decode -> interpolate -> encode in VAE chunks of 8 frames, in order, as soon as a chunk's frames are final.

    :meth:`push` is called by the sampler during the last step with the frames that are final so far, and
    once more at the end with all of them. With interpolation the output is [f0, m01, f1, ...]: each chunk
    starts with the middle between the previous chunk's last frame and its own first, so the whole video is
    2N-1 frames.
    """

    def __init__(self, runtime: "Runtime", timer: _Timer, interpolate: bool, writer, keep: list | None, events,
                 say, where: str):
        self.graphs, self.timer, self.interpolate = runtime.graphs, timer, interpolate
        self.writer, self.keep, self.events = writer, keep, events
        # on out-of-memory: fewer frames per VAE call (changes frames near chunk edges), fewer RIFE pairs (exact)
        self.decode_memory = _MemoryFallback("frames per VAE decode call", False,
                                             f"out of memory decoding one frame {where}", say)
        self.rife_memory = _MemoryFallback("frame pairs per RIFE call", True,
                                           f"out of memory interpolating one frame pair {where}", say)
        self.chunk_size = self.graphs.vae_decoder.spec.dims["frames"].max  # official decode_chunk_size (8)
        self.next_frame = 0       # first frame not decoded yet
        self.previous = None      # last decoded frame of the previous chunk (for RIFE)
        self.num_out = 0
        self.seconds = 0.0        # time spent here (taken out of the denoise stage)

    def push(self, latents: torch.Tensor, ready: torch.Tensor) -> None:
        """Decode every whole chunk from :attr:`next_frame` on whose frames are all ``ready`` ([N] bool)."""
        started = time.perf_counter()
        num_frames = latents.shape[1]
        ready = ready.cpu()
        while self.next_frame < num_frames:
            end = min(self.next_frame + self.chunk_size, num_frames)
            if not bool(ready[self.next_frame:end].all()):
                break
            self._chunk(latents[0, self.next_frame:end])
            self.next_frame = end
        self.seconds += time.perf_counter() - started

    def _chunk(self, z: torch.Tensor) -> None:
        timer, g = self.timer, self.graphs
        with timer.stage("decode"):
            z = (1 / g.config.vae_scaling_factor) * z  # official decode_latents: 1 / 0.18215 * z
            decoded = self.decode_memory.run(len(z), lambda part: g.vae_decoder(z[part]))  # [n, 3, H, W]
            frames = (decoded.float() * 0.5 + 0.5).clamp(0, 1)
        out = frames
        if self.interpolate:
            with timer.stage("interpolate"):
                seq = frames if self.previous is None else torch.cat([self.previous, frames])
                middles = self.rife_memory.run(  # RIFE in fp32, pairs batched
                    len(seq) - 1, lambda part: g.rife(seq[:-1][part], seq[1:][part])).clamp(0, 1)
                # interleave: [m(prev,f0), f0, m(f0,f1), f1, ...] (no leading middle for the first chunk)
                out = torch.stack([middles, seq[1:]], dim=1).flatten(0, 1)
                if self.previous is None:
                    out = torch.cat([frames[:1], out])
                self.previous = frames[-1:]
        generated, output = _to_uint8(frames), _to_uint8(out) if self.interpolate else None
        output = generated if output is None else output
        if self.keep is not None:
            self.keep.append(generated)
        if self.writer is not None:
            with timer.stage("encode"):
                self.writer.write(output)
        self.num_out += len(output)
        if self.events is not None:
            self.events("frames", {"generated": self.next_frame + len(generated), "written": self.num_out})


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] float in [0, 1] -> uint8 [n, H, W, 3]; truncation as official ``(x*255).astype(uint8)``."""
    return (frames * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
