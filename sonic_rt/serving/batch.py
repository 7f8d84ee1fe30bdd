"""``python -m sonic_rt batch jobs.jsonl --out DIR [--ray [ADDRESS]]``: many videos from a jobs file.

``jobs.jsonl`` has one JSON object per line::

    {"image": "faces/anna.png", "audio": "speech/anna.wav", "output": "anna.mp4", "options": {"seed": 1}}

``image`` and ``audio`` are files (relative to the jobs file's folder), ``output`` a file name ending in ``.mp4``
(written in ``--out``), ``options`` any :class:`~sonic_rt.AnimateOptions` fields by name (optional). Blank lines
are skipped.

* **One Runtime per worker.** Without ``--ray`` the jobs run here, one after the other, on one Runtime. With
  ``--ray`` they run on Ray Data: ``map_batches`` over an actor pool of ``--workers`` actors, each holding one
  Runtime (``--num-gpus`` each, 1 by default where the cluster has GPUs). A line runs through the same
  :func:`run_job` either way.
* **A worker that dies costs no line.** Ray Data's actor pools restart a dead actor and run its batch again
  (``max_restarts=-1``, ``max_task_retries=-1``). The runtime writes each mp4 under a temporary name and renames
  it when complete, so an interrupted job leaves no ``.mp4``; the temporary files of killed workers are removed
  at the end of the run.
* **Resumable.** A line whose output exists is complete (see above) and is skipped on the next run.
* **One failed line fails that line only.** ``results.jsonl`` in ``--out`` gets one object per line of the jobs
  file (``line``, ``output``, ``status``: ``succeeded``, ``failed`` or ``skipped``, ``error``, ``frames``,
  ``video_seconds``, ``seconds``), written as the jobs end and sorted by line at the end of the run.
* A tqdm bar on stderr: jobs done of those to run, their rate and the time left.

The exit code is 0 when no line failed, 1 otherwise (``results.jsonl`` says which and why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import SonicError

RESULTS = "results.jsonl"
LINE_FIELDS = ("image", "audio", "output", "options")
# AnimateOptions fields a line may not set: the batch writes mp4 files itself, quietly.
NOT_IN_A_LINE = ("hls", "progress", "return_frames")
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


@dataclass(frozen=True)
class BatchJob:
    """One line of the jobs file, checked.

    Attributes:
        line: its line number in the jobs file (1-based).
        image, audio: the input files (absolute, or as given when absolute).
        output: the output file name (``*.mp4``) inside the output folder.
        options: :class:`~sonic_rt.AnimateOptions` overrides by field name (``face_box`` as a list of 4 numbers
            or ``"x,y,w,h"``).
    """

    line: int
    image: str
    audio: str
    output: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    """What a batch run did: the lines that ``succeeded``, ``failed`` and were ``skipped`` (their output existed),
    and the ``results`` file."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    results: Path | None = None


