"""Verify before use: the Triton kernels' self-check and how ``resolve_attention`` uses it.

The GPU is faked (a ``torch.device("cuda")`` object and an injected check / identity); the real check runs the
real kernels in the Triton interpreter on CPU.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from sonic_rt import attention_check
from sonic_rt.attention import resolve_attention
from sonic_rt.attention_check import SelfCheck, run_selfcheck, verify_triton
from sonic_rt.errors import InputError
from sonic_rt.models.unet import AudioAttention

kernels = pytest.importorskip("sonic_rt.kernels.audio_attention")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
FAKE_GPU = {"gpu": "Fake GPU", "capability": "9.0", "triton": "0.0", "torch": "0.0"}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SONIC_RT_CACHE_DIR", str(tmp_path / "cache"))
    attention_check.clear_memo()
    yield
    attention_check.clear_memo()


def counting(passed: bool, reason: str = ""):
    calls = []

    def run(device, head_dims):
        calls.append((device, frozenset(head_dims)))
        return {"passed": passed, "reason": reason, "cases": {"spatial fp16 d64": {"kernel_err": 0.0}}}

    return run, calls


@interpreted
def test_the_real_kernels_pass_the_check_in_the_interpreter():
    result = run_selfcheck(torch.device("cpu"), {64, 32})
    assert result["passed"], result["reason"]
    assert set(result["cases"]) == {
        f"{k} {t} d{d}" for k in ("spatial", "temporal") for t in ("fp16", "fp32") for d in (32, 64)
    }
    for case in result["cases"].values():
        assert case["kernel_err"] <= case["bound"]


@interpreted
def test_a_wrong_kernel_fails_the_check_with_the_case_and_the_error():
    def off_by_a_bit(q, k, v, clip_v, mask, heads, scale=1.0, **kw):
        return kernels.spatial_audio_attention(q, k, v, clip_v, mask, heads, scale, **kw) + 0.05

    broken = types.SimpleNamespace(
        SUPPORTED_HEAD_DIMS=kernels.SUPPORTED_HEAD_DIMS,
        spatial_audio_attention=off_by_a_bit,
        temporal_audio_attention=kernels.temporal_audio_attention,
    )
    result = run_selfcheck(torch.device("cpu"), {64}, (torch.float16,), kernels=broken)
    assert not result["passed"] and result["reason"].startswith("spatial fp16 d64: max|kernel - fp32| =")

    def raising(*args, **kw):
        raise RuntimeError("PTX assembly failed\nmore lines")

    broken.spatial_audio_attention = raising
    result = run_selfcheck(torch.device("cpu"), {64}, (torch.float16,), kernels=broken)
    assert result == {
        "passed": False,
        "cases": {},
        "reason": "spatial fp16 d64: the kernel raised RuntimeError: PTX assembly failed",
    }


def test_verdict_is_cached_per_gpu_in_memory_and_on_disk(tmp_path):
    run, calls = counting(True)
    first = verify_triton(CUDA, {64}, run=run, identity=lambda d: FAKE_GPU)
    again = verify_triton(CUDA, {64}, run=run, identity=lambda d: FAKE_GPU)
    assert first.passed and not first.cached and again is first and len(calls) == 1
    cache = tmp_path / "cache" / "triton_selfcheck.json"
    data = json.loads(cache.read_text())
    assert data["version"] == 1 and list(data["checks"]) == [first.key]
    assert "Fake GPU" in first.key and "triton 0.0" in first.key and "[64]" in first.key
    attention_check.clear_memo()  # a new process: read from disk, nothing runs
    from_disk = verify_triton(CUDA, {64}, run=run, identity=lambda d: FAKE_GPU)
    assert from_disk.passed and from_disk.cached and len(calls) == 1
    # another GPU model, another Triton, other head dims: checked again
    verify_triton(CUDA, {64}, run=run, identity=lambda d: {**FAKE_GPU, "gpu": "Other GPU"})
    verify_triton(CUDA, {64}, run=run, identity=lambda d: {**FAKE_GPU, "triton": "9.9"})
    verify_triton(CUDA, {64, 128}, run=run, identity=lambda d: FAKE_GPU)
    assert len(calls) == 4 and len(json.loads(cache.read_text())["checks"]) == 4


def test_an_unwritable_or_corrupt_cache_only_means_checking_again(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run, calls = counting(True)
    assert verify_triton(CUDA, {64}, run=run, identity=lambda d: FAKE_GPU, cache=blocker / "c.json").passed
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    attention_check.clear_memo()
    assert verify_triton(CUDA, {64}, run=run, identity=lambda d: FAKE_GPU, cache=corrupt).passed
    assert len(calls) == 2 and json.loads(corrupt.read_text())["version"] == 1


def fake_check(passed: bool, reason: str = "spatial fp16 d64: max|kernel - fp32| = 0.5 > 0.01"):
    calls = []

    def check(device, head_dims):
        calls.append(device)
        return SelfCheck(passed, "" if passed else reason, "fake")

    return check, calls


def test_auto_on_cuda_uses_triton_only_after_the_check_passed(capsys):
    check, calls = fake_check(True)
    assert resolve_attention("auto", CUDA, {64}, selfcheck=check) is AudioAttention.TRITON
    assert resolve_attention(None, CUDA, {64}, selfcheck=check) is AudioAttention.TRITON
    assert len(calls) == 2 and capsys.readouterr().err == ""


def test_auto_on_cuda_falls_back_to_sdpa_with_a_one_line_reason(capsys):
    check, calls = fake_check(False)
    assert resolve_attention("auto", CUDA, {64}, selfcheck=check) is AudioAttention.SDPA
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed its self-check against sdpa" in err and "0.5 > 0.01" in err
    assert "using sdpa" in err
    resolve_attention("auto", CUDA, {64}, selfcheck=check)
    assert capsys.readouterr().err == ""  # said once


def test_explicit_triton_still_runs_the_check_and_fails_clearly():
    check, calls = fake_check(False)
    with pytest.raises(
        InputError,
        match=r"attention='triton' cannot be used on cuda: the compiled kernel failed "
        r"its self-check against sdpa \(spatial fp16 d64: .*\); use attention='sdpa'",
    ):
        resolve_attention("triton", CUDA, {64}, selfcheck=check)
    assert len(calls) == 1
    ok, _ = fake_check(True)
    assert resolve_attention("triton", CUDA, {64}, selfcheck=ok) is AudioAttention.TRITON


def test_other_choices_and_the_cpu_never_run_the_check():
    check, calls = fake_check(False)
    for name in ("sdpa", "reference"):
        assert resolve_attention(name, CUDA, {64}, selfcheck=check).value == name
    assert resolve_attention("auto", torch.device("cpu"), {64}, selfcheck=check) is AudioAttention.SDPA
    # unsupported head dims: the reason is known without running anything
    assert resolve_attention("auto", CUDA, {24}, selfcheck=check) is AudioAttention.SDPA
    assert calls == []
