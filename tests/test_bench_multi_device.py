"""bench/simulator.py and bench/multi_device.py: the model runs the scheduler's own rules; the commands write their
reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.simulator import CostModel, simulate_devices, simulate_ranks
from sonic_rt.ranks import RankPlan
from sonic_rt.sampling import ShiftFusionWork
from sonic_rt.scheduler import SchedulerConfig

REPO = Path(__file__).resolve().parents[1]


def test_one_worker_runs_every_unit_back_to_back_after_the_stages_before():
    cost = CostModel(unit_s=1.0, row_s=0.4, chunk_s=0.0, before_s=5.0)
    p = simulate_devices(60, 4, 1, cost)
    assert p.units == 3 * 4 and p.total_s == pytest.approx(5.0 + 12.0) and p.busy == [pytest.approx(12 / 17)]
    assert p.first_frame_s <= p.total_s and p.splits == 0


def test_a_lone_window_is_split_over_three_workers_and_takes_a_row_s_time():
    """N = 7: one window per step, so each step's window is split over the 3 free workers (one row each)."""
    cost = CostModel(unit_s=1.0, row_s=0.4, chunk_s=0.0)
    split = simulate_devices(7, 4, 3, cost)
    assert split.splits == 4 and split.total_s == pytest.approx(4 * 0.4)
    whole = simulate_devices(7, 4, 3, cost, SchedulerConfig(split_rows=False))
    assert whole.splits == 0 and whole.total_s == pytest.approx(4 * 1.0)


def test_more_devices_finish_sooner_and_output_is_written_in_order_after_the_first_chunk():
    cost = CostModel(unit_s=1.0, row_s=0.34, chunk_s=0.1, output_blocks="home")
    totals = [simulate_devices(250, 6, w, cost).total_s for w in (1, 2, 4)]
    assert totals[0] > totals[1] > totals[2]
    p = simulate_devices(250, 6, 2, cost)
    assert 0 < p.first_frame_s < p.total_s


def test_ranks_send_exactly_the_runtimes_messages_and_match_one_rank_alone():
    cost = CostModel(unit_s=1.0, row_s=0.34, chunk_s=0.0, latency_s=0.01, bandwidth_gbs=1.0, frame_bytes=1000)
    work = ShiftFusionWork(300, 5, 25, 7)
    two = simulate_ranks(300, 5, 2, cost)
    assert two.extra["messages"] == sum(len(k) for k in RankPlan(work, work.plan(), 2).sends.values())
    one = simulate_ranks(300, 5, 1, cost)
    assert one.total_s == pytest.approx(simulate_devices(300, 5, 1, cost).total_s)
    assert two.total_s < one.total_s


def test_the_projection_writes_a_table_marked_as_a_projection(tmp_path):
    out = tmp_path / "projection.json"
    cmd = [sys.executable, "-m", "bench.multi_device", "project", "--lengths", "10", "--devices", "1,2,4"]
    run = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["projection"] is True and report["efficiency"] == 0.4
    rows = [r for r in report["rows"] if r["mode"] == "devices" and r["link"] == "nvlink"]
    assert [r["devices"] for r in rows] == [1, 2, 4] and rows[0]["total_s"] > rows[-1]["total_s"]
    assert "PROJECTION" in out.with_suffix(".md").read_text()