def read_jobs(path: str | Path) -> tuple[list[BatchJob], list[dict[str, Any]]]:
    """Parse and check a jobs file.

    Returns:
        the jobs that can run, and a ``failed`` result record (:func:`run_job`'s form) for each line that cannot
        (not JSON, a missing or unknown field, an option that is not an AnimateOptions field or has the wrong type,
        an output name that is not a plain ``*.mp4`` name or repeats an earlier line's).

    Raises:
        SonicError: the jobs file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SonicError(f"cannot read the jobs file: {exc}", path) from None
    jobs, errors, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            job = _parse_line(number, raw, path.resolve().parent)
            if job.output in seen:
                raise ValueError(f"output {job.output!r} is also an earlier line's")
            seen.add(job.output)
            jobs.append(job)
        except ValueError as exc:
            output = _output_of(raw)
            errors.append(_record(number, output, "failed", error=f"line {number}: {exc}"))
    return jobs, errors


def _parse_line(number: int, raw: str, base: Path) -> BatchJob:
    from ..pipeline.options import AnimateOptions

    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(item) - set(LINE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; a line has {', '.join(LINE_FIELDS)}")
    for name in ("image", "audio", "output"):
        if not isinstance(item.get(name), str) or not item[name]:
            raise ValueError(f"{name} must be a file name (a non-empty string)")
    output = item["output"]
    if Path(output).name != output or not output.lower().endswith(".mp4") or output.startswith("."):
        raise ValueError(f"output {output!r} must be a file name ending in .mp4 (no folder)")
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError("options must be a JSON object")
    infos = {info.name: info for info in AnimateOptions.describe()}
    for name, value in options.items():
        if name not in infos or name in NOT_IN_A_LINE:
            raise ValueError(f"options.{name}: not an option here (see AnimateOptions)")
        kind = infos[name].type.removesuffix(" | None")
        if value is None and infos[name].type.endswith("| None"):
            continue
        if name == "face_box":
            if isinstance(value, list):
                options[name] = tuple(value)
            continue
        if kind in _TYPES and (not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool))):
            raise ValueError(f"options.{name}: expected {kind}, got {json.dumps(value)}")
    image, audio = (str(p if Path(p).is_absolute() else base / p) for p in (item["image"], item["audio"]))
    return BatchJob(number, image, audio, output, dict(options))


def _output_of(raw: str) -> str | None:
    try:
        value = json.loads(raw).get("output")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _record(line: int, output: str | None, status: str, **extra) -> dict[str, Any]:
    return {"line": line, "output": output, "status": status, "error": None, **extra}


def run_job(runtime, job: BatchJob, out_dir: str | Path) -> dict[str, Any]:
    """Run one line on ``runtime`` (the same code locally and in a Ray worker).

    Returns:
        its result record: ``line``, ``output``, ``status`` (``succeeded`` or ``failed``), ``error`` (one line, or
        None), and when it succeeded ``frames``, ``video_seconds``, ``seconds`` (wall time of the job).
        Nothing is raised for a bad line: its error is in the record and no output file is left.
    """
    from ..face import FaceBox
    from ..pipeline.options import AnimateOptions

    started = time.perf_counter()
    out = Path(out_dir) / job.output
    try:
        options = AnimateOptions.resolve(None, {**job.options, "progress": False}, f"line {job.line}: options")
        if options.face_box is not None:
            options = dataclasses.replace(options, face_box=FaceBox.from_user(options.face_box))
        result = runtime.animate(job.image, job.audio, out, options)
    except SonicError as exc:
        return _record(job.line, job.output, "failed", error=" ".join(str(exc).split()))
    except Exception as exc:  # a fault of this line's run, not of the batch: say it, go on with the others
        return _record(job.line, job.output, "failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return _record(
        job.line,
        job.output,
        "succeeded",
        frames=result.num_frames,
        video_seconds=round(result.num_frames / result.fps, 3),
        seconds=round(time.perf_counter() - started, 3),
    )


class BatchWorker:
    """A Ray Data worker (the callable class of ``map_batches``): one Runtime, built once by ``load``.

    Args:
        load: builds the Runtime (a :class:`~sonic_rt.serving.ray_app.RuntimeLoader` or any picklable callable).
        out_dir: the output folder (reachable from this worker's node).
    """

    def __init__(self, load: Callable[[], Any], out_dir: str):
        self.runtime, self.out_dir = load(), out_dir

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """``batch["job"]``: JSON of :class:`BatchJob` fields -> ``{"result": [JSON of result records]}``."""
        results = [
            json.dumps(run_job(self.runtime, BatchJob(**json.loads(text)), self.out_dir)) for text in batch["job"]
        ]
        return {"result": results}


def run_batch(
    jobs_file: str | Path,
    out_dir: str | Path,
    load: Callable[[], Any],
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    progress: bool = True,
) -> Summary:
    """Run a jobs file (see the module's docstring).

    Args:
        jobs_file: the ``jobs.jsonl``.
        out_dir: the output folder (created); ``results.jsonl`` goes there too. One batch per folder at a time.
        load: builds a Runtime (in this process, or once in each Ray worker).
        ray_address: None: run here, in this process. A string: run on Ray Data, through
            :func:`~sonic_rt.serving.ray_app.init_ray` (an address connects, an empty string starts a local
            cluster on loopback) unless this process is connected already.
        workers: Ray workers (default: the cluster's GPUs divided by ``num_gpus``, or 1 without GPUs).
        num_gpus, num_cpus: per Ray worker (``num_gpus`` default: 1 where the cluster has GPUs, else 0).
        progress: show the tqdm bar.

    Raises:
        SonicError: the jobs file cannot be read; Ray is not installed (with ``ray_address``).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir).resolve()  # absolute: workers on Ray may run elsewhere
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, records = read_jobs(jobs_file)
    summary = Summary(failed=len(records), results=out_dir / RESULTS)
    todo = []
    for job in jobs:
        if (out_dir / job.output).is_file():
            records.append(_record(job.line, job.output, "skipped"))
            summary.skipped += 1
        else:
            todo.append(job)
    _remove_temporaries(out_dir, todo)  # left by a run that was killed
    with open(summary.results, "w", encoding="utf-8") as results:
        for record in records:
            results.write(json.dumps(record) + "\n")
        results.flush()
        bar = tqdm(total=len(todo), desc="sonic_rt batch", unit="job", disable=not progress, file=sys.stderr)
        bar.set_postfix(failed=summary.failed, skipped=summary.skipped)
        if ray_address is None:
            done = _run_here(todo, out_dir, load)
        else:
            done = _run_on_ray(todo, out_dir, load, ray_address, workers, num_gpus, num_cpus)
        for record in done:
            records.append(record)
            results.write(json.dumps(record) + "\n")
            results.flush()
            if record["status"] == "succeeded":
                summary.succeeded += 1
            else:
                summary.failed += 1
            bar.update(1)
            bar.set_postfix(failed=summary.failed, skipped=summary.skipped)
        bar.close()
    _remove_temporaries(out_dir, todo)
    sorted_path = summary.results.with_name(f".{RESULTS}.tmp")
    sorted_path.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["line"])))
    os.replace(sorted_path, summary.results)
    return summary


