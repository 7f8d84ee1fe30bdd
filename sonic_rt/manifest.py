"""Engine directories: ``manifest.json`` and what it guarantees.

An engine directory (written by ``python -m export.build_engines``) holds one artifact per graph
(``<graph>.onnx`` or ``<graph>.plan``), the small support files the pipeline needs besides the graphs
(Whisper's ``preprocessor_config.json``, the optional YOLO face detector) and ``manifest.json``, whose schema
is :class:`Manifest` (with :class:`PipelineInfo` and one :class:`GraphEntry` per graph)::

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

import dataclasses
import enum
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import torch

from .errors import EngineError
from .graphs import GRAPH_NAMES, GraphSpec, PipelineConfig, Precision, ShapeOptions

MANIFEST_NAME = "manifest.json"
FORMAT = "sonic_rt.engines/1"
_OMIT_NONE = {"omit_none": True}  # field metadata: left out of the JSON when None


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


def rebuild_hint(
    manifest: Manifest | Mapping[str, Any] | None, engine_dir: Path, *, precision: str | None = None
) -> str:
    """The command that rebuilds ``engine_dir`` from its recorded source.

    Args:
        manifest: the parsed :class:`Manifest`, or the raw JSON (any shape: missing parts get placeholders).
        engine_dir: the engine directory.
        precision: the precision to rebuild for (default: the manifest's).
    """
    if isinstance(manifest, Manifest):
        model_dir = manifest.source.get("model_dir", "MODEL_DIR")
        backend, recorded = manifest.backend, manifest.precision.value
    else:
        manifest = manifest if isinstance(manifest, Mapping) else {}
        source = manifest.get("source")
        model_dir = source.get("model_dir", "MODEL_DIR") if isinstance(source, Mapping) else "MODEL_DIR"
        backend, recorded = manifest.get("backend", "onnxruntime"), manifest.get("precision", "fp16")
    return (
        f"rebuild it: python -m export.build_engines --model {model_dir} --out {engine_dir} "
        f"--backend {backend} --precision {precision or recorded}"
    )


def read_manifest(engine_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse ``engine_dir/manifest.json`` as JSON and check its format version (not its structure: that is
    :meth:`Manifest.from_json`, or :meth:`Manifest.load` for both).

    Raises:
        EngineError: missing, not JSON, or another format version.
    """
    path = Path(engine_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            "no manifest.json: not an engine directory (python -m export.build_engines writes one)", engine_dir
        ) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"manifest.json is unreadable ({exc}); rebuild the engine directory", path) from None
    _check_format(data, Path(engine_dir))
    return data


def _check_format(data: Any, engine_dir: Path) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EngineError(
            f"manifest format {found!r} is not {FORMAT!r}; {rebuild_hint(data, engine_dir)}", engine_dir / MANIFEST_NAME
        )


# ---------------------------------------------------------------------------------------------------------
# The schema: dataclasses whose annotations are the checked JSON types
# ---------------------------------------------------------------------------------------------------------
Fail = Callable[[str], NoReturn]


