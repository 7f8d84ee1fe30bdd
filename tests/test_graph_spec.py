"""GraphSpec: every shape artefact (dynamic axes, profiles, buffers, samples, checks) comes from one description."""

from __future__ import annotations

import json

import pytest
import torch

from sonic_rt.errors import InputError
from sonic_rt.graphs import DimRange, GraphSpec, PipelineConfig, Precision, ShapeOptions, TensorSpec, graph_specs
from sonic_rt.graphs.modules import GRAPH_NAMES

CONFIG = PipelineConfig(
    latent_channels=4,
    unet_in_channels=8,
    cross_attention_dim=1024,
    audio_context_tokens=32,
    attention_levels=(0, 1, 2, 3),
    vae_scale_factor=8,
    vae_scaling_factor=0.18215,
    clip_image_size=224,
    clip_embed_dim=1024,
    whisper_mel_bins=80,
    whisper_positions=1500,
    whisper_states=5,
    whisper_d_model=384,
    token_window=10,
    bucket_window=50,
    num_buckets=2,
)
SHAPES = ShapeOptions(frames=25, resolution=DimRange(512, 512, 1024), windows=DimRange(1, 2, 4))


@pytest.fixture(scope="module")
def specs():
    return graph_specs(CONFIG, SHAPES, Precision.FP16)


def test_every_graph_has_a_spec_with_the_official_sizes(specs):
    assert tuple(specs) == GRAPH_NAMES
    unet = specs["unet"]
    assert unet.input_names == [
        "sample",
        "timestep",
        "clip_embeds",
        "audio_tokens",
        "added_time_ids",
        "face_mask_0",
        "face_mask_1",
        "face_mask_2",
        "face_mask_3",
    ]
    assert unet.shape(unet.inputs[0], "opt") == (6, 25, 8, 64, 64)
    assert unet.shape(unet.inputs[3], "max") == (12, 25, 32, 1024)
    assert [unet.shape(t, "max") for t in unet.inputs[5:]] == [
        (1, 1, 128, 128),
        (1, 1, 64, 64),
        (1, 1, 32, 32),
        (1, 1, 16, 16),
    ]
    assert specs["whisper_encoder"].shape(specs["whisper_encoder"].outputs[0]) == (1, 1500, 5, 384)
    # precision: official fp32 graphs stay fp32, timestep and added_time_ids are always fp32
    assert specs["rife"].inputs[0].dtype == "float32" and specs["audio2token"].inputs[0].dtype == "float32"
    assert unet.inputs[0].dtype == "float16" and unet.inputs[1].dtype == "float32" and unet.inputs[4].dtype == "float32"


def test_dynamic_axes_are_exactly_the_named_dims_with_a_range(specs):
    axes = specs["unet"].dynamic_axes()
    assert axes["sample"] == {0: "batch", 1: "frames", 3: "height", 4: "width"}
    assert axes["face_mask_2"] == {2: "height_2", 3: "width_2"}
    assert "timestep" not in axes
    assert specs["whisper_encoder"].dynamic_axes() == {}  # fixed [1, 80, 3000]: a static graph
    fixed = graph_specs(
        CONFIG, ShapeOptions(resolution=DimRange.fixed(512), windows=DimRange.fixed(1)), Precision.FP32
    )["unet"].dynamic_axes()
    assert fixed["sample"] == {1: "frames"}  # single-value ranges are static


def test_tensorrt_profile_is_min_opt_max_of_every_input(specs):
    profile = specs["unet"].profile()
    assert set(profile) == set(specs["unet"].input_names)
    assert profile["sample"] == ((3, 1, 8, 64, 64), (6, 25, 8, 64, 64), (12, 25, 8, 128, 128))
    assert profile["face_mask_3"] == ((1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 16, 16))
    assert profile["timestep"] == ((1,), (1,), (1,))
    vae = specs["vae_decoder"]
    assert vae.max_shape(vae.outputs[0]) == (8, 3, 1024, 1024)


