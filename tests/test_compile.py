"""torch.compile of the UNet: same video within 2 uint8 levels, one compile per shape, clear fallback; the default
(auto) runs compiled exactly the shapes already in the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

import sonic_rt
from sonic_rt import compiling

FAST = dict(steps=2, progress=False)


@pytest.fixture(scope="module")
def eager_frames(runtime, portrait, speech):
    return runtime.animate(portrait, speech, None, **FAST).frames


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One inductor cache shared by this module's tests (compiled once by the first, read by the auto test)."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(scope="module")
def compiled_frames():
    return {}


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_frames_within_2_levels_and_compiles_each_shape_once(
    demo_dir, portrait, speech, eager_frames, compile_cache, compiled_frames, monkeypatch, capsys
):
    monkeypatch.setenv(compiling.ENV_CACHE, str(compile_cache))
    rt = sonic_rt.Runtime(demo_dir, compile=True)
    first = rt.animate(portrait, speech, None, **FAST)
    err = capsys.readouterr().err
    assert err.count("compiling the UNet for input") == 1 and "compiled the UNet in" in err
    assert any(compile_cache.iterdir())  # the on-disk cache was written
    assert len(compiling.read_index()) == 1  # and the shape recorded in its index
    diff = np.abs(first.frames.astype(int) - eager_frames.astype(int))
    assert first.frames.shape == eager_frames.shape and diff.max() <= 2
    again = rt.animate(portrait, speech, None, **FAST)
    assert "compiling" not in capsys.readouterr().err  # same shape: no new compile
    assert np.array_equal(again.frames, first.frames)
    compiled_frames["on"] = first.frames


@pytest.mark.slow
def test_by_default_a_cached_shape_runs_compiled_where_loading_pays_and_any_other_uncompiled(
    demo_dir, portrait, speech, eager_frames, compile_cache, compiled_frames, tmp_path, monkeypatch, capsys
):
    if "on" not in compiled_frames:
        pytest.skip("needs the compile test before it (its cache)")
    monkeypatch.setattr(compiling, "_SAID_UNCOMPILED", set())
    monkeypatch.setenv(compiling.ENV_CACHE, str(tmp_path / "empty"))
    cold = sonic_rt.Runtime(demo_dir)  # compile=None: auto
    assert np.array_equal(cold.animate(portrait, speech, None, **FAST).frames, eager_frames)
    err = capsys.readouterr().err
    assert err.count("running the UNet uncompiled for input") == 1 and "compiling" not in err
    monkeypatch.setenv(compiling.ENV_CACHE, str(compile_cache))
    warm = sonic_rt.Runtime(demo_dir, compile="auto")  # a short video in a fresh process: loading does not pay
    assert np.array_equal(warm.animate(portrait, speech, None, **FAST).frames, eager_frames)
    err = capsys.readouterr().err
    windows = warm.graphs.unet.call.planned_windows
    assert 0 < windows < compiling.AUTO_MIN_WINDOWS
    assert f"costs more than it saves on a video of {windows} windows" in err and "loading the" not in err
    assert compiling.long_lived(warm) is warm.graphs.unet.call  # a server's runtime: loads whatever the length
    got = warm.animate(portrait, speech, None, **FAST)
    err = capsys.readouterr().err
    assert err.count("loading the compiled UNet for input") == 1 and "uncompiled" not in err
    assert np.array_equal(got.frames, compiled_frames["on"])  # the cached code, not a new compile of it
    off = sonic_rt.Runtime(demo_dir, compile="off")
    assert off.graphs.unet.call is off.graphs.unet.module


def test_an_unknown_compile_mode_is_refused(demo_dir):
    with pytest.raises(sonic_rt.InputError, match="compile must be one of auto, on, off"):
        sonic_rt.Runtime(demo_dir, compile="sometimes")


def test_without_a_compiler_compile_says_so_and_runs_uncompiled(
    demo_dir, portrait, speech, eager_frames, monkeypatch, capsys
):
    monkeypatch.setattr(compiling, "compile_unavailable_reason", lambda device: "no C++ compiler was found")
    rt = sonic_rt.Runtime(demo_dir, compile=True)
    err = capsys.readouterr().err
    assert "not compiling the UNet: no C++ compiler was found; running it uncompiled" in err
    assert rt.graphs.unet.call is rt.graphs.unet.module
    assert np.array_equal(rt.animate(portrait, speech, None, **FAST).frames, eager_frames)


def test_compile_is_refused_for_engine_directories(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(sonic_rt.InputError, match="compile=True applies to the torch backend"):
        sonic_rt.Runtime(tmp_path, compile=True)


def test_compiled_artefacts_go_to_a_lasting_cache_unless_the_user_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(compiling.ENV_CACHE, raising=False)
    assert compiling.cache_dir() == tmp_path / "sonic_rt" / "inductor"
    monkeypatch.setenv(compiling.ENV_CACHE, default_cache_dir())  # what inductor writes there itself
    assert compiling.cache_dir() == tmp_path / "sonic_rt" / "inductor"
    monkeypatch.setenv(compiling.ENV_CACHE, str(tmp_path / "mine"))
    assert compiling.cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_the_background_warm_up_compiles_the_same_shape_a_square_job_runs(
    demo_dir, compile_cache, compiled_frames, monkeypatch
):
    if "on" not in compiled_frames:
        pytest.skip("needs the compile test before it (its cache)")
    monkeypatch.setenv(compiling.ENV_CACHE, str(compile_cache))  # holds the shape the compile test's job ran
    before = compiling.read_index()
    child = compiling.warm_in_background(demo_dir, 128)
    assert child.wait(timeout=600) == 0
    log = (compile_cache / compiling.WARM_LOG).read_text()
    assert "loading the compiled UNet for input 3x25x8x16x16 from the cache" in log  # the same index key
    assert compiling.read_index().keys() == before.keys()


@pytest.mark.slow
def test_a_server_warms_its_default_shape_once_and_only_in_auto_mode_on_cpu(
    demo_dir, compile_cache, compiled_frames, monkeypatch
):
    if "on" not in compiled_frames:
        pytest.skip("needs the compile test before it (its cache)")
    monkeypatch.setenv(compiling.ENV_CACHE, str(compile_cache))  # holds the demo's 128 px shape: a quick child
    said: list[str] = []
    assert compiling.warm_for_serving(sonic_rt.Runtime(demo_dir, compile="off"), said.append) is None
    assert compiling.warm_for_serving(sonic_rt.Runtime(demo_dir, compile="on"), said.append) is None
    auto = sonic_rt.Runtime(demo_dir)
    assert auto.default_min_resolution == 128
    waiter = compiling.warm_for_serving(auto, said.append)
    assert waiter is not None and "compiling the UNet for 128x128 videos in the background" in said[0]
    waiter.join(timeout=600)
    assert not waiter.is_alive() and "the background compile finished" in said[-1], said
    key = compiling.warm_key(demo_dir, 128, "cpu", "fp32")
    assert compiling.read_index()[key]["what"] == "warm-up"
    assert compiling.warm_for_serving(sonic_rt.Runtime(demo_dir), said.append) is None  # done once: not again
    assert len(said) == 2
