"""bench.backends runs end to end on the demo checkpoint with tiny settings and writes its JSON."""

from __future__ import annotations

import json
import shutil

from bench import backends

GRAPHS = ["audio2token", "unet"]


def test_bench_backends_demo_writes_the_expected_json(demo_dir, engine_dir, tmp_path, capsys):
    video = shutil.which("espeak-ng") is not None  # the whole-video part needs real speech
    out = tmp_path / "backends.json"
    argv = [
        "--sizes",
        "demo",
        "--model",
        str(demo_dir),
        "--engines",
        str(engine_dir),
        "--cache",
        str(tmp_path),
        "--steps",
        "1",
        "--repeats",
        "1",
        "--graphs",
        ",".join(GRAPHS),
        "--out",
        str(out),
        "--video" if video else "--no-video",
    ]
    assert backends.main(argv) == 0

    report = json.loads(out.read_text())
    assert set(report) >= {"benchmark", "date", "command", "machine", "settings", "sizes"}
    assert report["command"].startswith("python -m bench.backends --sizes demo")
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["onnxruntime"]
    demo = report["sizes"]["demo"]
    assert demo["build"] is None  # the given engine directory was used as it is
    assert list(demo["graphs"]) == GRAPHS
    for graph in demo["graphs"].values():
        for backend in ("torch", "onnxruntime"):
            assert graph[backend]["repeats"] == 1 and graph[backend]["median_s"] > 0
        assert graph["speedup"] > 0
        assert graph["max_abs_diff"] < 1e-3
    eff = demo["efficiency"]
    assert eff["unet_flops"]["torch"] >= eff["unet_flops"]["onnxruntime"] > 0
    assert all(rate > 0 for rate in eff["unet_gflops_per_s"].values()) and eff["gemm_gflops_per_s"] > 0
    if video:
        v = demo["video"]
        assert v["steps"] == 1 and v["num_generated_frames"] > 0 and v["size"] == [128, 128]
        for backend in ("torch", "onnxruntime"):
            timings = v[backend]["timings_s"]
            assert set(timings) >= {"denoise", "decode", "total"} and all(t > 0 for t in timings.values())
            assert v[backend]["frames_per_s"] > 0
        assert v["frames_max_abs_diff"] <= 8  # uint8 frames of the same seed; fp32 on both sides
    table = capsys.readouterr().out
    assert "graph unet" in table and "onnxruntime s" in table
