"""The guided UNet: the latents of some windows in, the classifier-free-guided v-prediction out.

Sonic's 3-way guidance runs the UNet on three rows per window (docs/official_algorithm.md section 5):

=============  ====================  ===========  ===================================
row            image latents (cat)   CLIP token   audio tokens
=============  ====================  ===========  ===================================
uncond         zeros                 zeros        audio2token(zero window)
drop_audio     reference latents     CLIP embed   audio2token(zero window)
cond           reference latents     CLIP embed   the window's audio tokens
=============  ====================  ===========  ===================================

and combines them as ``u + g1 (d - u) + g2 (c - d)`` (:func:`sonic_rt.sampling.combine_guidance`). With g
windows per UNet call the batch is 3g rows: ``[uncond x g, drop_audio x g, cond x g]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import Window, combine_guidance, scale_model_input
from .memory import MemoryFallback


@dataclass(frozen=True)
class UNetRows:
    """The UNet inputs of g windows (3g rows, in the order of the UNet graph's inputs).

    Attributes:
        sample: [3g, T, 8, h, w] scaled latents concatenated with the image latents, working dtype.
        timestep: [1] float32 UNet timestep.
        clip: [3g, 1, D_clip] CLIP image embeddings, working dtype.
        audio: [3g, T, 32, D] audio tokens, working dtype.
        time_ids: [3g, 3] float32 ``added_time_ids`` (fps, the window's mean buckets), rounded through the
            working dtype as the official code builds them.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    clip: torch.Tensor
    audio: torch.Tensor
    time_ids: torch.Tensor


class GuidedDenoiser:
    """``denoiser(x, windows) -> v``: the guided v-prediction of g windows, the ``denoise`` callable of
    :func:`sonic_rt.sampling.sample`; also :class:`~sonic_rt.scheduler.Placeable`: it runs on any of its UNet
    replicas (one per scheduler device) and by guidance rows, the inputs built on the first device and the v
    returned there.

    Args:
        unet: the UNet graph ``(sample, timestep, clip, audio, time_ids, *face_masks) -> v``, or one per device
            (the first where the latents live).
        image_latents: [1, 4, h, w] VAE latents of the reference (distribution mean, unscaled), working dtype.
        clip_embeds: [1, D_clip] CLIP image embedding, working dtype.
        cond_tokens: [1, N, 32, D] audio tokens of every frame; uncond_tokens: [1, 1, 32, D] (audio2token of
            the zero window); both are cast to the working dtype here.
        buckets: [1, N, 2] float32 motion buckets of every frame (already times ``dynamic_scale``).
        face_masks: the face mask of every UNet attention level ([1, 1, h_l, w_l] each, working dtype).
        fps: the UNet's fps conditioning (official 12.5), the first ``added_time_id``.
        image_guidance_scale, audio_guidance_scale: g1 and g2 (official 2.0 and 7.5).
        memory: the out-of-memory policy of a UNet call (fewer windows per call on failure: same result),
            or None to call the UNet once per group.
    """

    guidance_rows = 3  # [uncond, drop_audio, cond]

    def __init__(
        self,
        unet,
        *,
        image_latents: torch.Tensor,
        clip_embeds: torch.Tensor,
        cond_tokens: torch.Tensor,
        uncond_tokens: torch.Tensor,
        buckets: torch.Tensor,
        face_masks: list[torch.Tensor],
        fps: float,
        image_guidance_scale: float,
        audio_guidance_scale: float,
        memory: MemoryFallback | None = None,
    ):
        dtype, device = image_latents.dtype, image_latents.device
        self.unets = list(unet) if isinstance(unet, (list, tuple)) else [unet]
        self.unet, self.dtype, self.device, self.memory = self.unets[0], dtype, device, memory
        self.scales = (image_guidance_scale, audio_guidance_scale)
        # CFG rows [uncond, drop_audio, cond]: image latents and CLIP are zero for uncond only
        self.image_rows = torch.cat([torch.zeros_like(image_latents), image_latents, image_latents])  # [3, 4, h, w]
        self.clip_rows = torch.cat([torch.zeros_like(clip_embeds), clip_embeds, clip_embeds]).unsqueeze(1)  # [3,1,D]
        self.cond_tokens, self.uncond_tokens = cond_tokens.to(dtype), uncond_tokens.to(dtype)
        self.buckets = buckets
        self.face_masks = [[m.to(getattr(u, "device", device)) for m in face_masks] for u in self.unets]  # per replica
        self.fps_id = torch.tensor([fps], device=device)

    @property
    def replicas(self) -> int:
        return len(self.unets)

    def rows(self, x: torch.Tensor, windows: list[Window]) -> UNetRows:
        """The UNet inputs of windows ``windows`` whose latents are ``x`` [g, T, 4, h, w] (same step)."""
        n, frames = x.shape[:2]
        # [n, T, 4, h, w] -> [3n, T, 8, h, w]: rows [uncond x n, drop-audio x n, cond x n], + image latents
        sample = scale_model_input(torch.cat([x] * 3), windows[0].sigma)
        image = self.image_rows.repeat_interleave(n, dim=0).unsqueeze(1).expand(-1, frames, -1, -1, -1)
        sample = torch.cat([sample, image], dim=2)
        uncond = self.uncond_tokens.expand(n, frames, -1, -1)
        audio = torch.cat([uncond, uncond, *(self.cond_tokens[:, w.index] for w in windows)])  # [3n, T, 32, D]
        # per-window mean buckets; official builds added_time_ids in the working dtype (fp16 rounds them)
        ids = torch.stack([torch.cat([self.fps_id, self.buckets[0, w.index].mean(dim=0)]) for w in windows])
        time_ids = ids.to(self.dtype).float().repeat(3, 1)  # [3n, 3]
        return UNetRows(
            sample, windows[0].timestep.reshape(1).float(), self.clip_rows.repeat_interleave(n, dim=0), audio, time_ids
        )

    def unguided_v(self, rows: UNetRows, replica: int = 0, part: slice = slice(None)) -> torch.Tensor:
        """One UNet call on replica ``replica`` over the rows ``part`` of ``rows``: v ``[rows, T, 4, h, w]`` on the
        first device (moved there from the replica's)."""
        r = rows
        v = self.unets[replica](
            r.sample[part], r.timestep, r.clip[part], r.audio[part], r.time_ids[part], *self.face_masks[replica]
        )
        return v.to(self.device, non_blocking=True)

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The guided v ``u + g1 (d - u) + g2 (c - d)`` from the v of every row ([3g, ...] in all, row order)."""
        return combine_guidance(torch.cat(parts) if len(parts) > 1 else parts[0], *self.scales)

    def guided_v(self, x: torch.Tensor, windows: list[Window], replica: int = 0) -> torch.Tensor:
        """One UNet call on the 3g rows of ``windows``, combined: [g, T, 4, h, w] in the UNet's dtype."""
        return self.combine([self.unguided_v(self.rows(x, windows), replica)])

    def guided(self, x: torch.Tensor, windows: list[Window], replica: int) -> torch.Tensor:
        """:meth:`guided_v` on replica ``replica``, in fewer windows per call after an out-of-memory error (windows
        are independent: same result)."""
        if self.memory is None:
            return self.guided_v(x, windows, replica)
        return self.memory.run(len(windows), lambda part: self.guided_v(x[part], windows[part], replica))

    def partial(self, x: torch.Tensor, windows: list[Window], rows: range, replica: int) -> torch.Tensor:
        """The v of guidance rows ``rows`` (of 0 uncond, 1 drop-audio, 2 cond) of ``windows`` on replica ``replica``:
        ``[len(rows) g, T, 4, h, w]`` on the first device (the row split of the scheduler)."""
        g = len(windows)
        return self.unguided_v(self.rows(x, windows), replica, slice(rows.start * g, rows.stop * g))

    def __call__(self, x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
        """:meth:`guided` on the first device."""
        return self.guided(x, windows, 0)


__all__ = ["GuidedDenoiser", "UNetRows"]
