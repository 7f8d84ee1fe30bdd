"""Face detection, square crop, face mask and reference-image tensors for Sonic.

This module reproduces the reference-image preprocessing of the official Sonic inference
(Tencent, CVPR 2025):

* ``src/utils/face_align/`` / ``face_detect`` (official Sonic): the YOLOv5-face detector
  ``yoloface_v5m.pt`` (TorchScript) with confidence 0.5 and NMS IoU 0.45, short side resized to
  416 pixels, and the ``maxface=True`` face-selection quirk (see :func:`select_face`).
* ``sonic.py`` ``Sonic.preprocess`` + ``process_bbox`` (official Sonic, used by the gradio demo):
  the face box is expanded by ``expand_ratio=0.5`` and turned into a square crop
  (:func:`square_crop_box`); the crop is detected again.
* ``src/dataset/test_preprocess.py`` ``image_audio_to_tensor`` (official Sonic): the face mask
  (:func:`face_mask_image`, area 1.1 as passed by ``sonic.py``), the resize rule
  (:func:`generation_size`), the ``ToTensor``/``Normalize(0.5, 0.5)`` reference tensor and the
  CLIP pixels (:func:`clip_pixels`).

When no ``yoloface_v5m.pt`` is available, an OpenCV Haar cascade is used instead
(:class:`HaarFaceDetector`); this is a sonic_rt addition, not official behaviour.

Deviations from the official code (all deliberate, all documented where they happen):

* If the second detection on the square crop finds no face, the official code fails; sonic_rt
  falls back to the first box translated into crop coordinates.
* An explicit user face box (``--face-box x,y,w,h``) skips detection entirely.
* The Haar fallback picks the largest face (no quirk).

All coordinates are in pixels. Boxes are ``(x, y, w, h)`` with ``(x, y)`` the top-left corner,
unless a name says ``xyxy``.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import CheckpointError, FaceNotFoundError, InputError

__all__ = [
    "YOLO_FILENAME",
    "FaceBox",
    "FaceDetector",
    "HaarFaceDetector",
    "YoloFaceDetector",
    "select_face",
    "select_largest",
    "load_face_detector",
    "square_crop_box",
    "face_mask_image",
    "generation_size",
    "clip_pixels",
    "clip_image_processor",
    "Reference",
    "prepare_reference",
]

#: File name of the YOLOv5-face TorchScript detector in the Sonic model directory (official Sonic
#: ``checkpoints/yoloface_v5m.pt``).
YOLO_FILENAME = "yoloface_v5m.pt"

# Official Sonic face detector settings (face_detect: conf_thres=0.5, iou_thres=0.45, 416 short side).
_YOLO_CONF = 0.5
_YOLO_IOU = 0.45
_YOLO_SHORT_SIDE = 416
_YOLO_STRIDES = (8, 16, 32)
_YOLO_COLUMNS = 16  # cx, cy, w, h, obj, 10 landmark coordinates, cls


# --------------------------------------------------------------------------------------------------
# Face boxes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box ``(x, y, w, h)`` in pixels (float).

    ``(x, y)`` is the top-left corner, ``w``/``h`` the width and height. Detectors return boxes in
    the pixels of the image they were given; :meth:`translated` moves a box into another frame
    (e.g. the square crop).
    """

    x: float
    y: float
    w: float
    h: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The box as ``(x1, y1, x2, y2)`` floats in pixels, ``x2 = x + w``, ``y2 = y + h``."""
        return (self.x, self.y, self.x + self.w, self.y + self.h)

    @property
    def area(self) -> float:
        """``w * h`` in square pixels (float), the area the official ``maxface`` selection compares."""
        return self.w * self.h

    def translated(self, dx: float, dy: float) -> FaceBox:
        """The same box moved by ``(dx, dy)`` pixels, e.g. ``(-crop_x1, -crop_y1)`` into a crop."""
        return FaceBox(self.x + dx, self.y + dy, self.w, self.h)

    @classmethod
    def from_user(cls, value: Any) -> FaceBox:
        """Parse a user face box ``x,y,w,h`` in original-image pixels (sonic_rt ``--face-box``).

        Args:
            value: a :class:`FaceBox`, a tuple/list of 4 numbers, or a string ``"x,y,w,h"``
                (commas and/or whitespace as separators, optional surrounding brackets).

        Returns:
            the :class:`FaceBox` (floats).

        Raises:
            InputError: not 4 values, a value that is not a finite number (bools are rejected),
                or ``w <= 0`` / ``h <= 0``.
        """
        if isinstance(value, FaceBox):
            parts: list[Any] = [value.x, value.y, value.w, value.h]
        elif isinstance(value, str):
            text = value.strip().strip("()[]").replace(",", " ")
            parts = text.split()
        elif isinstance(value, (tuple, list, np.ndarray)):
            parts = list(value.astype(object).reshape(-1)) if isinstance(value, np.ndarray) else list(value)
        else:
            raise InputError(f"face box must be 'x,y,w,h' (4 numbers in pixels), got {value!r}")
        if len(parts) != 4:
            raise InputError(f"face box must have 4 numbers 'x,y,w,h' in pixels, got {len(parts)}: {value!r}")
        nums: list[float] = []
        for p in parts:
            if isinstance(p, (bool, np.bool_)):
                raise InputError(f"face box values must be numbers, got {value!r}")
            try:
                f = float(p)
            except (TypeError, ValueError):
                raise InputError(f"face box values must be numbers 'x,y,w,h' in pixels, got {value!r}") from None
            if not math.isfinite(f):
                raise InputError(f"face box values must be finite numbers, got {value!r}")
            nums.append(f)
        x, y, w, h = nums
        if w <= 0 or h <= 0:
            raise InputError(f"face box width and height must be > 0 pixels, got w={w:g}, h={h:g}")
        return cls(x, y, w, h)


def select_face(boxes: Sequence[FaceBox]) -> FaceBox:
    """Pick one face exactly like the official ``maxface=True`` selection (official Sonic face_detect).

    Official quirk, reproduced on purpose: ``max_idx = 0; max_area = area(box 0)``; for every later
    box whose area exceeds ``max_area`` set ``max_idx = i`` -- but ``max_area`` is never updated.
    The result is therefore the LAST box whose area exceeds that of box 0 (or box 0 if none does),
    which is not always the largest. Boxes are in the detector's order (descending confidence).

    Args:
        boxes: one or more detected boxes.

    Returns:
        the selected box.

    Raises:
        FaceNotFoundError: ``boxes`` is empty.
    """
    if len(boxes) == 0:
        raise FaceNotFoundError("no face to select from")
    max_idx = 0
    max_area = boxes[0].area
    for i in range(1, len(boxes)):
        if boxes[i].area > max_area:
            max_idx = i  # official: max_area is NOT updated here
    return boxes[max_idx]


def select_largest(boxes: Sequence[FaceBox]) -> FaceBox:
    """Pick the box with the largest area (first one on ties); used by the Haar fallback (sonic_rt).

    Raises:
        FaceNotFoundError: ``boxes`` is empty.
    """
    if len(boxes) == 0:
        raise FaceNotFoundError("no face to select from")
    best = boxes[0]
    for b in boxes[1:]:
        if b.area > best.area:
            best = b
    return best


# --------------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class FaceDetector(Protocol):
    """What :func:`prepare_reference` needs from a detector.

    ``detect(image_rgb)`` takes an RGB uint8 array ``[H, W, 3]`` and returns the faces as
    :class:`FaceBox` in that image's pixels; ``name`` is a short tag (``"yolo"``, ``"haar"``).
    A detector may also have ``select(boxes) -> FaceBox``; without it :func:`select_face` is used.
    """

    name: str

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]: ...


def _check_rgb(image_rgb: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 ``[H, W, 3]`` array; return it C-contiguous. Raises InputError."""
    if not isinstance(image_rgb, np.ndarray):
        raise InputError(f"face detection needs a numpy RGB image, got {type(image_rgb).__name__}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise InputError(
            f"face detection needs an RGB uint8 image [H, W, 3], got {image_rgb.dtype} {tuple(image_rgb.shape)}"
        )
    if image_rgb.shape[0] < 1 or image_rgb.shape[1] < 1:
        raise InputError(f"face detection got an empty image {tuple(image_rgb.shape)}")
    return np.ascontiguousarray(image_rgb)


