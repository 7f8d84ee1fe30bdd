"""Strict loading of the official checkpoint layout, on the full-size architecture (meta) and the demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sonic_rt.architectures import AUDIO2BUCKET_ARGS, AUDIO2TOKEN_ARGS, RIFE_WIDTH, SVD_XT_UNET_CONFIG
from sonic_rt.checkpoint import check_state_dict, convert_checkpoints, read_state_dict, resolve_model_dir
from sonic_rt.errors import CheckpointError
from sonic_rt.loading import load_models
from sonic_rt.models.audio_adapters import Audio2bucketModel, AudioProjModel
from sonic_rt.models.rife import IFNet
from sonic_rt.models.unet import SonicUNet

KEYS_FILE = Path(__file__).parent / "data" / "sonic_checkpoint_keys.txt"


def official_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """Parse sonic_checkpoint_keys.txt into {file: {key: shape}}."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line.split()[1].removeprefix("checkpoints/"), {})
        elif line and not line.startswith("#"):
            key, shape = line.split("\t")
            current[key] = tuple(json.loads(shape))
    return sections


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_models_have_exactly_the_official_keys_and_shapes():
    expected = official_keys()
    with torch.device("meta"):
        unet = SonicUNet.from_config(SVD_XT_UNET_CONFIG)
        a2t = AudioProjModel(**AUDIO2TOKEN_ARGS)
        a2b = Audio2bucketModel(**AUDIO2BUCKET_ARGS)
        rife = IFNet(RIFE_WIDTH)
    assert shapes(unet.unet) == expected["Sonic/unet.pth"]
    assert len(expected["Sonic/unet.pth"]) == 1492
    assert sum(v.numel() for v in unet.unet.state_dict().values()) == 1_575_741_162
    assert shapes(a2t) == expected["Sonic/audio2token.pth"]
    assert shapes(a2b) == expected["Sonic/audio2bucket.pth"]
    assert shapes(rife, "module.") == expected["RIFE/flownet.pkl"]


def test_demo_checkpoint_has_the_official_file_layout_and_key_names(demo_dir):
    expected = official_keys()
    # The demo UNet has fewer blocks and layers (its config says so), so its keys are a subset of the
    # official names, including Sonic's audio-processor keys; the other files have identical key lists.
    unet = torch.load(demo_dir / "Sonic/unet.pth", weights_only=True)
    assert set(unet) <= set(expected["Sonic/unet.pth"])
    assert (
        sum(k.endswith("attn2.processor.to_k_ip.0.weight") for k in unet) == 8
    )  # 4 transformers (down 1, mid 1, up 2) x spatial+temporal
    for rel in ("Sonic/audio2token.pth", "Sonic/audio2bucket.pth", "RIFE/flownet.pkl"):
        state = torch.load(demo_dir / rel, weights_only=True)
        assert list(state) == list(expected[rel]), rel  # same names, same order; only widths differ
    for rel in (
        "stable-video-diffusion-img2vid-xt/unet/config.json",
        "stable-video-diffusion-img2vid-xt/vae/diffusion_pytorch_model.fp16.safetensors",
        "stable-video-diffusion-img2vid-xt/image_encoder/model.fp16.safetensors",
        "stable-video-diffusion-img2vid-xt/scheduler/scheduler_config.json",
        "whisper-tiny/model.safetensors",
        "whisper-tiny/preprocessor_config.json",
    ):
        assert (demo_dir / rel).is_file(), rel


def test_demo_checkpoint_is_deterministic(demo_dir, tmp_path):
    from sonic_rt.demo import write_demo_model

    again = write_demo_model(tmp_path / "again")
    for rel in ("Sonic/unet.pth", "Sonic/audio2token.pth", "RIFE/flownet.pkl"):
        a, b = torch.load(demo_dir / rel, weights_only=True), torch.load(again / rel, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_demo_round_trips_through_the_strict_loader(demo_dir):
    models = load_models(resolve_model_dir(demo_dir), torch.device("cpu"), torch.float32)
    saved = torch.load(demo_dir / "Sonic/unet.pth", weights_only=True)
    loaded = models.unet.unet.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    rife = torch.load(demo_dir / "RIFE/flownet.pkl", weights_only=True)
    assert all(torch.equal(models.rife.state_dict()[k.removeprefix("module.")], v) for k, v in rife.items())
    assert not any(p.is_meta for p in models.unet.parameters())
    assert models.vae_scale_factor == 8


def copy_demo(demo_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_dir, tmp_path / "model"))


def test_missing_file_is_named(demo_dir, tmp_path):
    model = copy_demo(demo_dir, tmp_path)
    (model / "Sonic/audio2bucket.pth").unlink()
    with pytest.raises(CheckpointError, match=r"missing from the model directory: Sonic/audio2bucket\.pth"):
        resolve_model_dir(model)


def test_key_mismatch_names_the_file_and_first_keys(demo_dir, tmp_path):
    model = copy_demo(demo_dir, tmp_path)
    state = torch.load(model / "Sonic/unet.pth", weights_only=True)
    del state["conv_in.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(7)
    torch.save(state, model / "Sonic/unet.pth")
    with pytest.raises(CheckpointError) as info:
        load_models(resolve_model_dir(model), torch.device("cpu"), torch.float32)
    message = str(info.value)
    assert "unet.pth" in message
    assert "missing keys: conv_in.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "conv_out.bias (7,) != expected (4,)" in message


def test_check_state_dict_lists_at_most_five_keys():
    expected = {f"k{i}": (1,) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"8 missing keys: k0, k1, k2, k3, k4 \(\+3 more\)"):
        check_state_dict(expected, {}, Path("x.pth"))


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle would run code",))


def test_pickle_that_needs_code_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "meta": _Evil()}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_state_dict(path)
    # trusted: the pickle loads, but it is still not a flat dict of tensors
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        read_state_dict(path, trust_pickle=True)


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="broken.pth: cannot read checkpoint"):
        read_state_dict(path)


def test_convert_writes_safetensors_that_the_loader_prefers(demo_dir, tmp_path):
    model = copy_demo(demo_dir, tmp_path)
    written = convert_checkpoints(model)
    assert sorted(p.name for p in written) == [
        "audio2bucket.safetensors",
        "audio2token.safetensors",
        "flownet.safetensors",
        "unet.safetensors",
    ]
    paths = resolve_model_dir(model)
    assert paths.unet.suffix == ".safetensors" and paths.rife.suffix == ".safetensors"
    original = torch.load(model / "Sonic/unet.pth", weights_only=True)
    (model / "Sonic/unet.pth").unlink()  # the converted file alone must be enough
    models = load_models(resolve_model_dir(model), torch.device("cpu"), torch.float32)
    assert all(torch.equal(models.unet.unet.state_dict()[k], v) for k, v in original.items())
    assert convert_checkpoints(model) == []  # idempotent
