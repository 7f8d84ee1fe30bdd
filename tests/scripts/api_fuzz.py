"""Run schemathesis against ``python -m sonic_rt serve`` (tests/test_api_schema.py runs this inside a network
namespace of its own, where nothing but loopback exists).

Starts the server (demo checkpoint, no page, ``--allow-private-urls``: the address rule depends on DNS and on the
server's flags, which no schema can state, and has tests of its own), waits until it is ready, runs schemathesis
with every check twice: the examples, coverage and fuzzing phases with valid and invalid requests (JSON and
multipart), then stateful sequences along the schema's links with valid JSON requests (schemathesis_hooks.py says
why), and stops the server. Exit code: 0 when schemathesis found
nothing.

    python tests/scripts/api_fuzz.py WORKDIR PORT MAX_EXAMPLES SEED
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(workdir: str, port: str, max_examples: str, seed: str) -> int:
    url = f"http://127.0.0.1:{port}"
    log = open(Path(workdir) / "server.log", "w")
    command = [sys.executable, "-m", "sonic_rt", "serve", "--demo", "--no-page", "--compile", "off", "--port", port]
    command += ["--workdir", str(Path(workdir) / "serve"), "--allow-private-urls"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print((Path(workdir) / "server.log").read_text()[-3000:], file=sys.stderr)
                return 2
            time.sleep(0.3)
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        schemathesis = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json"]
        common = ["--checks", "all", "--max-examples", max_examples, "--seed", seed, "--workers", "1"]
        common += ["--request-timeout", "60", "--generation-database", "none", "--warnings", "off", "--no-color"]
        runs = (
            (["--phases", "examples,coverage,fuzzing"], {}),
            (["--phases", "stateful", "--mode", "positive"], {"SONIC_RT_SCHEMATHESIS_JSON_ONLY": "1"}),
        )
        codes = [
            subprocess.run([*schemathesis, *common, *phases], env={**env, **extra}, cwd=workdir).returncode
            for phases, extra in runs
        ]
        return max(codes)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