class HaarFaceDetector:
    """OpenCV Haar-cascade face detector, the fallback when ``yoloface_v5m.pt`` is absent (sonic_rt).

    Uses ``cv2.data.haarcascades + "haarcascade_frontalface_default.xml"`` on the grey image with
    ``scaleFactor=1.1``, ``minNeighbors=5`` and ``minSize`` = 2 % of the short side (pixels).
    This is not the official detector; boxes differ from YOLOv5-face, so crops differ slightly.

    Raises:
        CheckpointError: the bundled cascade file is missing or cannot be loaded (OpenCV >= 5 drops it).
    """

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size_frac: float = 0.02) -> None:
        cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", "")
        path = os.path.join(cascade_dir, "haarcascade_frontalface_default.xml")
        if not os.path.isfile(path):
            raise CheckpointError(
                "OpenCV's bundled Haar cascade is missing; install opencv-python-headless<5", path=path
            )
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise CheckpointError("cannot load OpenCV's Haar cascade", path=path)
        self._cascade = cascade
        self._lock = threading.Lock()  # CascadeClassifier is not documented as thread-safe
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size_frac = float(min_size_frac)

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        """Detect faces.

        Args:
            image_rgb: RGB uint8 ``[H, W, 3]``.

        Returns:
            all detected faces as :class:`FaceBox` (integer-valued floats, pixels of ``image_rgb``),
            in OpenCV's order (not sorted).

        Raises:
            InputError: ``image_rgb`` is not an RGB uint8 ``[H, W, 3]`` array.
        """
        img = _check_rgb(image_rgb)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        side = max(1, int(round(min(grey.shape[:2]) * self.min_size_frac)))
        with self._lock:
            found = self._cascade.detectMultiScale(
                grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side)
            )
        return [FaceBox(float(x), float(y), float(w), float(h)) for (x, y, w, h) in np.asarray(found).reshape(-1, 4)]

    def select(self, boxes: Sequence[FaceBox]) -> FaceBox:
        """The largest face (:func:`select_largest`). Raises FaceNotFoundError on an empty list."""
        return select_largest(boxes)


