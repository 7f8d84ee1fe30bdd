"""bench/peak_memory.py: each backend's peak memory in a fresh process of its own, load included."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import peak_memory


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (real speech input)")
def test_each_backend_runs_in_a_process_of_its_own_and_the_report_holds_its_peaks(demo_dir, tmp_path, capsys):
    out = tmp_path / "results" / "peak.json"
    argv = ["--preset", "demo", "--model", str(demo_dir), "--cache", str(tmp_path / "cache"), "--seconds", "0.5"]
    assert peak_memory.main([*argv, "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m bench.peak_memory --preset demo")
    assert report["settings"]["steps"] == 1 and report["settings"]["repeats"] == 1
    runs = report["runs"]
    assert [r["backend"] for r in runs] == ["eager", "torch"]
    n = int(0.5 * 16000) // 640 // 2
    for r in runs:
        assert r["frames"] == n
        assert 0 < r["imported_mb"] <= r["loaded_mb"] <= r["before_animate_mb"] + 1 <= r["peak_mb"] + 1
        # the sampled rise lies under the kernel's high-water mark (1 MB for page rounding)
        assert r["before_animate_mb"] + r["animate_added_mb"] <= r["peak_mb"] + 1
        assert r["animate_added_mb"] > 0 and r["load_s"] > 0 and r["animate_s"] > 0
    assert report["peak_mb"] == {r["backend"]: r["peak_mb"] for r in runs}
    assert report["peak_ratio"] == pytest.approx(runs[1]["peak_mb"] / runs[0]["peak_mb"])
    assert report["animate_added_ratio"] == pytest.approx(runs[1]["animate_added_mb"] / runs[0]["animate_added_mb"])
    assert f"peak RSS x{report['peak_ratio']:.3f}" in out.with_suffix(".md").read_text()
    assert f"peak RSS x{report['peak_ratio']:.3f}" in capsys.readouterr().out


def test_bad_settings_exit_2_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        peak_memory.main(["--repeats", "0"])
    assert exit_info.value.code == 2 and "--repeats and --steps must be at least 1" in capsys.readouterr().err
