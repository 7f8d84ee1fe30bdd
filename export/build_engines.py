"""``python -m export.build_engines``: export Sonic's graphs to ONNX (and TensorRT engines) with a manifest.

For every graph of :mod:`sonic_rt.graphs` (Whisper encoder, CLIP image encoder, VAE encoder and decoder,
audio2token, audio2bucket, the UNet with Sonic's audio attention, RIFE):

1. trace it with the TorchScript ONNX exporter at the spec's shapes, dynamic axes from the spec;
2. clean it up with onnxslim, run ONNX shape inference and the full ONNX checker;
3. run the graph with ONNX Runtime at the min and opt shapes and compare it with PyTorch fp32;
4. for ``--backend tensorrt``: build a TensorRT engine (one optimisation profile from the spec, fp16
   when asked, a shared timing cache) and check it the same way.

Everything is written to a temporary sibling directory and moved into place at the end, so a failure or
Ctrl-C leaves no half-written engine directory (the previous one, if any, stays as it was). Re-running
with unchanged inputs reuses every verified artifact and says so; a changed input (weights, shapes,
precision, library version) rebuilds exactly the graphs that depend on it and says why.

The code follows those phases: :func:`plan_build` (what each graph depends on; reuse or rebuild, and why),
:func:`_build_graph` per graph (export, check, and :func:`_compile_graph` for a compiled backend), the
manifest (:class:`~sonic_rt.manifest.Manifest`) with the support files, then :func:`_swap_into_place`.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import sonic_rt
from export.onnx_export import OPSET, ExportError, check_parity, export_graph, run_check
from sonic_rt.backends import Backend, engine_backends, get_backend
from sonic_rt.checkpoint import ModelPaths, read_config, resolve_model_dir
from sonic_rt.errors import InputError, SonicError
from sonic_rt.graphs import DimRange, GraphSpec, PipelineConfig, Precision, ShapeOptions, graph_modules, graph_specs
from sonic_rt.graphs.modules import GRAPH_NAMES
from sonic_rt.manifest import MANIFEST_NAME, GraphEntry, Manifest, PipelineInfo, sha256_file
from sonic_rt.models.unet import AudioAttention

# Parity of each exported graph against PyTorch fp32 at build time (diff <= atol + rtol * max|reference|).
# This catches broken exports (frozen shapes, wrong ops); the test suite holds the tight per-precision checks.
TIMING_CACHE = "timing.cache"
CHECK_TOLERANCE = {Precision.FP32: (1e-4, 1e-4), Precision.FP16: (5e-2, 5e-2)}


@dataclass(frozen=True)
class BuildOptions:
    """What to build. ``shapes`` are the ranges the graphs must accept (TensorRT profiles)."""

    backend: str = "onnxruntime"
    precision: Precision = Precision.FP32
    shapes: ShapeOptions = field(default_factory=ShapeOptions)
    opset: int = OPSET
    check_points: tuple[str, ...] = ("min", "opt")


@dataclass
class BuildReport:
    """What :func:`build_engines` did: per graph ``"built"`` or ``"reused"`` and why, and the manifest."""

    out: Path
    actions: dict[str, tuple[str, str]]
    manifest: Manifest


@dataclass
class BuildPlan:
    """What :func:`build_engines` will do, decided before anything is written (:func:`plan_build`).

    Attributes:
        out: the engine directory to write (absolute).
        backend: the backend class the artifacts are for.
        device: where PyTorch traces the graphs and runs the parity reference.
        paths: the resolved weights directory.
        old: the manifest already in ``out`` (None when there is none).
        sources: every source file (relative to ``paths.root``) -> sha256.
        versions: library versions recorded in the manifest and the build keys.
        gpu: the GPU compiled artifacts are tied to (:meth:`Backend.gpu_identity`), None for ONNX.
        config: model sizes and constants.
        specs, modules: per graph, its spec (options' shapes and precision) and its fp32 module.
        keys: per graph, everything its artifact depends on (:func:`_build_key`).
        reasons: per graph, why it is rebuilt, or None when the artifact in ``out`` is reused.
    """

    out: Path
    backend: type[Backend]
    device: torch.device
    paths: ModelPaths
    old: Manifest | None
    sources: dict[str, str]
    versions: dict[str, str]
    gpu: dict[str, str] | None
    config: PipelineConfig
    specs: dict[str, GraphSpec]
    modules: dict[str, nn.Module]
    keys: dict[str, dict[str, Any]]
    reasons: dict[str, str | None]


def _source_files(paths: ModelPaths) -> dict[str, list[Path]]:
    """The files each graph's weights and sizes come from."""

    def folder(path: Path) -> list[Path]:
        return sorted(p for p in path.rglob("*") if p.is_file())

    whisper_config = paths.whisper / "config.json"
    return {
        "whisper_encoder": folder(paths.whisper),
        "image_encoder": folder(paths.image_encoder),
        "vae_encoder": folder(paths.vae),
        "vae_decoder": folder(paths.vae),
        "audio2token": [paths.audio2token, whisper_config, paths.unet_config],
        "audio2bucket": [paths.audio2bucket, whisper_config, paths.image_encoder / "config.json"],
        "unet": [paths.unet, paths.unet_config],
        "rife": [paths.rife],
    }


def _library_versions(backend: type[Backend]) -> dict[str, str]:
    import onnx
    import onnxslim

    versions = {
        "sonic_rt": sonic_rt.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxslim": onnxslim.__version__,
    }
    versions.update(backend.versions())
    return versions


def _build_key(
    spec: GraphSpec, options: BuildOptions, sources: dict[str, str], versions: dict[str, str], gpu: dict | None
) -> dict[str, Any]:
    """Everything a graph's artifact depends on (its sha256 is the build key)."""
    return {
        "spec": spec.to_json(),
        "backend": options.backend,
        "precision": options.precision.value,
        "opset": options.opset,
        "sources": sources,
        "libraries": versions,
        "gpu": gpu,
    }


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _why_rebuild(old_entry: GraphEntry | None, key: dict[str, Any], old_dir: Path | None) -> str | None:
    """None when the old artifact can be reused, else the reason to rebuild."""
    if old_entry is None or old_dir is None:
        return "not built yet"
    old_key = old_entry.build_key_inputs
    if _key_digest(old_key) == _key_digest(key):
        for name, digest in old_entry.files.items():
            path = old_dir / name
            if not path.is_file() or sha256_file(path) != digest:
                return f"artifact {name} is missing or corrupted"
        return None
    for part, label in (
        ("sources", "source weights"),
        ("spec", "shapes"),
        ("precision", "precision"),
        ("backend", "backend"),
        ("opset", "opset"),
        ("libraries", "library versions"),
        ("gpu", "GPU"),
    ):
        if old_key.get(part) != key.get(part):
            if part == "sources":
                changed = sorted(set(old_key.get(part, {}).items()) ^ set(key[part].items()))
                return f"source changed: {changed[0][0] if changed else '?'}"
            if part == "libraries":
                changed = [k for k in key[part] if old_key.get(part, {}).get(k) != key[part][k]]
                return f"library versions changed: {', '.join(changed)}"
            return f"{label} changed"
    return "build inputs changed"


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# 1. Plan: what each graph depends on, and which ones to rebuild
# ---------------------------------------------------------------------------------------------------------
def plan_build(
    model_dir: str | os.PathLike,
    out: Path,
    options: BuildOptions,
    backend: type[Backend],
    device: torch.device,
    log: Callable[[str], None],
) -> BuildPlan:
    """Hash the sources, load the fp32 models and decide per graph whether the artifact in ``out`` is reused.

    Raises:
        InputError: ``out`` exists and is not an engine directory.
        EngineError: ``out``'s manifest is unreadable or malformed.
        CheckpointError: the weights directory is unusable.
    """
    if out.exists() and not (out / MANIFEST_NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an engine directory; choose another --out or remove it")
    old = Manifest.load(out) if (out / MANIFEST_NAME).is_file() else None
    paths = resolve_model_dir(model_dir)
    log(f"hashing source files in {paths.root}")
    depends = _source_files(paths)
    hashes = {p: sha256_file(p) for p in sorted({p for files in depends.values() for p in files})}
    rel = {p: str(p.relative_to(paths.root)) for p in hashes}
    versions = _library_versions(backend)
    gpu = backend.gpu_identity(device)
    log(f"loading {paths.root} on {device}")
    models, modules = _load_for_export(paths, device)
    config = PipelineConfig.from_models(models)
    specs = graph_specs(config, options.shapes, options.precision)
    keys = {
        name: _build_key(specs[name], options, {rel[p]: hashes[p] for p in depends[name]}, versions, gpu)
        for name in GRAPH_NAMES
    }
    # a manifest from another backend/precision: everything differs, and the reasons say so
    reasons = {
        name: _why_rebuild(old.graphs.get(name) if old else None, keys[name], out if old else None)
        for name in GRAPH_NAMES
    }
    return BuildPlan(
        out,
        backend,
        device,
        paths,
        old,
        {rel[p]: h for p, h in hashes.items()},
        versions,
        gpu,
        config,
        specs,
        modules,
        keys,
        reasons,
    )


# ---------------------------------------------------------------------------------------------------------
# 2. Build each graph (or reuse it)
# ---------------------------------------------------------------------------------------------------------
def _reuse_graph(plan: BuildPlan, name: str, tmp: Path) -> GraphEntry:
    """Link the verified artifact files of ``name`` from the old directory into ``tmp``; its old entry."""
    entry = plan.old.graphs[name]
    for file in entry.files:
        _place(plan.out / file, tmp / file)
    return entry


def _build_graph(
    plan: BuildPlan, name: str, options: BuildOptions, tmp: Path, log: Callable[[str], None]
) -> GraphEntry:
    """Export graph ``name`` to ONNX in ``tmp`` and check it against PyTorch fp32; for a compiled backend, then
    compile it (:func:`_compile_graph`), keeping only the compiled artifact.

    Raises:
        ExportError / EngineError: the export, the compilation or a parity check failed.
    """
    started = time.perf_counter()
    module, spec = plan.modules[name], plan.specs[name]
    fp32 = spec.inputs[0].dtype == "float32"
    export_module = module if fp32 else copy.deepcopy(module).to(torch.float16)
    onnx_path = tmp / f"{name}.onnx"
    files = export_graph(export_module, spec, onnx_path, opset=options.opset)
    del export_module
    rtol, atol = CHECK_TOLERANCE[Precision.FP32 if fp32 else options.precision]
    check = run_check(module, spec, onnx_path, options.check_points, rtol=rtol, atol=atol)
    log(
        f"{name}: ONNX exported and checked at {'/'.join(options.check_points)} shapes "
        f"(max |diff| vs PyTorch fp32 {max(check.values()):.2g})"
    )
    artifact, info = onnx_path, None
    if plan.backend.compiled:
        artifact, info, check = _compile_graph(plan, name, onnx_path, options, tmp, (rtol, atol), log)
        for file in files:
            file.unlink()
        files = [artifact]
    return GraphEntry(
        artifact=artifact.name,
        check=check,
        tensorrt=info,
        files={f.name: sha256_file(f) for f in files},
        spec=spec,
        build_key=_key_digest(plan.keys[name]),
        build_key_inputs=plan.keys[name],
        seconds=round(time.perf_counter() - started, 2),
    )


def _compile_graph(
    plan: BuildPlan,
    name: str,
    onnx_path: Path,
    options: BuildOptions,
    tmp: Path,
    tolerance: tuple[float, float],
    log: Callable[[str], None],
) -> tuple[Path, dict[str, Any], dict[str, float]]:
    """Compile the ONNX export of ``name`` into the backend's artifact, load it and check it against PyTorch.

    TensorRT is the one compiled backend (:attr:`Backend.compiled`); its tactic timings are kept in
    ``tmp/timing.cache`` between graphs and builds. Returns the artifact, the build info and the parity report.
    """
    from export.tensorrt_build import build_engine, profile_table

    spec, module = plan.specs[name], plan.modules[name]
    artifact = tmp / f"{name}{plan.backend.artifact_suffix}"
    for line in profile_table(spec):
        log(f"{name}:   {line}")
    info = build_engine(onnx_path, spec, artifact, options.precision, timing_cache=tmp / TIMING_CACHE)
    graph = plan.backend.load_graph(spec, artifact, plan.device)
    rtol, atol = tolerance
    check = check_parity(
        module,
        spec,
        lambda args, point: graph(*args),
        options.check_points,
        rtol=rtol,
        atol=atol,
        seed=200,
        label=artifact.name,
    )
    log(f"{name}: TensorRT engine built and checked (max |diff| {max(check.values()):.2g})")
    return artifact, info, check


# ---------------------------------------------------------------------------------------------------------
# 3. The manifest and the support files
# ---------------------------------------------------------------------------------------------------------
def _write_support_files(paths: ModelPaths, tmp: Path) -> dict[str, str]:
    """Copy Whisper's preprocessor config and the YOLO face detector (if any) into ``tmp``; name -> sha256."""
    support = {}
    (tmp / "whisper").mkdir()
    shutil.copy2(paths.whisper / "preprocessor_config.json", tmp / "whisper" / "preprocessor_config.json")
    support["whisper/preprocessor_config.json"] = sha256_file(tmp / "whisper" / "preprocessor_config.json")
    if paths.yoloface is not None:
        shutil.copy2(paths.yoloface, tmp / paths.yoloface.name)
        support[paths.yoloface.name] = sha256_file(tmp / paths.yoloface.name)
    return support


def _manifest(
    plan: BuildPlan, options: BuildOptions, graphs: dict[str, GraphEntry], support: dict[str, str], command: str | None
) -> Manifest:
    paths = plan.paths
    demo = json.loads(paths.demo_marker.read_text()) if paths.demo_marker else None
    pipeline = PipelineInfo(
        config=plan.config, scheduler_config=read_config(paths.scheduler / "scheduler_config.json"), demo=demo
    )
    return Manifest(
        backend=plan.backend.name,
        precision=options.precision,
        opset=options.opset,
        shapes=options.shapes,
        pipeline=pipeline,
        source={"model_dir": str(paths.root), "files": plan.sources},
        libraries=plan.versions,
        gpu=plan.gpu,
        graphs=graphs,
        files=support,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Swap into place
# ---------------------------------------------------------------------------------------------------------
def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the complete ``tmp``: the old directory stays intact until the new one is complete."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build_engines(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    options: BuildOptions,
    *,
    log: Callable[[str], None] = _log,
    device: torch.device | None = None,
    command: str | None = None,
) -> BuildReport:
    """Export (and for TensorRT build) every graph of the model in ``model_dir`` into ``out``.

    Steps: plan (:func:`plan_build`: what each graph depends on, which to reuse and why), build or reuse
    each graph in a temporary sibling directory, write the support files and the manifest, swap into place.

    Args:
        model_dir: official-layout weights directory (or the demo checkpoint).
        out: engine directory to write; an existing engine directory is updated (unchanged graphs reused).
        options: backend, precision, shape ranges, opset.
        log: where progress lines go (stderr by default).
        device: where PyTorch runs the tracing and the reference (None: CUDA when available).
        command: the command line, recorded in the manifest.

    Returns:
        a :class:`BuildReport`.

    Raises:
        CheckpointError: the weights directory is unusable.
        BackendUnavailableError: the backend's library (or GPU, for TensorRT) is missing.
        InputError: ``out`` exists and is not an engine directory.
        ExportError / EngineError: a graph failed its checks (nothing is written then).
    """
    out = Path(out).resolve()
    backend = get_backend(options.backend)  # fails early, naming what to install
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_build(model_dir, out, options, backend, device, log)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if plan.old is not None and (out / TIMING_CACHE).is_file():  # TensorRT tactic timings (not an artifact)
        shutil.copy2(out / TIMING_CACHE, tmp / TIMING_CACHE)
    actions: dict[str, tuple[str, str]] = {}
    try:
        graphs: dict[str, GraphEntry] = {}
        for i, name in enumerate(GRAPH_NAMES, 1):
            prefix = f"[{i}/{len(GRAPH_NAMES)}] "
            reason = plan.reasons[name]
            if reason is None:
                graphs[name] = _reuse_graph(plan, name, tmp)
                actions[name] = ("reused", "inputs unchanged, sha256 verified")
                log(f"{prefix}{name}: reused (inputs unchanged, sha256 verified)")
                continue
            log(f"{prefix}{name}: building ({reason})")
            graphs[name] = _build_graph(plan, name, options, tmp, lambda line: log(prefix + line))
            actions[name] = ("built", reason)
        manifest = _manifest(plan, options, graphs, _write_support_files(plan.paths, tmp), command)
        manifest.write(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildReport(out, actions, manifest)


def _load_for_export(paths: ModelPaths, device: torch.device):
    """fp32 models (the export source and the parity reference) and their graph modules; the UNet with the
    exact-simplification attention (:attr:`AudioAttention.SDPA`)."""
    from sonic_rt.loading import load_models

    models = load_models(paths, device, torch.float32)
    models.unet.attention = AudioAttention.SDPA
    return models, graph_modules(models)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def _range(text: str, what: str) -> DimRange:
    try:
        values = [int(v) for v in text.split(":")]
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError
        return DimRange(*values)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be N or MIN:OPT:MAX with MIN <= OPT <= MAX, got {text!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.build_engines",
        description="Export Sonic's eight graphs (Whisper encoder, CLIP, VAE encoder/decoder, audio2token, "
        "audio2bucket, UNet with audio attention, RIFE) to ONNX and, for --backend tensorrt, TensorRT "
        "engines. Writes OUT/manifest.json; load the result with sonic_rt.Runtime(OUT) or "
        "python -m sonic_rt animate --model OUT.",
        epilog="Re-running with the same inputs reuses verified artifacts; changed weights, shapes, precision or "
        "library versions rebuild what depends on them. A failure leaves no half-written directory.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="official-layout Sonic weights directory")
    src.add_argument(
        "--demo",
        action="store_true",
        help="the small random-weight demo checkpoint (created on first use in ~/.cache/sonic_rt)",
    )
    p.add_argument("--out", type=Path, required=True, help="engine directory to write, e.g. engines/demo-ort")
    p.add_argument(
        "--backend",
        choices=engine_backends(),
        default="onnxruntime",
        help="onnxruntime: portable .onnx graphs (CPU/CUDA/TensorRT execution providers); tensorrt: "
        "serialized TensorRT 10 engines for this GPU and TensorRT version (default: onnxruntime)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default=None,
        help="float precision of the UNet, VAE, CLIP and Whisper graphs (the audio adapters and RIFE stay "
        "fp32, as official). Default: fp16 for tensorrt, fp32 for onnxruntime",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=25,
        help="window length in frames at 12.5 fps: the most frames one UNet call takes (official 25)",
    )
    p.add_argument(
        "--resolution",
        type=lambda t: _range(t, "--resolution"),
        default=None,
        metavar="MIN:OPT:MAX",
        help="pixel height/width range of the generated video, multiples of 64 "
        "(default 512:512:1024, demo 128:128:256)",
    )
    p.add_argument(
        "--windows",
        type=lambda t: _range(t, "--windows"),
        default=DimRange(1, 1, 1),
        metavar="MIN:OPT:MAX",
        help="windows per UNet call; the UNet batch is 3x this (default 1)",
    )
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument(
        "--check",
        default="min,opt",
        help="shape points at which each graph is compared with PyTorch "
        "(comma-separated from min, opt, max; default min,opt)",
    )
    p.add_argument(
        "--device", default=None, help="where PyTorch traces and runs the reference (default: cuda when available)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import signal

    from sonic_rt.cli import raise_interrupt

    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # SIGTERM unwinds like Ctrl-C: the temporary directory goes
    try:
        backend = get_backend(args.backend)  # before any work: names what to install
        from sonic_rt.demo import DEMO_MIN_RESOLUTION, ensure_demo_model

        default_res = (
            DimRange(DEMO_MIN_RESOLUTION, DEMO_MIN_RESOLUTION, 2 * DEMO_MIN_RESOLUTION)
            if args.demo
            else DimRange(512, 512, 1024)
        )
        precision = Precision(args.precision) if args.precision else backend.default_precision
        points = tuple(p.strip() for p in args.check.split(",") if p.strip())
        if not points or any(p not in ("min", "opt", "max") for p in points):
            raise InputError(f"--check takes min, opt and/or max, got {args.check!r}")
        try:
            shapes = ShapeOptions(frames=args.frames, resolution=args.resolution or default_res, windows=args.windows)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        model_dir = ensure_demo_model() if args.demo else args.model
        options = BuildOptions(
            backend=args.backend, precision=precision, shapes=shapes, opset=args.opset, check_points=points
        )
        device = torch.device(args.device) if args.device else None
        command = "python -m export.build_engines " + " ".join(sys.argv[1:] if argv is None else argv)
        started = time.perf_counter()
        report = build_engines(model_dir, args.out, options, device=device, command=command)
    except (SonicError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    built = sum(1 for action, _ in report.actions.values() if action == "built")
    print(
        f"{report.out}: {built} graphs built, {len(report.actions) - built} reused, "
        f"{options.backend} {options.precision.value}, {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
