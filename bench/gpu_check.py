"""``python -m bench.gpu_check``: the first-GPU check, one command of at most 9 minutes (run by bench/gpu_check.sh).

Every part runs in its own subprocess with its own timeout, so a failure or a hang in one loses none of the
others; each writes one JSON file into the output folder (``$OUT`` when set, else
``bench/results/gpu-check-<UTC date>/``), then a summary table is printed and written:

============  ==========================================================================  =====================
part          what                                                                        file
============  ==========================================================================  =====================
env           device, driver-side facts, library versions, which optional modules import  ``env.json``
              (and why not), the Triton kernels' self-check against sdpa and what
              ``attention="auto"`` resolves to (sonic_rt/attention_check.py)
pytest        ``pytest -m gpu`` on the test files that hold GPU tests (compiled kernels   ``pytest.json``
              at full size in fp16/bf16, stream lanes, real out-of-memory, host syncs,
              TensorRT where installed): per test outcome, seconds, message, output
unet_fp16     ``python -m bench.unet_call --dtype fp16``: one full-size SVD-xt UNet call  ``unet_call-fp16.json``
              per attention implementation (reference / sdpa / triton)
unet_bf16     the same in bf16                                                            ``unet_call-bf16.json``
low_memory    ``python -m bench.low_memory --preset full --seconds 2 --steps 10``: the    ``low_memory.json``
              default runtime and ``low_memory=True`` loaded one after the other: peak
              CUDA memory (allocated, and in use on the device), seconds, frame difference
throughput    ``python -m bench.throughput --preset full --seconds 2 --steps N            ``throughput.json``
              --backends eager,torch,devices2``: whole 512x512 videos, per-stage
              seconds, peak CUDA memory; devices2: two workers on the GPU
============  ==========================================================================  =====================

plus ``summary.json`` (every part's status, seconds, command and headline numbers) and ``log.txt`` (each
part's stdout and stderr). Eight files: the device tool brings back at most eight.

Each part file: ``{"part", "command", "rc", "status" (ok / failed / timeout / skipped), "seconds",
"timeout_s", "device", "versions", "result"}`` where ``result`` is the program's own JSON (pytest's is built
from its JUnit XML) and ``device`` / ``versions`` come from the env part.

Time: parts run in the order above; each gets ``min(its cap, what is left of --budget)`` seconds (the last,
throughput, gets the rest), and a part with under 20 s left is skipped and says so. ``--budget`` defaults to
540 s, so the whole command ends inside 9 minutes.

``--rehearse`` runs every part on the CPU with the tiny/demo shapes and the Triton interpreter
(``TRITON_INTERPRET=1``, ``CUDA_VISIBLE_DEVICES=``): unet_call ``--interpret --tiny`` (bf16 without the triton
implementation, which the interpreter computes wrongly), throughput on the demo preset for 0.5 s and 1 step;
pytest -m gpu then only collects and skips. tests/test_gpu_check.py runs it in CI
so that this script cannot rot.

Internal entry points: ``--env FILE`` (the env part), ``--prepare-inputs DIR`` (bench/gpu_wheels.sh: the
portrait and the speech WAVs that the GPU machine cannot make without espeak-ng).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540
MIN_PART_S = 20
RESERVE_S = 10  # for the summary after the last part
DEFAULT_STEPS = 25  # official; 2 s of audio is one UNet call per step
THROUGHPUT_SECONDS = 2.0
# modules the parts may need, with the pip package that provides each (the env part reports each one's import)
MODULES = {
    "torch": "torch",
    "triton": "triton",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "huggingface_hub": "huggingface-hub",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "av": "av",
    "soxr": "soxr",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxslim": "onnxslim",
    "tensorrt": "tensorrt",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
}
FILES = (
    "env.json",
    "pytest.json",
    "unet_call-fp16.json",
    "unet_call-bf16.json",
    "low_memory.json",
    "throughput.json",
    "summary.json",
    "log.txt",
)


# ---------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One subprocess of the check.

    Attributes:
        name: the part's name (``env``, ``pytest``, ...).
        command: argv, run in the repository root.
        cap_s: its own timeout (before the budget clamps it).
        file: the JSON file it becomes in the output folder.
        result_file: where the program writes its own JSON (a scratch path), or None.
        needs: modules without which it cannot run at all (skipped with the reason instead).
    """

    name: str
    command: list[str]
    cap_s: float
    file: str
    result_file: Path | None = None
    needs: tuple[str, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)


