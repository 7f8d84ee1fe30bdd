"""bench.throughput runs end to end on a tiny preset and writes well-formed JSON, Markdown and a PNG.

Only the form of the results is checked here: timings are never asserted (they live in bench/results/).
"""

from __future__ import annotations

import json
import shutil

import pytest

from bench import throughput
from sonic_rt.runtime import STAGES

SECONDS = (0.5, 1.0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (real speech input)")
def test_tiny_preset_writes_well_formed_results(demo_dir, engine_dir, tmp_path, capsys):
    out = tmp_path / "results" / "throughput.json"
    argv = [
        "--preset",
        "demo",
        "--seconds",
        ",".join(map(str, SECONDS)),
        "--steps",
        "1",
        "--backends",
        "eager,torch,onnxruntime,tensorrt",
        "--model",
        str(demo_dir),
        "--engines",
        str(engine_dir),
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert throughput.main(argv) == 0

    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m bench.throughput --preset demo")
    assert report["settings"]["seconds"] == list(SECONDS) and report["settings"]["steps"] == 1
    assert set(report["machine"]) >= {"platform", "cpu", "torch", "diffusers", "transformers", "onnxruntime"}
    assert report["skipped"] == {"tensorrt": "needs a CUDA GPU"}
    assert list(report["runs"]) == ["eager", "torch", "onnxruntime"]
    assert set(report["first_call_s"]) == set(report["runs"]) and min(report["first_call_s"].values()) > 0
    flops = report["unet_call_flops"]
    assert flops["official"] > flops["simplified"] > 0 and report["peak"]["tflops"] > 0
    for name, runs in report["runs"].items():
        assert list(runs) == [f"{s:g}" for s in SECONDS]
        for seconds in SECONDS:
            e = runs[f"{seconds:g}"]
            n = int(seconds * 16000) // 640 // 2
            assert e["num_generated_frames"] == n and e["num_output_frames"] == 2 * n - 1
            assert e["video_s"] == pytest.approx((2 * n - 1) / 25)
            assert list(e["timings_s"]) == list(STAGES) and all(t > 0 for t in e["timings_s"].values())
            assert e["unet_calls"] == 1  # one window (N < 25), one step
            assert e["frames_per_s"] == pytest.approx(e["num_output_frames"] / e["timings_s"]["total"])
            assert e["real_time_factor"] == pytest.approx(e["timings_s"]["total"] / e["video_s"])
            assert e["rss_peak_mb"] > 0 and e["rss_peak_mb"] >= e["rss_added_mb"] and e["output_bytes"] > 0
            assert 0 < e["unet_fraction_of_floor"] and e["unet_tflops_per_s"] > 0
            base = report["runs"]["eager"][f"{seconds:g}"]
            assert e["speedup_vs_eager"] == pytest.approx(base["timings_s"]["total"] / e["timings_s"]["total"])
            assert set(e["stage_speedup_vs_eager"]) == set(STAGES)
        scaling = report["scaling"][name]
        assert scaling["audio_s"] == list(SECONDS) and len(scaling["seconds_per_output_second"]) == 2
        for key in ("total_s", "rss_added_mb"):
            assert all(isinstance(scaling[key][k], float) for k in ("slope", "intercept", "r2"))
    assert report["runs"]["eager"]["1"]["speedup_vs_eager"] == 1.0

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)
    markdown = out.with_suffix(".md").read_text()
    assert markdown.strip() in capsys.readouterr().out  # the same tables are printed
    for name in report["runs"]:
        rows = [line for line in markdown.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == len(SECONDS) + 1  # one row per run, one scaling row
    assert "tensorrt: skipped, needs a CUDA GPU" in markdown
    assert sorted(p.name for p in out.parent.iterdir()) == ["throughput.json", "throughput.md", "throughput.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "full", "--device", "cpu"], "for GPUs"),
        (["--seconds", "0.01"], "at least 0.08"),
        (["--backends", "eager,jax"], "--backends takes"),
    ],
)
def test_bad_settings_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
