"""``python -m bench.api_load``: ``serve`` under more predictions per second than it can run, with locust.

A ``python -m sonic_rt serve --demo --no-page`` subprocess on a free loopback port (its own work directory and
demo cache, a small ``--max-queue``, ``--log-format json``) and a locust load in this process (headless, as a
library): ``--users`` users each send an async ``PUT /predictions/{id}`` (the portrait and ``--seconds`` of speech as
``data:`` URLs, 1 step, 64 px) every ``--interval`` seconds, far more than the one job a second or so that a CPU
runs, until ``--jobs`` predictions were accepted or ``--time-limit`` passed: it stops by itself. Then it waits for
every accepted prediction to end.

Checked and reported:

* every accepted prediction (202) ended exactly once: its record is final, and the server's JSON log has exactly
  one ``finished`` line for it (and none for a refused id);
* every refused one got 429 with a ``Retry-After`` of at least 1 s (any other answer is counted as an error);
* time to accept: p50 and p95 of the accepted PUTs (from the raw times; locust's own table too);
* the server's resident memory (``VmRSS``, sampled every second) against the jobs finished: flat means it grew by
  less than ``--rss-bound-mb`` from the ``--warmup``-th finished job to the last.

Loopback only; bounded in users, time and requests. Writes ``--out`` (JSON) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GOAL_RSS_MB = 64.0  # the stated bound: growth of the server's RSS from the warm-up to the last job
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=200, help="accepted predictions after which the load stops")
    p.add_argument("--users", type=int, default=4, help="locust users")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between one user's requests")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds the load may last at most")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds of speech per prediction")
    p.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    p.add_argument("--warmup", type=int, default=20, help="finished jobs before the memory baseline")
    p.add_argument("--rss-bound-mb", type=float, default=GOAL_RSS_MB, help="allowed RSS growth after the warm-up")
    p.add_argument("--cache", type=Path, default=None, help="bench inputs and the demo model (default: bench's)")
    p.add_argument("--out", type=Path, default=RESULTS / "api_load-demo-cpu.json")
    args = p.parse_args(argv)

    import gevent  # locust's own event loop; importing locust patches the standard library for it
    import locust

    from bench.common import command_line, log, machine_info, utc_now, write_json
    from bench.presets import DEFAULT_CACHE, ensure_inputs, speech_of_length

    cache = args.cache or DEFAULT_CACHE
    image, _ = ensure_inputs(cache)
    audio = speech_of_length(cache, args.seconds)
    with Server(cache, args.max_queue) as server:
        log(f"server up at {server.url} (pid {server.proc.pid}); load: {args.users} users every {args.interval:g} s")
        load = Load(server.url, image, audio, args.jobs, args.interval)
        sampler = gevent.spawn(server.sample_rss, load)
        stats = load.run(locust, args.users, args.time_limit)
        log(f"load stopped: {len(load.accepted)} accepted, {len(load.refused)} refused, {len(load.errors)} errors")
        finished = server.wait_for(load.accepted, timeout=max(600.0, 5.0 * len(load.accepted)))
        sampler.kill()
        server.sample_rss_once(load)
        events = server.events()
    data = {
        "program": "bench.api_load",
        "command": command_line("bench.api_load", argv),
        "date_utc": utc_now(),
        "machine": machine_info(),
        "locust": locust.__version__,
        "workload": {
            "users": args.users,
            "interval_s": args.interval,
            "seconds_of_speech": args.seconds,
            "steps": 1,
            "min_resolution": 64,
            "max_queue": args.max_queue,
            "jobs": args.jobs,
            "warmup": args.warmup,
            "model": "demo (random weights)",
        },
        "summary": summarize(load, finished, events, server.rss, stats, args),
        "rss": server.rss,
    }
    write_json(args.out, data)
    args.out.with_suffix(".md").write_text(markdown(data, args.out.name))
    print(args.out.with_suffix(".md").read_text())
    return 0 if data["summary"]["ok"] else 1


class Server:
    """``serve --demo --no-page`` in a subprocess on a free loopback port, in a temporary work directory."""

    def __init__(self, cache: Path, max_queue: int):
        self.cache, self.max_queue = cache, max_queue
        self.rss: list[dict[str, float]] = []  # {"t", "rss_mb", "finished"}

    def __enter__(self) -> Server:
        import os
        import socket
        import subprocess
        import tempfile
        import time

        import requests

        self.folder = Path(tempfile.mkdtemp(prefix="api-load-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "SONIC_RT_CACHE": str(self.cache / "sonic_rt")}  # the demo model: not in ~/.cache
        command = [sys.executable, "-m", "sonic_rt", "serve", "--demo", "--no-page", "--compile", "off"]
        command += ["--port", str(port), "--workdir", str(self.folder / "serve"), "--max-queue", str(self.max_queue)]
        command += ["--log-format", "json"]
        self.log = self.folder / "server.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(command, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() - self.started > 300:
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        import shutil
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def sample_rss_once(self, load) -> None:
        import time

        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_mb = int(line.split()[1]) / 1024
                self.rss.append(
                    {
                        "t": round(time.monotonic() - self.started, 1),
                        "rss_mb": rss_mb,
                        "finished": self.finished_count(),
                    }
                )
                return

    def sample_rss(self, load) -> None:
        import gevent

        while True:
            self.sample_rss_once(load)
            gevent.sleep(1.0)

    def finished_count(self) -> int:
        return sum(1 for e in self.events() if e.get("event") == "finished")

    def events(self) -> list[dict]:
        import json

        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def wait_for(self, ids: list[str], timeout: float) -> dict[str, dict]:
        """The final record of each accepted id, once every one has ended."""
        import time

        import requests

        deadline, final = time.monotonic() + timeout, {}
        session = requests.Session()
        while len(final) < len(ids):
            for pred_id in ids:
                if pred_id not in final:
                    body = session.get(f"{self.url}/predictions/{pred_id}", timeout=30).json()
                    if body["status"] in ("succeeded", "failed", "canceled"):
                        final[pred_id] = body
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(final)} accepted predictions did not end in {timeout:g} s")
            time.sleep(1.0)
        return final


class Load:
    """The locust side: users that send predictions until ``jobs`` were accepted."""

    def __init__(self, url: str, image: Path, audio: Path, jobs: int, interval: float):
        import base64

        def data_url(path: Path, media_type: str) -> str:
            return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()

        self.url, self.jobs, self.interval = url, jobs, interval
        self.body = {
            "image": data_url(image, "image/png"),
            "audio": data_url(audio, "audio/wav"),
            "steps": 1,
            "min_resolution": 64,
        }
        self.accepted: list[str] = []
        self.accept_ms: list[float] = []
        self.refused: list[dict] = []  # {"id", "retry_after"}
        self.errors: list[dict] = []
        self.counter = 0

    def run(self, locust, users: int, time_limit: float) -> dict:
        import time

        import gevent
        from locust import HttpUser, constant, task
        from locust.env import Environment

        load = self

        class Client(HttpUser):
            host = self.url
            wait_time = constant(self.interval)

            @task
            def predict(self):
                if len(load.accepted) >= load.jobs:
                    return  # the watcher below stops the run
                load.counter += 1
                pred_id = f"load{load.counter:05d}"
                with self.client.put(
                    f"/predictions/{pred_id}",
                    json={"input": load.body},
                    headers={"Prefer": "respond-async"},
                    name="PUT /predictions/{id}",
                    catch_response=True,
                ) as response:
                    load.record(pred_id, response)

        environment = Environment(user_classes=[Client], events=locust.events)
        runner = environment.create_local_runner()
        runner.start(users, spawn_rate=users)

        def watch() -> None:  # not from a user's greenlet: quitting kills those
            started = time.monotonic()
            while len(load.accepted) < load.jobs and time.monotonic() - started < time_limit:
                gevent.sleep(0.2)
            runner.quit()

        gevent.spawn(watch)
        runner.greenlet.join()
        entry = environment.stats.get("PUT /predictions/{id}", "PUT")
        return {
            "requests": entry.num_requests,
            "locust_p50_ms": entry.get_response_time_percentile(0.5),
            "locust_p95_ms": entry.get_response_time_percentile(0.95),
            "locust_rps": entry.total_rps,
        }

    def record(self, pred_id: str, response) -> None:
        ms = response.request_meta["response_time"]
        if response.status_code == 202:
            self.accepted.append(pred_id)
            self.accept_ms.append(ms)
            response.success()
        elif response.status_code == 429:
            retry = response.headers.get("Retry-After", "")
            self.refused.append({"id": pred_id, "retry_after": retry})
            if retry.isdigit() and int(retry) >= 1:
                response.success()  # the expected refusal
            else:
                self.errors.append({"id": pred_id, "status": 429, "retry_after": retry})
                response.failure(f"429 without a Retry-After of at least 1 s: {retry!r}")
        else:
            self.errors.append({"id": pred_id, "status": response.status_code, "body": response.text[:300]})
            response.failure(f"HTTP {response.status_code}")


def summarize(load: Load, finished: dict, events: list[dict], rss: list[dict], stats: dict, args) -> dict:
    import collections
    import statistics

    counts = collections.Counter(e.get("prediction_id") for e in events if e.get("event") == "finished")
    accepted = set(load.accepted)
    ended_once = all(counts[p] == 1 for p in accepted) and all(finished[p]["status"] for p in accepted)
    refused_ids = {r["id"] for r in load.refused}
    refused_ok = all(r["retry_after"].isdigit() and int(r["retry_after"]) >= 1 for r in load.refused)
    after_warmup = [s for s in rss if s["finished"] >= args.warmup]
    baseline = after_warmup[0]["rss_mb"] if after_warmup else None
    final = rss[-1]["rss_mb"] if rss else None
    growth = (final - baseline) if baseline is not None and final is not None else None
    ms = sorted(load.accept_ms)

    def pct(q: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None

    statuses = collections.Counter(b["status"] for b in finished.values())
    summary = {
        "accepted": len(accepted),
        "refused_429": len(load.refused),
        "errors": load.errors[:20],
        "ended_exactly_once": ended_once,
        "finished_lines_for_refused_ids": sum(counts[p] for p in refused_ids),
        "final_statuses": dict(statuses),
        "every_refusal_had_retry_after": refused_ok,
        "accept_ms_p50": pct(0.50),
        "accept_ms_p95": pct(0.95),
        "accept_ms_median": round(statistics.median(ms), 1) if ms else None,
        "locust": stats,
        "rss_mb_after_warmup": baseline,
        "rss_mb_final": final,
        "rss_growth_mb": round(growth, 1) if growth is not None else None,
        "rss_bound_mb": args.rss_bound_mb,
        "rss_peak_mb": max(s["rss_mb"] for s in rss) if rss else None,
        "jobs_finished": max((s["finished"] for s in rss), default=0),
    }
    summary["rss_flat"] = growth is not None and growth < args.rss_bound_mb
    summary["ok"] = (
        ended_once
        and not load.errors
        and refused_ok
        and summary["finished_lines_for_refused_ids"] == 0
        and summary["rss_flat"]
        and len(accepted) >= args.jobs
    )
    return summary


def markdown(data: dict, json_name: str) -> str:
    s, w, m = data["summary"], data["workload"], data["machine"]
    rows = []
    for mark in (0, w["warmup"], 50, 100, 150, 200, s["jobs_finished"]):
        first = next((x for x in data["rss"] if x["finished"] >= mark), None)
        if first is not None and f"| {first['finished']} |" not in "".join(rows):
            rows.append(f"| {first['finished']} | {first['t']:.0f} | {first['rss_mb']:.0f} |")
    load = m["load_average"] or [0.0]
    busy = (
        f"The machine was shared with other work (load average {load[0]:.1f} on {m['cpu_count']} cores), so the "
        "seconds are inflated; the counts and the memory are the figures."
        if load[0] > m["cpu_count"]
        else "The machine was otherwise idle."
    )
    return f"""# serve under load (locust), demo checkpoint, CPU

