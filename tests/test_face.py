"""Tests of sonic_rt.face: detectors, official process_bbox / mask / resize rules, reference tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sonic_rt.errors import CheckpointError, FaceNotFoundError, InputError
from sonic_rt.face import (
    FaceBox,
    HaarFaceDetector,
    Reference,
    YoloFaceDetector,
    clip_pixels,
    face_mask_image,
    generation_size,
    load_face_detector,
    prepare_reference,
    select_face,
    select_largest,
    square_crop_box,
)

skdata = pytest.importorskip("skimage.data")


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def haar() -> HaarFaceDetector:
    return HaarFaceDetector()


# ------------------------------------------------------------------------------------------ FaceBox


def test_facebox_basics() -> None:
    b = FaceBox(10.0, 20.0, 30.0, 40.0)
    assert b.xyxy == (10.0, 20.0, 40.0, 60.0)
    assert b.area == 1200.0
    assert b.translated(-5, 3) == FaceBox(5.0, 23.0, 30.0, 40.0)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        b.x = 1.0  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "value, expected",
    [
        ("100,80,60,70", FaceBox(100, 80, 60, 70)),
        (" 1.5, 2 , 3.25 ,4 ", FaceBox(1.5, 2, 3.25, 4)),
        ("(1 2 3 4)", FaceBox(1, 2, 3, 4)),
        ((1, 2, 3, 4), FaceBox(1, 2, 3, 4)),
        ([-5, 0, 10, 10], FaceBox(-5, 0, 10, 10)),
    ],
)
def test_facebox_from_user_ok(value: object, expected: FaceBox) -> None:
    assert FaceBox.from_user(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1,2,3",
        "1,2,3,4,5",
        "a,b,c,d",
        "1,2,0,5",
        "1,2,3,-4",
        "nan,1,2,3",
        "1,2,inf,3",
        (1, 2, 3),
        (1, 2, True, 4),
        None,
        7,
    ],
)
def test_facebox_from_user_bad(value: object) -> None:
    with pytest.raises(InputError):
        FaceBox.from_user(value)


# ------------------------------------------------------------------------------------------ Haar


def test_haar_finds_astronaut(astronaut: np.ndarray, haar: HaarFaceDetector) -> None:
    boxes = haar.detect(astronaut)
    assert len(boxes) >= 1
    face = haar.select(boxes)
    # Hand-checked face region of skimage.data.astronaut() (512x512): x 175-265, y 60-160.
    assert iou(face.xyxy, (175.0, 60.0, 265.0, 160.0)) > 0.6
    assert haar.name == "haar"


def test_haar_rejects_bad_input(haar: HaarFaceDetector) -> None:
    with pytest.raises(InputError):
        haar.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError):
        haar.detect(np.zeros((10, 10, 3), np.float32))


def test_load_face_detector_falls_back_to_haar(tmp_path: Path) -> None:
    assert isinstance(load_face_detector(None), HaarFaceDetector)
    assert isinstance(load_face_detector(tmp_path), HaarFaceDetector)


# ------------------------------------------------------------------------------------------ selection


def test_select_face_maxface_quirk() -> None:
    boxes = [FaceBox(0, 0, 10, 10), FaceBox(0, 0, 20, 20), FaceBox(0, 0, 15, 15)]  # areas 100, 400, 225
    # Official: max_area stays area(box 0) -> the LAST box larger than box 0 wins, not the largest.
    assert select_face(boxes) == boxes[2]
    assert select_largest(boxes) == boxes[1]
    assert select_face(boxes[:1]) == boxes[0]
    assert select_face([FaceBox(0, 0, 30, 30), FaceBox(0, 0, 20, 20)]) == FaceBox(0, 0, 30, 30)
    with pytest.raises(FaceNotFoundError):
        select_face([])


# ------------------------------------------------------------------------------------------ process_bbox


def xywh(x1: float, y1: float, x2: float, y2: float) -> FaceBox:
    return FaceBox(x1, y1, x2 - x1, y2 - y1)


def test_square_crop_tall_with_bankers_rounding() -> None:
    # bbox (100.5,100)-(200.5,250): expanded (50.5,25)-(250.5,325), w=200 < h=300, no shift;
    # square x 50.5..250.5 -> round(50.5)=50, round(250.5)=250 (banker's); y 75..275.
    assert square_crop_box(xywh(100.5, 100, 200.5, 250), 1000, 1000) == (50, 75, 250, 275)


def test_square_crop_wide() -> None:
    # bbox (300,400)-(460,500): expanded (220,350)-(540,550), w=320 > h=200, c=100, centre (380,450).
    assert square_crop_box(xywh(300, 400, 460, 500), 1000, 1000) == (280, 350, 480, 550)


def test_square_crop_clamped_tall() -> None:
    # 640x480, bbox (500,50)-(620,200): expanded (440,0)-(640,275): w=200, h=275, c=100, c_h=137.5;
    # src_h=125 -> s_h = -min(37.5, 12.5) -> c_h=125 -> (440,25)-(640,225).
    assert square_crop_box(xywh(500, 50, 620, 200), 640, 480) == (440, 25, 640, 225)


def test_square_crop_clamped_wide() -> None:
    # 400x150, bbox (20,30)-(120,110): expanded (0,0)-(170,150): w=170 > h=150, c=75, c_w=85;
    # src_w=70 -> s_w = -min(10, 15) = -10 -> c_w=75 -> (0,0)-(150,150).
    assert square_crop_box(xywh(20, 30, 120, 110), 400, 150) == (0, 0, 150, 150)


def test_square_crop_expand_ratio_and_errors() -> None:
    assert square_crop_box(xywh(100, 100, 200, 200), 1000, 1000, expand_ratio=0.0) == (100, 100, 200, 200)
    with pytest.raises(InputError):
        square_crop_box(xywh(0, 0, 10, 10), 0, 10)


# ------------------------------------------------------------------------------------------ face mask


def mask_bounds(img: Image.Image) -> tuple[int, int, int, int]:
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert set(np.unique(a)) <= {0, 255}
    ys, xs = np.nonzero(a[:, :, 0])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_face_mask_bounds() -> None:
    # box (50,20,40,30): ww=44, hh=33, centre (70,35) -> x 48..92, y 35-16=19..51.
    m = face_mask_image((200, 100), FaceBox(50, 20, 40, 30))
    assert m.size == (200, 100)
    assert mask_bounds(m) == (48, 19, 92, 51)


def test_face_mask_clamped_float_box() -> None:
    # box (-10.5,5.25,30,20): x2=19.5, y2=25.25, ww=33, hh=22, centre ((9.0)//2, 30.5//2) = (4, 15);
    # x max(4-16, 0)=0 .. 20, y 4 .. 26.
    m = face_mask_image((100, 100), FaceBox(-10.5, 5.25, 30, 20))
    assert mask_bounds(m) == (0, 4, 20, 26)


def test_face_mask_outside_is_empty() -> None:
    m = face_mask_image((50, 50), FaceBox(-100, -100, 20, 20))
    assert not np.asarray(m).any()


# ------------------------------------------------------------------------------------------ resize rule


@pytest.mark.parametrize(
    "size, expected",
    [((512, 512), (512, 512)), ((1920, 1080), (896, 512)), ((300, 500), (512, 832)), ((190, 190), (512, 512))],
)
def test_generation_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert generation_size(*size) == expected


def test_generation_size_errors() -> None:
    with pytest.raises(InputError):
        generation_size(0, 10)
    with pytest.raises(InputError):
        generation_size(100, 100, min_resolution=16)  # round(0.25) * 64 = 0


# ------------------------------------------------------------------------------------------ CLIP


def test_clip_pixels_uniform_image() -> None:
    img = Image.new("RGB", (300, 200), (128, 64, 32))
    px = clip_pixels(img)
    assert px.shape == (1, 3, 224, 224) and px.dtype == torch.float32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor([128, 64, 32]) / 255.0 - mean) / std
    assert torch.allclose(px[0, :, 100, 100], expected, atol=1e-5)
    assert torch.allclose(px, expected.view(1, 3, 1, 1).expand_as(px), atol=1e-5)


# ------------------------------------------------------------------------------------------ prepare_reference


def test_prepare_reference_astronaut(astronaut: np.ndarray, haar: HaarFaceDetector) -> None:
    ref = prepare_reference(Image.fromarray(astronaut), haar, source="astronaut.png")
    assert isinstance(ref, Reference)
    assert ref.detector == "haar"
    first = haar.select(haar.detect(astronaut))
    assert ref.crop_box == square_crop_box(first, 512, 512)
    x1, y1, x2, y2 = ref.crop_box
    assert x2 - x1 == y2 - y1 and 0 <= x1 and 0 <= y1 and x2 <= 512 and y2 <= 512
    assert ref.size == (512, 512)
    assert ref.ref_img.shape == (1, 3, 512, 512) and ref.ref_img.dtype == torch.float32
    assert ref.ref_img.min() >= -1.0 and ref.ref_img.max() <= 1.0
    assert ref.face_mask.shape == (1, 1, 512, 512) and ref.face_mask.dtype == torch.float32
    assert ref.face_mask.min() >= 0.0 and ref.face_mask.max() <= 1.0
    assert ref.clip_pixels.shape == (1, 3, 224, 224) and ref.clip_pixels.dtype == torch.float32
    # Mask is 1 at the face centre (mapped into the resized crop) and 0 in the far corners.
    s = 512 / (x2 - x1)
    fx, fy = ref.face_box.x + ref.face_box.w / 2, ref.face_box.y + ref.face_box.h / 2
    assert ref.face_mask[0, 0, int(fy * s), int(fx * s)] == 1.0
    for cy, cx in [(2, 2), (2, 509), (509, 2), (509, 509)]:
        assert ref.face_mask[0, 0, cy, cx] == 0.0
    # ref_img is ToTensor + Normalize(0.5, 0.5) of the LANCZOS-resized crop.
    crop = Image.fromarray(astronaut[y1:y2, x1:x2]).resize((512, 512), Image.LANCZOS)
    expected = torch.from_numpy(np.asarray(crop).transpose(2, 0, 1).copy()).float() / 255 * 2 - 1
    assert torch.allclose(ref.ref_img[0], expected, atol=1e-6)


def test_prepare_reference_no_crop(astronaut: np.ndarray, haar: HaarFaceDetector) -> None:
    ref = prepare_reference(Image.fromarray(astronaut), haar, crop=False, min_resolution=256)
    assert ref.crop_box is None
    assert ref.size == (256, 256)
    assert ref.face_box == haar.select(haar.detect(astronaut))
    assert ref.ref_img.shape == (1, 3, 256, 256)


def test_prepare_reference_no_face(haar: HaarFaceDetector) -> None:
    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    with pytest.raises(FaceNotFoundError) as ei:
        prepare_reference(grey, haar, source="grey.png")
    assert "grey.png" in str(ei.value)
    assert "--face-box" in str(ei.value)


def test_prepare_reference_user_box() -> None:
    grey = Image.new("RGB", (400, 300), (128, 128, 128))
    ref = prepare_reference(grey, None, face_box="100,80,60,70")
    assert ref.detector == "user"
    crop = square_crop_box(FaceBox(100, 80, 60, 70), 400, 300)
    assert ref.crop_box == crop
    assert ref.face_box == FaceBox(100 - crop[0], 80 - crop[1], 60, 70)
    side = crop[2] - crop[0]
    assert ref.size == generation_size(side, side)
    s = ref.size[0] / side
    fx, fy = ref.face_box.x + 30, ref.face_box.y + 35
    assert ref.face_mask[0, 0, int(fy * s), int(fx * s)] == 1.0
    assert torch.allclose(ref.ref_img, torch.full_like(ref.ref_img, 128 / 255 * 2 - 1), atol=1e-6)


class OnceDetector:
    """Finds one face on the full image and nothing on the crop (tests the crop fallback)."""

    name = "once"

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def detect(self, image_rgb: np.ndarray) -> list[FaceBox]:
        self.calls.append(image_rgb.shape)
        return [FaceBox(100, 80, 60, 70)] if len(self.calls) == 1 else []


def test_prepare_reference_redetect_fallback() -> None:
    det = OnceDetector()
    ref = prepare_reference(Image.new("RGB", (400, 300), (90, 90, 90)), det)
    crop = square_crop_box(FaceBox(100, 80, 60, 70), 400, 300)
    assert det.calls == [(300, 400, 3), (crop[3] - crop[1], crop[2] - crop[0], 3)]  # detected twice
    assert ref.detector == "once" and ref.crop_box == crop
    assert ref.face_box == FaceBox(100 - crop[0], 80 - crop[1], 60, 70)  # first box, in crop pixels


def test_prepare_reference_bad_args(astronaut: np.ndarray, haar: HaarFaceDetector) -> None:
    img = Image.fromarray(astronaut)
    with pytest.raises(InputError):
        prepare_reference(img, haar, face_box="600,600,50,50")  # outside the 512x512 image
    with pytest.raises(InputError):
        prepare_reference(img, haar, face_box="1,2,3")
    with pytest.raises(InputError):
        prepare_reference(img, haar, min_resolution=32)
    with pytest.raises(InputError):
        prepare_reference(img, haar, min_resolution=512.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ YOLO

# Original image 1000x600 -> r = 416/600 -> h1 = 416, w1 = int(693.3 + 31)//32*32 = 704.
W0, H0, W1, H1 = 1000, 600, 704, 416


class FakeYolo(torch.nn.Module):
    """Stands in for yoloface_v5m.pt: checks its inputs and returns a fixed [1, 6, 16] prediction."""

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        if img.dim() != 4 or img.size(0) != 1 or img.size(1) != 3:
            raise ValueError("bad image shape")
        if img.dtype != torch.float32 or float(img.max()) > 1.0:
            raise ValueError("image must be float32 in [0, 1]")
        h = img.size(2)
        w = img.size(3)
        if len(grids) != 3:
            raise ValueError("need 3 grids")
        strides = [8, 16, 32]
        for i in range(3):
            g = grids[i]
            s = strides[i]
            if g.dim() != 5 or g.size(0) != 1 or g.size(1) != 1 or g.size(4) != 2:
                raise ValueError("bad grid shape")
            if g.size(2) != h // s or g.size(3) != w // s:
                raise ValueError("bad grid shape")
            if g.dtype != torch.float32 or float(g[0, 0, 0, 1, 0]) != 1.0 or float(g[0, 0, 1, 0, 1]) != 1.0:
                raise ValueError("bad grid content: (x, y) order")
        pred = torch.zeros(1, 6, 16)
        lm = torch.zeros(10)
        rows = [
            # cx, cy, w, h, obj, cls
            [200.0, 150.0, 100.0, 120.0, 0.7, 0.99],  # A: conf 0.693
            [205.0, 152.0, 100.0, 120.0, 0.65, 0.9],  # duplicate of A, conf 0.585 -> NMS
            [500.0, 300.0, 160.0, 180.0, 0.8, 0.9],  # C: conf 0.72 (larger, first by conf)
            [600.0, 100.0, 50.0, 50.0, 0.4, 1.0],  # obj <= 0.5 -> dropped
            [100.0, 300.0, 50.0, 50.0, 0.6, 0.7],  # conf 0.42 -> dropped
            [400.0, 100.0, 50.0, 50.0, 0.95, 0.3],  # conf 0.285 -> dropped
        ]
        for i in range(6):
            r = rows[i]
            pred[0, i, 0:5] = torch.tensor(r[0:5])
            pred[0, i, 5:15] = lm
            pred[0, i, 15] = r[5]
        return pred


@pytest.fixture()
def yolo_dir(tmp_path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
        torch.jit.script(FakeYolo()).save(str(tmp_path / "yoloface_v5m.pt"))
    return tmp_path


def test_yolo_input_size() -> None:
    assert YoloFaceDetector.input_size(W0, H0) == (W1, H1)
    assert YoloFaceDetector.input_size(512, 512) == (416, 416)


def test_yolo_detect(yolo_dir: Path) -> None:
    det = load_face_detector(yolo_dir)
    assert isinstance(det, YoloFaceDetector) and det.name == "yolo"
    img = np.full((H0, W0, 3), 100, np.uint8)
    boxes = det.detect(img)
    sx, sy = W0 / W1, H0 / H1
    expected = [
        (420.0 * sx, 210.0 * sy, 160.0 * sx, 180.0 * sy),  # C first (higher obj*cls)
        (150.0 * sx, 90.0 * sy, 100.0 * sx, 120.0 * sy),  # A; its duplicate removed by NMS
    ]
    assert len(boxes) == 2
    for b, e in zip(boxes, expected):
        assert (b.x, b.y, b.w, b.h) == pytest.approx(e, rel=1e-9, abs=1e-9)
    assert select_face(boxes) == boxes[0]
    grids = det.grids(H1, W1)
    assert [tuple(g.shape) for g in grids] == [(1, 1, 52, 88, 2), (1, 1, 26, 44, 2), (1, 1, 13, 22, 2)]
    assert det.grids(H1, W1) is grids  # cached per (h1, w1)


def test_yolo_prepare_reference(yolo_dir: Path) -> None:
    det = load_face_detector(yolo_dir)
    img = Image.fromarray(np.full((H0, W0, 3), 100, np.uint8))
    ref = prepare_reference(img, det, min_resolution=128)
    assert ref.detector == "yolo"
    first = select_face(det.detect(np.asarray(img)))
    assert ref.crop_box == square_crop_box(first, W0, H0)
    assert ref.ref_img.shape[-2:] == (ref.size[1], ref.size[0])


def test_yolo_corrupt_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "yoloface_v5m.pt"
    bad.write_bytes(b"this is not a torchscript archive")
    with pytest.raises(CheckpointError) as ei:
        load_face_detector(tmp_path)
    assert "yoloface_v5m.pt" in str(ei.value)
    lazy = YoloFaceDetector(bad, lazy=True)
    with pytest.raises(CheckpointError):
        lazy.detect(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(CheckpointError) as ei2:
        YoloFaceDetector(tmp_path / "missing.pt")
    assert "missing.pt" in str(ei2.value)


@pytest.mark.parametrize("crop", [True, False])
def test_exif_orientation_is_applied_with_and_without_crop(
    astronaut: np.ndarray, haar: HaarFaceDetector, tmp_path: Path, crop: bool
) -> None:
    """A phone photo stored sideways with EXIF Orientation 6 is animated upright in both modes. The official code
    applies the orientation with the crop (cv2.imread honours EXIF) but not without it (PIL.Image.open does not);
    sonic_rt applies it in both, on purpose: the same photo should not turn sideways when crop is off."""
    from sonic_rt.media import load_image

    wide = np.zeros((512, 768, 3), np.uint8)
    wide[:, 128:640] = astronaut  # displayed upright: 768 wide, 512 tall, face left of centre
    stored = np.ascontiguousarray(np.rot90(wide, k=1))  # stored rotated 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    ref = prepare_reference(load_image(path), haar, crop=crop, min_resolution=256)
    upright = prepare_reference(Image.fromarray(wide), haar, crop=crop, min_resolution=256)
    assert ref.size == upright.size
    assert ref.size == ((256, 256) if crop else (384, 256))  # landscape, as displayed
    assert iou(ref.face_box.xyxy, upright.face_box.xyxy) > 0.8