def _nms_xyxy(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """Greedy NMS with the semantics of ``torchvision.ops.nms``.

    Args:
        boxes: float ``[N, 4]`` ``(x1, y1, x2, y2)`` pixels.
        scores: float ``[N]``.
        iou_thres: a box is dropped when its IoU with a kept, higher-scoring box is ``> iou_thres``.

    Returns:
        int64 indices of the kept boxes, by descending score (ties: lower index first).
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(scores), dtype=bool)
    keep: list[int] = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[pos + 1 :]
        if rest.size == 0:
            break
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > iou_thres]] = True  # NaN (0/0) compares False, as in torchvision
    return np.asarray(keep, dtype=np.int64)


class YoloFaceDetector:
    """YOLOv5-face TorchScript detector ``yoloface_v5m.pt`` (official Sonic face_detect).

    Pipeline (official): BGR input; ``r = 416 / min(h0, w0)``; ``h1 = int(h0*r + 31)//32*32`` and
    likewise ``w1``; ``cv2.resize(..., INTER_LINEAR)``; BGR->RGB; float32 ``[1, 3, h1, w1]`` / 255;
    ``pred = model(img, grids)`` with one grid per stride 8/16/32 of shape ``[1, 1, h1//s, w1//s, 2]``
    holding ``(x, y)`` cell indices; ``pred`` is ``[1, N, 16]`` = ``(cx, cy, w, h, obj, 10 landmark
    coords, cls)`` in resized pixels. Post-processing (YOLOv5-face NMS): ``obj > 0.5``;
    ``conf = obj * cls``; xywh -> xyxy; ``conf > 0.5``; NMS IoU 0.45 by descending ``conf``; rescale
    to the original image (``x * w0 / w1``, ``y * h0 / h1``).

    The model file is loaded with ``torch.jit.load(path, map_location="cpu")`` in the constructor,
    or on first use with ``lazy=True``.

    Args:
        path: the ``yoloface_v5m.pt`` file.
        lazy: defer loading to the first :meth:`detect` call (existence is still checked now).

    Raises:
        CheckpointError: the file is missing, or (now or, with ``lazy``, at first use) is not a
            loadable TorchScript model, naming the file.
    """

    name = "yolo"

    def __init__(self, path: str | os.PathLike, *, lazy: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError("YOLOv5-face detector file not found", path=self.path)
        self._model: torch.jit.ScriptModule | None = None
        self._grids: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        if not lazy:
            self._load()

    def _load(self) -> torch.jit.ScriptModule:
        """Load (once) and return the TorchScript model. Raises CheckpointError naming the file."""
        with self._lock:
            if self._model is None:
                try:
                    with warnings.catch_warnings():
                        # torch >= 2.10 deprecates TorchScript; the official detector file is TorchScript.
                        warnings.simplefilter("ignore", DeprecationWarning)
                        model = torch.jit.load(str(self.path), map_location="cpu")
                except Exception as exc:  # torch raises RuntimeError/ValueError/zipfile errors
                    raise CheckpointError(
                        f"not a loadable TorchScript YOLOv5-face model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); re-download {YOLO_FILENAME}",
                        path=self.path,
                    ) from exc
                model.eval()
                self._model = model
            return self._model

    @staticmethod
    def input_size(width: int, height: int) -> tuple[int, int]:
        """Network input size ``(w1, h1)`` in pixels for an ``width x height`` image (official rule).

        ``r = 416 / min(h0, w0)``; ``h1 = int(h0 * r + 31) // 32 * 32``; ``w1`` likewise.
        """
        r = _YOLO_SHORT_SIDE / min(height, width)
        h1 = int(height * r + 31) // 32 * 32
        w1 = int(width * r + 31) // 32 * 32
        return w1, h1

    def grids(self, h1: int, w1: int) -> list[torch.Tensor]:
        """Anchor grids for strides 8, 16, 32, cached per ``(h1, w1)`` (official face_detect).

        Returns:
            three float32 tensors ``[1, 1, h1//s, w1//s, 2]`` holding ``(x, y)`` = (column, row).
        """
        key = (h1, w1)
        cached = self._grids.get(key)
        if cached is None:
            cached = []
            for s in _YOLO_STRIDES:
                ny, nx = h1 // s, w1 // s
                yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                cached.append(torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float())
            self._grids[key] = cached
        return cached

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        """Detect faces.

        Args:
            image_rgb: RGB uint8 ``[H, W, 3]``; converted to BGR here to match the official input
                (``np.array(pil_rgb)[:, :, ::-1]``).

        Returns:
            faces as :class:`FaceBox` floats in pixels of ``image_rgb``, ordered by descending
            confidence (``obj * cls``) after NMS.

        Raises:
            InputError: ``image_rgb`` is not an RGB uint8 ``[H, W, 3]`` array.
            CheckpointError: the model cannot be loaded or returns something other than ``[1, N, 16]``.
        """
        img_rgb = _check_rgb(image_rgb)
        model = self._load()
        img_bgr = np.ascontiguousarray(img_rgb[:, :, ::-1])  # official input is BGR
        h0, w0 = img_bgr.shape[:2]
        w1, h1 = self.input_size(w0, h0)
        resized = cv2.resize(img_bgr, (w1, h1), interpolation=cv2.INTER_LINEAR)
        net_in = np.ascontiguousarray(resized[:, :, ::-1].transpose(2, 0, 1))  # BGR -> RGB, CHW
        tensor = torch.from_numpy(net_in).float().div(255.0).unsqueeze(0)
        with torch.no_grad():
            try:
                pred = model(tensor, self.grids(h1, w1))
            except Exception as exc:
                raise CheckpointError(
                    f"YOLOv5-face model failed on a [1, 3, {h1}, {w1}] input ({type(exc).__name__}: {exc})",
                    path=self.path,
                ) from exc
        if isinstance(pred, (tuple, list)):
            pred = pred[0]
        if not isinstance(pred, torch.Tensor) or pred.ndim != 3 or pred.shape[0] != 1 or pred.shape[2] != _YOLO_COLUMNS:
            shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise CheckpointError(f"YOLOv5-face model returned {shape}, expected [1, N, 16]", path=self.path)
        return self._postprocess(pred[0].detach().float().cpu().numpy(), w0, h0, w1, h1)

    @staticmethod
    def _postprocess(x: np.ndarray, w0: int, h0: int, w1: int, h1: int) -> list[FaceBox]:
        """YOLOv5-face NMS + rescale (official). ``x``: float32 ``[N, 16]`` in resized pixels."""
        x = x[x[:, 4] > _YOLO_CONF]  # objectness candidates
        if x.shape[0] == 0:
            return []
        conf = x[:, 15] * x[:, 4]  # single class: conf = cls * obj (float32)
        cx, cy, bw, bh = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
        xyxy = np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), axis=1).astype(np.float32)
        ok = conf > _YOLO_CONF
        xyxy, conf = xyxy[ok], conf[ok]
        if xyxy.shape[0] == 0:
            return []
        keep = _nms_xyxy(xyxy, conf, _YOLO_IOU)
        sx, sy = w0 / w1, h0 / h1
        out: list[FaceBox] = []
        for i in keep:
            x1, y1, x2, y2 = xyxy[i]
            out.append(FaceBox(float(x1) * sx, float(y1) * sy, float(x2 - x1) * sx, float(y2 - y1) * sy))
        return out

    def select(self, boxes: Sequence[FaceBox]) -> FaceBox:
        """The official ``maxface`` quirk (:func:`select_face`). Raises FaceNotFoundError on empty."""
        return select_face(boxes)


def load_face_detector(model_dir: str | os.PathLike | None) -> YoloFaceDetector | HaarFaceDetector:
    """The face detector for a Sonic model directory.

    Args:
        model_dir: directory that may hold ``yoloface_v5m.pt`` (official Sonic ``checkpoints/``);
            ``None`` means "no directory".

    Returns:
        :class:`YoloFaceDetector` when ``<model_dir>/yoloface_v5m.pt`` exists (official detector),
        else :class:`HaarFaceDetector` (sonic_rt fallback).

    Raises:
        CheckpointError: the YOLO file exists but cannot be loaded, or the Haar cascade is missing.
    """
    if model_dir is not None:
        path = Path(model_dir) / YOLO_FILENAME
        if path.is_file():
            return YoloFaceDetector(path)
    return HaarFaceDetector()


# --------------------------------------------------------------------------------------------------
# Geometry: square crop, face mask, resize rule
# --------------------------------------------------------------------------------------------------


def square_crop_box(face: FaceBox, width: int, height: int, expand_ratio: float = 0.5) -> tuple[int, int, int, int]:
    """Square crop box around a face, the official ``process_bbox`` (official Sonic sonic.py).

    ``expand``: with ``bw = x2 - x1``, ``bh = y2 - y1`` the box grows by ``expand_ratio * bw`` /
    ``expand_ratio * bh`` on each side, clamped to ``[0, width] x [0, height]``.
    ``to_square``: side ``2c = min(expanded w, h)``, centred on the expanded box, shifted along its
    long side toward the face centre by at most ``|h - w| / 2``; then rounded with Python ``round``
    (banker's rounding) to ``x1, x2 = round(cx -/+ side/2)`` and likewise ``y1, y2``.

    Args:
        face: face box in pixels of the ``width x height`` image.
        width, height: image size in pixels.
        expand_ratio: expansion per side as a fraction of the box size (gradio uses 0.5).

    Returns:
        ``(x1, y1, x2, y2)`` ints in pixels; the crop is ``image[y1:y2, x1:x2]``.

    Raises:
        InputError: non-positive image size or negative ``expand_ratio``.
    """
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    if not (expand_ratio >= 0):
        raise InputError(f"expand_ratio must be >= 0, got {expand_ratio}")
    bx1, by1, bx2, by2 = (float(v) for v in face.xyxy)
    r = float(expand_ratio)
    # expand
    bw, bh = bx2 - bx1, by2 - by1
    ex1 = max(bx1 - r * bw, 0)
    ey1 = max(by1 - r * bh, 0)
    ex2 = min(bx2 + r * bw, width)
    ey2 = min(by2 + r * bh, height)
    # to_square
    h = ey2 - ey1
    w = ex2 - ex1
    c_h = (ey1 + ey2) / 2
    c_w = (ex1 + ex2) / 2
    c = min(h, w) / 2
    src_h = (by1 + by2) / 2
    src_w = (bx1 + bx2) / 2
    s_h = s_w = 0.0
    if w < h:
        d = abs((h - w) / 2)
        s_h = min(d, abs(src_h - c_h))
        s_h = s_h if src_h > c_h else -s_h
    else:
        d = abs((h - w) / 2)
        s_w = min(d, abs(src_w - c_w))
        s_w = s_w if src_w > c_w else -s_w
    c_h += s_h
    c_w += s_w
    sx1, sy1, sx2, sy2 = c_w - c, c_h - c, c_w + c, c_h + c
    # restore (official: re-centre and round)
    cx = (sx1 + sx2) / 2
    cy = (sy1 + sy2) / 2
    ww = hh = min(sx2 - sx1, sy2 - sy1)
    x1, x2 = round(cx - ww / 2), round(cx + ww / 2)
    y1, y2 = round(cy - hh / 2), round(cy + hh / 2)
    return (int(x1), int(y1), int(x2), int(y2))


def face_mask_image(size_wh: tuple[int, int], face: FaceBox, area: float = 1.1) -> Image.Image:
    """Rectangular face mask, official ``image_audio_to_tensor`` (official Sonic src/dataset/test_preprocess.py).

    With ``x2 = x1 + w``, ``y2 = y1 + h``: ``ww, hh = w * area, h * area``;
    ``center = [(x2 + x1) // 2, (y2 + y1) // 2]`` (floor division on floats);
    ``mx1 = max(center[0] - ww // 2, 0)``, ``my1 = max(center[1] - hh // 2, 0)``,
    ``mx2 = min(center[0] + ww // 2, W)``, ``my2 = min(center[1] + hh // 2, H)``; the mask is 255 on
    ``[int(my1):int(my2), int(mx1):int(mx2)]`` and 0 elsewhere. ``area=1.1`` is what official
    ``sonic.py`` passes (the function default there is 1.25).

    Args:
        size_wh: ``(W, H)`` of the image the box lives in, pixels.
        face: face box in that image's pixels.
        area: linear scale of the mask rectangle relative to the face box.

    Returns:
        PIL ``RGB`` image ``W x H`` (uint8 ``[H, W, 3]``, values 0/255).

    Raises:
        InputError: non-positive size or ``area``.
    """
    W, H = int(size_wh[0]), int(size_wh[1])
    if W <= 0 or H <= 0:
        raise InputError(f"mask size must be positive, got {W}x{H}")
    if not (area > 0):
        raise InputError(f"mask area must be > 0, got {area}")
    x1, y1 = float(face.x), float(face.y)
    x2, y2 = x1 + float(face.w), y1 + float(face.h)
    ww, hh = (x2 - x1) * area, (y2 - y1) * area
    center = [(x2 + x1) // 2, (y2 + y1) // 2]
    mx1 = max(center[0] - ww // 2, 0)
    my1 = max(center[1] - hh // 2, 0)
    mx2 = min(center[0] + ww // 2, W)
    my2 = min(center[1] + hh // 2, H)
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    # numpy slicing: a negative end (box entirely left/above) would wrap; clamp it to 0 (empty mask).
    ys, ye = int(my1), max(int(my2), 0)
    xs, xe = int(mx1), max(int(mx2), 0)
    mask[ys:ye, xs:xe] = 255
    return Image.fromarray(mask)


def generation_size(width: int, height: int, min_resolution: int = 512) -> tuple[int, int]:
    """Generation size, official ``image_audio_to_tensor`` (official Sonic src/dataset/test_preprocess.py).

    ``scale = min_resolution / min(w, h)``; ``new_w = round(w * scale / 64) * 64``;
    ``new_h = round(h * scale / 64) * 64`` (Python ``round``). E.g. 1920x1080 -> 896x512.

    Args:
        width, height: image size in pixels.
        min_resolution: target short side in pixels (official default 512).

    Returns:
        ``(new_w, new_h)`` in pixels, both multiples of 64.

    Raises:
        InputError: non-positive sizes, or a ``min_resolution`` so small (< 32) that a side rounds to 0.
    """
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    if min_resolution <= 0:
        raise InputError(f"min_resolution must be positive, got {min_resolution}")
    scale = min_resolution / min(width, height)
    new_w = round(width * scale / 64) * 64
    new_h = round(height * scale / 64) * 64
    if new_w <= 0 or new_h <= 0:
        raise InputError(
            f"min_resolution {min_resolution} gives an empty generation size {new_w}x{new_h} for a "
            f"{width}x{height} image; use min_resolution >= 64"
        )
    return int(new_w), int(new_h)


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------

_clip_processor: Any = None
_clip_lock = threading.Lock()


def clip_image_processor() -> Any:
    """``CLIPImageProcessor()`` with its defaults, created once.

    transformers 5 maps ``CLIPImageProcessor`` to a torchvision backend and falls back (with a
    warning) to ``CLIPImageProcessorPil`` when torchvision is absent; we pick the PIL/numpy one
    directly in that case, which is the processor the official code (transformers 4) used.
    """
    global _clip_processor
    with _clip_lock:
        if _clip_processor is None:
            import importlib.util

            proc: Any = None
            if importlib.util.find_spec("torchvision") is None:
                try:
                    from transformers import CLIPImageProcessorPil  # type: ignore[attr-defined]

                    proc = CLIPImageProcessorPil()
                except ImportError:
                    proc = None
            if proc is None:
                from transformers import CLIPImageProcessor

                proc = CLIPImageProcessor()
            _clip_processor = proc
        return _clip_processor


def clip_pixels(image: Image.Image) -> torch.Tensor:
    """CLIP vision input, official ``image_audio_to_tensor`` (official Sonic src/dataset/test_preprocess.py).

    ``CLIPImageProcessor()`` with its defaults (shortest edge 224, bicubic, centre crop 224,
    rescale 1/255, OpenAI CLIP mean/std) applied to ``image.resize((224, 224), Image.LANCZOS)``.

    Args:
        image: PIL image (converted to RGB if needed), any size.

    Returns:
        float32 ``[1, 3, 224, 224]``, normalised with the CLIP mean/std (roughly [-1.8, 2.2]).

    Raises:
        InputError: ``image`` is not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"clip_pixels needs a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    small = image.resize((224, 224), Image.LANCZOS)
    out = clip_image_processor()(images=small, return_tensors="pt").pixel_values
    return out.to(torch.float32).reshape(1, 3, 224, 224)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` for an RGB uint8 PIL image: float32 ``[3, H, W]`` = pixels / 255."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32).div(255)


@dataclass(frozen=True)
class Reference:
    """The prepared reference portrait (official Sonic src/dataset/test_preprocess.py outputs).

    Attributes:
        ref_img: float32 ``[1, 3, H, W]`` in [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``).
        face_mask: float32 ``[1, 1, H, W]`` in [0, 1] (channel 0 of the resized mask / 255).
        clip_pixels: float32 ``[1, 3, 224, 224]`` CLIP-normalised pixels.
        crop_box: ``(x1, y1, x2, y2)`` square crop in original-image pixels, or ``None`` without crop.
        face_box: face box in the cropped (or, without crop, original) image before the resize, pixels.
        detector: ``"yolo"``, ``"haar"`` (whatever the detector's ``name`` is) or ``"user"``.
        size: ``(W, H)`` of ``ref_img`` in pixels (multiples of 64).
    """

    ref_img: torch.Tensor
    face_mask: torch.Tensor
    clip_pixels: torch.Tensor
    crop_box: tuple[int, int, int, int] | None
    face_box: FaceBox
    detector: str
    size: tuple[int, int]


def _select(detector: Any, boxes: Sequence[FaceBox]) -> FaceBox:
    """Use the detector's own ``select`` if it has one, else the official maxface quirk."""
    sel = getattr(detector, "select", None)
    return sel(boxes) if callable(sel) else select_face(boxes)


def prepare_reference(
    image: Image.Image,
    detector: FaceDetector | Any,
    *,
    face_box: FaceBox | str | Sequence[float] | None = None,
    crop: bool = True,
    min_resolution: int = 512,
    expand_ratio: float = 0.5,
    source: str | None = None,
) -> Reference:
    """Turn a portrait into Sonic's reference tensors (official Sonic sonic.py + test_preprocess.py).

    Steps: detect on the full image (skipped with ``face_box``; YOLO picks with the official
    maxface quirk, Haar the largest face) -> with ``crop`` (default, as gradio): square crop
    (:func:`square_crop_box`), detect again on the crop as the official code does -> face mask
    (:func:`face_mask_image`, area 1.1) -> resize image and mask with LANCZOS to
    :func:`generation_size` if it differs -> tensors.

    Deviations from official: if the second detection on the crop finds nothing, the first box
    translated into crop coordinates is used (official fails). With an explicit ``face_box`` no
    detection runs; the mask uses the given box (translated into the crop).

    Args:
        image: PIL portrait (converted to RGB if it is not).
        detector: a :class:`YoloFaceDetector`, :class:`HaarFaceDetector` or any object with
            ``detect(rgb) -> list[FaceBox]`` and ``name``; may be ``None`` when ``face_box`` is given.
        face_box: explicit face ``(x, y, w, h)`` in original-image pixels (anything
            :meth:`FaceBox.from_user` accepts).
        crop: square-crop around the face (True) or use the whole image (False).
        min_resolution: generation short side in pixels, >= 64 (official default 512).
        expand_ratio: crop expansion per side as a fraction of the face box (gradio 0.5).
        source: name of the image file, put in front of error messages.

    Returns:
        a :class:`Reference`.

    Raises:
        FaceNotFoundError: no face in the image (message names ``source`` and suggests ``--face-box``).
        InputError: bad ``min_resolution``, ``expand_ratio``, ``face_box`` (unparsable, or not
            overlapping the image), not a PIL image, or a degenerate crop/size.
        CheckpointError: the detector model fails.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"the portrait must be a PIL image, got {type(image).__name__}", path=source)
    if isinstance(min_resolution, bool) or not isinstance(min_resolution, (int, np.integer)) or min_resolution < 64:
        raise InputError(f"min_resolution must be an integer >= 64 pixels, got {min_resolution!r}")
    min_resolution = int(min_resolution)
    if not (isinstance(expand_ratio, (int, float)) and math.isfinite(expand_ratio) and expand_ratio >= 0):
        raise InputError(f"expand_ratio must be a finite number >= 0, got {expand_ratio!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    W0, H0 = image.size
    if W0 < 1 or H0 < 1:
        raise InputError(f"the portrait is empty ({W0}x{H0})", path=source)
    rgb = np.asarray(image, dtype=np.uint8)

    if face_box is not None:
        user = FaceBox.from_user(face_box)
        ux1, uy1, ux2, uy2 = user.xyxy
        if min(ux2, W0) - max(ux1, 0) <= 0 or min(uy2, H0) - max(uy1, 0) <= 0:
            raise InputError(
                f"face box x={user.x:g},y={user.y:g},w={user.w:g},h={user.h:g} lies outside the {W0}x{H0} image",
                path=source,
            )
        first, det_name = user, "user"
    else:
        if detector is None:
            raise InputError("no face detector and no face box given", path=source)
        boxes = detector.detect(rgb)
        if not boxes:
            raise FaceNotFoundError(
                f"no face found in the {W0}x{H0} portrait; pass --face-box x,y,w,h (pixels) to set it by hand",
                path=source,
            )
        first, det_name = _select(detector, boxes), str(detector.name)

    crop_box: tuple[int, int, int, int] | None = None
    if crop:
        crop_box = square_crop_box(first, W0, H0, expand_ratio=expand_ratio)
        cx1, cy1, cx2, cy2 = crop_box
        if cx2 - cx1 < 1 or cy2 - cy1 < 1:
            raise InputError(f"the face box gives an empty crop {crop_box}; pass a larger --face-box", path=source)
        img = Image.fromarray(np.ascontiguousarray(rgb[cy1:cy2, cx1:cx2]))
        fallback = first.translated(-cx1, -cy1)
        if det_name == "user":
            mask_box = fallback
        else:
            # Official: detect again on the crop. Deviation: if that finds nothing, reuse the first box.
            again = detector.detect(np.asarray(img, dtype=np.uint8))
            mask_box = _select(detector, again) if again else fallback
    else:
        img = image
        mask_box = first

    w, h = img.size
    mask = face_mask_image((w, h), mask_box, area=1.1)
    new_w, new_h = generation_size(w, h, min_resolution)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.LANCZOS)
        mask = mask.resize((new_w, new_h), Image.LANCZOS)

    ref = _to_tensor(img).sub_(0.5).div_(0.5).unsqueeze(0)  # Normalize([0.5], [0.5])
    fmask = _to_tensor(mask)[0:1].unsqueeze(0)
    clip = clip_pixels(img)
    return Reference(
        ref_img=ref,
        face_mask=fmask,
        clip_pixels=clip,
        crop_box=crop_box,
        face_box=mask_box,
        detector=det_name,
        size=(new_w, new_h),
    )
