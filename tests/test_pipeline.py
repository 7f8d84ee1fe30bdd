"""The pipeline's units on their own (sonic_rt/pipeline/): options and the CLI flags made from them, the guided
denoiser's CFG rows, the out-of-memory policy and the stage timer. No model is loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sonic_rt
from sonic_rt.cli import build_parser, options_from_args
from sonic_rt.errors import OutOfMemoryError
from sonic_rt.pipeline.guidance import GuidedDenoiser
from sonic_rt.pipeline.memory import MemoryFallback
from sonic_rt.pipeline.options import AnimateOptions
from sonic_rt.pipeline.timing import STAGES, StageTimer
from sonic_rt.sampling import SamplingConfig, Window

REQUIRED = ["animate", "--model", "m", "--image", "i.png", "--audio", "a.wav", "--out", "o.mp4"]


def test_options_are_exported_and_describe_every_field():
    assert sonic_rt.AnimateOptions is AnimateOptions
    info = {o.name: o for o in AnimateOptions.describe()}
    assert list(info) == [f.name for f in dataclasses.fields(AnimateOptions)]
    assert all(o.help and o.default == getattr(AnimateOptions(), o.name) for o in info.values())
    assert (info["steps"].default, info["steps"].unit, info["steps"].source) == (25, "steps", "num_inference_steps")
    assert (info["seed"].default, info["seed"].source) == (72589, "seed")
    assert info["frames_per_window"].source == "n_sample_frames" and info["shift_offset"].unit == "frames"
    assert info["return_frames"].flag is None and info["interpolate"].flag == "--no-interpolate"


def test_the_sampler_takes_its_defaults_from_the_options():
    options, config = AnimateOptions(), SamplingConfig()
    assert (config.steps, config.frames_per_window, config.shift_offset) == (
        options.steps,
        options.frames_per_window,
        options.shift_offset,
    )


def test_cli_defaults_are_the_options_defaults():
    assert options_from_args(build_parser().parse_args(REQUIRED)) == AnimateOptions()


def test_every_cli_flag_reaches_its_option(capsys):
    args = build_parser().parse_args(
        REQUIRED
        + [
            "--steps",
            "3",
            "--seed",
            "5",
            "--dynamic-scale",
            "1.5",
            "--shift-offset",
            "4",
            "--frames-per-window",
            "9",
            "--min-resolution",
            "256",
            "--no-interpolate",
            "--face-box",
            "1,2,3,4",
            "--no-crop",
            "--quiet",
        ]
    )
    assert options_from_args(args) == AnimateOptions(
        steps=3,
        seed=5,
        dynamic_scale=1.5,
        shift_offset=4,
        frames_per_window=9,
        min_resolution=256,
        interpolate=False,
        face_box="1,2,3,4",
        crop=False,
        progress=False,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["animate", "--help"])
    text = capsys.readouterr().out
    for info in AnimateOptions.describe():
        if info.flag is not None:
            assert info.flag in text
    assert "num_inference_steps" in text and "(default: 25)" in text


def test_overrides_replace_options_and_unknown_names_are_a_type_error():
    base = AnimateOptions(steps=3)
    assert AnimateOptions.resolve(base, {"seed": 1}) == AnimateOptions(steps=3, seed=1)
    assert AnimateOptions.resolve(None, {}) == AnimateOptions()
    with pytest.raises(TypeError, match="'stesp'"):
        AnimateOptions.resolve(None, {"stesp": 2})


class RecordingUNet:
    """Returns, for each row, a constant v that says which CFG row its inputs make it (0 uncond: no image latents;
    1 drop_audio: the zero window's audio tokens, all -1 in these tests; 2 cond)."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, clip, audio, time_ids, *masks):
        self.calls.append((sample, timestep, clip, audio, time_ids, masks))
        no_image = (sample[:, :, 4:] == 0).flatten(1).all(1)
        no_audio = (audio == -1.0).flatten(1).all(1)
        kind = torch.where(no_image, 0.0, torch.where(no_audio, 1.0, 2.0)).to(sample.dtype)
        return kind[:, None, None, None, None].expand(-1, *sample.shape[1:2], 4, *sample.shape[3:]).clone()


def _window(index, step=0):
    return Window(
        step=step,
        index=torch.tensor(index),
        timestep=torch.tensor(1.5),
        sigma=torch.tensor(3.0),
        sigma_next=torch.tensor(2.0),
    )


def test_guided_denoiser_builds_uncond_drop_audio_cond_rows_and_combines_them():
    h = w = 2
    frames, dim, n = 3, 5, 2
    image_latents = torch.full((1, 4, h, w), 7.0)
    clip = torch.full((1, 6), 2.0)
    cond = torch.arange(frames * 2 * 32 * dim, dtype=torch.float32).reshape(1, 2 * frames, 32, dim)
    uncond = torch.full((1, 1, 32, dim), -1.0)
    buckets = torch.arange(2 * frames * 2, dtype=torch.float32).reshape(1, 2 * frames, 2)
    unet = RecordingUNet()
    denoiser = GuidedDenoiser(
        unet,
        image_latents=image_latents,
        clip_embeds=clip,
        cond_tokens=cond,
        uncond_tokens=uncond,
        buckets=buckets,
        face_masks=[torch.ones(1, 1, h, w)],
        fps=12.5,
        image_guidance_scale=2.0,
        audio_guidance_scale=7.5,
    )
    windows = [_window([0, 1, 2]), _window([3, 4, 5])]
    x = torch.randn(n, frames, 4, h, w)
    v = denoiser(x, windows)
    sample, timestep, clip_rows, audio, time_ids, masks = unet.calls[0]
    assert sample.shape == (3 * n, frames, 8, h, w) and len(masks) == 1
    scaled = x / (3.0**2 + 1) ** 0.5
    for row in range(3):
        torch.testing.assert_close(sample[row * n : (row + 1) * n, :, :4], scaled)
    assert (sample[:n, :, 4:] == 0).all() and (sample[n:, :, 4:] == 7.0).all()  # image latents: zero for uncond
    assert (clip_rows[:n] == 0).all() and (clip_rows[n:] == 2.0).all() and clip_rows.shape == (3 * n, 1, 6)
    assert (audio[: 2 * n] == -1.0).all()  # uncond and drop_audio: audio2token of the zero window
    torch.testing.assert_close(audio[2 * n :], torch.cat([cond[:, [0, 1, 2]], cond[:, [3, 4, 5]]]))
    want_ids = torch.tensor([[12.5, *buckets[0, :3].mean(0)], [12.5, *buckets[0, 3:].mean(0)]])
    torch.testing.assert_close(time_ids, want_ids.repeat(3, 1))
    assert timestep.tolist() == [1.5]
    # v rows are 0 (uncond), 1 (drop_audio), 2 (cond): u + g1 (d - u) + g2 (c - d) = 2 + 7.5
    torch.testing.assert_close(v, torch.full((n, frames, 4, h, w), 9.5))
    # the scheduler's row split: rows [0, 1] in one call, row 2 in another, combined: the same v, bit for bit
    parts = [denoiser.partial(x, windows, range(0, 2), 0), denoiser.partial(x, windows, range(2, 3), 0)]
    assert [p.shape[0] for p in parts] == [2 * n, n]
    assert torch.equal(denoiser.combine(parts), v)
    split_sample = torch.cat([unet.calls[1][0], unet.calls[2][0]])
    assert torch.equal(split_sample, sample)  # the same UNet rows, in two calls


def test_memory_fallback_halves_keeps_the_smaller_size_and_fails_at_one():
    said, sizes = [], []

    def call(part):
        sizes.append(part.stop - part.start)
        if part.stop - part.start > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return torch.arange(part.start, part.stop)

    fallback = MemoryFallback("windows per UNet call", True, "too big", lambda m, info: said.append((m, info)))
    assert fallback.run(5, call).tolist() == [0, 1, 2, 3, 4]
    assert sizes == [5, 2, 2, 1] and fallback.limit == 2
    assert said == [
        (
            "out of memory with 5 windows per UNet call; retrying with 2 (same result)",
            {"what": "windows per UNet call", "failed": 5, "retry": 2},
        )
    ]

    def always(part):
        raise RuntimeError("CPU allocator: out of memory")

    with pytest.raises(OutOfMemoryError, match="too big"):
        MemoryFallback("pairs", True, "too big", lambda *_: None).run(2, always)


def test_stage_timer_orders_stages_by_the_pipeline():
    timer = StageTimer(torch.device("cpu"))
    for stage in ("extra", "encode", "preprocess", "decode", "decode"):
        with timer.stage(stage):
            pass
    assert list(timer.ordered()) == ["preprocess", "decode", "encode", "extra"]
    assert STAGES[0] == "preprocess" and STAGES[-1] == "total"


def test_dtype_names_come_from_precision_and_a_half_dtype_slower_than_fp32_on_this_cpu_runs_fp32(monkeypatch, capsys):
    import torch

    from sonic_rt.errors import InputError
    from sonic_rt.pipeline import components

    cpu = torch.device("cpu")
    assert components.default_dtype(None, cpu) is torch.float32
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        components.default_dtype("fp8", cpu)
    monkeypatch.setattr(components, "cpu_speedup_over_fp32", lambda dtype: 0.25)
    assert components.default_dtype("bf16", cpu) is torch.float32
    assert components.default_dtype("float16", cpu) is torch.float32
    err = capsys.readouterr().err
    assert "bf16 is 4.0x slower than fp32 on this CPU" in err and "running fp32 instead" in err
    assert "fp16 is 4.0x slower" in err
    monkeypatch.setattr(components, "cpu_speedup_over_fp32", lambda dtype: 2.0)
    assert components.default_dtype("bf16", cpu) is torch.bfloat16
    assert capsys.readouterr().err == ""


def test_the_half_precision_probe_measures_a_positive_speed_ratio_once_per_process():
    import torch

    from sonic_rt.pipeline.components import cpu_speedup_over_fp32

    ratio = cpu_speedup_over_fp32(torch.bfloat16)
    assert 0 < ratio < float("inf")
    assert cpu_speedup_over_fp32(torch.bfloat16) == ratio  # cached: measured once


def test_the_readme_options_table_is_generated_from_animate_options():
    """README.md shows markdown_table() verbatim: a new or changed option without a README update fails here."""
    from pathlib import Path

    from sonic_rt.pipeline.options import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, (
        "regenerate: python -c 'from sonic_rt.pipeline.options import markdown_table; print(markdown_table())'"
    )


def test_importing_sonic_rt_and_its_cli_loads_no_torch_until_the_runtime_is_used():
    """``import sonic_rt`` and the CLI's parser import no torch, so ``--help`` and bad arguments answer at once."""
    import subprocess
    import sys

    code = (
        "import sys, sonic_rt, sonic_rt.cli as cli; cli.build_parser(); print('torch' in sys.modules); "
        "sonic_rt.Runtime; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
