"""bench.encoder runs end to end on a few small frames and writes well-formed JSON and Markdown.

Only the form of the results, the reproducibility counts and the PSNR bounds are checked: timings and sizes are
never asserted (they live in bench/results/).
"""

from __future__ import annotations

import json

from bench import encoder


def test_short_run_reports_every_setting_and_sonic_rt_writes_one_file(tmp_path, capsys):
    out = tmp_path / "results" / "encoder.json"
    argv = ["--contents", "talking-head", "--frames", "12", "--size", "128", "--repeats", "2", "--out", str(out)]
    assert encoder.main(argv) == 0
    report = json.loads(out.read_text())
    content = report["contents"]["talking-head"]
    assert content["frames"] == [12, 128, 128, 3]
    results = content["results"]
    assert {"previous default", "sonic_rt file (mp4)", "sonic_rt live stream (HLS)", "mbtree=0 only"} <= set(results)
    for name in ("sonic_rt file (mp4)", "sonic_rt live stream (HLS)"):
        assert results[name]["distinct_outputs"] == 1 and results[name]["max_level_difference"] == 0
    for r in results.values():
        assert r["bytes"] > 0 and len(r["encode_s_all"]) == 2
        assert 20 < r["psnr_db"] <= content["yuv420p_ceiling_psnr_db"]  # coding loses on top of yuv420p
    md = out.with_suffix(".md").read_text()
    assert md.count("| sonic_rt file (mp4) |") == 1 and "## talking-head: 12 frames, 128x128" in md
    assert "previous default" in capsys.readouterr().out
