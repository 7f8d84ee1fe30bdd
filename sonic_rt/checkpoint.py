"""Strict loading of Sonic's official checkpoint layout.

The model directory is laid out as the official release (docs/official_algorithm.md section 2)::

    MODEL_DIR/
      Sonic/unet.pth  Sonic/audio2token.pth  Sonic/audio2bucket.pth
      RIFE/flownet.pkl
      yoloface_v5m.pt                                   (optional; else OpenCV's Haar cascade)
      stable-video-diffusion-img2vid-xt/{unet/config.json, vae/, image_encoder/, scheduler/, feature_extractor/}
      whisper-tiny/{config.json, model.safetensors, preprocessor_config.json}

Every size comes from the config files in the directory (and, for Sonic's config-less adapters and
RIFE, from those configs plus the checkpoint shapes), so the same code loads the small demo directory.
Loading is key-exact: a missing file, or a key or shape that differs, is a :class:`CheckpointError`
naming the file and the first differing keys. ``.pth``/``.pkl`` pickles are read with
``torch.load(weights_only=True)``; a pickle that needs arbitrary code is refused unless the caller
passes ``trust_pickle=True``. ``convert_checkpoints`` rewrites them as ``.safetensors`` beside the
originals, which the loader then prefers.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .layout import PICKLED_CHECKPOINTS, SVD_DIR, WHISPER_DIR  # noqa: F401 (re-exported)

DEMO_MARKER = "sonic_rt_demo.json"
_MAX_LISTED_KEYS = 5


@dataclass(frozen=True)
class ModelPaths:
    """Resolved files of one official-layout model directory (all absolute)."""

    root: Path
    unet: Path
    audio2token: Path
    audio2bucket: Path
    rife: Path
    yoloface: Path | None
    unet_config: Path
    vae: Path
    image_encoder: Path
    scheduler: Path
    whisper: Path
    demo_marker: Path | None


def _prefer_safetensors(path: Path) -> Path:
    converted = path.with_suffix(".safetensors")
    return converted if converted.is_file() else path


def resolve_model_dir(model_dir: str | Path) -> ModelPaths:
    """Check that ``model_dir`` holds the official layout and return its files.

    Raises:
        CheckpointError: the directory does not exist, or required files are missing (all listed).
    """
    root = Path(model_dir).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError("model directory not found (expected the official Sonic checkpoint layout)", root)
    svd = root / SVD_DIR
    required = {
        "unet": _prefer_safetensors(root / "Sonic/unet.pth"),
        "audio2token": _prefer_safetensors(root / "Sonic/audio2token.pth"),
        "audio2bucket": _prefer_safetensors(root / "Sonic/audio2bucket.pth"),
        "rife": _prefer_safetensors(root / "RIFE/flownet.pkl"),
        "unet_config": svd / "unet/config.json",
        "vae": svd / "vae",
        "image_encoder": svd / "image_encoder",
        "scheduler": svd / "scheduler",
        "whisper": root / WHISPER_DIR,
    }
    missing = [str(p.relative_to(root)) for p in required.values() if not p.exists()]
    if missing:
        raise CheckpointError(f"missing from the model directory: {', '.join(missing)}", root)
    yolo = root / "yoloface_v5m.pt"
    marker = root / DEMO_MARKER
    return ModelPaths(
        root=root,
        yoloface=yolo if yolo.is_file() else None,
        demo_marker=marker if marker.is_file() else None,
        **required,
    )


def read_config(path: Path) -> dict:
    """Read a JSON config file; raises CheckpointError if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError("config file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"not a valid JSON config ({exc})", path) from None


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat ``{key: tensor}`` state dict from ``.safetensors`` or a torch pickle, on the CPU.

    Pickles are opened with ``torch.load(weights_only=True)``, which cannot run code. One that needs
    more is refused unless ``trust_pickle`` is True (then ``weights_only=False``: only for files from a
    source you trust).

    Raises:
        CheckpointError: missing, unreadable, untrusted, or not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                if not trust_pickle:
                    raise CheckpointError(
                        "this pickle needs arbitrary code to load, which is refused by default "
                        f"({str(exc).splitlines()[0]}). If the file comes from a source you trust, pass "
                        "--trust-pickle (API: trust_pickle=True), or run `python -m sonic_rt convert` once "
                        "with it to rewrite the file as safetensors",
                        path,
                    ) from None
                state = torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt zip, truncated file, wrong format: all one error for the user
        raise CheckpointError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not a flat state dict of tensors", path)
    return state


def check_state_dict(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError unless ``state`` has exactly the keys and shapes of ``expected``.

    The message lists up to five missing keys, unexpected keys and shape mismatches, in key order.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != expected {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED_KEYS])}{more}")
    raise CheckpointError("checkpoint does not match the model; " + "; ".join(parts), path)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Strictly load ``state`` into ``module`` (which may live on the meta device) and return it.

    The loaded tensors replace the module's (``assign=True``), so a module built on the meta device is
    never allocated twice. Raises CheckpointError on any key or shape difference.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, state, path)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def strip_prefix(state: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    """Keys of ``state`` that start with ``prefix``, with it removed (RIFE's ``module.``); others raise."""
    stray = [k for k in state if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(f"expected every key to start with '{prefix}'; found {', '.join(stray[:5])}", path)
    return {k[len(prefix) :]: v for k, v in state.items()}


def convert_checkpoints(model_dir: str | Path, *, trust_pickle: bool = False) -> list[Path]:
    """Rewrite the official ``.pth``/``.pkl`` files of ``model_dir`` as ``.safetensors`` beside them.

    Keys are kept as they are (RIFE keeps its ``module.`` prefix), so the loader checks the converted
    file exactly as the original. Each file is written to a temporary name, read back and compared,
    then renamed. Returns the written paths; files already converted are skipped.

    Raises:
        CheckpointError: a pickle is missing, unreadable or untrusted (see :func:`read_state_dict`).
    """
    from safetensors.torch import load_file, save_file

    root = Path(model_dir).expanduser().resolve()
    written = []
    for rel in PICKLED_CHECKPOINTS:
        src = root / rel
        dst = src.with_suffix(".safetensors")
        if dst.is_file():
            continue
        state = {k: v.contiguous() for k, v in read_state_dict(src, trust_pickle=trust_pickle).items()}
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            save_file(state, str(tmp))
            back = load_file(str(tmp))
            if back.keys() != state.keys() or any(not torch.equal(back[k], state[k]) for k in state):
                raise CheckpointError("converted file does not read back identically", tmp)
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(dst)
    return written
