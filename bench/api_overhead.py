"""``python -m bench.api_overhead``: what the predictions API adds to a job, against ``Runtime.animate`` directly.

One demo runtime is loaded once and shared by both paths, in one process:

* **direct**: ``Runtime.animate(image, audio, out, steps=...)`` on the files, wall time of the call;
* **api**: a Cog client with ``requests`` against ``sonic_rt.serving`` on loopback (uvicorn on a thread, no page):
  ``PUT /predictions/{id}`` with ``Prefer: respond-async``, the portrait and the speech as ``data:`` URLs and a
  ``webhook`` to a receiver in this process; wall time from before the PUT until the ``completed`` webhook is in
  and the mp4 is downloaded from its output URL. It includes everything the API does (JSON and base64 decoding,
  the job record, the speech-length check that decodes the audio once more, progress events, webhooks, serving the
  file).

The runs are interleaved in pairs (direct then api, api then direct in alternate pairs), after one warm-up run of
each. Reported: per-path median and min, the overhead of the medians and of the mins, per-pair ratios, and
the API's own share measured inside each API job (wall time minus the runtime's ``animate`` time in the same job,
which other load on the machine disturbs least). The goal (issue 22): under 2% at 4 s of speech.

Writes ``--out`` (JSON) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common import RESULTS, command_line, log, machine_info, utc_now, write_json
from bench.presets import DEFAULT_CACHE, ensure_inputs, speech_of_length

GOAL = 0.02  # issue 22: the API adds under 2% per job at 4 s of speech


class TimedRunner:
    """The server's LocalRunner, also recording the seconds each ``Runtime.animate`` call took (by job id)."""

    def __init__(self, runtime):
        from sonic_rt.serving.local import LocalRunner

        self.inner = LocalRunner(runtime)
        self.animate_s: dict[str, float] = {}
        original = self.inner._animate

        def timed(job, events):
            started = time.perf_counter()
            try:
                return original(job, events)
            finally:
                self.animate_s[job.id] = time.perf_counter() - started

        self.inner._animate = timed

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Receiver:
    """Webhook receiver: sets an event when a prediction's ``completed`` webhook arrives."""

    def __init__(self):
        self.done: dict[str, threading.Event] = {}
        self.bodies: dict[str, dict] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if body["status"] in ("succeeded", "failed", "canceled"):
                    receiver.bodies[body["id"]] = body
                    receiver.done.setdefault(body["id"], threading.Event()).set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, pred_id: str, timeout: float) -> dict:
        if not self.done.setdefault(pred_id, threading.Event()).wait(timeout):
            raise RuntimeError(f"no completed webhook for {pred_id} within {timeout:g} s")
        return self.bodies[pred_id]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of speech")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (the official 25)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved (direct, api) pairs after the warm-up")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the bench inputs are cached")
    p.add_argument("--out", type=Path, default=RESULTS / "api_overhead-demo-cpu.json")
    args = p.parse_args(argv)

    import requests
    import uvicorn

    import sonic_rt
    from sonic_rt.demo import ensure_demo_model
    from sonic_rt.serving.jobs import Jobs, Settings
    from sonic_rt.serving.server import build_app

    image, _ = ensure_inputs(args.cache)
    audio = speech_of_length(args.cache, args.seconds)
    runtime = sonic_rt.Runtime(ensure_demo_model())
    runner = TimedRunner(runtime)
    work = Path(tempfile.mkdtemp(prefix="api-overhead-"))
    jobs = Jobs(runner, work / "serve", Settings(allow_private_urls=True))  # the receiver is on loopback
    server = uvicorn.Server(uvicorn.Config(build_app(jobs, page=False), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    receiver = Receiver()
    body_input = {
        "image": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode(),
        "audio": "data:audio/wav;base64," + base64.b64encode(audio.read_bytes()).decode(),
        "steps": args.steps,
    }
    session = requests.Session()
    counter = iter(range(10**6))

    def direct() -> dict:
        out = work / f"direct-{next(counter)}.mp4"
        started = time.perf_counter()
        result = runtime.animate(str(image), str(audio), out, steps=args.steps, progress=False)
        wall = time.perf_counter() - started
        out.unlink()
        return {"wall_s": wall, "frames": result.num_frames}

    def api() -> dict:
        pred_id = f"bench-{next(counter)}"
        started = time.perf_counter()
        r = session.put(
            f"{url}/predictions/{pred_id}",
            json={"input": body_input, "webhook": receiver.url, "webhook_events_filter": ["completed"]},
            headers={"Prefer": "respond-async"},
            timeout=60,
        )
        r.raise_for_status()
        final = receiver.wait(pred_id, timeout=3600)
        if final["status"] != "succeeded":
            raise RuntimeError(f"{pred_id}: {final['status']}: {final['error']}")
        video = session.get(final["output"], timeout=60).content
        wall = time.perf_counter() - started
        animate = runner.animate_s[pred_id]
        return {
            "wall_s": wall,
            "animate_s": animate,
            "api_own_s": wall - animate,
            "bytes": len(video),
            "frames": final["metrics"]["frames"],
        }

    log(f"warm-up: {args.seconds:g} s of speech, {args.steps} steps, demo checkpoint")
    direct(), api()
    pairs = []
    for i in range(args.pairs):
        order = (direct, api) if i % 2 == 0 else (api, direct)
        runs = {fn.__name__: fn() for fn in order}
        pairs.append(runs)
        log(
            f"pair {i + 1}/{args.pairs}: direct {runs['direct']['wall_s']:.2f} s, api {runs['api']['wall_s']:.2f} s "
            f"(api's own {runs['api']['api_own_s'] * 1000:.0f} ms)"
        )
    server.should_exit = True

    d = [p["direct"]["wall_s"] for p in pairs]
    a = [p["api"]["wall_s"] for p in pairs]
    own = [p["api"]["api_own_s"] for p in pairs]
    summary = {
        "direct_median_s": statistics.median(d),
        "direct_min_s": min(d),
        "api_median_s": statistics.median(a),
        "api_min_s": min(a),
        "overhead_of_medians": statistics.median(a) / statistics.median(d) - 1,
        "overhead_of_mins": min(a) / min(d) - 1,
        "pair_ratios": [x / y for x, y in zip(a, d)],
        "api_own_median_s": statistics.median(own),
        "api_own_share_of_median_job": statistics.median(own) / statistics.median(d),
        "goal": GOAL,
    }
    data = {
        "program": "bench.api_overhead",
        "command": command_line("bench.api_overhead", argv),
        "date_utc": utc_now(),
        "machine": machine_info(),
        "workload": {
            "seconds_of_speech": args.seconds,
            "steps": args.steps,
            "model": "demo (random weights)",
            "frames": pairs[0]["direct"]["frames"],
            "pairs": args.pairs,
        },
        "pairs": pairs,
        "summary": summary,
    }
    write_json(args.out, data)
    args.out.with_suffix(".md").write_text(markdown(data, args.out.name))
    print(args.out.with_suffix(".md").read_text())
    return 0


def markdown(data: dict, json_name: str) -> str:
    s, w, m = data["summary"], data["workload"], data["machine"]
    rows = "\n".join(
        f"| {i + 1} | {p['direct']['wall_s']:.2f} | {p['api']['wall_s']:.2f} | {p['api']['animate_s']:.2f} | "
        f"{p['api']['api_own_s'] * 1000:.0f} | {p['api']['wall_s'] / p['direct']['wall_s']:.3f} |"
        for i, p in enumerate(data["pairs"])
    )
    inner = statistics.median(p["api"]["animate_s"] for p in data["pairs"])
    verdict = "met" if s["api_own_share_of_median_job"] < s["goal"] and s["overhead_of_mins"] < s["goal"] else "NOT met"
    return f"""# Predictions API overhead per job against Runtime.animate, CPU (issue 22)

- **Command:** `{data["command"]}` (JSON: `{json_name}`).
- **Date:** {data["date_utc"]}.
- **Machine:** {m["cpu_count"]} cores ({m["cpu"]}), torch {m["torch"]} with {m["torch_threads"]} threads, load average {m["load_average"]} at the end.
- **Workload:** {w["seconds_of_speech"]:g} s of speech ({w["frames"]} output frames), {w["steps"]} steps, the {w["model"]} checkpoint at its own resolution, one runtime shared by both paths; {w["pairs"]} interleaved pairs after one warm-up of each.
- **api:** async `PUT /predictions/{{id}}` with the inputs as `data:` URLs and a webhook, until the `completed` webhook is in and the mp4 is downloaded. **direct:** `Runtime.animate` on the files.

| pair | direct s | api s | api's animate s | api's own ms | api / direct |
|---|---|---|---|---|---|
{rows}

- Medians: direct {s["direct_median_s"]:.2f} s, api {s["api_median_s"]:.2f} s: overhead **{s["overhead_of_medians"] * 100:+.2f}%** (mins: {s["overhead_of_mins"] * 100:+.2f}%).
- The API's own time inside its jobs (wall minus the runtime's `animate` in the same job): median **{s["api_own_median_s"] * 1000:.0f} ms**, **{s["api_own_share_of_median_job"] * 100:.2f}%** of a direct job.
- Goal under {s["goal"] * 100:g}%: **{verdict}**.
- The wall-time ratios carry a difference in the runtime's own time larger than the API's cost: the same `animate` work took {inner:.2f} s (median) inside the API's jobs (on its worker thread) and {s["direct_median_s"]:.2f} s called directly (on the main thread), in every pair of this run; its cause was not found. So a ratio below 1 is not a gain from the API: the API's own time, measured inside each job, is the figure to read.
"""


if __name__ == "__main__":
    sys.exit(main())
