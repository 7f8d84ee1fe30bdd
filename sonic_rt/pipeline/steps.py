"""Steps 2-7 of the pipeline, each a function of the loaded :class:`~sonic_rt.pipeline.components.Components`.

Step 1 (:func:`~sonic_rt.pipeline.inputs.check_inputs`) checks the inputs; then

2. :func:`audio_features`: Whisper once per 30 s chunk,
3. :func:`encode_reference`: CLIP embedding and VAE latents of the reference (once each; official: twice),
4. :func:`encode_audio`: audio tokens and motion buckets of every frame (audio2token, audio2bucket),
5. :func:`guided_denoiser`: the guided UNet over the CFG rows (:mod:`sonic_rt.pipeline.guidance`),
6. :func:`prepare_latents`: reference latents + sigma_max * noise (the official seeded noise),
7. :func:`open_output` and :func:`denoise`: the shift-fusion loop, with decode -> interpolate -> encode
   streamed in VAE chunks from the last step on (:mod:`sonic_rt.pipeline.output`).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import audio_features as _audio
from .. import media
from ..face import Reference
from ..models.unet import level_face_masks
from ..sampling import Window, initial_noise, karras_schedule, sample, window_starts
from ..scheduler import WindowScheduler
from .components import Components
from .guidance import GuidedDenoiser
from .inputs import PreparedInputs
from .memory import MemoryFallback, Notify
from .options import AnimateOptions
from .output import StreamingOutput, audio_for_mux, output_fps
from .timing import StageTimer

Events = Callable[[str, dict], None]


@dataclass
class AudioFeatures:
    """Whisper's states of the whole audio (:func:`sonic_rt.audio_features.whisper_hidden_states`).

    Attributes:
        hidden: [1, 1500 n, layers+1, d_model] every hidden state stacked, fp32; last: [1, 1500 n, 1, d_model].
    """

    hidden: torch.Tensor
    last: torch.Tensor


@dataclass
class ReferenceLatents:
    """The encoded reference image.

    Attributes:
        clip_embeds: [1, D_clip] CLIP ``image_embeds``, working dtype.
        image_latents: [1, 4, h, w] VAE latent-distribution mean (``noise_aug_strength`` 0), working dtype;
            the UNet's conditioning channels.
        ref_latents: ``image_latents * vae_scaling_factor`` (0.18215): the initial latents before noise.
    """

    clip_embeds: torch.Tensor
    image_latents: torch.Tensor
    ref_latents: torch.Tensor


@dataclass
class AudioConditioning:
    """The audio conditioning of every generated frame (:func:`sonic_rt.audio_features.encode_audio`).

    Attributes:
        cond_tokens: [1, N, 32, D] fp32; uncond_tokens: [1, 1, 32, D] fp32 (audio2token of the zero window);
        buckets: [1, N, 2] fp32 motion buckets, ``(out * 16 + 16) * dynamic_scale``.
    """

    cond_tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    buckets: torch.Tensor


@dataclass
class InitialLatents:
    """Where sampling starts.

    Attributes:
        latents: [1, N, 4, h, w] working dtype: ``ref_latents + sigma_max * noise`` (diffusers ``add_noise``).
        sigmas: [steps + 1] float32 Karras sigmas; timesteps: [steps] float32 UNet timesteps.
        seed: the seed the noise was drawn from, None when the caller gave the noise.
    """

    latents: torch.Tensor | None
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    seed: int | None

    def take_latents(self) -> torch.Tensor:
        """The latents, handed over: this object no longer holds them (so whoever takes them can free them)."""
        latents, self.latents = self.latents, None
        return latents


def audio_features(c: Components, samples: np.ndarray) -> AudioFeatures:
    """Step 2: Whisper once per 30 s chunk of ``samples`` (float32 mono 16 kHz, [S])."""
    hidden, last = _audio.whisper_hidden_states(samples, c.feature_extractor, c.graphs.whisper_encoder, c.device)
    return AudioFeatures(hidden, last)


def encode_reference(c: Components, reference: Reference) -> ReferenceLatents:
    """Step 3: CLIP embedding and VAE latents of the reference, once each (official: twice each)."""
    clip_embeds = c.graphs.image_encoder(reference.clip_pixels).to(c.dtype)  # [1, D]
    image_latents = c.graphs.vae_encoder(reference.ref_img).to(c.dtype)  # [1, 4, h, w]; mean, noise_aug_strength 0
    return ReferenceLatents(clip_embeds, image_latents, image_latents * c.graphs.config.vae_scaling_factor)


def encode_audio(
    c: Components, features: AudioFeatures, audio_frames: int, clip_embeds: torch.Tensor, dynamic_scale: float
) -> AudioConditioning:
    """Step 4: audio tokens (audio2token) and motion buckets (audio2bucket, with the CLIP embedding) of every
    frame, batched over frames; ``audio_frames`` = S // 640."""
    cond, uncond, buckets = _audio.encode_audio(
        features.hidden,
        features.last,
        audio_frames,
        clip_embeds,
        c.graphs.audio2token,
        c.graphs.audio2bucket,
        dynamic_scale=dynamic_scale,
    )
    return AudioConditioning(cond, uncond, buckets)


