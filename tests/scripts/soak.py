"""One animation in a fresh process, for the soak test: prints its peak RSS and what it wrote as JSON.

usage: python tests/scripts/soak.py MODEL_DIR IMAGE AUDIO OUT.mp4 STEPS MIN_RESOLUTION [paste_back]
"""

from __future__ import annotations

import json
import resource
import sys
import time

import sonic_rt


def main() -> None:
    model, image, audio, out, steps, resolution = sys.argv[1:7]
    paste_back = sys.argv[7:8] == ["paste_back"]
    runtime = sonic_rt.Runtime(model, device="cpu")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KiB)
    started = time.perf_counter()
    result = runtime.animate(
        image, audio, out, steps=int(steps), min_resolution=int(resolution), progress=False, paste_back=paste_back
    )
    print(
        json.dumps(
            {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_load_mb": loaded,
                "seconds": time.perf_counter() - started,
                "num_frames": result.num_frames,
                "num_generated_frames": result.num_generated_frames,
                "fps": result.fps,
                "size": [result.width, result.height],
                "timings": result.timings,
            }
        )
    )


if __name__ == "__main__":
    main()
