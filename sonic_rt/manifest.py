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
format, a malformed manifest (missing graph, unknown backend, an artifact that is not among the files it
verifies), a file name that leaves the directory (``..``, absolute, or a symlink out), or an engine
built for another GPU, TensorRT version or precision is an :class:`EngineError` that says how to
rebuild; nothing falls back silently.
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
    source = manifest.get("source") if isinstance(manifest, dict) else None
    model_dir = source.get("model_dir", "MODEL_DIR") if isinstance(source, dict) else "MODEL_DIR"
    manifest = manifest if isinstance(manifest, dict) else {}
    return (f"rebuild it: python -m export.build_engines --model {model_dir} --out {engine_dir} "
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


def engine_file(engine_dir: Path, name: Any, manifest: dict[str, Any]) -> Path:
    """``engine_dir / name`` for a file name read from ``manifest.json``, refusing any that leaves the directory.

    A name must be a non-empty relative path with ``/`` separators and no ``..`` part, and the file it
    names (after following symlinks) must lie inside ``engine_dir``.

    Raises:
        EngineError: ``name`` is absolute, contains ``..``, is not a string, or resolves outside ``engine_dir``.
    """
    manifest_path = Path(engine_dir) / MANIFEST_NAME
    if (not isinstance(name, str) or not name or "\\" in name or "\0" in name or os.path.isabs(name)
            or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/"))):
        raise EngineError(f"lists the file {name!r}, which is not a plain path inside the engine directory "
                          f"(tampered manifest?); {rebuild_hint(manifest, Path(engine_dir))}", manifest_path)
    path = Path(engine_dir) / name
    if not path.resolve().is_relative_to(Path(engine_dir).resolve()):
        raise EngineError(f"lists the file {name!r}, which resolves outside the engine directory (symlink?); "
                          f"{rebuild_hint(manifest, Path(engine_dir))}", manifest_path)
    return path


def verify_files(engine_dir: Path, files: dict[str, str], manifest: dict[str, Any]) -> None:
    """Check that every ``name -> sha256`` in ``files`` exists under ``engine_dir`` with that hash.

    Every name must stay inside ``engine_dir`` (see :func:`engine_file`).

    Raises:
        EngineError: ``files`` is not a name -> sha256 mapping; names the first file that escapes the
            directory, is missing or has changed.
    """
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise EngineError(f"a file list is not a mapping of name -> sha256 (tampered manifest?); "
                          f"{rebuild_hint(manifest, Path(engine_dir))}", Path(engine_dir) / MANIFEST_NAME)
    for name, digest in files.items():
        path = engine_file(engine_dir, name, manifest)
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
    from . import backends
    from .graphs import GraphSpec, PipelineConfig

    root = Path(engine_dir).resolve()
    manifest = read_manifest(root)
    check_manifest(manifest, root)
    backend = backends.get_backend(manifest["backend"])
    if precision is not None and precision != manifest["precision"]:
        raise EngineError(f"engines were built for {manifest['precision']}, but {precision} was requested; "
                          f"omit the dtype or {rebuild_hint({**manifest, 'precision': precision}, root)}", root)
    recorded = manifest.get("libraries", {})
    for library, version in backend.versions().items():
        if backend.compiled and recorded.get(library) != version:  # a compiled artifact needs its library version
            raise EngineError(f"engines were built with {library} {recorded.get(library)}, this is {version}; "
                              f"{rebuild_hint(manifest, root)}", root)
    device = torch.device(device) if device is not None else backend.default_device()
    if backend.compiled:  # ... and the GPU it was built for
        here, built = backend.gpu_identity(device), manifest.get("gpu")
        if here != built:
            raise EngineError(f"engines were built for {built}, this GPU is {here}; {rebuild_hint(manifest, root)}",
                              root)
    verify_files(root, manifest.get("files", {}), manifest)
    try:
        config = PipelineConfig.from_json(manifest["pipeline"]["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"malformed pipeline config ({type(exc).__name__}: {exc}); "
                          f"{rebuild_hint(manifest, root)}", root / MANIFEST_NAME) from None
    graphs = {}
    for name, entry in manifest["graphs"].items():
        verify_files(root, entry["files"], manifest)  # the artifact is one of these (check_manifest)
        try:
            spec = GraphSpec.from_json(entry["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"malformed spec of graph {name} ({type(exc).__name__}: {exc}); "
                              f"{rebuild_hint(manifest, root)}", root / MANIFEST_NAME) from None
        graphs[name] = backend.load_graph(spec, engine_file(root, entry["artifact"], manifest), device, providers)
    return EngineDir(root, manifest, backends.Graphs.from_mapping(backend, config, graphs))


def check_manifest(manifest: dict[str, Any], engine_dir: Path) -> None:
    """Check the structure of a parsed manifest before anything in it is used.

    ``manifest.json`` carries no hash of itself, so a hand-edited or truncated-then-repaired manifest is
    caught here instead of as a ``KeyError`` deep in loading: a known backend and precision, one entry per
    pipeline graph whose ``artifact`` is among the ``files`` it verifies, and a ``pipeline`` section.

    Raises:
        EngineError: the first problem found, naming ``manifest.json``.
    """
    from .backends import engine_backends
    from .graphs.modules import GRAPH_NAMES

    path = Path(engine_dir) / MANIFEST_NAME

    def fail(problem: str) -> None:
        raise EngineError(f"{problem} (tampered or damaged manifest); {rebuild_hint(manifest, Path(engine_dir))}",
                          path)

    if manifest.get("backend") not in engine_backends():
        fail(f"backend {manifest.get('backend')!r} is not one of {', '.join(engine_backends())}")
    if manifest.get("precision") not in ("fp32", "fp16", "bf16"):
        fail(f"precision {manifest.get('precision')!r} is not fp32, fp16 or bf16")
    if not isinstance(manifest.get("files", {}), dict):
        fail("'files' is not a mapping of name -> sha256")
    pipeline = manifest.get("pipeline")
    if not (isinstance(pipeline, dict) and isinstance(pipeline.get("config"), dict)
            and isinstance(pipeline.get("scheduler_config"), dict)
            and isinstance(pipeline.get("demo"), (dict, type(None)))):
        fail("no valid 'pipeline' section (config, scheduler_config)")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        fail("no 'graphs' mapping")
    missing = [name for name in GRAPH_NAMES if name not in graphs]
    unknown = [name for name in graphs if name not in GRAPH_NAMES]
    if missing or unknown:
        fail(f"graph entries missing: {', '.join(missing) or 'none'}; unknown: {', '.join(map(str, unknown)) or 'none'}"
             f" (expected exactly {', '.join(GRAPH_NAMES)})")
    for name, entry in graphs.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("files"), dict)
                and isinstance(entry.get("spec"), dict)):
            fail(f"malformed entry for graph {name} (needs artifact, files and spec)")
        if not isinstance(entry.get("artifact"), str) or entry["artifact"] not in entry["files"]:
            fail(f"graph {name}: its artifact {entry.get('artifact')!r} is not among the files whose sha256 is "
                 f"checked ({', '.join(map(str, entry['files']))})")