- **Command:** `{data["command"]}` (JSON: `{json_name}`).
- **Date:** {data["date_utc"]}.
- **Machine:** {m["cpu_count"]} cores ({m["cpu"]}), torch {m["torch"]}, locust {data["locust"]}, load average {m["load_average"]} at the end. {busy}
- **Load:** {w["users"]} locust users, each an async `PUT /predictions/{{id}}` every {w["interval_s"]:g} s ({w["users"] / w["interval_s"]:g} requests/s, several times what the server runs), {w["seconds_of_speech"]:g} s of speech, {w["steps"]} step, {w["min_resolution"]} px, `--max-queue {w["max_queue"]}`, until {w["jobs"]} predictions were accepted; the server on loopback.

| what | result |
|---|---|
| accepted (202) | {s["accepted"]} |
| refused (429) | {s["refused_429"]}, every one with `Retry-After` >= 1 s: **{s["every_refusal_had_retry_after"]}** |
| other answers | {len(s["errors"])} |
| every accepted prediction ended exactly once (one `finished` log line each, final record) | **{s["ended_exactly_once"]}** ({s["final_statuses"]}) |
| `finished` lines for refused ids | {s["finished_lines_for_refused_ids"]} |
| time to accept, p50 / p95 | {s["accept_ms_p50"]} ms / {s["accept_ms_p95"]} ms (locust: {s["locust"]["locust_p50_ms"]} / {s["locust"]["locust_p95_ms"]} ms over all {s["locust"]["requests"]} PUTs) |
| server RSS after {w["warmup"]} jobs / at the end / peak | {s["rss_mb_after_warmup"]:.0f} MiB / {s["rss_mb_final"]:.0f} MiB / {s["rss_peak_mb"]:.0f} MiB |
| RSS growth after the warm-up (bound: under {s["rss_bound_mb"]:g} MiB) | {s["rss_growth_mb"]} MiB: flat **{s["rss_flat"]}** |

Server RSS against jobs finished:

| jobs finished | seconds | RSS MiB |
|---|---|---|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    sys.exit(main())