def test_sample_inputs_follow_shapes_dtypes_ranges_and_derived_dims(specs):
    unet = specs["unet"]
    args = unet.sample_inputs({"batch": 3, "frames": 7, "height": 72, "width": 100}, seed=3)
    assert [tuple(a.shape) for a in args[:5]] == [(3, 7, 8, 72, 100), (1,), (3, 1, 1024), (3, 7, 32, 1024), (3, 3)]
    assert [tuple(a.shape) for a in args[5:]] == [(1, 1, 72, 100), (1, 1, 36, 50), (1, 1, 18, 25), (1, 1, 9, 13)]
    assert args[0].dtype == torch.float16 and args[1].dtype == torch.float32
    assert 0.0 <= float(args[5].min()) and float(args[5].max()) <= 1.0
    again = unet.sample_inputs({"batch": 3, "frames": 7, "height": 72, "width": 100}, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(args, again))
    assert unet.check_inputs(args) == {
        "batch": 3,
        "frames": 7,
        "height": 72,
        "width": 100,
        "height_0": 72,
        "width_0": 100,
        "height_1": 36,
        "width_1": 50,
        "height_2": 18,
        "width_2": 25,
        "height_3": 9,
        "width_3": 13,
    }


def test_check_inputs_names_the_problem(specs):
    unet = specs["unet"]
    args = list(unet.sample_inputs("min"))
    with pytest.raises(InputError, match="takes 9 inputs"):
        unet.check_inputs(args[:5])
    bad = list(args)
    bad[2] = torch.zeros(4, 1, 1024)
    with pytest.raises(InputError, match="'batch' is 4 here but 3"):
        unet.check_inputs(bad)
    bad = list(args)
    bad[6] = torch.zeros(1, 1, 5, 5)
    with pytest.raises(InputError, match="height_1 must be ceil"):
        unet.check_inputs(bad)
    big = unet.sample_inputs({"frames": 30})
    with pytest.raises(InputError, match="frames = 30 is outside the range"):
        unet.check_inputs(big)
    assert unet.check_inputs(big, check_ranges=False)["frames"] == 30


def test_output_shapes_follow_from_the_inputs(specs):
    vae = specs["vae_decoder"]
    values = vae.check_inputs(vae.sample_inputs({"frames": 3, "latent_height": 64, "latent_width": 96}))
    assert vae.output_shapes(values) == {"frames": (3, 3, 512, 768)}
    enc = specs["vae_encoder"]
    assert enc.output_shapes(enc.check_inputs(enc.sample_inputs("max"))) == {"latents": (1, 4, 128, 128)}


def test_json_round_trip_is_exact(specs):
    for spec in specs.values():
        assert GraphSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_bad_ranges_and_options_are_refused():
    with pytest.raises(ValueError):
        DimRange(4, 2, 8)
    with pytest.raises(ValueError, match="multiple of 64"):
        ShapeOptions(resolution=DimRange(500, 512, 512))
    with pytest.raises(ValueError, match="has no range"):
        GraphSpec("g", (TensorSpec("x", ("n",), "float32"),), (), {})


@pytest.mark.parametrize(
    "value, want",
    [
        ("fp16", Precision.FP16),
        ("float16", Precision.FP16),
        (torch.float16, Precision.FP16),
        ("bf16", Precision.BF16),
        ("bfloat16", Precision.BF16),
        (torch.bfloat16, Precision.BF16),
        ("fp32", Precision.FP32),
        ("float32", Precision.FP32),
        (torch.float32, Precision.FP32),
        (Precision.FP16, Precision.FP16),
        (None, None),
    ],
)
def test_precision_parses_every_spelling_of_a_dtype(value, want):
    assert Precision.parse(value) is want


def test_precision_owns_the_torch_and_numpy_dtypes_and_names_unknown_ones():
    import numpy as np

    assert [(p.value, p.dtype, p.torch_dtype) for p in Precision] == [
        ("fp32", "float32", torch.float32),
        ("fp16", "float16", torch.float16),
        ("bf16", "bfloat16", torch.bfloat16),
    ]
    assert Precision.FP16.numpy_dtype is np.float16 and Precision.FP32.numpy_dtype is np.float32
    with pytest.raises(ValueError, match="numpy has no bfloat16"):
        _ = Precision.BF16.numpy_dtype
    assert all(Precision.from_torch(p.torch_dtype) is p for p in Precision)
    for bad in ("half", "FP16", torch.int64):
        with pytest.raises(InputError, match="use one of fp16, float16, bf16, bfloat16, fp32, float32"):
            Precision.parse(bad)