def guided_denoiser(
    c: Components, inputs: PreparedInputs, reference: ReferenceLatents, audio: AudioConditioning, say: Notify
) -> GuidedDenoiser:
    """Step 5: the guided UNet of this video on each device: its CFG rows, the face mask of every UNet level (once
    per resolution; official: per layer and call), the out-of-memory policy (fewer windows per call) and, under
    ``low_memory``, the UNet's feed-forward chunking for this window length."""
    config = inputs.config
    c.prepare_unet(config.frames_per_window)  # low_memory: the feed-forward in chunks of frames
    face_masks = [
        mask.to(c.device, c.dtype)
        for mask in level_face_masks(
            inputs.reference.face_mask, inputs.latent_shape[-2:], c.graphs.config.attention_levels
        )
    ]
    memory = MemoryFallback(
        "windows per UNet call",
        True,
        "out of memory in a UNet call of one window "
        f"(3 x {config.frames_per_window} frames) {inputs.memory_hint()}, or run in fp16",
        say,
    )
    return GuidedDenoiser(
        c.unets,  # the UNet on each of the scheduler's devices
        image_latents=reference.image_latents,
        clip_embeds=reference.clip_embeds,
        cond_tokens=audio.cond_tokens,
        uncond_tokens=audio.uncond_tokens,
        buckets=audio.buckets,
        face_masks=face_masks,
        fps=config.fps,
        image_guidance_scale=config.image_guidance_scale,
        audio_guidance_scale=config.audio_guidance_scale,
        memory=memory,
    )


def prepare_latents(
    c: Components, inputs: PreparedInputs, reference: ReferenceLatents, seed: int, latents: torch.Tensor | None = None
) -> InitialLatents:
    """Step 6: the noise schedule and the initial latents, ``ref_latents + noise * sigma_max``.

    Args:
        seed: draws the official seeded noise (:func:`sonic_rt.sampling.initial_noise`) when ``latents`` is None.
        latents: the noise ``[1, N, 4, h, w]`` to use instead (shape checked by ``check_inputs``).
    """
    sigmas, timesteps = karras_schedule(c.noise_schedule_config, inputs.config.steps)
    if latents is None:
        noise = initial_noise(seed, tuple(inputs.reference.ref_img.shape), inputs.latent_shape, c.device, c.dtype)
    else:
        noise, seed = latents, None
    # diffusers add_noise: the schedule's sigmas are cast to the latents' dtype
    init = reference.ref_latents.unsqueeze(1) + noise.to(c.device, c.dtype) * sigmas[0].to(c.device, c.dtype)
    return InitialLatents(init, sigmas, timesteps, seed)


