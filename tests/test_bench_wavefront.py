"""bench.wavefront runs end to end on short audio and writes well-formed JSON, Markdown and a PNG.

Only the form of the results and the counts are checked here: timings are never asserted (they live in
bench/results/).
"""

from __future__ import annotations

import json
import shutil

import pytest

from bench import wavefront


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (real speech input)")
def test_short_run_writes_both_orders_for_each_length(tmp_path, capsys):
    out = tmp_path / "results" / "wavefront.json"
    argv = ["--minutes", "0.1,0.2", "--steps", "2", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert wavefront.main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["0.1", "0.2"] and report["settings"]["steps"] == 2
    for minutes, pair in report["runs"].items():
        assert list(pair) == ["steps", "wavefront"]
        frames = round(float(minutes) * 60 * 12.5)
        for order, entry in pair.items():
            assert entry["order"] == order and entry["generated_frames"] == frames
            assert entry["units"] == 2 * -(-frames // 25)  # steps x windows per step
            assert 0 < entry["first_frame_s"] <= entry["total_s"] and entry["peak_rss_mb"] > 0
            assert entry["video_seconds"] == pytest.approx((2 * frames - 1) / 25)
        # the wavefront's first chunk never needs more windows than the step order's
        assert pair["wavefront"]["units_before_first_chunk"] <= pair["steps"]["units_before_first_chunk"]
    assert out.with_suffix(".png").stat().st_size > 5000
    md = out.with_suffix(".md").read_text()
    assert md.count("| 0.1 min") == md.count("| 0.2 min") == 1 and "first frame" in md
    assert "wavefront" in capsys.readouterr().out
