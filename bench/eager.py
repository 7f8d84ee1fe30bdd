"""The eager baseline: Sonic's official inference structure and cost, in PyTorch, over the runtime's weights.

Every speedup in ``bench/`` is a ratio against this pipeline. It computes the same function as
:meth:`sonic_rt.Runtime.animate` (same weights, same sampler math, same output frames up to floating-point
reduction order) but does the work the way the official ``sonic.py`` + ``SonicPipeline.__call__`` do it
(docs/official_algorithm.md sections 1-6 and 10):

- **Whisper twice** per 30 s chunk: once with ``output_hidden_states=True``, once more for
  ``last_hidden_state`` (section 2.6).
- **Per-frame adapter loops**: ``audio2token`` on each frame's window, ``audio2token(zeros)`` recomputed for
  every frame, ``audio2bucket`` one frame at a time (sections 2.7-2.8).
- **CLIP twice and the VAE encoder twice** on the same reference image (sections 2.4-2.5).
- **Per-frame copies** of the conditioning: image latents ``[3, N, 4, h, w]``, CLIP embeddings
  ``[3, N, 1, D]`` and audio tokens ``[3, N, 32, D]`` for the whole video (section 5).
- **Windows one after another**, one UNet call each (batch 3 x 25), with diffusers' own linear layers and
  temporal ``conv3d`` (not the runtime's batch-invariant CPU forms), with the diffusers-style attention
  processors: full SDPA over the single CLIP token, the temporal audio context repeated and projected at
  every spatial position, and the face mask bicubic-downsampled in every spatial layer of every call
  (:class:`sonic_rt.models.unet.AudioAttention` REFERENCE with ``face_mask=``; section 2.3).
- **The whole video decoded and held** (8-frame VAE chunks moved to the CPU as fp32), then moved back to
  the device for RIFE, **one pair at a time**, the results stacked, then written (sections 2.4, 2.11).

What it does not copy (each makes the baseline slightly *faster* than the official code, so speedups
against it are conservative): the ``.crop.png`` written and re-read, librosa's loading (PyAV + soxr here,
same samples), and the second video encode (the official code writes a silent mp4 with imageio and
re-encodes it with ffmpeg to mux the audio; here one encode writes video and audio).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import torch

from sonic_rt import media
from sonic_rt.audio_features import (
    AUDIO_FRAMES_PER_FRAME,
    BUCKET_OFFSET,
    BUCKET_PAD,
    BUCKET_SCALE,
    BUCKET_WINDOW,
    SAMPLE_RATE,
    TOKEN_PAD,
    TOKEN_WINDOW,
    TOKENS_PER_FRAME,
    WHISPER_CHUNK_SAMPLES,
)
from sonic_rt.errors import InputError
from sonic_rt.models.batch_invariant import plain_layers
from sonic_rt.pipeline.options import AnimateOptions
from sonic_rt.pipeline.output import audio_for_mux, output_fps, to_uint8
from sonic_rt.pipeline.timing import StageTimer
from sonic_rt.runtime import AnimateResult, Runtime
from sonic_rt.sampling import combine_guidance, euler_v_step, initial_noise, karras_schedule, window_indices

MEL_FRAMES_PER_CHUNK = 3000  # Whisper input frames per 30 s (official encoder window)


class EagerPipeline:
    """Sonic's official inference structure over the modules of a torch-backend :class:`~sonic_rt.Runtime`.

    Args:
        runtime: a ``Runtime`` over a weights directory (``runtime.backend == "torch"``). Its modules are
            used as they are (nothing is copied or reloaded), so the baseline and the runtime compute the
            same function; the runtime's own attention setting is untouched (the official structure is
            chosen per call).

    Raises:
        InputError: ``runtime`` runs exported engines (the baseline needs the PyTorch modules).
    """

    def __init__(self, runtime: Runtime):
        if runtime.graphs.backend.is_exported:
            raise InputError(
                f"the eager baseline needs a torch-backend Runtime (weights), not {runtime.backend} "
                f"engines ({runtime.source})"
            )
        g = runtime.graphs
        self.runtime = runtime
        self.device, self.dtype, self.config = runtime.device, runtime.dtype, g.config
        self.whisper = g.whisper_encoder.module.encoder  # transformers WhisperEncoder, fp32
        self.image_encoder = g.image_encoder.module.image_encoder  # CLIPVisionModelWithProjection
        self.vae = g.vae_encoder.module.vae  # AutoencoderKLTemporalDecoder
        self.audio2token = g.audio2token.module.audio2token  # fp32
        self.audio2bucket = g.audio2bucket.module.audio2bucket  # fp32
        self.unet = g.unet.module  # SonicUNet
        self.rife = g.rife.module.rife  # IFNet, fp32

    @torch.inference_mode()
    def animate(
        self, image, audio, out: str | os.PathLike | None = None, options: AnimateOptions | None = None, **overrides
    ) -> AnimateResult:
        """Animate like :meth:`sonic_rt.Runtime.animate` (same options, defaults and result), the official way.

        ``options`` and ``**overrides`` are those of the runtime (:class:`sonic_rt.AnimateOptions`); there is
        no ``latents`` or ``events``. ``timings`` has the runtime's stages (:data:`sonic_rt.pipeline.timing.STAGES`),
        each covering the official work of that stage (e.g. ``audio_features`` holds both Whisper calls,
        ``decode`` the whole-video decode and its CPU copies).

        Raises:
            TypeError: an override that is not an option.
            ImageError, AudioError, FaceNotFoundError, OutputPathError, InputError: bad input, before any
            model runs; no output file is left behind.
        """
        options = AnimateOptions.resolve(options, overrides, "EagerPipeline.animate()")
        timer = StageTimer(self.device)
        t_start = time.perf_counter()

        # 1. Inputs, face crop and reference tensors (the runtime's own checks: same errors)
        with timer.stage("preprocess"):
            prepared = self.runtime.check_inputs(image, audio, out, options)
            out_path, samples, reference = prepared.out_path, prepared.samples, prepared.reference
            width, height = reference.size
        with timer.stage("audio_features"):
            hidden, last = self._whisper(samples)
        with timer.stage("image_encode"):
            bucket_clip_embeds, clip_embeds, ref_latents, image_latents = self._image_encode(reference)
        with timer.stage("audio_adapters"):
            conditioning = self._audio_adapters(
                hidden, last, prepared, bucket_clip_embeds, clip_embeds, image_latents, options.dynamic_scale
            )
        latents = self._denoise(ref_latents, prepared, conditioning, options, timer)
        with timer.stage("decode"):
            video = self._decode(latents)  # [N, 3, H, W] fp32 on the CPU
            generated = to_uint8(video) if (options.return_frames or out_path is None) else None
        if options.interpolate:
            with timer.stage("interpolate"):
                video = self._interpolate(video)

        # 8. Encode the whole video at once (uint8 truncation), audio muxed
        fps = output_fps(options.interpolate)
        if out_path is not None:
            with timer.stage("encode"), ExitStack() as stack:
                writer = stack.enter_context(
                    media.VideoWriter(
                        out_path, fps=fps, width=width, height=height, audio=audio_for_mux(audio, samples, stack)
                    )
                )
                writer.write(to_uint8(video))
        timer.add("total", time.perf_counter() - t_start)
        return AnimateResult(
            path=out_path,
            fps=float(fps),
            num_frames=len(video),
            num_generated_frames=prepared.num_frames,
            width=width,
            height=height,
            timings=timer.ordered(),
            frames=generated,
            seed=options.seed,
            reference=reference,
        )

    def _whisper(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """2. Mel features per 30 s chunk, concatenated; the encoder twice per 3000-frame window.

        Returns ``hidden [1, 1500 n, 5, C]`` (every layer's states) and ``last [1, 1500 n, 1, C]``."""
        features = torch.cat(
            [
                self.runtime.feature_extractor(
                    samples[s : s + WHISPER_CHUNK_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt"
                ).input_features
                for s in range(0, max(len(samples), 1), WHISPER_CHUNK_SAMPLES)
            ],
            dim=-1,
        )  # [1, 80, 3000 n]
        hidden, last = [], []
        for s in range(0, features.shape[-1], MEL_FRAMES_PER_CHUNK):
            x = features[..., s : s + MEL_FRAMES_PER_CHUNK].to(self.device)
            hidden.append(torch.stack(self.whisper(x, output_hidden_states=True).hidden_states, dim=2))
            last.append(self.whisper(x).last_hidden_state.unsqueeze(-2))
        return torch.cat(hidden, dim=1), torch.cat(last, dim=1)

    def _image_encode(self, reference):
        """3. CLIP for audio2bucket (sonic.test), then CLIP again and the VAE encoder twice (the pipeline).

        Returns the bucket and conditioning CLIP embeddings ``[1, D]``, the initial latents ``[1, 4, h, w]``
        (scaled mean) and the conditioning image latents ``[1, 4, h, w]`` (mode, noise_aug_strength 0)."""
        clip_pixels = reference.clip_pixels.to(self.device, self.dtype)
        bucket_clip_embeds = self.image_encoder(clip_pixels).image_embeds
        clip_embeds = self.image_encoder(clip_pixels).image_embeds
        ref_img = reference.ref_img.to(self.device, self.dtype)
        ref_latents = self.vae.encode(ref_img).latent_dist.mean * self.config.vae_scaling_factor
        image_latents = self.vae.encode(ref_img).latent_dist.mode()
        return bucket_clip_embeds, clip_embeds, ref_latents, image_latents

    def _audio_adapters(self, hidden, last, prepared, bucket_clip_embeds, clip_embeds, image_latents, dynamic_scale):
        """4. audio2token / audio2bucket one frame at a time, the zero window re-encoded for every frame, then
        per-frame copies of the conditioning for the whole video, CFG rows ``[uncond, drop_audio, cond]``.

        Returns a dict: ``audio_prompts [3, N, 32, D]``, ``image_latents [3, N, 4, h, w]``,
        ``image_embeddings [3, N, 1, D]``, ``motion_buckets [1, N, 2]`` fp32, ``face_mask [1, 1, H, W]``."""
        dtype, num_frames, audio_frames = self.dtype, prepared.num_frames, prepared.audio_frames
        prompts = _pad_tokens(hidden[:, : audio_frames * 2], TOKEN_PAD)  # [1, 2L+10, 5, C]
        last_prompts = _pad_tokens(last[:, : audio_frames * 2], BUCKET_PAD)  # [1, 2L+50, 1, C]
        cond, uncond, buckets = [], [], []
        for i in range(audio_frames // AUDIO_FRAMES_PER_FRAME):
            audio_clip = prompts[:, TOKENS_PER_FRAME * i : TOKENS_PER_FRAME * i + TOKEN_WINDOW].unsqueeze(0)
            bucket_clip = last_prompts[:, TOKENS_PER_FRAME * i : TOKENS_PER_FRAME * i + BUCKET_WINDOW].unsqueeze(0)
            cond.append(self.audio2token(audio_clip))  # [1, 1, 32, D]
            uncond.append(self.audio2token(torch.zeros_like(audio_clip)))
            bucket = self.audio2bucket(bucket_clip, bucket_clip_embeds.float())  # [1, 1, 2, 1]
            buckets.append(bucket * BUCKET_SCALE + BUCKET_OFFSET)
        cond, uncond = torch.cat(cond, dim=1).to(dtype), torch.cat(uncond, dim=1).to(dtype)  # [1, N, 32, D]
        frame_latents = image_latents.unsqueeze(1).repeat(1, num_frames, 1, 1, 1)
        frame_embeds = clip_embeds.to(dtype)[:, None, None].repeat(1, num_frames, 1, 1)  # [1, N, 1, D]
        return {
            "audio_prompts": torch.cat([uncond, uncond, cond]),
            "image_latents": torch.cat([torch.zeros_like(frame_latents), frame_latents, frame_latents]),
            "image_embeddings": torch.cat([torch.zeros_like(frame_embeds), frame_embeds, frame_embeds]),
            "motion_buckets": torch.cat(buckets, dim=1)[..., 0] * dynamic_scale,
            "face_mask": prepared.reference.face_mask.to(self.device, dtype),
        }

    def _denoise(self, ref_latents, prepared, conditioning, options, timer) -> torch.Tensor:
        """5. Initial latents (scheduler.add_noise at sigma_max), then the windows one after another, one UNet
        call each. Returns the final latents ``[1, N, 4, h, w]``."""
        from tqdm.auto import tqdm

        device, dtype, cfg, config = self.device, self.dtype, self.config, prepared.config
        num_frames, reference = prepared.num_frames, prepared.reference
        width, height = reference.size
        sigmas, timesteps = karras_schedule(self.runtime.noise_schedule_config, config.steps)
        latent_shape = (
            1,
            num_frames,
            cfg.latent_channels,
            height // cfg.vae_scale_factor,
            width // cfg.vae_scale_factor,
        )
        noise = initial_noise(options.seed, tuple(reference.ref_img.shape), latent_shape, device, dtype)
        latents = ref_latents.unsqueeze(1) + noise * sigmas[0].to(device, dtype)
        c = conditioning
        with timer.stage("denoise"):
            windows_per_step = len(window_indices(num_frames, config.frames_per_window, 0, config.shift_offset))
            bar = tqdm(
                total=config.steps * windows_per_step,
                desc="eager denoising",
                unit="window",
                disable=not options.progress,
                dynamic_ncols=True,
            )
            with bar:
                for i in range(config.steps):
                    sigma, sigma_next = sigmas[i], sigmas[i + 1]  # fp32 0-dim tensors, as diffusers
                    acc = torch.zeros_like(latents)
                    count = torch.zeros(1, num_frames, 1, 1, 1, dtype=latents.dtype, device=device)
                    for idx in window_indices(num_frames, config.frames_per_window, i, config.shift_offset):
                        idx = torch.tensor(idx, device=device)
                        x = latents[:, idx]  # [1, T, 4, h, w]
                        inp = torch.cat([x] * 3) / ((sigma**2 + 1) ** 0.5)
                        inp = torch.cat([inp, c["image_latents"][:, idx]], dim=2)  # [3, T, 8, h, w]
                        b = c["motion_buckets"][0, idx].mean(dim=0)  # the window's 2 buckets
                        ids = torch.tensor([[config.fps, b[0], b[1]]], dtype=dtype, device=device)
                        with plain_layers():  # diffusers' own linear and conv3d, as the official code
                            v = self.unet(
                                inp,
                                timesteps[i].reshape(1).to(device),
                                c["image_embeddings"][:, idx[0]],
                                c["audio_prompts"][:, idx],
                                ids.float().repeat(3, 1),
                                face_mask=c["face_mask"],
                            )
                        v = combine_guidance(v, config.image_guidance_scale, config.audio_guidance_scale)
                        stepped = euler_v_step(v, x, sigma, sigma_next).to(latents.dtype)
                        acc.index_add_(1, idx, stepped)
                        count.index_add_(1, idx, count.new_ones(1, len(idx), 1, 1, 1))
                        bar.update()
                    latents = acc / count
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """6. The whole video decoded in 8-frame chunks, each moved to the CPU as fp32, and held.

        Returns ``[N, 3, H, W]`` fp32 in [0, 1] on the CPU."""
        chunk = self.runtime.graphs.vae_decoder.spec.dims["frames"].max  # official decode_chunk_size (8)
        decoded = []
        for s in range(0, latents.shape[1], chunk):
            z = 1 / self.config.vae_scaling_factor * latents[0, s : s + chunk]
            decoded.append(self.vae.decode(z, num_frames=len(z)).sample.cpu().float())
        return (torch.cat(decoded) * 0.5 + 0.5).clamp(0, 1)

    def _interpolate(self, video: torch.Tensor) -> torch.Tensor:
        """7. RIFE: the whole video back on the device, one pair at a time, the results stacked.

        ``video [N, 3, H, W]`` -> ``[2N-1, 3, H, W]`` on the CPU."""
        video = video.to(self.device)
        frames = [video[0]]
        for k in range(len(video) - 1):
            middle = self.rife(video[k : k + 1], video[k + 1 : k + 2]).clamp(0, 1)
            frames += [middle[0], video[k + 1]]
        return torch.stack(frames).cpu()


def _pad_tokens(states: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Zero tokens before and after along dim 1 (official ``audio_prompts`` / ``last_audio_prompts`` padding)."""
    before = states.new_zeros(states.shape[0], pad[0], *states.shape[2:])
    after = states.new_zeros(states.shape[0], pad[1], *states.shape[2:])
    return torch.cat([before, states, after], dim=1)


__all__ = ["EagerPipeline"]