def open_output(
    stack: ExitStack,
    c: Components,
    inputs: PreparedInputs,
    options: AnimateOptions,
    audio,
    timer: StageTimer,
    events: Events | None,
    say: Notify,
    write: bool,
    started: float | None = None,
) -> StreamingOutput:
    """Step 7a: the streamed output of this video; its mp4 writer (when ``write`` and there is an output path)
    and its HLS writer (the ``hls`` option) are entered on ``stack``, so the mp4 appears atomically when the
    stack closes without error, and a failed run removes the HLS stream.

    Args:
        audio: what the caller passed as audio (muxed as it is, or as a temporary WAV of an array).
        write: whether this process writes (rank 0 of a distributed job).
        started: when the run started (``time.perf_counter()``), for the ``frames`` events' elapsed seconds.
    """
    paste = None
    if options.paste_back:
        from ..paste_back import PasteBack

        paste = PasteBack.from_reference(
            inputs.image,
            inputs.reference,
            device=c.device,
            reuse_output=True,  # safe: the writer encodes each chunk before the next one is composited
            max_output_side=options.max_output_side,
        )
    width, height = paste.output_size if paste is not None else inputs.size
    fps = output_fps(options.interpolate)
    writers = []
    if inputs.out_path is not None and write:
        audio_file = audio_for_mux(audio, inputs.samples, stack)
        writers.append(
            stack.enter_context(
                media.VideoWriter(inputs.out_path, fps=fps, width=width, height=height, audio=audio_file)
            )
        )
    if inputs.hls_path is not None and write:
        writers.append(
            stack.enter_context(
                media.HlsWriter(inputs.hls_path, fps=fps, width=width, height=height, samples=inputs.samples)
            )
        )
    keep = [] if (options.return_frames or inputs.out_path is None) else None
    return StreamingOutput(
        c.graphs,
        timer,
        options.interpolate,
        writers,
        keep,
        events,
        say,
        inputs.memory_hint(),
        paste=paste,
        decode_frames=c.decode_frames,
        started=started,
    )


def denoise(
    c: Components,
    scheduler: WindowScheduler,
    init: InitialLatents,
    inputs: PreparedInputs,
    denoiser: GuidedDenoiser,
    output: StreamingOutput,
    timer: StageTimer,
    *,
    progress: bool,
    events: Events | None,
    write: bool,
) -> torch.Tensor:
    """Step 7b: the shift-fusion loop (:func:`sonic_rt.sampling.sample`) with a progress bar (windows, and the
    seconds of video written); finished chunks go to ``output`` (when ``write``) as soon as their frames are
    final: from early on in the wavefront order, during the last step in the step order. The time not spent in
    ``output`` is the ``denoise`` stage.

    Returns:
        the final latents [1, N, 4, h, w], working dtype.
    """
    from tqdm.auto import tqdm

    config = inputs.config
    windows_per_step = len(window_starts(inputs.num_frames, config.frames_per_window, 0, config.shift_offset))
    with tqdm(
        total=config.steps * windows_per_step, desc="denoising", unit="window", disable=not progress, dynamic_ncols=True
    ) as bar:

        def on_window(window: Window) -> None:
            bar.update()
            if events is not None:
                events("window", {"step": window.step, "index": window.index.tolist()})

        def on_final(latents: torch.Tensor, ready: torch.Tensor) -> None:
            written = output.num_out
            output.push(latents, ready)
            if output.num_out > written:
                bar.set_postfix_str(f"{output.num_out / float(output.fps):.1f} s of video written", refresh=False)

        started = time.perf_counter()
        final = sample(
            init.take_latents(),  # the run owns them now: a torchrun rank keeps only its own frames' latents
            init.sigmas,
            init.timesteps,
            config,
            denoiser,
            on_window=on_window,
            scheduler=scheduler,
            on_final_frames=on_final if write else None,
        )
        if c.device.type == "cuda":
            torch.cuda.synchronize(c.device)  # stage boundary, as StageTimer.stage does
        timer.add("denoise", time.perf_counter() - started - output.seconds)
    return final


__all__ = [
    "AudioFeatures",
    "ReferenceLatents",
    "AudioConditioning",
    "InitialLatents",
    "audio_features",
    "encode_reference",
    "encode_audio",
    "guided_denoiser",
    "prepare_latents",
    "open_output",
    "denoise",
]
