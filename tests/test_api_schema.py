"""The API as the field's own tools see it: schemathesis generates valid and invalid requests (bodies, headers,
paths) from the running server's ``/openapi.json``, checks every answer against the schema with all its checks
(status codes, content types, headers, bodies, valid data accepted, invalid data refused, allowed methods...) and
follows the schema's links in stateful sequences. No failure of any kind may be found.

The server and schemathesis run in a network namespace of their own (``unshare -n``: only loopback there), so that
no generated URL (a webhook, an ``http(s)`` input) can reach another address, nor a DNS server: the test needs root
(or user namespaces) and ``ip``, and is skipped without them. Bounded: ``MAX_EXAMPLES`` cases per operation and
phase, a fixed seed (``SONIC_RT_SCHEMATHESIS_SEED`` changes it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[ui]')")

MAX_EXAMPLES = 25
SEED = os.environ.get("SONIC_RT_SCHEMATHESIS_SEED", "20261207")
SCRIPT = Path(__file__).parent / "scripts" / "api_fuzz.py"


def loopback_only_namespace() -> list[str]:
    """The command prefix that runs a command in a new network namespace with loopback up, or a skip."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a network namespace of loopback only")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (unshare -n: {probe.stderr.decode().strip()})")
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.mark.slow
def test_schemathesis_finds_no_failure_against_the_running_server(demo_dir, tmp_path):
    from sonic_rt.demo import DEMO_VERSION

    prefix = loopback_only_namespace()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"demo-model-v{DEMO_VERSION}").symlink_to(demo_dir, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free here; the namespace has its own ports, this one just needs to be valid
    env = {**os.environ, "SONIC_RT_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        [*prefix, sys.executable, str(SCRIPT), str(tmp_path), str(port), str(MAX_EXAMPLES), SEED],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12000:]
    assert report.count("No issues found") == 2, report[-6000:]