def _conforms(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` has the type ``hint`` (Any, None, str, int, float, bool, unions, dict[K, V],
    list[T])."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if hint in (int, float):  # JSON numbers; a bool is not one
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


class _Record:
    """A dataclass that reads and writes itself as JSON, its field annotations being the schema.

    :meth:`_parse` checks a JSON mapping against the fields: every field without a default present, each
    value of its annotated type. A field typed with a class that has ``from_json`` (a :class:`_Record`,
    :class:`GraphSpec`, :class:`PipelineConfig`, :class:`ShapeOptions`) is converted with it, an enum field
    (:class:`Precision`) from its value. Unknown keys are ignored.
    """

    @classmethod
    def _parse(cls, data: Any, fail: Fail, where: str | None, done: Mapping[str, Any] | None = None) -> Any:
        """An instance from ``data``; ``fail(problem)`` raises on the first problem, ``where`` names the
        record in problems ("graph unet"; None at the top level); ``done`` holds fields already converted."""
        if not isinstance(data, dict):
            fail(f"{where or 'the manifest'} is {type(data).__name__}, not a mapping")
        hints = typing.get_type_hints(cls)
        values = dict(done or {})
        for f in dataclasses.fields(cls):
            what = f"{f.name} of {where}" if where else f.name
            if f.name in values:
                continue
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    fail(f"{what} is missing")
                continue
            values[f.name] = _convert(data[f.name], hints[f.name], f.type, what, fail)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The JSON mapping :meth:`_parse` reads back (fields in declaration order)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _to_json(value)
        return out


def _convert(value: Any, hint: Any, text: str, what: str, fail: Fail) -> Any:
    """``value`` checked against ``hint`` (spelt ``text`` in problems) and converted where the type has a
    JSON form."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    target = args[0] if optional else hint
    if optional and value is None:
        return None
    if isinstance(target, type) and issubclass(target, enum.Enum):
        choices = [member.value for member in target]
        if value not in choices:
            fail(f"{what} {value!r} is not one of {', '.join(map(str, choices))}")
        return target(value)
    if isinstance(target, type) and issubclass(target, _Record):
        return target._parse(value, fail, what)
    if isinstance(target, type) and hasattr(target, "from_json"):
        if not isinstance(value, dict):
            fail(f"{what} is {type(value).__name__}, not a mapping")
        try:
            return target.from_json(value)
        except (KeyError, TypeError, ValueError) as exc:
            fail(f"malformed {what} ({type(exc).__name__}: {exc})")
    if not _conforms(value, hint):
        found = repr(value)
        fail(f"{what} is not {text} (found {found if len(found) <= 60 else found[:57] + '...'})")
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class PipelineInfo(_Record):
    """What the pipeline needs besides the graphs.

    Attributes:
        config: model sizes and constants.
        scheduler_config: the checkpoint's ``scheduler/scheduler_config.json``.
        demo: the demo checkpoint's marker (``random_weights``, ``min_resolution``), None for real weights.
    """

    config: PipelineConfig
    scheduler_config: dict[str, Any]
    demo: dict[str, Any] | None = None


@dataclass(kw_only=True)
class GraphEntry(_Record):
    """One graph of an engine directory.

    Attributes:
        artifact: the file the backend loads (``<graph>.onnx`` or ``<graph>.plan``); one of :attr:`files`.
        check: max |difference| from PyTorch fp32 per shape point, measured at build time.
        tensorrt: TensorRT's build info (:func:`export.tensorrt_build.build_engine`); None (and absent from
            the JSON) for ONNX artifacts.
        files: every file of the graph (the artifact, an ONNX ``.data`` file) -> sha256.
        spec: the graph's I/O description.
        build_key: sha256 of :attr:`build_key_inputs`, everything the artifact depends on.
        build_key_inputs: spec, backend, precision, opset, source sha256s, library versions, GPU.
        seconds: how long exporting (and compiling) took.
    """

    artifact: str
    check: dict[str, float] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    files: dict[str, str]
    spec: GraphSpec
    build_key: str | None = None
    build_key_inputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


@dataclass(kw_only=True)
class Manifest(_Record):
    """``manifest.json`` of an engine directory (see the module docstring for the fields).

    :meth:`from_json` is the one place its structure is checked; :meth:`to_json` writes what it reads.
    """

    format: str = FORMAT
    backend: str
    precision: Precision
    opset: int | None = None
    shapes: ShapeOptions | None = None
    pipeline: PipelineInfo
    source: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    gpu: dict[str, str] | None = None
    graphs: dict[str, GraphEntry]
    files: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    command: str | None = None

    @classmethod
    def from_json(cls, data: Any, engine_dir: str | os.PathLike) -> Manifest:
        """Check the parsed ``manifest.json`` of ``engine_dir`` and convert it.

        ``manifest.json`` carries no hash of itself, so a hand-edited or truncated-then-repaired manifest is
        caught here instead of as a ``KeyError`` deep in loading: the format version, a backend that loads
        engine directories, every field of its annotated type (specs and the pipeline config parsed), one
        entry per pipeline graph, each one's ``artifact`` among the ``files`` it verifies.

        Raises:
            EngineError: the first problem found, naming ``manifest.json`` and how to rebuild.
        """
        from .backends import engine_backends

        engine_dir = Path(engine_dir)
        _check_format(data, engine_dir)

        def fail(problem: str) -> NoReturn:
            raise EngineError(
                f"{problem} (tampered or damaged manifest); {rebuild_hint(data, engine_dir)}",
                engine_dir / MANIFEST_NAME,
            )

        if data.get("backend") not in engine_backends():
            fail(f"backend {data.get('backend')!r} is not one of {', '.join(engine_backends())}")
        graphs = data.get("graphs")
        if not isinstance(graphs, dict):
            fail("no 'graphs' mapping")
        missing = [name for name in GRAPH_NAMES if name not in graphs]
        unknown = [name for name in graphs if name not in GRAPH_NAMES]
        if missing or unknown:
            fail(
                f"graph entries missing: {', '.join(missing) or 'none'}; unknown: "
                f"{', '.join(map(str, unknown)) or 'none'} (expected exactly {', '.join(GRAPH_NAMES)})"
            )
        entries = {name: GraphEntry._parse(entry, fail, f"graph {name}") for name, entry in graphs.items()}
        for name, entry in entries.items():
            if entry.artifact not in entry.files:
                fail(
                    f"graph {name}: its artifact {entry.artifact!r} is not among the files whose sha256 is "
                    f"checked ({', '.join(entry.files)})"
                )
        return cls._parse(data, fail, None, {"graphs": entries})

    @classmethod
    def load(cls, engine_dir: str | os.PathLike) -> Manifest:
        """:func:`read_manifest` then :meth:`from_json`. Raises :class:`EngineError` (see both)."""
        return cls.from_json(read_manifest(engine_dir), engine_dir)

    def write(self, engine_dir: str | os.PathLike) -> Path:
        """Write ``engine_dir/manifest.json`` (indented JSON); returns its path."""
        path = Path(engine_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


# ---------------------------------------------------------------------------------------------------------
# Verification and loading
# ---------------------------------------------------------------------------------------------------------
def engine_file(engine_dir: Path, name: Any, manifest: Manifest | Mapping[str, Any]) -> Path:
    """``engine_dir / name`` for a file name read from ``manifest.json``, refusing any that leaves the directory.

    A name must be a non-empty relative path with ``/`` separators and no ``..`` part, and the file it
    names (after following symlinks) must lie inside ``engine_dir``.

    Raises:
        EngineError: ``name`` is absolute, contains ``..``, is not a string, or resolves outside ``engine_dir``.
    """
    manifest_path = Path(engine_dir) / MANIFEST_NAME
    if (
        not isinstance(name, str)
        or not name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise EngineError(
            f"lists the file {name!r}, which is not a plain path inside the engine directory "
            f"(tampered manifest?); {rebuild_hint(manifest, Path(engine_dir))}",
            manifest_path,
        )
    path = Path(engine_dir) / name
    if not path.resolve().is_relative_to(Path(engine_dir).resolve()):
        raise EngineError(
            f"lists the file {name!r}, which resolves outside the engine directory (symlink?); "
            f"{rebuild_hint(manifest, Path(engine_dir))}",
            manifest_path,
        )
    return path


def verify_files(engine_dir: Path, files: dict[str, str], manifest: Manifest | Mapping[str, Any]) -> None:
    """Check that every ``name -> sha256`` in ``files`` exists under ``engine_dir`` with that hash.

    Every name must stay inside ``engine_dir`` (see :func:`engine_file`).

    Raises:
        EngineError: ``files`` is not a name -> sha256 mapping; names the first file that escapes the
            directory, is missing or has changed.
    """
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise EngineError(
            f"a file list is not a mapping of name -> sha256 (tampered manifest?); "
            f"{rebuild_hint(manifest, Path(engine_dir))}",
            Path(engine_dir) / MANIFEST_NAME,
        )
    for name, digest in files.items():
        path = engine_file(engine_dir, name, manifest)
        if not path.is_file():
            raise EngineError(f"artifact {name} is missing; {rebuild_hint(manifest, engine_dir)}", path)
        if sha256_file(path) != digest:
            raise EngineError(
                f"artifact {name} does not match its sha256 in manifest.json (corrupted or "
                f"modified); {rebuild_hint(manifest, engine_dir)}",
                path,
            )


@dataclass
class EngineDir:
    """A verified engine directory: its manifest and the graphs loaded by its backend."""

    root: Path
    manifest: Manifest
    graphs: Any  # sonic_rt.backends.Graphs

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.manifest.pipeline.scheduler_config

    @property
    def demo(self) -> dict[str, Any] | None:
        return self.manifest.pipeline.demo

    def feature_extractor(self):
        """Whisper's feature extractor from the copied ``whisper/preprocessor_config.json``."""
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor.from_pretrained(self.root / "whisper", local_files_only=True)


def open_engine_dir(
    engine_dir: str | os.PathLike,
    device: torch.device | None,
    precision: str | None,
    providers: list[str] | None = None,
) -> EngineDir:
    """Verify an engine directory and load its graphs with the backend named in its manifest.

    Args:
        engine_dir: written by ``python -m export.build_engines``.
        device: where to run (None: the backend's default, CUDA when usable).
        precision: the precision the caller asked for ("fp32"/"fp16"), or None to take the manifest's.
        providers: ONNX Runtime execution providers (None: CPU on CPU, CUDA on CUDA).

    Raises:
        EngineError: unreadable or malformed manifest; missing/corrupted artifact; built for another
            precision, or (compiled backends: TensorRT) another library version or GPU.
        BackendUnavailableError: the backend's library or device is missing here.
    """
    from . import backends

    root = Path(engine_dir).resolve()
    manifest = Manifest.load(root)
    backend = backends.get_backend(manifest.backend)
    if precision is not None and precision != manifest.precision.value:
        raise EngineError(
            f"engines were built for {manifest.precision.value}, but {precision} was requested; "
            f"omit the dtype or {rebuild_hint(manifest, root, precision=precision)}",
            root,
        )
    if backend.compiled:  # a compiled artifact runs only on the library version it was built with
        for library, version in backend.versions().items():
            if manifest.libraries.get(library) != version:
                raise EngineError(
                    f"engines were built with {library} {manifest.libraries.get(library)}, this is "
                    f"{version}; {rebuild_hint(manifest, root)}",
                    root,
                )
    device = torch.device(device) if device is not None else backend.default_device()
    if backend.compiled:  # ... and on the GPU it was built for
        here, built = backend.gpu_identity(device), manifest.gpu
        if here != built:
            raise EngineError(
                f"engines were built for {built}, this GPU is {here}; {rebuild_hint(manifest, root)}", root
            )
    verify_files(root, manifest.files, manifest)
    graphs = {}
    for name, entry in manifest.graphs.items():
        verify_files(root, entry.files, manifest)  # the artifact is one of these (Manifest.from_json)
        graphs[name] = backend.load_graph(entry.spec, engine_file(root, entry.artifact, manifest), device, providers)
    return EngineDir(root, manifest, backends.Graphs.from_mapping(backend, manifest.pipeline.config, graphs))
