"""``python -m bench.compile_cache``: what compiling costs once and what a later process pays, through the CLI.

Three ``python -m sonic_rt animate`` processes on a preset's checkpoint (default ``structure``), one after
another, sharing one empty compile cache (``TORCHINDUCTOR_CACHE_DIR``, a temporary directory):

1. ``--compile off``: the uncompiled reference run;
2. ``--compile on``: a new user's first compiled run (the UNet shape compiles, the cache is written);
3. ``--compile on`` again: a later process, which finds the shape in the cache and loads it (what the default,
   ``auto``, does in a server, or for a video of at least ``sonic_rt.compiling.AUTO_MIN_WINDOWS`` windows).

Each row: the process's wall seconds (imports and loading included), the UNet's compile or load seconds as the
runtime reports them on stderr, and the denoise stage's seconds (the stage times the CLI prints).

Results: ``bench/results/compile_cache-<preset>-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench.common import RESULTS, command_line, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, SIZES, ensure_inputs, ensure_model, speech_of_length

MODES = ("off", "on", "on")  # the second "on" finds the cache the first wrote


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(SIZES), default="structure")
    p.add_argument("--seconds", type=float, default=4.0, help="audio length (default 4)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    size = SIZES[args.preset]
    model = ensure_model(size, args.cache)
    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    inductor = Path(tempfile.mkdtemp(prefix="sonic_rt_bench_compile_cache_"))
    rows = []
    try:
        for mode in MODES:
            out = inductor / f"{mode}-{len(rows)}.mp4"
            command = [
                sys.executable, "-m", "sonic_rt", "animate", "--model", str(model), "--image", str(image),
                "--audio", str(audio), "--out", str(out), "--steps", str(args.steps), "--min-resolution",
                str(size.resolution), "--compile", mode, "--quiet",
            ]  # fmt: skip
            log(f"--compile {mode}")
            started = time.perf_counter()
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
            )
            wall = time.perf_counter() - started
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            text = done.stdout + done.stderr
            unet = re.search(r"(compiled|loaded) the UNet in ([\d.]+) s", text)
            denoise = re.search(r"denoise ([\d.]+)s", text)
            rows.append(
                {
                    "mode": mode,
                    "wall_s": wall,
                    "unet_compile_or_load_s": float(unet.group(2)) if unet else None,
                    "unet_event": unet.group(1) if unet else None,
                    "denoise_s": float(denoise.group(1)) if denoise else None,
                    "stderr_notes": [line for line in done.stderr.splitlines() if "UNet" in line],
                }
            )
            log(f"--compile {mode}: {wall:.1f} s")
    finally:
        shutil.rmtree(inductor, ignore_errors=True)
    report = {
        "benchmark": "bench.compile_cache",
        "date": utc_now(),
        "command": command_line("bench.compile_cache", argv),
        "machine": machine_info(),
        "settings": {"preset": args.preset, "seconds": args.seconds, "steps": args.steps},
        "rows": rows,
    }
    path = args.out or RESULTS / f"compile_cache-{args.preset}-cpu.json"
    write_json(path, report)
    lines = [
        f"# bench.compile_cache: preset `{args.preset}`, {args.seconds:g} s of speech, {args.steps} steps",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores",
        "- three processes in a row sharing one empty compile cache",
        "",
        "| --compile | process wall s | UNet compiled / loaded in s | denoise s |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        unet = "-" if r["unet_event"] is None else f"{r['unet_event']} {r['unet_compile_or_load_s']:.1f}"
        denoise = "-" if r["denoise_s"] is None else f"{r['denoise_s']:.1f}"
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {unet} | {denoise} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
