"""bench/gpu_check.sh --rehearse: the first-GPU check runs every part on CPU (tiny shapes, Triton interpreter)
and writes the JSON files the GPU run will write, so the script cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
PARTS = ["env", "pytest", "unet_fp16", "unet_bf16", "low_memory", "throughput"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (the throughput input)")
def test_rehearsal_runs_every_part_and_writes_every_file(demo_dir, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--rehearse",
            "--out",
            str(out),
            "--model",
            str(demo_dir),
            "--cache",
            str(tmp_path / "cache"),
            "--budget",
            "400",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.FILES)
    assert len(gpu_check.FILES) <= 8  # what the device tool brings back from $OUT

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["rehearse"] and list(summary["parts"]) == PARTS
    assert all(p["status"] == "ok" for p in summary["parts"].values())
    assert summary["seconds"] <= 400 and summary["versions"]["torch"]

    records = {name: json.loads((out / summary["parts"][name]["file"]).read_text()) for name in PARTS}
    for name, record in records.items():
        assert record["part"] == name and record["rc"] == 0 and record["seconds"] > 0
        assert record["command"] and record["timeout_s"] > 0
        assert record["device"] == summary["device"] and record["versions"] == summary["versions"]
        assert record["result"], name

    env_result = records["env"]["result"]
    assert env_result["device"]["name"] == "cpu (Triton interpreter)"
    assert env_result["modules"]["torch"]["ok"] and env_result["versions"]["triton"]
    check = env_result["attention_selfcheck"]
    assert check["passed"] and check["auto"] == "sdpa" and len(check["cases"]) == 4

    tests = records["pytest"]["result"]
    assert tests["counts"]["failed"] == 0 and tests["counts"]["error"] == 0
    assert tests["counts"]["skipped"] == len(tests["tests"]) > 0  # on CPU every GPU test skips
    ids = {t["id"].split("::")[0] for t in tests["tests"]}
    assert {"tests.test_gpu", "tests.test_kernels"} <= ids

    for dtype in ("fp16", "bf16"):
        result = records[f"unet_{dtype}"]["result"]
        assert result["benchmark"] == "unet_call" and result["settings"]["dtype"] == dtype
        impls = ["reference", "sdpa", "triton"] if dtype == "fp16" else ["reference", "sdpa"]  # interpreter bf16
        assert result["settings"]["tiny"] and list(result["implementations"]) == impls

    low = records["low_memory"]["result"]
    assert list(low["runs"]) == ["default", "low_memory"] and low["settings"]["steps"] == 1
    assert all(r["frames"] == 6 and r["peak_rss_mb"] > 0 for r in low["runs"].values()) and low["peak_ratio"] > 0

    throughput = records["throughput"]["result"]
    assert list(throughput["runs"]) == ["eager", "torch", "devices2"] and throughput["settings"]["steps"] == 1
    assert throughput["runs"]["torch"]["0.5"]["num_generated_frames"] == 6 and throughput["markdown"]
    assert throughput["runs"]["devices2"]["0.5"]["num_generated_frames"] == 6  # two workers on the device

    table = proc.stdout.split("bench.gpu_check on")[-1]
    assert all(name in table for name in PARTS) and "kernel self-check passed; auto -> sdpa" in table
    log = (out / "log.txt").read_text()
    assert all(f"===== {name}:" in log for name in PARTS)


def test_a_hanging_part_times_out_and_the_next_part_still_runs(tmp_path):
    py = sys.executable
    hang = gpu_check.Part("hang", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 60, "h.json")
    quick = gpu_check.Part("quick", [py, "-c", "print('done')"], 60, "q.json")
    lines = []
    first = gpu_check.run_part(hang, 2, dict(os.environ), lines.append)
    second = gpu_check.run_part(quick, 30, dict(os.environ), lines.append)
    assert first["status"] == "timeout" and first["seconds"] < 20 and "started" in first["output_tail"]
    assert second["status"] == "ok" and second["rc"] == 0 and "done\n" in lines


def test_a_failing_part_keeps_its_output_tail():
    part = gpu_check.Part("fail", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 60, "f.json")
    record = gpu_check.run_part(part, 30, dict(os.environ), lambda _: None)
    assert record["status"] == "failed" and record["rc"] == 3 and "boom" in record["output_tail"]


def test_parts_are_skipped_when_the_budget_is_spent_or_a_module_is_missing(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(gpu_check, "missing_modules", lambda needs, env: ["av"] if "av" in needs else [])
    ran = []

    def fake_run(part, timeout, env, log):  # each part takes 30 s of the (fake) clock
        ran.append((part.name, timeout))
        now[0] += 30
        return {"part": part.name, "command": "x", "rc": 0, "status": "ok", "seconds": 30.0, "timeout_s": timeout}

    monkeypatch.setattr(gpu_check, "run_part", fake_run)
    monkeypatch.setattr(gpu_check, "collect", lambda part, record: {**record, "result": None})
    args = gpu_check.parse_args(
        [
            "--rehearse",
            "--out",
            str(tmp_path),
            "--budget",
            "50",
            "--parts",
            "throughput,unet_fp16,unet_bf16",
            "--inputs",
            str(tmp_path / "none"),
        ]
    )
    assert gpu_check.check(args, "cmd") == 1
    assert ran == [("unet_fp16", 40)]  # min(cap 90, 50 - 0 - 10 reserved)
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert parts["unet_bf16"]["status"] == "skipped" and "10 s of the budget left" in parts["unet_bf16"]["headline"]
    assert parts["throughput"]["status"] == "skipped" and "av not importable" in parts["throughput"]["headline"]


def test_junit_results_and_headlines(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_gpu" name="test_a" time="1.5"><system-out>lanes=2: max 0</system-out></testcase>
      <testcase classname="tests.test_gpu" name="test_b" time="0.1"><failure message="assert 4 &lt;= 3">tb</failure></testcase>
      <testcase classname="tests.test_kernels" name="test_c" time="0"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    result = gpu_check.junit_results(xml)
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert result["tests"][0] == {
        "id": "tests.test_gpu::test_a",
        "outcome": "passed",
        "seconds": 1.5,
        "message": "",
        "stdout": "lanes=2: max 0",
    }
    assert result["tests"][1]["message"] == "assert 4 <= 3"
    assert gpu_check.headline("pytest", result) == "1 passed, 1 failed, 0 errors, 1 skipped"
    unet = {
        "implementations": {
            "reference": {"ms": 300.0, "speedup_vs_reference": 1.0, "peak_gib": 20.0, "max_abs_diff_vs_reference": 0.0},
            "triton": {"ms": 200.0, "speedup_vs_reference": 1.5, "peak_gib": 18.0, "max_abs_diff_vs_reference": 1e-3},
        }
    }
    assert gpu_check.headline("unet_fp16", unet) == (
        "reference 300.0 ms, triton 200.0 ms; triton x1.50, |diff| 1.0e-03; peak 20.0 GiB"
    )
    assert gpu_check.headline("unet_bf16", {"bad": 1}).startswith("(unreadable result")


def test_gpu_test_files_are_the_files_with_gpu_tests():
    files = gpu_check.gpu_test_files()
    assert {"tests/test_gpu.py", "tests/test_kernels.py", "tests/test_tensorrt.py"} <= set(files)
    assert "tests/test_sampling.py" not in files
