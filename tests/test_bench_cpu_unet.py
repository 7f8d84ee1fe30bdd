"""bench.flop_mix and bench.unet_cpu: the Sonic-shaped preset's FLOP mix, and one UNet call on the CPU.

FLOP counts are exact properties of the architectures (asserted); times are never asserted.
"""

from __future__ import annotations

import json

import pytest

from bench import flop_mix, unet_cpu


def test_the_structure_preset_has_the_full_models_flop_mix_within_5_points_where_the_runtime_runs(tmp_path):
    out = tmp_path / "flop_mix.json"
    assert flop_mix.main(["--presets", "structure", "--out", str(out)]) == 0
    rows = {(r["model"], r["resolution"], r["structure"]): r for r in json.loads(out.read_text())["rows"]}
    full = rows[("full", 512, "official")]
    # the release's UNet at 512x512, 3 CFG rows x 25 frames: ~100 TFLOP (docs/performance.md)
    assert 99e12 < full["total"] < 101e12
    assert set(full["by_class"]) == {"conv", "linear", "attention", "rest"} and full["by_class"]["rest"] == 0
    preset = rows[("structure", 192, "simplified")]
    assert preset["matches"] and max(abs(p) for p in preset["points_from_full"].values()) <= 5
    assert "| structure | 192 | simplified |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("op, kind", [("aten.convolution", "conv"), ("aten.mm", "linear"), ("aten.bmm", "attention")])
def test_ops_fall_into_their_flop_classes(op, kind):
    assert flop_mix.op_class(op) == kind
    assert flop_mix.op_class("aten.something_else") == "rest"


def test_one_structure_unet_call_runs_in_each_variant_and_reports_its_distance_to_the_peak(tmp_path):
    out = tmp_path / "unet_cpu.json"
    argv = ["--model", "structure", "--resolution", "64", "--variants", "reference,default,bf16"]
    assert unet_cpu.main([*argv, "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    variants = data["variants"]
    assert list(variants) == ["reference", "default", "bf16"]
    assert variants["reference"]["max_abs_diff_vs_reference"] == 0
    assert variants["default"]["max_abs_diff_vs_reference"] < 1e-4  # the exact simplifications, fp32 rounding
    assert variants["default"]["executed_flops"] == data["flops"]["simplified"] < data["flops"]["official"]
    for v in variants.values():
        assert v["tflops"] == pytest.approx(v["executed_flops"] / (v["ms"] * 1e-3) / 1e12)
        assert v["fraction_of_fp32_peak"] == pytest.approx(v["tflops"] / data["peak"]["tflops"])
    assert "of fp32 peak" in out.with_suffix(".md").read_text()
