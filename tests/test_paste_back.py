"""Paste-back of the generated crop into the whole photo (issue 14): sizes, exactness outside the box, the
feather ramp, colour correction, boxes past the border, tiny/huge/grey/RGBA photos, chunking and memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sonic_rt.errors import ImageError, InputError
from sonic_rt.paste_back import PasteBack, PasteGeometry, feather_weights, main

# The photo: skimage's astronaut (512x512) placed off-centre in a wider 1001x701 canvas (odd sides, so the
# output rounds down to 1000x700). The canvas outside the astronaut is its mirror image: textured everywhere,
# so "exactly the original" means something.
PAD_TOP, PAD_LEFT = 120, 420
CROP = (PAD_LEFT + 100, PAD_TOP + 10, PAD_LEFT + 100 + 320, PAD_TOP + 10 + 320)  # 320 px square around the face
GEN = (512, 512)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    astro = data.astronaut()
    H, W = 701, 1001
    return np.ascontiguousarray(
        np.pad(astro, ((PAD_TOP, H - 512 - PAD_TOP), (PAD_LEFT, W - 512 - PAD_LEFT), (0, 0)), mode="reflect")
    )


def crop_as_generated(photo: np.ndarray, box=CROP, size=GEN, cast=(0.0, 0.0, 0.0), gain=1.0) -> torch.Tensor:
    """The crop resized to the generation size (official Lanczos), with an optional colour cast: uint8 [3, h, w]."""
    x1, y1, x2, y2 = box
    crop = Image.fromarray(photo[y1:y2, x1:x2]).resize(size, Image.LANCZOS)
    g = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)
    g = g * gain + torch.tensor(cast, dtype=torch.float32).view(3, 1, 1)
    return g.clamp(0, 255).round().to(torch.uint8)


def constant_frames(colours, size=GEN) -> torch.Tensor:
    """One uint8 [3, h, w] frame per RGB colour, ``size = (w, h)``."""
    return torch.tensor(colours, dtype=torch.uint8).view(-1, 3, 1, 1).expand(-1, 3, *size[::-1]).contiguous()


def box_masks(geometry: PasteGeometry):
    """(outside the box, inside the box farther than the feather from its edge) as [H, W] bool."""
    W, H = geometry.output_size
    x1, y1, x2, y2 = geometry.box
    f = geometry.feather
    yy, xx = np.mgrid[0:H, 0:W]
    inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
    core = (xx >= x1 + f) & (xx < x2 - f) & (yy >= y1 + f) & (yy < y2 - f)
    return ~inside, core


def test_output_is_the_photo_at_its_even_size(photo):
    paste = PasteBack(photo, CROP, GEN)
    assert paste.output_size == (1000, 700)
    assert paste.geometry.original_size == (1001, 701) and paste.geometry.scale == 1.0
    assert paste.crop_box == CROP and paste.geometry.box == CROP and paste.geometry.feather == 20  # 320 / 16
    out = paste(crop_as_generated(photo)[None])
    assert out.dtype == np.uint8 and out.shape == (1, 700, 1000, 3)


def test_outside_exactly_original_inside_generated(photo):
    paste = PasteBack(photo, CROP, GEN, colour_correction=False)
    colours = [(200, 30, 40), (10, 250, 128)]
    out = paste(constant_frames(colours))
    outside, core = box_masks(paste.geometry)
    original = photo[:700, :1000]
    for k, colour in enumerate(colours):
        np.testing.assert_array_equal(out[k][outside], original[outside])  # every pixel outside the box
        assert (out[k][core] == np.array(colour, np.uint8)).all()  # the generated colour, beyond the feather
        # the band changed something, but only between the original and the generated colour
        band = ~outside & ~core
        lo = np.minimum(original[band], colour).astype(int) - 1
        hi = np.maximum(original[band], colour).astype(int) + 1
        assert ((out[k][band] >= lo) & (out[k][band] <= hi)).all()


def test_feather_ramp_is_monotone_without_a_hard_edge(photo):
    paste = PasteBack(photo, CROP, GEN, colour_correction=False)
    f = paste.geometry.feather
    # the blend weight as the output shows it, on the real photo: frames all 0 and all 255
    black, white = paste(constant_frames([(0, 0, 0)]))[0], paste(constant_frames([(255, 255, 255)]))[0]
    weight = (white.astype(float) - black.astype(float)).mean(axis=2) / 255  # +-1/255 from rounding
    x1, y1, x2, y2 = CROP
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    for ramp in (
        weight[cy, x1 : x1 + f + 1],
        weight[cy, x2 - f - 1 : x2][::-1],  # left, right edge inward
        weight[y1 : y1 + f + 1, cx],
        weight[y2 - f - 1 : y2, cx][::-1],
    ):  # top, bottom
        assert (np.diff(ramp) >= -2 / 255).all(), ramp  # monotone up to rounding
        assert ramp[0] < 0.05 and ramp[-1] > 0.99
        assert np.abs(np.diff(ramp)).max() < 1.5 / f + 2 / 255  # smoothstep's steepest slope: no step
    assert (weight[cy, x1 - 20 : x1] == 0).all() and (weight[cy, x2 : x2 + 20] == 0).all()
    # the weights themselves: exactly monotone along each axis, 1 beyond the feather
    w = feather_weights(paste.geometry)[0].numpy()
    row = w[w.shape[0] // 2]
    assert (np.diff(row[: len(row) // 2]) >= 0).all() and (np.diff(row[len(row) // 2 :]) <= 0).all()
    assert (w[f:-f, f:-f] == 1).all() and 0 < w.min() < 0.01


@pytest.mark.parametrize("mode", ["mean", "mean_std"])
def test_colour_correction_matches_the_band(photo, mode):
    cast = (18.0, 6.0, -14.0)
    gen = crop_as_generated(photo, cast=cast)[None]
    original = photo[:700, :1000].astype(float)

    def band_stats(paste):
        out = paste(gen)[0].astype(float)
        w = feather_weights(paste.geometry)[0].numpy()
        x1, y1, x2, y2 = paste.geometry.region
        band = (w > 0.25) & (w < 1)
        orig = original[y1:y2, x1:x2][band]
        # the pasted generated value, recovered from the blend out = orig + w * (gen - orig); error <= 2 levels
        pasted = orig + (out[y1:y2, x1:x2][band] - orig) / w[band][:, None]
        core = original[y1:y2, x1:x2][w == 1].mean(axis=0), out[y1:y2, x1:x2][w == 1].mean(axis=0)
        return pasted.mean(axis=0) - orig.mean(axis=0), pasted.std(axis=0) / orig.std(axis=0), core

    raw, _, _ = band_stats(PasteBack(photo, CROP, GEN, colour_correction=False))
    assert np.all(np.abs(raw) > 0.6 * np.abs(cast))  # the cast shows without correction (less where it clips)
    paste = PasteBack(photo, CROP, GEN, colour_correction=mode)
    diff, std_ratio, (core_orig, core_out) = band_stats(paste)
    assert np.all(np.abs(diff) < 2), diff  # band mean within 2 levels of the original's
    assert np.all(np.abs(core_out - core_orig) < 2)  # and the face lost the cast as well
    gain, offset = paste.colour_transform
    if mode == "mean":
        np.testing.assert_allclose(offset, -np.array(cast), atol=3)  # less where the cast clipped at 0 / 255
    assert np.all(np.abs(std_ratio - 1) < 0.05)


def test_mean_std_corrects_a_contrast_cast(photo):
    gen = crop_as_generated(photo, gain=0.8, cast=(30, 30, 30))[None]
    paste = PasteBack(photo, CROP, GEN, colour_correction="mean_std")
    paste(gen)
    gain, offset = paste.colour_transform
    np.testing.assert_allclose(gain, 1 / 0.8, rtol=0.03)


def test_box_partly_outside_the_photo(photo):
    box = (-100, -60, 300, 340)  # 400 px square, 100 px past the left and 60 px past the top edge
    ramp = torch.linspace(50, 200, 512).view(1, 1, 512).expand(3, 512, 512)  # generated: a horizontal ramp
    frames = torch.stack([ramp / 255])  # float [0, 1], as the runtime's frames
    paste = PasteBack(photo, box, GEN, colour_correction=False)
    g = paste.geometry
    assert g.region == (0, 0, 300, 340) and g.feathered == (False, False, True, True) and g.feather == 25
    out = paste(frames)[0]
    outside, _ = box_masks(g)
    np.testing.assert_array_equal(out[outside], photo[:700, :1000][outside])
    # no feather along the image border: the pixels there are the generated ramp, at the right place
    for x in (0, 50, 200):
        u = (x + 100 + 0.5) * 512 / 400 - 0.5  # generated column under output column x
        assert abs(int(out[0, x, 0]) - (50 + 150 * u / 511)) <= 1.5
        assert abs(int(out[150, x, 1]) - (50 + 150 * u / 511)) <= 1.5


def test_invalid_inputs(photo):
    with pytest.raises(InputError, match="entirely outside"):
        PasteBack(photo, (1100, 0, 1300, 200), GEN)
    with pytest.raises(InputError, match="entirely outside"):
        PasteBack(photo, (-300, -300, 0, 0), GEN)
    with pytest.raises(ImageError, match="at least 16x16"):
        PasteBack(np.zeros((8, 12, 3), np.uint8), (0, 0, 8, 8), GEN)
    with pytest.raises(ImageError):
        PasteBack(np.zeros((64, 64, 3), np.float32), (0, 0, 32, 32), GEN)
    with pytest.raises(ImageError):
        PasteBack("not an image", (0, 0, 32, 32), GEN)
    with pytest.raises(InputError, match="empty"):
        PasteBack(photo, (10, 10, 10, 50), GEN)
    with pytest.raises(InputError):
        PasteBack(photo, (10.5, 10, 50, 50), GEN)
    with pytest.raises(InputError, match="feather"):
        PasteBack(photo, CROP, GEN, feather=-1)
    with pytest.raises(InputError, match="colour_correction"):
        PasteBack(photo, CROP, GEN, colour_correction="hist")
    with pytest.raises(InputError, match="max_output_side"):
        PasteBack(photo, CROP, GEN, max_output_side=4)
    paste = PasteBack(photo, CROP, GEN)
    with pytest.raises(InputError, match=r"\[n, 3, 512, 512\]"):
        paste(torch.zeros(2, 3, 256, 256))
    with pytest.raises(InputError, match="uint8"):
        paste(torch.zeros(1, 3, 512, 512, dtype=torch.int32))


def test_small_photo_works():
    small = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    paste = PasteBack(small, (4, 2, 14, 12), (64, 64))
    assert paste.output_size == (22, 16)
    out = paste(torch.full((1, 3, 64, 64), 0.5))
    assert out.shape == (1, 16, 22, 3)
    np.testing.assert_array_equal(out[0, :, 15:], small[:16, 15:22])


def test_huge_photo_is_downscaled(photo):
    big = np.asarray(Image.fromarray(photo).resize((4004, 2804), Image.BICUBIC))  # 11 MP
    box = (2000, 520, 3280, 1800)  # 1280 px square
    paste = PasteBack(big, box, GEN, colour_correction=False)
    g = paste.geometry
    assert g.output_size == (1920, 1344) and g.output_size[0] % 2 == 0 and g.output_size[1] % 2 == 0
    sx, sy = 1920 / 4004, 1344 / 2804
    assert g.box == (round(2000 * sx), round(520 * sy), round(3280 * sx), round(1800 * sy))
    out = paste(constant_frames([(255, 0, 0)]))[0]
    expect = np.asarray(Image.fromarray(big).resize((1920, 1344), Image.LANCZOS), dtype=float)
    outside, core = box_masks(g)
    assert np.abs(out[outside] - expect[outside]).mean() < 2  # the photo, downscaled
    assert (out[core] == (255, 0, 0)).all()
    assert PasteBack(big, box, GEN, max_output_side=1000).output_size == (1000, 700)


def test_grey_and_rgba_photos(photo):
    grey = photo[..., 1].copy()
    paste = PasteBack(grey, CROP, GEN)
    out = paste(constant_frames([(90, 90, 90)]))[0]
    outside, _ = box_masks(paste.geometry)
    np.testing.assert_array_equal(out[outside], np.repeat(grey[:700, :1000, None], 3, axis=2)[outside])

    alpha = np.zeros(photo.shape[:2] + (1,), np.uint8)
    alpha[:, ::2] = 255  # half the photo fully transparent: alpha is dropped, the colours kept
    rgba = np.concatenate([photo, alpha], axis=2)
    for image in (rgba, Image.fromarray(rgba, "RGBA")):
        out = PasteBack(image, CROP, GEN)(constant_frames([(90, 90, 90)]))[0]
        np.testing.assert_array_equal(out[outside], photo[:700, :1000][outside])


def test_whole_image_without_crop(photo):
    from sonic_rt.face import generation_size

    size = generation_size(1001, 701, 512)  # what crop=False generates at
    paste = PasteBack(photo, None, size)
    g = paste.geometry
    assert g.crop_box == (0, 0, 1001, 701) and g.feathered == (False, False, False, False)
    out = paste(constant_frames([(7, 77, 177)], size))[0]
    assert (out == (7, 77, 177)).all() and out.shape == (700, 1000, 3)
    assert paste.colour_transform is None  # no blend band, nothing to match


def test_chunked_equals_all_at_once(photo):
    rng = torch.Generator().manual_seed(0)
    base = crop_as_generated(photo, cast=(10, -5, 3)).float() / 255
    frames = (base + 0.05 * torch.randn(21, 3, 512, 512, generator=rng)).clamp(0, 1)
    whole = PasteBack(photo, CROP, GEN)(frames)
    paste = PasteBack(photo, CROP, GEN)
    parts = [paste(frames[a:b]) for a, b in ((0, 1), (1, 9), (9, 12), (12, 21))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    reuse = PasteBack(photo, CROP, GEN, reuse_output=True)  # views of one buffer: copy before the next call
    np.testing.assert_array_equal(np.concatenate([reuse(frames[a:b]).copy() for a, b in ((0, 5), (5, 21))]), whole)
    # uint8 frames give the same picture as the same values in float
    as_u8 = (frames * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(PasteBack(photo, CROP, GEN)(as_u8), PasteBack(photo, CROP, GEN)(as_u8.float() / 255))


def _tensor_state(obj) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("reuse_output", [False, True])
def test_long_sequence_holds_no_per_frame_state(photo, reuse_output):
    paste = PasteBack(photo, CROP, GEN, reuse_output=reuse_output)
    chunk = crop_as_generated(photo).float().div(255).expand(16, -1, -1, -1).contiguous()  # the runtime's 16
    fields = len(vars(paste))
    rss = []
    for i in range(16):  # 240 frames: 16, 15, 14, 16, ... (shorter chunks, as at the end of a video)
        out = paste(chunk[: 16 - i % 3])
        if i == 0:
            state, colour = _tensor_state(paste), paste.colour_transform
        rss.append(_rss_mb())
    assert _tensor_state(paste) == state and paste.colour_transform == colour and len(vars(paste)) == fields
    # RSS reaches a plateau (the allocator keeps freed blocks); one kept 15-frame chunk per call would add
    # 31 MB per call, 300 MB over the last ten
    assert rss[-1] - rss[5] < 48, f"RSS grew while compositing chunk after chunk: {rss}"
    assert out.shape == (16 - 15 % 3, 700, 1000, 3)


def test_from_reference_maps_the_real_crop_back(photo):
    from sonic_rt.face import prepare_reference

    face = (PAD_LEFT + 170, PAD_TOP + 70, 120, 140)
    ref = prepare_reference(Image.fromarray(photo), None, face_box=face)
    paste = PasteBack.from_reference(Image.fromarray(photo), ref, colour_correction=False)
    g = paste.geometry
    assert g.crop_box == ref.crop_box and g.generated_size == ref.size
    np.testing.assert_allclose(g.face_box, face)
    # the reference image itself, pasted back, reproduces the photo: the mapping is the inverse of the crop
    frames = ref.ref_img * 0.5 + 0.5  # float [1, 3, h, w] in [0, 1]
    out = paste(frames)[0].astype(float)
    x1, y1, x2, y2 = g.region
    err = np.abs(out[y1:y2, x1:x2] - photo[y1:y2, x1:x2]).mean()
    assert err < 3, err
    shifted = np.abs(out[y1:y2, x1:x2] - photo[y1:y2, x1 + 2 : x2 + 2]).mean()
    assert shifted > err + 2  # a 2-pixel misplacement would show


def test_demo_still(tmp_path, capsys):
    out = tmp_path / "still.png"
    assert main(["--demo-still", str(out)]) == 0
    im = Image.open(out)
    assert im.height == 360 and im.width > 3 * 300
    assert "feather" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(photo):
    frames = crop_as_generated(photo, cast=(12, 0, -9)).float().div(255).expand(5, -1, -1, -1).contiguous()
    cpu = PasteBack(photo, CROP, GEN)(frames)
    gpu = PasteBack(photo, CROP, GEN, device="cuda")(frames.cuda())
    diff = np.abs(cpu.astype(int) - gpu.astype(int))  # the CPU rounds frames to uint8 before the resize
    assert diff.max() <= 2 and diff.mean() < 0.3


def test_frames_go_straight_into_the_video_writer(photo, tmp_path):
    """The integration contract: output_size is a valid writer size and the frames are what write() takes."""
    from sonic_rt import media

    paste = PasteBack(photo, CROP, GEN, reuse_output=True)
    frames = crop_as_generated(photo, cast=(6, 0, -4)).float().div(255).expand(6, -1, -1, -1).contiguous()
    W, H = paste.output_size
    with media.VideoWriter(tmp_path / "full.mp4", fps=25, width=W, height=H) as writer:
        for a, b in ((0, 4), (4, 6)):  # chunks, as the runtime's output stream passes them
            writer.write(paste(frames[a:b]))
    video, fps, _ = media.read_video(tmp_path / "full.mp4")
    assert video.shape == (6, 700, 1000, 3) and fps == 25
    outside, _ = box_masks(paste.geometry)
    assert np.abs(video[0][outside].astype(int) - photo[:700, :1000][outside]).mean() < 3  # H.264 at crf 18
