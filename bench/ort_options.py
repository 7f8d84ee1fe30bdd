"""ONNX Runtime session options for the exported UNet on CPU: which settings pay on this workload.

What is measured: one UNet call (3 CFG rows x 25 frames, latent 16x16 for the 128-px presets) of an
onnxruntime engine directory, once per session-options variant, in rounds that alternate the variants (so
machine noise hits them alike). Each variant: one untimed call, then ``--repeats`` timed calls; the median is
reported. Variants: the runtime's settings (``ORT_ENABLE_ALL``, intra-op threads = onnxruntime's default,
i.e. the physical cores), no thread spinning, the ``EXTENDED`` optimisation level (no layout transforms),
sequential execution with one inter-op thread, and intra-op threads = 1.

Usage::

    python -m bench.ort_options --engines engines/bench/widths-onnxruntime-fp32
    # results: bench/results/ort_options-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.presets import REPO

VARIANTS: dict[str, dict[str, Any]] = {
    "runtime settings (ENABLE_ALL, default threads)": {},
    "no intra-op spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
    "ENABLE_EXTENDED": {"level": "ORT_ENABLE_EXTENDED"},
    "sequential, 1 inter-op thread": {"execution_mode": "ORT_SEQUENTIAL", "inter_op_num_threads": 1},
    "1 intra-op thread": {"intra_op_num_threads": 1},
}


def unet_feeds(session, latent: int, frames: int = 25) -> dict[str, np.ndarray]:
    """Random inputs of one window for the UNet session (face box over the central half)."""
    rng = np.random.default_rng(0)
    sizes = {"batch": 3, "frames": frames, "height": latent, "width": latent}
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("face_mask_"):
            level = int(inp.name.rsplit("_", 1)[1])
            side = -(-latent // 2**level)
            mask = np.zeros((1, 1, side, side), np.float32)
            mask[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
            feeds[inp.name] = mask
        elif inp.name == "added_time_ids":
            feeds[inp.name] = np.array([[12.5, 20.0, 24.0]] * 3, np.float32)
        else:
            shape = [sizes[d] if isinstance(d, str) else d for d in inp.shape]
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def session(path: Path, variant: dict[str, Any]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant.get("level", "ORT_ENABLE_ALL"))
    for key, value in variant.get("config", {}).items():
        options.add_session_config_entry(key, value)
    if "execution_mode" in variant:
        options.execution_mode = getattr(ort.ExecutionMode, variant["execution_mode"])
    for key in ("inter_op_num_threads", "intra_op_num_threads"):
        if key in variant:
            setattr(options, key, variant[key])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ort_options", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=Path, required=True, help="an onnxruntime engine directory (fp32, CPU)")
    p.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8; default 16 = 128 px)")
    p.add_argument("--repeats", type=int, default=8, help="timed calls per variant and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ort_options-cpu.json")
    args = p.parse_args(argv)
    path = args.engines / "unet.onnx"
    if not path.is_file():
        p.error(f"{path} does not exist (build it: python -m export.build_engines --backend onnxruntime)")
    import onnxruntime as ort

    sessions = {name: session(path, variant) for name, variant in VARIANTS.items()}
    feeds = unet_feeds(next(iter(sessions.values())), args.latent)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            sess.run(None, feeds)
            for _ in range(args.repeats):
                started = time.perf_counter()
                sess.run(None, feeds)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    base = medians[next(iter(VARIANTS))]
    report = {
        "benchmark": "bench.ort_options",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.ort_options", *(sys.argv[1:] if argv is None else argv)]),
        "onnxruntime": ort.__version__,
        "engines": str(args.engines),
        "latent": args.latent,
        "variants": VARIANTS,
        "median_ms": medians,
        "all_ms": {k: [x * 1000 for x in v] for k, v in times.items()},
    }
    lines = [
        f"# bench.ort_options: UNet call, onnxruntime {ort.__version__} CPU",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        "",
        "| session options | median ms | vs runtime settings |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} | x{base / ms:.2f} |" for name, ms in medians.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