def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests (collecting only those keeps a missing optional library
    in another test file from stopping the run)."""
    files = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"pytest\.mark\.gpu|^gpu = pytest\.mark\.gpu", text, re.M):
            files.append(str(path.relative_to(REPO)))
    return files


def plan(args: argparse.Namespace, scratch: Path, cache: Path) -> list[Part]:
    """The parts of this run, in order (see the module docstring)."""
    py = sys.executable
    rehearse = args.rehearse
    parts = [
        Part(
            "env",
            [py, "-m", "bench.gpu_check", "--env", str(scratch / "env.json")] + (["--rehearse"] if rehearse else []),
            90 if rehearse else 60,
            "env.json",
            scratch / "env.json",
            needs=("torch",),
        )
    ]
    junit = scratch / "pytest.xml"
    # --continue-on-collection-errors: a test file that needs a library the image lacks loses only its own tests
    # -v: each outcome is in the streamed log as it happens, even if the part is killed at its timeout
    parts.append(
        Part(
            "pytest",
            [
                py,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-v",
                "-rA",
                "-p",
                "no:cacheprovider",
                "--continue-on-collection-errors",
                "-o",
                "junit_logging=system-out",
                f"--junitxml={junit}",
                *gpu_test_files(),
            ],
            130,
            "pytest.json",
            junit,
            needs=("torch", "pytest"),
        )
    )
    for dtype in ("fp16", "bf16"):
        out = scratch / f"unet_call-{dtype}.json"
        extra = ["--interpret", "--tiny", "--frames", "16", "--warmup", "0", "--repeats", "1"] if rehearse else []
        if rehearse and dtype == "bf16":  # the interpreter computes bf16 tl.dot wrongly (docs/development.md)
            extra += ["--impls", "reference,sdpa"]
        parts.append(
            Part(
                f"unet_{dtype}",
                [py, "-m", "bench.unet_call", "--dtype", dtype, *extra, "--out", str(out)],
                90 if rehearse else 70,
                f"unet_call-{dtype}.json",
                out,
                needs=("torch", "triton", "diffusers"),
            )
        )
    out = scratch / "low_memory.json"
    if rehearse:
        shape = ["--preset", "demo", "--seconds", "0.5", "--steps", "1", "--device", "cpu", "--threads", "2"]
    else:  # the first part to need the full checkpoint writes it into the cache (~5 GB), hence the cap
        shape = ["--preset", "full", "--seconds", f"{THROUGHPUT_SECONDS:g}", "--steps", "10", "--device", "cuda"]
    parts.append(
        Part(
            "low_memory",
            [py, "-m", "bench.low_memory", *shape, "--cache", str(cache), "--out", str(out)]
            + (["--model", str(args.model)] if args.model else []),
            120,
            "low_memory.json",
            out,
            needs=("torch", "diffusers", "transformers"),
        )
    )
    out = scratch / "throughput.json"
    if rehearse:
        shape = ["--preset", "demo", "--seconds", "0.5", "--steps", "1", "--device", "cpu", "--threads", "2"]
    else:
        shape = [
            "--preset",
            "full",
            "--seconds",
            f"{THROUGHPUT_SECONDS:g}",
            "--steps",
            str(args.steps),
            "--device",
            "cuda",
        ]
    parts.append(
        Part(
            "throughput",
            [
                py,
                "-m",
                "bench.throughput",
                *shape,
                "--backends",
                "eager,torch,devices2",
                "--cache",
                str(cache),
                "--out",
                str(out),
            ]
            + (["--model", str(args.model)] if args.model else []),
            10_000,
            "throughput.json",
            out,
            needs=("torch", "diffusers", "transformers", "av"),
        )
    )
    wanted = set(args.parts.split(",")) if args.parts else None
    return [p for p in parts if wanted is None or p.name in wanted]


def missing_modules(names: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Which of ``names`` do not import in a child with ``env`` (one quick subprocess)."""
    if not names:
        return []
    code = (
        "import importlib.util, sys\n"
        f"print(','.join(n for n in {list(names)!r} if importlib.util.find_spec(n) is None))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    return [n for n in proc.stdout.strip().split(",") if n]


def run_part(part: Part, timeout_s: float, env: dict[str, str], log) -> dict[str, Any]:
    """Run one part with ``timeout_s``, streaming its output (stdout and stderr) line by line to ``log`` (so
    the log holds what it said even if the whole command is killed); its record, without the result (read by
    :func:`collect`)."""
    import collections
    import threading

    command = shlex.join(part.command)
    record: dict[str, Any] = {"part": part.name, "command": command, "timeout_s": round(timeout_s, 1)}
    log(f"\n===== {part.name}: {command} (timeout {timeout_s:.0f} s) =====\n")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            part.command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
    except OSError as exc:
        return {**record, "rc": None, "status": "failed", "seconds": 0.0, "error": f"cannot start: {exc}"}
    tail: collections.deque[str] = collections.deque(maxlen=60)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        timed_out = True
    reader.join(timeout=10)
    seconds = time.monotonic() - started
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    record.update(rc=proc.returncode, status=status, seconds=round(seconds, 2))
    if status != "ok":
        record["output_tail"] = "".join(tail)[-4000:]
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    """End the part and everything it started (its own process group, made by ``start_new_session``)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def junit_results(path: Path) -> dict[str, Any]:
    """Per-test outcomes from pytest's JUnit XML: counts and ``tests: [{id, outcome, seconds, message, stdout}]``."""
    root = ET.parse(path).getroot()
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip()[:2000]
                break
        counts[outcome] += 1
        stdout = case.find("system-out")
        printed = (
            "\n".join(
                line
                for line in (stdout.text or "").splitlines()
                if not re.fullmatch(r"-+ Captured \w+ -+", line.strip())
            )
            if stdout is not None
            else ""
        )
        tests.append(
            {
                "id": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
                "stdout": printed.strip()[-2000:],
            }
        )
    return {"counts": counts, "tests": tests}


def collect(part: Part, record: dict[str, Any]) -> dict[str, Any]:
    """The part's record with its program's result attached (``result``; None when it wrote none)."""
    result = None
    path = part.result_file
    if path is not None and path.is_file():
        try:
            if part.name == "pytest":
                result = junit_results(path)
            else:
                result = json.loads(path.read_text())
                md = path.with_suffix(".md")
                if part.name == "throughput" and md.is_file():
                    result["markdown"] = md.read_text()
        except (OSError, ValueError, ET.ParseError) as exc:
            record["result_error"] = f"{path.name}: {exc}"
    record["result"] = result
    return record


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
def headline(name: str, result: dict | None) -> str:
    """The few numbers of a part that go in the summary table."""
    if not result:
        return "-"
    try:
        if name == "env":
            check = result.get("attention_selfcheck", {})
            verdict = "passed" if check.get("passed") else f"FAILED ({check.get('reason')})"
            return f"{result['device']['name']}; kernel self-check {verdict}; auto -> {check.get('auto')}"
        if name == "pytest":
            c = result["counts"]
            return f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
        if name.startswith("unet_"):
            impls = result["implementations"]
            cells = [f"{k} {v['ms']:.1f} ms" for k, v in impls.items()]
            tri = impls.get("triton")
            extra = (
                f"; triton x{tri['speedup_vs_reference']:.2f}, |diff| {tri['max_abs_diff_vs_reference']:.1e}"
                if tri
                else ""
            )
            peak = max((v["peak_gib"] or 0) for v in impls.values())
            return ", ".join(cells) + extra + (f"; peak {peak:.1f} GiB" if peak else "")
        if name == "low_memory":
            runs = result["runs"]
            peak = "cuda_peak_allocated_mb" if "cuda_peak_allocated_mb" in runs["default"] else "peak_rss_mb"
            return (
                f"{peak} default {runs['default'][peak]:.0f}, low_memory {runs['low_memory'][peak]:.0f} "
                f"(x{result['peak_ratio']:.2f}); time x{result['time_ratio']:.2f}; frames max "
                f"{result['frames_max_levels']} levels"
            )
        if name == "throughput":
            cells = []
            for backend, runs in result["runs"].items():
                for seconds, e in runs.items():
                    cells.append(
                        f"{backend} {seconds}s: {e['timings_s']['total']:.1f} s, "
                        f"{e['frames_per_s']:.1f} fps"
                        + (f", CUDA peak {e['cuda_peak_mb'] / 1024:.1f} GiB" if "cuda_peak_mb" in e else "")
                    )
            return "; ".join(cells)
    except (KeyError, TypeError, ValueError) as exc:
        return f"(unreadable result: {exc})"
    return "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------------------
# The env part (run in its own process)
# ---------------------------------------------------------------------------------------------------------
def env_report(rehearse: bool) -> dict[str, Any]:
    """Device, versions, module imports, and the kernels' self-check (see the module docstring)."""
    import importlib
    import platform

    modules: dict[str, Any] = {}
    for name, package in MODULES.items():
        try:
            module = importlib.import_module(name)
            modules[name] = {
                "ok": True,
                "version": str(getattr(module, "__version__", "?")),
                "path": str(Path(getattr(module, "__file__", "") or "").parent),
            }
        except Exception as exc:  # noqa: BLE001 - any import failure is a fact to report
            modules[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                "package": package,
            }
    import torch

    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rehearse": rehearse,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {k: v["version"] for k, v in modules.items() if v["ok"]},
        "modules": modules,
        "wheels": os.environ.get("SONIC_RT_GPU_CHECK_WHEELS", "").split(),
        "git": _git(),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")},
    }
    report["versions"]["cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available() and not rehearse
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        report["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": total / 2**30,
            "free_gib": free / 2**30,
            "count": torch.cuda.device_count(),
        }
        try:
            report["device"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        device = torch.device("cpu")
        report["device"] = {
            "name": "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu",
            "capability": None,
        }
    report["attention_selfcheck"] = _selfcheck(device, modules)
    return report


def _selfcheck(device, modules: dict) -> dict[str, Any]:
    """Run the kernels' self-check (uncached, timed) and resolve ``attention="auto"`` as the runtime would."""
    if not modules["triton"]["ok"]:
        return {"passed": False, "reason": f"triton does not import: {modules['triton']['error']}"}
    try:
        from sonic_rt import attention_check
        from sonic_rt.attention import resolve_attention
    except Exception as exc:  # noqa: BLE001
        return {"passed": False, "reason": f"sonic_rt does not import: {type(exc).__name__}: {exc}"}
    started = time.perf_counter()
    try:
        result = attention_check.run_selfcheck(device, {64})
    except Exception as exc:  # noqa: BLE001
        result = {"passed": False, "reason": f"{type(exc).__name__}: {exc}", "cases": {}}
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["identity"] = attention_check.device_identity(device)
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["SONIC_RT_CACHE_DIR"] = tmp  # a fresh cache: the runtime's own path runs the check again
            try:
                result["auto"] = resolve_attention("auto", device, {64}).value
            except Exception as exc:  # noqa: BLE001
                result["auto"] = f"error: {type(exc).__name__}: {exc}"
    else:
        result["auto"] = resolve_attention("auto", device, {64}).value
    return result


def _git() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------------------------------------------
# Inputs for the GPU machine (no espeak-ng there)
# ---------------------------------------------------------------------------------------------------------
def prepare_inputs(folder: Path, seconds: float = THROUGHPUT_SECONDS) -> list[Path]:
    """Write the throughput inputs (``bench.presets``: the astronaut PNG, the espeak-ng sentence, and that
    sentence tiled to ``seconds``) into ``folder``, named as the preset cache names them; the check copies them
    into its cache's ``inputs/``. Needs espeak-ng, scikit-image and PyAV here."""
    from bench.presets import ensure_inputs, speech_of_length

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        ensure_inputs(cache)
        speech_of_length(cache, seconds)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((cache / "inputs").iterdir()):
            shutil.copy2(path, folder / path.name)
            written.append(folder / path.name)
    return written


# ---------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------
def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "bench" / "results" / f"gpu-check-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description="The first-GPU check: GPU tests, the full-size UNet call benchmark and "
        "a short full-size throughput run, each part in its own subprocess "
        "with its own timeout; JSON per part, a summary table. See "
        "bench/README.md.",
    )
    p.add_argument("--rehearse", action="store_true", help="every part on CPU, tiny/demo shapes, Triton interpreter")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: $OUT, else bench/results/gpu-check-<UTC date>/)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for all parts together (default {DEFAULT_BUDGET_S})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"denoising steps of the throughput run (default {DEFAULT_STEPS})",
    )
    p.add_argument("--parts", default=None, help="comma-separated subset of env,pytest,unet_fp16,unet_bf16,throughput")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="bench cache (checkpoints, inputs); default: a temporary folder on a GPU, engines/bench with --rehearse",
    )
    p.add_argument(
        "--inputs",
        type=Path,
        default=REPO / "wheels" / "inputs",
        help="prepared throughput inputs to "
        "copy into the cache (default wheels/inputs, written by bench/gpu_wheels.sh)",
    )
    p.add_argument("--model", type=Path, default=None, help="weights for the throughput part instead of the preset's")
    p.add_argument("--env", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare-inputs", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.budget <= 0:
        p.error("--steps and --budget must be positive")
    return args


def child_env(rehearse: bool) -> dict[str, str]:
    """The parts' environment: the repository first on PYTHONPATH (no install), unbuffered output; with
    ``rehearse`` the Triton interpreter and no visible GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    if rehearse:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env is not None:
        args.env.parent.mkdir(parents=True, exist_ok=True)
        args.env.write_text(json.dumps(env_report(args.rehearse), indent=1) + "\n")
        return 0
    if args.prepare_inputs is not None:
        for path in prepare_inputs(args.prepare_inputs):
            print(path)
        return 0
    return check(args, " ".join(["python -m bench.gpu_check", *(sys.argv[1:] if argv is None else argv)]))


def check(args: argparse.Namespace, command: str) -> int:
    started = time.monotonic()
    deadline = started + args.budget
    out = (args.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a rerun into the same folder must not mix old and new results
        (out / name).unlink(missing_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sonic_rt_gpu_check_"))
    cache = (args.cache or (REPO / "engines" / "bench" if args.rehearse else scratch / "cache")).resolve()
    if args.inputs.is_dir():  # the GPU machine cannot make speech (no espeak-ng): use what gpu_wheels.sh prepared
        (cache / "inputs").mkdir(parents=True, exist_ok=True)
        for path in args.inputs.iterdir():
            if not (cache / "inputs" / path.name).exists():
                shutil.copy2(path, cache / "inputs" / path.name)
    env = child_env(args.rehearse)
    log_file = (out / "log.txt").open("w", encoding="utf-8")

    def log(text: str) -> None:
        text = text if text.endswith("\n") else text + "\n"
        log_file.write(text)
        log_file.flush()
        print(text, end="", flush=True)

    log(f"bench.gpu_check: {command}\noutput: {out}\nbudget {args.budget:.0f} s; rehearse={args.rehearse}\n")
    records: dict[str, dict[str, Any]] = {}
    parts = plan(args, scratch, cache)
    try:
        for part in parts:
            left = deadline - time.monotonic() - RESERVE_S
            record: dict[str, Any]
            missing = missing_modules(part.needs, env)
            if missing:
                record = {
                    "part": part.name,
                    "command": shlex.join(part.command),
                    "status": "skipped",
                    "rc": None,
                    "seconds": 0.0,
                    "reason": f"{', '.join(missing)} not importable (bench/gpu_wheels.sh brings the wheels)",
                }
            elif left < MIN_PART_S:
                record = {
                    "part": part.name,
                    "command": shlex.join(part.command),
                    "status": "skipped",
                    "rc": None,
                    "seconds": 0.0,
                    "reason": f"only {max(left, 0):.0f} s of the budget left",
                }
            else:
                record = collect(part, run_part(part, min(part.cap_s, left), env, log))
            if record["status"] == "skipped":
                log(f"\n===== {part.name}: skipped ({record['reason']}) =====\n")
            records[part.name] = record
    finally:
        log_file.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return finish(records, parts, out, command, time.monotonic() - started, args)


def finish(
    records: dict[str, dict[str, Any]],
    parts: list[Part],
    out: Path,
    command: str,
    seconds: float,
    args: argparse.Namespace,
) -> int:
    """Write each part's JSON (with the env part's device and versions) and the summary; print the table."""
    env = (records.get("env") or {}).get("result") or {}
    device, versions = env.get("device"), env.get("versions")
    rows = []
    for part in parts:
        record = records[part.name]
        record.update(device=device, versions=versions)
        (out / part.file).write_text(json.dumps(record, indent=1, default=str) + "\n")
        rows.append(
            [
                part.name,
                record["status"] + (f" (rc {record['rc']})" if record["status"] == "failed" else ""),
                f"{record['seconds']:.1f}",
                record.get("reason") or headline(part.name, record.get("result")),
            ]
        )
    ok = all(r["status"] == "ok" for r in records.values())
    summary = {
        "benchmark": "bench.gpu_check",
        "command": command,
        "rehearse": args.rehearse,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "budget_s": args.budget,
        "ok": ok,
        "device": device,
        "versions": versions,
        "parts": {
            name: {
                "status": r["status"],
                "seconds": r["seconds"],
                "command": r["command"],
                "file": next(p.file for p in parts if p.name == name),
                "headline": r.get("reason") or headline(name, r.get("result")),
            }
            for name, r in records.items()
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    name = (device or {}).get("name", "?")
    print(f"\nbench.gpu_check on {name}: {seconds:.0f} s of {args.budget:.0f}; results in {out}\n")
    print(table(rows, ["part", "status", "s", "result"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