def _run_here(todo: list[BatchJob], out_dir: Path, load) -> Iterable[dict[str, Any]]:
    if not todo:
        return
    runtime = load()
    for job in todo:
        yield run_job(runtime, job, out_dir)


def _run_on_ray(todo, out_dir: Path, load, address: str, workers, num_gpus, num_cpus) -> Iterable[dict[str, Any]]:
    from .ray_app import import_ray, init_ray

    import_ray(address)
    if not todo:
        return
    import ray
    import ray.data

    if not ray.is_initialized():
        print(f"sonic_rt batch --ray: {init_ray(address)}", file=sys.stderr, flush=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    per_worker_gpus = num_gpus if num_gpus is not None else (1.0 if gpus else 0.0)
    if workers is None:
        workers = max(1, int(gpus // per_worker_gpus)) if per_worker_gpus else 1
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the tqdm bar above counts jobs
    context.print_on_execution_start = False
    items = [{"job": json.dumps(dataclasses.asdict(job))} for job in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        BatchWorker,
        fn_constructor_args=(load, str(out_dir)),
        batch_size=1,
        concurrency=min(workers, len(todo)),
        num_gpus=per_worker_gpus,
        num_cpus=num_cpus,
    )
    for row in dataset.iter_rows():
        yield json.loads(row["result"])


def _remove_temporaries(out_dir: Path, jobs: list[BatchJob]) -> None:
    """The runtime's temporary files of these jobs' outputs (``.<stem>.*.partial.mp4``, see
    :class:`sonic_rt.media.VideoWriter`) left by a worker that died while writing."""
    for job in jobs:
        for temporary in out_dir.glob(f".{Path(job.output).stem}.*.partial.mp4"):
            temporary.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """The ``batch`` subcommand (cheap: imports nothing heavy)."""
    p = sub.add_parser(
        "batch",
        help="animate every line of a jobs.jsonl file, here or on a Ray cluster (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Animate every line of a JSON-lines jobs file ({image, audio, output, options}); outputs and "
        "results.jsonl go to --out; a rerun skips the outputs that exist. docs/serve.md 'Batch jobs'.",
    )
    p.add_argument("jobs", type=Path, help="the jobs file: one JSON object per line")
    p.add_argument("--out", type=Path, required=True, help="output folder (the mp4 files and results.jsonl)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="official-layout Sonic checkpoint (or engine) directory")
    src.add_argument(
        "--demo", action="store_true", help="use the random-weight demo checkpoint (install check; not a talking face)"
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (Ray Data; extra: cluster): ADDRESS of a running one ('auto' for this "
        "machine's), or none to start a local one for this batch alone, on loopback. Without --ray: in this process",
    )
    p.add_argument("--workers", type=int, default=None, help="Ray workers, one Runtime each (default: one per GPU)")
    gpus = p.add_mutually_exclusive_group()
    gpus.add_argument("--num-gpus", type=float, default=None, help="GPUs per Ray worker (default: 1 with GPUs, else 0)")
    gpus.add_argument(
        "--gpus-per-worker",
        type=int,
        default=None,
        metavar="N",
        help="give each Ray worker N GPUs and run each video over all of them (the same video as on one GPU)",
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray worker (Ray's logical CPUs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="as for animate")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoint pickles that need arbitrary code (only for files you trust)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``batch``: returns 0 when no line failed, 1 otherwise."""
    from .ray_app import RuntimeLoader, import_ray

    if args.ray is not None:
        import_ray(args.ray)  # a missing Ray fails now, in one line
    for name in ("workers", "gpus_per_worker"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SonicError(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpus_per_worker is not None:
        args.num_gpus = float(args.gpus_per_worker)
    if args.model is not None and not Path(args.model).is_dir():
        raise SonicError("not a directory (give an official-layout checkpoint folder)", args.model)
    load = RuntimeLoader(
        str(Path(args.model).resolve()) if args.model else None,
        args.demo,
        args.device,
        args.dtype,
        args.trust_pickle,
        gpus=args.gpus_per_worker or 1,
    )
    if args.demo:
        print(
            "using the RANDOM-WEIGHT demo checkpoint: the videos check the install, they are not talking faces",
            file=sys.stderr,
        )
    summary = run_batch(
        args.jobs,
        args.out,
        load,
        ray_address=args.ray,
        workers=args.workers,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        progress=not args.no_progress,
    )
    print(
        f"sonic_rt batch: {summary.succeeded} succeeded, {summary.failed} failed, {summary.skipped} skipped "
        f"(output existed); results in {summary.results}",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


__all__ = ["BatchJob", "BatchWorker", "Summary", "read_jobs", "run_job", "run_batch", "add_parser", "run", "RESULTS"]
