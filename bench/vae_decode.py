"""``python -m bench.vae_decode``: one VAE decode call, the eager baseline's against the runtime's, side by side.

The eager baseline (``bench/eager.py``, the official pipeline's structure) decodes with diffusers' own
``vae.decode``; the runtime's decode graph (``VaeDecoderGraph``) calls the same decoder with its SiLUs, residual
sums and spatial/temporal blends in place (:mod:`sonic_rt.models.vae`). Both decode the same 8-frame chunk of
latents (the official ``decode_chunk_size``) of the ``structure`` preset's VAE (official depth and widths), in this
process, alternating, ``--repeats`` times each, under ``torch.inference_mode`` as the pipelines run them. For each:
the median process CPU seconds and wall seconds of a call, the median RSS added at the call's peak (``bench.throughput.PeakRss``:
sampled every 5 ms, after ``malloc_trim``), the median minor page faults, and whether the frames are equal bit
for bit.
Writes ``--out`` (JSON) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from bench.common import RESULTS, command_line, fmt_table, load_average, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, SIZES, ensure_model
from bench.throughput import PeakRss

CHUNK = 8  # frames per decode call (official decode_chunk_size)


def measure(resolution: int, repeats: int, cache: Path) -> dict:
    """The two decodes of one ``[8, 4, resolution / 8, resolution / 8]`` chunk, ``repeats`` times each."""
    import torch

    import sonic_rt

    runtime = sonic_rt.Runtime(ensure_model(SIZES["structure"], cache), device="cpu")
    graph = runtime.graphs.vae_decoder
    vae = graph.module.vae
    latents = torch.randn(CHUNK, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0))
    calls = {
        "eager (diffusers vae.decode)": lambda: vae.decode(latents, num_frames=CHUNK).sample,
        "default (runtime decode graph)": lambda: graph(latents),
    }
    rows, frames = {name: [] for name in calls}, {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, call in calls.items():
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                with PeakRss() as rss:  # collects garbage and trims the heap first
                    cpu, wall = time.process_time(), time.perf_counter()
                    out = call()
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                added = (rss.peak - rss.before) / 2**20
                rows[name].append({"cpu_s": cpu, "wall_s": wall, "added_mb": added, "faults": faults})
                frames[name] = out
                del out
    equal = torch.equal(*frames.values())
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("cpu_s", "wall_s", "added_mb", "faults")}
        for name, runs in rows.items()
    }
    return {"resolution": resolution, "repeats": repeats, "bit_identical": equal, "median": summary, "runs": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vae_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="192,512", help="comma-separated, pixels (default: 192,512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=RESULTS / "vae_decode-structure-cpu.json")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        log(f"{resolution}x{resolution}: {args.repeats} x 2 decodes of {CHUNK} frames")
        results.append(measure(resolution, args.repeats, args.cache))
    data = {
        "date": utc_now(),
        "command": command_line("bench.vae_decode", argv),
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "results": results,
    }
    write_json(args.out, data)
    header = ["pixels", "decode", "CPU s", "wall s", "RSS added MB", "minor faults", "CPU vs eager", "RSS vs eager"]
    table = []
    for r in results:
        eager = next(iter(r["median"].values()))
        for name, m in r["median"].items():
            table.append(
                [
                    str(r["resolution"]),
                    name,
                    f"{m['cpu_s']:.2f}",
                    f"{m['wall_s']:.2f}",
                    f"{m['added_mb']:.0f}",
                    f"{m['faults']:.0f}",
                    f"x{m['cpu_s'] / eager['cpu_s']:.2f}",
                    f"x{m['added_mb'] / eager['added_mb']:.2f}",
                ]
            )
    same = all(r["bit_identical"] for r in results)
    md = (
        "# One VAE decode call (8 frames, structure preset's VAE): eager's against the runtime's\n\n"
        f"{data['date']}; `{data['command']}`; {data['machine'].get('cpu', '')}, {data['threads']} threads, "
        f"load average {data['load_average']}. Medians of {args.repeats} calls each, alternating. "
        f"Frames bit-identical: {'yes' if same else 'NO'}.\n\n" + fmt_table(header, table) + "\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
