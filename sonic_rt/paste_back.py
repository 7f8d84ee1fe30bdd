"""Paste the animated face back into the whole original picture (issue 14).

With ``crop=True`` (the default) Sonic animates a square crop around the face (official ``process_bbox``,
:func:`sonic_rt.face.square_crop_box`), so the video is that square at the generation size (e.g. 512x512).
:class:`PasteBack` turns every output frame back into the original photo at its original size: the generated
square is resized to the crop box it came from and blended into the photo under a feathered mask, with an
optional colour correction so the border of the box does not show. This is a sonic_rt addition; the official
Sonic code only writes the crop.

Geometry (:class:`PasteGeometry`), all boxes ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive:

* **Output size.** The original ``W0 x H0``, scaled down (never up) so that its long side is at most
  ``max_output_side`` (default 1920: a 24-MP portrait becomes a 1920x1280 video, not 6000x4000), then each
  side rounded *down* to an even number (yuv420p needs even sides). When no downscale is needed the odd last
  column/row is dropped instead of resampling the photo, so every untouched pixel is *exactly* the original's.
* **Crop box.** :attr:`Reference.crop_box <sonic_rt.face.Reference>` is the crop in original pixels; the
  generated frame is that crop resized to ``Reference.size`` (a Lanczos resize, the official
  ``image_audio_to_tensor``), so pasting back is the inverse resize onto the same box. The box is mapped to
  output pixels (scaled by the output/original ratio and rounded to whole pixels, at most half a pixel off)
  and may extend past the image border: only the part inside the image is composited. (The official square
  crop of :func:`~sonic_rt.face.square_crop_box` stays inside the image, but a user box or another crop rule
  need not.) With ``crop=False`` there is no crop box: the generated frame covers the whole image and is
  simply resized to the output size with the same resampler (its 64-multiple size has a slightly different
  aspect ratio than the photo; the resize undoes the stretch the reference resize made).
* **Feather.** The blend weight is 1 inside the box and falls to 0 at the box edge over ``feather`` pixels,
  as a smoothstep of the distance to the edge (C1, so no Mach band at either end of the ramp); the weights
  of the two axes multiply (rounded corners). Default: ``round(side / 16)`` of the box side in output pixels
  (32 px for a 512 px box). Reason: the official crop expands the face box by half its size on each side, so
  the face sits in the middle half of the box and the margin around it is about a quarter of the side; 1/16
  uses a quarter of that margin. That is wide enough to hide a seam (a colour step spread over 32 px is
  invisible) and narrow enough that the face, hair and shoulders, which move in the generated video, are
  generated pixels and not a double exposure of the still photo. Box edges on or beyond the image border are
  not feathered: there is no seam there, so the generated pixels reach the border.
* **Colour correction** (default ``"mean"``): the VAE decode shifts colours slightly, which shows as a halo
  along the blend band. The generated crop gets one per-channel affine transform that matches its colour
  statistics in the blend band to the original's in the same band: ``"mean"`` adds the difference of the
  means; ``"mean_std"`` also scales by the ratio of standard deviations (clamped to [0.5, 2]). The transform
  is computed once per video, from the first frame :class:`PasteBack` sees (the first frame of the video
  reproduces the reference most closely, and one fixed transform cannot flicker and makes chunked processing
  equal all-at-once processing), and applied to the whole crop so the face stays consistent with its border.
  ``"mean"`` is the default: measured in ``bench/paste_back.py`` (``bench/results/paste_back-cpu.md``), it
  removes an offset cast as well as ``"mean_std"`` (interior error 1.0 vs 1.1 levels) and stays within 1.4
  levels when the head moved into the band, where ``"mean_std"`` gets 2.2; where the band is a plain wall,
  ``"mean_std"`` divides by the decoder's grain over nothing and halves the face's contrast (22.7 levels).
  ``"mean_std"`` wins only when the cast changes contrast (0.4 vs 9.1 levels for ``0.85 x + 25``). A box with
  no blend band (``crop=False``, or every edge on the image border, or ``feather=0``) gets no correction.
* **Resampler.** Bicubic with antialiasing (``F.interpolate(mode="bicubic", antialias=True)``), clamped to
  [0, 255]: the box is often larger than the generated square (upscale), where bicubic is sharper than
  bilinear; antialias matters when the box is smaller (a small face, a downscaled photo). On CUDA the frames
  are resized in float32; on the CPU they are rounded to uint8 first and resized with torch's uint8 kernels
  (channels-last), about 10x faster there, for at most half a level of rounding.

Images: a PIL image or a uint8 numpy array ``[H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA),
loaded with :func:`sonic_rt.media.load_image`: EXIF orientation applied, grey converted to RGB, and alpha
*dropped*, not composited on white, because the reference the frames were generated from was made the same
way (official ``Image.open(p).convert("RGB")``); compositing on white would make the background differ from
the generated crop wherever the photo is transparent.

Streaming: construct one :class:`PasteBack` per video (it holds the output-size background once, the box's
background and blend weights, after the first call six colour numbers, and with ``reuse_output`` one output
buffer), then call it on each chunk of frames as they come out of decode -> RIFE; each call is a resize of the
chunk's frames to the box and a blend of the box region, on :attr:`PasteBack.device` (give the frames' device,
the GPU in the runtime, so nothing crosses to the host but the finished uint8 frames).

Command line: ``python -m sonic_rt.paste_back --demo-still out.png [--image photo.jpg]`` writes a
before/after still (generated crop | pasted without feather or correction | pasted with the defaults) from a
simulated generated frame with a colour cast (:func:`demo_still`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageError, InputError

__all__ = [
    "DEFAULT_MAX_OUTPUT_SIDE",
    "DEFAULT_FEATHER_FRACTION",
    "MIN_IMAGE_SIDE",
    "COLOUR_MODES",
    "PasteGeometry",
    "PasteBack",
    "feather_weights",
    "demo_still",
]

#: Default longest side of the output video, pixels (a 24-MP photo becomes 1920x1280, not 6000x4000).
DEFAULT_MAX_OUTPUT_SIDE = 1920
#: Default feather width as a fraction of the crop box's shorter side (see the module docstring).
DEFAULT_FEATHER_FRACTION = 1 / 16
#: Smallest photo side (pixels) that can be pasted back into: one H.264 macroblock. Nothing smaller holds a
#: face the detector finds, and a 1-pixel side cannot be rounded down to an even size at all.
MIN_IMAGE_SIDE = 16
#: Colour-correction modes (``True`` means ``"mean"``, ``False``/``None`` means none).
COLOUR_MODES = ("mean", "mean_std")
# Largest ratio of standard deviations "mean_std" applies (and smallest, 1/_MAX_GAIN): a flat band (sky,
# a wall) has a tiny std, and an unbounded ratio would wreck the face's contrast (even clamped it halves it,
# which is why "mean" is the default: bench/results/paste_back-cpu.md).
_MAX_GAIN = 2.0
# Float32 bytes of frames (input or box region, the larger) resized and blended per step inside one call,
# whatever the chunk size the caller passes. On the CPU the steps stay small: glibc serves blocks over 32 MB
# with a fresh mmap each time, and the page faults made the elementwise ops 3-5x slower (an 864 px box is
# 9 MB per frame); on CUDA bigger steps mean fewer kernel launches.
_STEP_BYTES = {"cpu": 16 << 20}
_STEP_BYTES_DEFAULT = 256 << 20

Box = tuple[int, int, int, int]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_box(box: Any, what: str) -> Box:
    """``(x1, y1, x2, y2)`` of 4 integers with ``x2 > x1`` and ``y2 > y1``. Raises InputError."""
    try:
        vals = tuple(box)
    except TypeError:
        raise InputError(f"{what} must be (x1, y1, x2, y2) integers in pixels, got {box!r}") from None
    if len(vals) != 4 or not all(_is_int(v) for v in vals):
        raise InputError(f"{what} must be (x1, y1, x2, y2) integers in pixels, got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in vals)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"{what} {(x1, y1, x2, y2)} is empty: it needs x2 > x1 and y2 > y1 (pixels)")
    return (x1, y1, x2, y2)


def _check_size(size: Any, what: str) -> tuple[int, int]:
    try:
        vals = tuple(size)
    except TypeError:
        raise InputError(f"{what} must be (width, height) in pixels, got {size!r}") from None
    if len(vals) != 2 or not all(_is_int(v) and v >= 1 for v in vals):
        raise InputError(f"{what} must be (width, height), positive integers in pixels, got {size!r}")
    return int(vals[0]), int(vals[1])


@dataclass(frozen=True)
class PasteGeometry:
    """Where the generated frame goes in the output picture. All sizes ``(width, height)``, all boxes
    ``(x1, y1, x2, y2)`` with exclusive ``x2``/``y2``, in pixels. Make one with :meth:`plan`.

    Attributes:
        original_size: the photo, ``(W0, H0)``.
        output_size: the video frame, ``(W, H)``: ``(W0, H0)`` scaled by :attr:`scale` and rounded down to
            even sides.
        scale: output / original: 1.0 when the photo fits ``max_output_side`` (the output is the photo
            itself minus an odd last column/row, no resampling), else the smaller of ``W / W0`` and ``H / H0``
            (about ``max_output_side / max(W0, H0)``).
        crop_box: the crop in original pixels (``(0, 0, W0, H0)`` without crop); may extend past the border.
        box: the crop box in output pixels (scaled, rounded); may extend past the border.
        region: ``box`` clipped to the output frame: the only pixels that change.
        generated_size: ``(w, h)`` of the generated frames.
        feather: width of the blend ramp in output pixels (0: hard edge).
        feathered: which edges of ``box`` (left, top, right, bottom) are feathered: those strictly inside
            the output frame; an edge on or past the border has nothing to blend with.
        face_box: the face ``(x, y, w, h)`` in original pixels when known (reported, not used), else None.
    """

    original_size: tuple[int, int]
    output_size: tuple[int, int]
    scale: float
    crop_box: Box
    box: Box
    region: Box
    generated_size: tuple[int, int]
    feather: int
    feathered: tuple[bool, bool, bool, bool]
    face_box: tuple[float, float, float, float] | None = None

    @classmethod
    def plan(
        cls,
        original_size: Sequence[int],
        crop_box: Sequence[int] | None,
        generated_size: Sequence[int],
        *,
        feather: int | None = None,
        max_output_side: int = DEFAULT_MAX_OUTPUT_SIDE,
        face_box: Sequence[float] | None = None,
        source: str | os.PathLike | None = None,
    ) -> PasteGeometry:
        """Work out the geometry.

        Args:
            original_size: the photo's ``(W0, H0)`` in pixels (after EXIF orientation).
            crop_box: the crop ``(x1, y1, x2, y2)`` in original pixels (``Reference.crop_box``), or None when
                the generated frame covers the whole photo (``crop=False``).
            generated_size: ``(w, h)`` of the generated frames (``Reference.size``).
            feather: blend ramp width in output pixels, >= 0; None: ``round(side / 16)`` of the box's shorter
                side in output pixels, at least 1. Clamped to half the box's shorter side.
            max_output_side: longest output side in pixels, >= 16; larger photos are scaled down.
            face_box: the face ``(x, y, w, h)`` in original pixels, only reported.
            source: the photo's file name, put in front of error messages.

        Raises:
            ImageError: a photo side under :data:`MIN_IMAGE_SIDE` pixels.
            InputError: a malformed size, box or option; a crop box entirely outside the photo; a box that
                becomes empty in output pixels.
        """
        W0, H0 = _check_size(original_size, "original_size")
        if W0 < MIN_IMAGE_SIDE or H0 < MIN_IMAGE_SIDE:
            raise ImageError(
                f"the photo is {W0}x{H0} pixels; pasting the face back needs at least "
                f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (use crop output for tiny images)",
                source,
            )
        gw, gh = _check_size(generated_size, "generated_size")
        if not _is_int(max_output_side) or max_output_side < MIN_IMAGE_SIDE:
            raise InputError(f"max_output_side must be an integer >= {MIN_IMAGE_SIDE} pixels, got {max_output_side!r}")
        if feather is not None and (not _is_int(feather) or feather < 0):
            raise InputError(f"feather must be an integer >= 0 (pixels) or None for the default, got {feather!r}")
        crop = (0, 0, W0, H0) if crop_box is None else _check_box(crop_box, "crop box")
        x1, y1, x2, y2 = crop
        if x2 <= 0 or y2 <= 0 or x1 >= W0 or y1 >= H0:
            raise InputError(
                f"crop box {crop} lies entirely outside the {W0}x{H0} photo; nothing to paste back", source
            )

        long_side = max(W0, H0)
        if long_side <= max_output_side:
            W, H = W0 // 2 * 2, H0 // 2 * 2
            sx = sy = 1.0
        else:  # integer arithmetic: 4004 * 1000 // 4004 is 1000, not 999.99...
            W = max(2, W0 * max_output_side // long_side // 2 * 2)
            H = max(2, H0 * max_output_side // long_side // 2 * 2)
            sx, sy = W / W0, H / H0  # per axis: the even rounding changes the aspect by under a pixel
        box = (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))
        bx1, by1, bx2, by2 = box
        region = (max(bx1, 0), max(by1, 0), min(bx2, W), min(by2, H))
        if region[2] <= region[0] or region[3] <= region[1] or bx2 <= bx1 or by2 <= by1:
            raise InputError(
                f"crop box {crop} covers no whole pixel of the {W}x{H} output "
                f"(box {box} in output pixels); use a larger face box or max_output_side",
                source,
            )
        side = min(bx2 - bx1, by2 - by1)
        fw = max(1, round(side * DEFAULT_FEATHER_FRACTION)) if feather is None else int(feather)
        fw = min(fw, side // 2)
        feathered = (bx1 > 0, by1 > 0, bx2 < W, by2 < H)
        fb = None if face_box is None else tuple(float(v) for v in face_box)
        if fb is not None and len(fb) != 4:
            raise InputError(f"face_box must be (x, y, w, h) in pixels, got {face_box!r}")
        return cls(
            original_size=(W0, H0),
            output_size=(W, H),
            scale=float(min(sx, sy)),
            crop_box=crop,
            box=box,
            region=region,
            generated_size=(gw, gh),
            feather=fw,
            feathered=feathered,
            face_box=fb,
        )  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists), e.g. for ``AnimateResult`` or a report."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(0, 1)
    return t * t * (3 - 2 * t)


def feather_weights(geometry: PasteGeometry, device: str | torch.device = "cpu") -> torch.Tensor:
    """The blend weight of the generated frame over :attr:`PasteGeometry.region`, float32 ``[1, h, w]``.

    For a pixel whose centre is ``d`` pixels inside a feathered edge of the box, the weight along that axis
    is ``smoothstep(d / feather)``; it is 1 beyond ``feather`` pixels and along unfeathered edges, and the
    two axes multiply. With ``feather == 0`` the weight is 1 everywhere in the region (hard edge).
    """
    bx1, by1, bx2, by2 = geometry.box
    rx1, ry1, rx2, ry2 = geometry.region
    fl, ft, fr, fb = geometry.feathered
    fw = geometry.feather

    def axis(lo: int, hi: int, r_lo: int, r_hi: int, feather_lo: bool, feather_hi: bool) -> torch.Tensor:
        centre = torch.arange(r_lo, r_hi, dtype=torch.float64) + 0.5  # float64 on the CPU (MPS has none)
        w = torch.ones_like(centre)
        if fw > 0:
            if feather_lo:
                w = w * _smoothstep((centre - lo) / fw)
            if feather_hi:
                w = w * _smoothstep((hi - centre) / fw)
        return w

    wx = axis(bx1, bx2, rx1, rx2, fl, fr)
    wy = axis(by1, by2, ry1, ry2, ft, fb)
    return (wy[:, None] * wx[None, :]).to(torch.float32).unsqueeze(0).to(device)


class PasteBack:
    """Composite generated frames into the original photo, chunk by chunk (see the module docstring).

    Args:
        image: the original photo: PIL image, or uint8 numpy ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``
            (EXIF orientation applied, grey to RGB, alpha dropped: :func:`sonic_rt.media.load_image`).
        crop_box: ``(x1, y1, x2, y2)`` in original pixels (``Reference.crop_box``), or None when the frames
            cover the whole photo (``crop=False``).
        generated_size: ``(w, h)`` of the frames (``Reference.size``).
        feather: blend ramp width in output pixels; None: 1/16 of the box side (:meth:`PasteGeometry.plan`).
        colour_correction: ``True``/``"mean"`` (default), ``"mean_std"``, or ``False``/``None``.
        max_output_side: longest output side in pixels (default 1920); larger photos are scaled down.
        device: where the background is kept and the frames are composited; None: ``"cpu"``. Frames on another
            device are moved here.
        mode: resampler, ``"bicubic"`` (default) or ``"bilinear"`` (both with antialiasing).
        face_box: the face ``(x, y, w, h)`` in original pixels, only reported in :attr:`geometry`.
        reuse_output: return views of one kept output buffer instead of a new array per call: only the crop
            region is written per frame (the rest of the picture never changes), which saves a fresh full-frame
            array per frame (on the CPU at 1080p with a 288 px box, 10 -> 6 ms per frame), but each returned
            array is only valid until the next call. Right for a caller that encodes each chunk before the
            next (``VideoWriter.write`` copies the frames); wrong for one that keeps the arrays.
        source: the photo's file name, put in front of error messages.

    Raises:
        ImageError: the photo cannot be used (wrong dtype/shape, too small, too many pixels).
        InputError: a bad box, size or option (:meth:`PasteGeometry.plan`).

    Calling the object: ``paste(frames) -> uint8 numpy [n, H, W, 3]`` with ``(W, H) = output_size``, the layout
    ``media.VideoWriter.write`` takes. ``frames`` are ``[n, 3, h, w]`` (or one ``[3, h, w]``) torch tensors or
    numpy arrays, uint8 in [0, 255] or float in [0, 1] (the runtime's decoded/RIFE frames), ``(w, h) =
    generated_size``. Composited values are rounded to the nearest level.
    """

    def __init__(
        self,
        image: Image.Image | np.ndarray,
        crop_box: Sequence[int] | None,
        generated_size: Sequence[int],
        *,
        feather: int | None = None,
        colour_correction: bool | str | None = True,
        max_output_side: int = DEFAULT_MAX_OUTPUT_SIDE,
        device: str | torch.device | None = None,
        mode: str = "bicubic",
        face_box: Sequence[float] | None = None,
        reuse_output: bool = False,
        source: str | os.PathLike | None = None,
    ) -> None:
        from .media import load_image

        if colour_correction is True:
            colour_correction = "mean"
        elif colour_correction is False or colour_correction is None:
            colour_correction = None
        elif colour_correction not in COLOUR_MODES:
            raise InputError(f"colour_correction must be True, False, 'mean' or 'mean_std', got {colour_correction!r}")
        if mode not in ("bicubic", "bilinear"):
            raise InputError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
        if not isinstance(image, (Image.Image, np.ndarray)):
            raise ImageError(
                f"the photo must be a PIL image or a uint8 numpy array, got {type(image).__name__}", source
            )
        rgb = np.array(load_image(image), dtype=np.uint8)  # [H0, W0, 3], a writable copy
        H0, W0 = rgb.shape[:2]
        self.geometry = PasteGeometry.plan(
            (W0, H0),
            crop_box,
            generated_size,
            feather=feather,
            max_output_side=max_output_side,
            face_box=face_box,
            source=source,
        )
        self.colour_correction: str | None = colour_correction
        self.mode = mode
        self.device = torch.device(device if device is not None else "cpu")
        W, H = self.geometry.output_size
        photo = torch.from_numpy(rgb).to(self.device)
        if self.geometry.scale >= 1.0:
            background = photo[:H, :W].contiguous()
        else:  # downscale once, same resampler as the frames
            chw = photo.permute(2, 0, 1).unsqueeze(0).float()
            small = F.interpolate(chw, size=(H, W), mode=mode, antialias=True, align_corners=False)
            background = small.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).contiguous()
        del photo, rgb
        #: the output-size background, uint8 [H, W, 3] on :attr:`device` (the one copy of the photo held)
        self.background = background
        rx1, ry1, rx2, ry2 = self.geometry.region
        #: the region's background, float32 [3, h, w] in [0, 255]
        self._region_bg = background[ry1:ry2, rx1:rx2].permute(2, 0, 1).float().contiguous()
        #: the blend weight over the region, float32 [1, h, w]
        self._weight = feather_weights(self.geometry, self.device)
        band = (self._weight > 0) & (self._weight < 1)
        self._band = band[0] if bool(band.any()) else None  # [h, w] bool, None: no blend band
        self._colour: tuple[torch.Tensor, torch.Tensor] | None = None  # (gain, offset) [3, 1, 1], from frame 0
        self.reuse_output = bool(reuse_output)
        self._buffer: torch.Tensor | None = None  # reuse_output: [n, H, W, 3] background + the last region

    @classmethod
    def from_reference(cls, image: Image.Image | np.ndarray, reference: Any, **options: Any) -> PasteBack:
        """Build from a :class:`sonic_rt.face.Reference` (its ``crop_box``, ``size`` and ``face_box``).

        ``reference.face_box`` is in crop pixels; it is moved to original pixels for :attr:`geometry`.
        ``options`` are the keyword arguments of the constructor.
        """
        crop = reference.crop_box
        fb = reference.face_box
        if fb is not None and "face_box" not in options:
            dx, dy = (crop[0], crop[1]) if crop is not None else (0, 0)
            options["face_box"] = (fb.x + dx, fb.y + dy, fb.w, fb.h)
        return cls(image, crop, reference.size, **options)

    # ------------------------------------------------------------------------------------------------------

    @property
    def output_size(self) -> tuple[int, int]:
        """``(W, H)`` of the composited frames: the video writer's width and height."""
        return self.geometry.output_size

    @property
    def crop_box(self) -> Box:
        """The crop box used, ``(x1, y1, x2, y2)`` in original pixels."""
        return self.geometry.crop_box

    @property
    def colour_transform(self) -> tuple[list[float], list[float]] | None:
        """``(gain, offset)`` per RGB channel applied to the generated crop (levels 0..255), or None before
        the first call or without correction: ``corrected = gain * generated + offset``."""
        if self._colour is None:
            return None
        gain, offset = self._colour
        return gain.flatten().tolist(), offset.flatten().tolist()

    def __call__(self, frames: torch.Tensor | np.ndarray) -> np.ndarray:
        """Composite one chunk; returns uint8 numpy ``[n, H, W, 3]`` (see the class docstring).

        Raises:
            InputError: frames of the wrong shape, dtype or size.
        """
        x = self._check_frames(frames)
        n = x.shape[0]
        out = self._output(n)
        rx1, ry1, rx2, ry2 = self.geometry.region
        bg, weight = self._region_bg, self._weight
        gw, gh = self.geometry.generated_size
        frame_bytes = 4 * max(bg.numel(), 3 * gw * gh)  # the larger float32 intermediate: region or input
        step = max(1, _STEP_BYTES.get(self.device.type, _STEP_BYTES_DEFAULT) // frame_bytes)
        for start in range(0, n, step):
            region = self._resize(x[start : start + step])  # new float32 [k, 3, h, w] in [0, 255]
            if self.colour_correction is not None and self._band is not None:
                if self._colour is None:
                    self._colour = self._fit_colour(region[0])
                gain, offset = self._colour
                region.mul_(gain).add_(offset)
            # bg + w * (generated - bg), in place: exactly bg where w == 0 (outside the box nothing is touched)
            region.sub_(bg).mul_(weight).add_(bg).clamp_(0, 255).round_()
            out[start : start + len(region), ry1:ry2, rx1:rx2] = region.to(torch.uint8).permute(0, 2, 3, 1)
        return out.cpu().numpy()

    # ------------------------------------------------------------------------------------------------------

    def _output(self, n: int) -> torch.Tensor:
        """``n`` frames of background, uint8 [n, H, W, 3]: new, or (``reuse_output``) a view of a kept buffer
        whose pixels outside :attr:`PasteGeometry.region` are never written, so only the region is."""
        W, H = self.output_size
        if not self.reuse_output:
            return self.background.unsqueeze(0).expand(n, H, W, 3).clone()
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = self.background.unsqueeze(0).expand(n, H, W, 3).clone()
        return self._buffer[:n]

    def _check_frames(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Validate; return the frames on :attr:`device` (uint8 in [0, 255] or float in [0, 1])."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, torch.Tensor):
            raise InputError(f"frames must be a torch tensor or numpy array [n, 3, h, w], got {type(frames).__name__}")
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        gw, gh = self.geometry.generated_size
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, gh, gw):
            raise InputError(
                f"frames must have shape [n, 3, {gh}, {gw}] (the generated size), got {list(frames.shape)}"
            )
        if frames.shape[0] == 0:
            raise InputError("frames is an empty chunk (n = 0)")
        if frames.dtype != torch.uint8 and not frames.is_floating_point():
            raise InputError(f"frames must be uint8 in [0, 255] or float in [0, 1], got {frames.dtype}")
        return frames.to(self.device)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Generated frames [k, 3, gh, gw] (uint8, or float in [0, 1]) -> the box's visible part, float32
        levels [k, 3, h, w].

        On the CPU the frames are rounded to uint8 and resized there: torch's uint8 resampling kernels are
        about 10x faster than float32 on the CPU (``bench/paste_back.py``), for at most half a level of
        rounding before the resize. Elsewhere (CUDA) the resize runs in float32.
        """
        bx1, by1, bx2, by2 = self.geometry.box
        rx1, ry1, rx2, ry2 = self.geometry.region
        resize = (bx2 - bx1, by2 - by1) != tuple(self.geometry.generated_size)
        if x.dtype != torch.uint8:
            x = torch.mul(x.float(), 255)
            if x.device.type == "cpu" and resize:
                x = x.round_().clamp_(0, 255).to(torch.uint8)
        elif x.device.type != "cpu" or not resize:
            x = x.float()
        if resize:
            x = F.interpolate(x, size=(by2 - by1, bx2 - bx1), mode=self.mode, antialias=True, align_corners=False)
        # float32 planar: the elementwise ops after this broadcast over channels, slow in channels-last memory
        x = x[:, :, ry1 - by1 : ry2 - by1, rx1 - bx1 : rx2 - bx1]
        # a new tensor (the caller works in place), even when x is the caller's float frames
        return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).clamp_(0, 255)

    def _fit_colour(self, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (gain, offset) matching ``region`` [3, h, w] to the photo in the blend band."""
        band = self._band
        gen = region[:, band].cpu().double()  # [3, m]; once per video, in float64 on the CPU
        ref = self._region_bg[:, band].cpu().double()
        mg, mr = gen.mean(dim=1), ref.mean(dim=1)
        if self.colour_correction == "mean_std":
            sg, sr = gen.std(dim=1), ref.std(dim=1)
            gain = torch.where(sg > 1e-6, sr / sg.clamp_min(1e-6), torch.ones_like(sg)).clamp(1 / _MAX_GAIN, _MAX_GAIN)
        else:
            gain = torch.ones_like(mg)
        offset = mr - gain * mg
        return gain.float().view(3, 1, 1).to(self.device), offset.float().view(3, 1, 1).to(self.device)


# --------------------------------------------------------------------------------------------------
# Demo still
# --------------------------------------------------------------------------------------------------


def _demo_photo() -> np.ndarray:
    """skimage's astronaut (512x512) placed off-centre in a 960x640 canvas: the border fades linearly to grey."""
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is a test/bench extra
        raise InputError("the demo photo is scikit-image's astronaut: pip install scikit-image, or pass --image") from e
    canvas = np.pad(data.astronaut(), ((64, 64), (96, 352), (0, 0)), mode="linear_ramp", end_values=110)
    return np.ascontiguousarray(canvas)


def demo_still(
    out: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    cast: Sequence[float] = (14, 4, -12),
    gain: float = 1.06,
    panel_height: int = 360,
) -> dict[str, Any]:
    """Write a before/after PNG: generated crop | pasted, hard edge, no correction | pasted with the defaults.

    The "generated" frame is simulated: the crop the runtime would animate (face found with the OpenCV Haar
    detector, official square crop, Lanczos resize to the generation size) with a colour cast (``gain * x + cast``
    per RGB channel, levels) like a VAE decode's drift, so the still shows the seam the feather and the
    correction hide. No model is run.

    Args:
        out: the PNG to write.
        image: the photo; None: scikit-image's astronaut placed off-centre in a wider canvas.
        cast, gain: the simulated colour cast.
        panel_height: height of each of the three panels, pixels.

    Returns:
        a dict with the geometry, the colour transform found and the output path.
    """
    from PIL import ImageDraw

    from .face import HaarFaceDetector, generation_size, select_largest, square_crop_box
    from .media import load_image

    photo = load_image(image) if image is not None else Image.fromarray(_demo_photo())
    faces = HaarFaceDetector().detect(np.asarray(photo))
    if not faces:
        raise InputError("the demo found no face in the photo (OpenCV Haar cascade)", image)
    face = select_largest(faces)
    box = square_crop_box(face, photo.width, photo.height)  # official crop, as prepare_reference makes it
    crop = photo.crop(box)
    size = generation_size(crop.width, crop.height, 512)
    gen = torch.from_numpy(np.asarray(crop.resize(size, Image.LANCZOS), dtype=np.float32)).permute(2, 0, 1)
    gen = (gen * gain + torch.tensor(cast, dtype=torch.float32).view(3, 1, 1)).clamp(0, 255).round().to(torch.uint8)
    face_box = (face.x, face.y, face.w, face.h)
    hard = PasteBack(photo, box, size, feather=0, colour_correction=False)(gen)[0]
    paste = PasteBack(photo, box, size, face_box=face_box)
    soft = paste(gen)[0]

    def panel(arr: np.ndarray, label: str) -> Image.Image:
        im = Image.fromarray(arr)
        im = im.resize((max(1, round(im.width * panel_height / im.height)), panel_height), Image.LANCZOS)
        draw = ImageDraw.Draw(im)
        draw.rectangle((0, 0, im.width, 18), fill=(0, 0, 0))
        draw.text((4, 3), label, fill=(255, 255, 255))
        return im

    panels = [
        panel(gen.permute(1, 2, 0).numpy(), "generated crop (crop=True output)"),
        panel(hard, "pasted: hard edge, no colour correction"),
        panel(soft, f"pasted: feather {paste.geometry.feather}px + colour correction (default)"),
    ]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panel_height), (255, 255, 255))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 8
    out = os.fspath(out)
    sheet.save(out)
    return {"out": out, "geometry": paste.geometry.to_dict(), "colour_transform": paste.colour_transform}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sonic_rt.paste_back", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo-still",
        metavar="OUT.png",
        required=True,
        help="write a before/after still: generated crop | hard paste | feathered + corrected",
    )
    parser.add_argument("--image", help="the photo (default: scikit-image's astronaut in a wider canvas)")
    args = parser.parse_args(argv)
    from .errors import SonicError

    try:
        info = demo_still(args.demo_still, args.image)
    except SonicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = info["geometry"]
    print(
        f"wrote {info['out']}: photo {g['original_size']}, output {g['output_size']}, crop box {g['crop_box']}, "
        f"feather {g['feather']} px, colour transform (gain, offset) {info['colour_transform']}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
