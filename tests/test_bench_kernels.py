"""The benchmark programs (bench.kernels, bench.unet_call) at tiny shapes in the Triton interpreter on CPU.

The numbers are meaningless here; what is checked is the program logic: every layer shape and implementation
runs, agrees with the fp32 / reference result, and lands in the JSON with the documented structure. Where
``TRITON_INTERPRET=1`` is already set (before the kernel module is imported) the programs' ``main`` runs
in-process; otherwise in a fresh interpreter, since Triton reads the flag only when the kernel is defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--warmup", "0", "--repeats", "1"]


def run_program(module: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def run_interpreted(module: str, args: list[str]) -> int:
    """``module``'s main(args) with --interpret: in-process when the interpreter flag is already set."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import importlib

        return importlib.import_module(module).main(["--interpret", *args])
    proc = run_program(module, ["--interpret", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def check_run_metadata(run: dict, program: str) -> None:
    assert run["device_type"] == "cpu" and run["triton_interpret"] is True
    for key in ("device", "torch", "triton", "python", "date_utc", "command"):
        assert run[key], key
    assert run["command"].startswith(f"python -m {program} ")
    assert run["date_utc"].endswith("+00:00")


def test_kernels_benchmark_in_the_interpreter(tmp_path):
    out = tmp_path / "kernels.json"
    assert run_interpreted("bench.kernels", ["--tiny", *FAST, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "kernels"
    check_run_metadata(data["run"], "bench.kernels")
    assert data["settings"]["tiny"] and data["settings"]["dtypes"] == ["fp16"]
    assert data["formulas"]["flops"].startswith("4*N*L*T*C")
    rows = data["layers"]["fp16"]
    # every distinct attn2 shape of SVD-xt: spatial and temporal at levels 0..3, 32 layers per UNet call
    assert sorted((r["kind"], r["level"]) for r in rows) == [
        (k, lvl) for k in ("spatial", "temporal") for lvl in range(4)
    ]
    assert sum(r["count"] for r in rows) == 32
    for r in rows:
        assert r["head_dim"] == 64 and r["tokens"] == 32
        assert r["flops"] == 4 * r["rows"] * r["queries"] * r["tokens"] * r["channels"]
        assert 0 < r["mask_nonzero_fraction"] <= 1
        if r["kind"] == "temporal":
            assert r["mask_nonzero_fraction"] == 1 and r["rows"] == 3
        assert set(r["impls"]) == {"eager", "sdpa", "triton"}
        for name, m in r["impls"].items():
            assert m["ms"] > 0 and m["tflops"] > 0 and m["tbs"] > 0 and len(m["ms_all"]) == 1, name
            assert m["max_abs_diff"] < 1e-2, (r["kind"], r["level"], name, m["max_abs_diff"])
        assert r["impls"]["triton"]["within_tolerance"]
        assert r["impls"]["triton"]["speedup_vs_sdpa"] > 0
    spatial0 = next(r for r in rows if r["kind"] == "spatial" and r["level"] == 0)
    assert 0 < spatial0["mask_nonzero_fraction"] < 1  # the face box covers part of the frame
    call = data["per_unet_call"]["fp16"]
    assert call["layers"] == 32 and all(call["ms"][k] > 0 for k in ("eager", "sdpa", "triton"))


def test_unet_call_benchmark_in_the_interpreter(tmp_path):
    out = tmp_path / "unet.json"
    assert run_interpreted("bench.unet_call", ["--tiny", "--frames", "16", *FAST, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "unet_call"
    check_run_metadata(data["run"], "bench.unet_call")
    settings = data["settings"]
    assert settings["dtype"] == "fp16" and settings["frames"] == 2 and settings["batch"] == 3
    assert settings["input_shapes"]["sample"] == [3, 2, 8, 8, 8]
    assert settings["input_shapes"]["audio_tokens"][:3] == [3, 2, 32]
    assert len(settings["face_mask_shapes"]) == 4
    assert data["flops"] > 0 and data["floor_ms"] > 0 and data["flops_by_op"]
    impls = data["implementations"]
    assert list(impls) == ["reference", "sdpa", "triton"]
    assert impls["reference"]["max_abs_diff_vs_reference"] == 0 and impls["reference"]["speedup_vs_reference"] == 1
    scale = max(1.0, data["reference_max_abs_v"])
    for name, r in impls.items():
        assert r["ms"] > 0 and r["tflops"] > 0 and r["efficiency"] > 0 and r["finite"], name
        assert r["max_abs_diff_vs_reference"] < 2e-2 * scale, (name, r["max_abs_diff_vs_reference"])


@pytest.mark.parametrize("module", ["bench.kernels", "bench.unet_call"])
def test_without_cuda_and_without_interpret_the_programs_exit_2(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where there is one
    proc = run_program(module, ["--tiny"], env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert "CUDA" in message and "--interpret" in message and len(message.splitlines()) == 1
    assert proc.stdout == ""
