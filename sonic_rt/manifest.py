"""Engine directories: ``manifest.json`` and what it guarantees.

An engine directory (written by ``python -m export.build_engines``) holds one artifact per graph
(``<graph>.onnx`` or ``<graph>.plan``), the small support files the pipeline needs besides the graphs
(Whisper's ``preprocessor_config.json``, the optional YOLO face detector) and ``manifest.json``::

    format            "sonic_rt.engines/1"
    backend           "onnxruntime" | "tensorrt"
    precision         "fp32" | "fp16"
    opset, shapes     ONNX opset; the shape ranges (frames, resolution, windows) the graphs were built for
    pipeline          model sizes and constants (PipelineConfig), scheduler_config, demo marker
    source            the weights directory and the sha256 of every source file
    libraries         versions of torch, onnx, onnxslim, the backend's library, sonic_rt
    gpu               TensorRT only: GPU name and compute capability the engines were built on
    graphs            per graph: its GraphSpec, artifact sha256s, build key, parity check, seconds
    files             support files -> sha256

Loading checks all of it (:func:`open_engine_dir`): a missing or changed artifact (sha256), an unknown
format, or an engine built for another GPU, TensorRT version or precision is an :class:`EngineError`
that says how to rebuild; nothing falls back silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT = "sonic_rt.engines/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (reads ``chunk`` bytes at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_engine_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a ``manifest.json``."""
    return (Path(path) / MANIFEST_NAME).is_file()


def rebuild_hint(manifest: dict[str, Any], engine_dir: Path) -> str:
    """The command that rebuilds ``engine_dir`` from its recorded source."""
    source = manifest.get("source", {}).get("model_dir", "MODEL_DIR")
    return (f"rebuild it: python -m export.build_engines --model {source} --out {engine_dir} "
            f"--backend {manifest.get('backend', 'onnxruntime')} --precision {manifest.get('precision', 'fp16')}")


def read_manifest(engine_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse ``engine_dir/manifest.json``.

    Raises:
        EngineError: missing, not JSON, or another format version.
    """
    path = Path(engine_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError("no manifest.json: not an engine directory (python -m export.build_engines writes one)",
                          engine_dir) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"manifest.json is unreadable ({exc}); rebuild the engine directory", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"manifest format {found!r} is not {FORMAT!r}; "
                          f"{rebuild_hint(manifest if isinstance(manifest, dict) else {}, Path(engine_dir))}", path)
    return manifest


def verify_files(engine_dir: Path, files: dict[str, str], manifest: dict[str, Any]) -> None:
    """Check that every ``name -> sha256`` in ``files`` exists under ``engine_dir`` with that hash.

    Raises:
        EngineError: names the first missing or changed file.
    """
    for name, digest in files.items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineError(f"artifact {name} is missing; {rebuild_hint(manifest, engine_dir)}", path)
        if sha256_file(path) != digest:
            raise EngineError(f"artifact {name} does not match its sha256 in manifest.json (corrupted or "
                              f"modified); {rebuild_hint(manifest, engine_dir)}", path)


@dataclass
class EngineDir:
    """A verified engine directory: its manifest and the graphs loaded by its backend."""

    root: Path
    manifest: dict[str, Any]
    graphs: Any  # sonic_rt.backends.Graphs

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.manifest["pipeline"]["scheduler_config"]

    @property
    def demo(self) -> dict[str, Any] | None:
        return self.manifest["pipeline"].get("demo")

    def feature_extractor(self):
        """Whisper's feature extractor from the copied ``whisper/preprocessor_config.json``."""
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor.from_pretrained(self.root / "whisper", local_files_only=True)


def open_engine_dir(engine_dir: str | os.PathLike, device: torch.device | None, precision: str | None,
                    providers: list[str] | None = None) -> EngineDir:
    """Verify an engine directory and load its graphs with the backend named in its manifest.

    Args:
        engine_dir: written by ``python -m export.build_engines``.
        device: where to run (None: the backend's default, CUDA when usable).
        precision: the precision the caller asked for ("fp32"/"fp16"), or None to take the manifest's.
        providers: ONNX Runtime execution providers (None: CPU on CPU, CUDA on CUDA).

    Raises:
        EngineError: unreadable manifest; missing/corrupted artifact; built for another precision, TensorRT
            version or GPU.
        BackendUnavailableError: the backend's library or device is missing here.
    """
    from .backends import Graphs, get_backend
    from .graphs import GraphSpec, PipelineConfig

    root = Path(engine_dir).resolve()
    manifest = read_manifest(root)
    backend = get_backend(manifest["backend"])
    if precision is not None and precision != manifest["precision"]:
        raise EngineError(f"engines were built for {manifest['precision']}, but {precision} was requested; "
                          f"omit the dtype or {rebuild_hint({**manifest, 'precision': precision}, root)}", root)
    recorded = manifest.get("libraries", {})
    for library, version in backend.versions().items():
        if manifest["backend"] == "tensorrt" and recorded.get(library) != version:
            raise EngineError(f"engines were built with {library} {recorded.get(library)}, this is {version}; "
                              f"{rebuild_hint(manifest, root)}", root)
    device = torch.device(device) if device is not None else backend.default_device()
    if manifest["backend"] == "tensorrt":
        here, built = backend.gpu_identity(device), manifest.get("gpu")
        if here != built:
            raise EngineError(f"engines were built for {built}, this GPU is {here}; {rebuild_hint(manifest, root)}",
                              root)
    verify_files(root, manifest.get("files", {}), manifest)
    graphs = {}
    for name, entry in manifest["graphs"].items():
        verify_files(root, entry["files"], manifest)
        spec = GraphSpec.from_json(entry["spec"])
        graphs[name] = backend.load_graph(spec, root / entry["artifact"], device, providers)
    config = PipelineConfig.from_json(manifest["pipeline"]["config"])
    return EngineDir(root, manifest, Graphs(manifest["backend"], config, graphs))
