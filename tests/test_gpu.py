"""On a real CUDA device (``pytest -m gpu``, run by bench/gpu_check.py): stream lanes, several workers and GPUs,
out-of-memory, host syncs, and the kernels' self-check.

Inputs avoid what a bare GPU image lacks: the demo checkpoint (written here), the astronaut portrait (skimage)
and a synthetic 16 kHz array as audio (no espeak-ng, no PyAV: ``out=None`` writes no mp4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# fp16 on GPU: lanes and batching may change kernel choices (cuBLAS heuristics per shape / stream), so the frames
# are compared within the fp16 tolerance of tests/test_end_to_end.py (uint8 levels), not bit for bit.
FP16_LEVELS = 3
FAST = dict(steps=2, progress=False)


def synthetic_audio(seconds: float = 3.2, rate: int = 16_000) -> np.ndarray:
    """[seconds * rate] float32 in [-1, 1]: a voiced-like buzz with amplitude modulation (40 frames at 3.2 s:
    two windows per step)."""
    t = np.arange(int(seconds * rate)) / rate
    buzz = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700, 1100), start=1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    return (0.2 * envelope * buzz / 2.3).astype(np.float32)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return synthetic_audio()


@pytest.fixture(scope="module")
def sequential(demo_dir):
    import sonic_rt

    return sonic_rt.Runtime(demo_dir, device="cuda", dtype="fp16")


@pytest.fixture(scope="module")
def sequential_frames(sequential, portrait, audio) -> np.ndarray:
    return sequential.animate(portrait, audio, None, **FAST).frames


def levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("lanes, windows_per_call", [(2, 1), (2, 2), (1, 2)])
def test_stream_lanes_and_batching_give_the_sequential_frames(
    demo_dir, portrait, audio, sequential_frames, lanes, windows_per_call
):
    import sonic_rt
    from sonic_rt.scheduler import SchedulerConfig

    rt = sonic_rt.Runtime(
        demo_dir, device="cuda", dtype="fp16", scheduler=SchedulerConfig(lanes=lanes, windows_per_call=windows_per_call)
    )
    try:
        if lanes > 1:
            assert rt._scheduler._streams is not None and len(rt._scheduler._streams) == lanes  # CUDA streams
        got = rt.animate(portrait, audio, None, **FAST).frames
    finally:
        rt.close()
    assert got.shape == sequential_frames.shape
    diff = levels(got, sequential_frames)
    print(f"lanes={lanes} windows_per_call={windows_per_call}: max {diff} uint8 levels from sequential")
    assert diff <= FP16_LEVELS


def test_on_cuda_the_wavefront_gives_the_step_order_frames(demo_dir, portrait, audio, sequential_frames):
    """The default (wavefront) order against the step order on the device, fp16: same windows, same calls; the
    frames agree within the fp16 tolerance (bit for bit is only promised on the CPU in fp32)."""
    import sonic_rt
    from sonic_rt.scheduler import SchedulerConfig

    rt = sonic_rt.Runtime(demo_dir, device="cuda", dtype="fp16", scheduler=SchedulerConfig(order="steps"))
    got = rt.animate(portrait, audio, None, **FAST).frames
    diff = levels(got, sequential_frames)
    print(f"wavefront vs steps on cuda: max {diff} uint8 levels")
    assert diff <= FP16_LEVELS


def test_a_real_device_out_of_memory_error_retries_with_fewer_windows(
    demo_dir, portrait, audio, sequential_frames, monkeypatch, capsys
):
    """The UNet graph asks the device for more memory than it has when called with 2 windows: a genuine
    ``torch.cuda.OutOfMemoryError`` from the caching allocator. The runtime retries with 1 window per call and
    gives the sequential frames; the device is usable afterwards."""
    import sonic_rt
    from sonic_rt.scheduler import SchedulerConfig

    rt = sonic_rt.Runtime(demo_dir, device="cuda", dtype="fp16", scheduler=SchedulerConfig(windows_per_call=2))
    run, sizes = rt.graphs.unet.run, []

    def run_or_real_oom(inputs, values):
        sizes.append(inputs[0].shape[0])
        if inputs[0].shape[0] > 3:
            _, total = torch.cuda.mem_get_info()
            torch.empty(total + 2**30, dtype=torch.uint8, device="cuda")  # more than the device has
        return run(inputs, values)

    monkeypatch.setattr(rt.graphs.unet, "run", run_or_real_oom)
    got = rt.animate(portrait, audio, None, **FAST).frames
    assert sizes[0] == 6 and set(sizes[1:]) == {3}
    assert "out of memory with 2 windows per UNet call; retrying with 1 (same result)" in capsys.readouterr().err
    assert levels(got, sequential_frames) <= FP16_LEVELS


def test_with_the_device_nearly_full_the_runtime_fails_cleanly_and_recovers(
    sequential, portrait, audio, sequential_frames, tmp_path
):
    """Fill the device to all but 8 MiB, then animate: an out-of-memory error (the runtime's, or torch's from a
    stage without a fallback), no output file; once the memory is freed the same runtime gives the same frames."""
    import importlib.util

    from sonic_rt.errors import OutOfMemoryError

    out = tmp_path / "o.mp4" if importlib.util.find_spec("av") else None  # an mp4 needs PyAV
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 8 * 2**20), dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises((OutOfMemoryError, torch.cuda.OutOfMemoryError)) as caught:
            sequential.animate(portrait, audio, out, **FAST)
        print(f"near-full device: {type(caught.value).__name__}: {str(caught.value).splitlines()[0]}")
    finally:
        del hog
        torch.cuda.empty_cache()
    assert list(tmp_path.iterdir()) == []
    assert levels(sequential.animate(portrait, audio, None, **FAST).frames, sequential_frames) <= FP16_LEVELS


def test_low_memory_keeps_only_the_unet_on_the_device_and_lowers_the_peak(
    demo_dir, sequential, portrait, audio, monkeypatch
):
    """``low_memory`` on a real device: between calls every offloaded graph's weights are in host memory and
    the UNet's on the GPU; the run's peak allocated memory is below the default runtime's; the frames equal the
    default's with 4 frames per VAE call within the fp16 tolerance (feed-forward chunking may change cuBLAS
    kernel choices)."""
    import sonic_rt
    from sonic_rt.pipeline.components import Components
    from sonic_rt.pipeline.memory import OFFLOADED_GRAPHS

    def peak_of(rt):
        """The run's footprint: the runtime's weights resident on the GPU at the start plus the most allocated
        above that during the run (two runtimes share this process, so absolute figures would mix them)."""
        resident = {
            p.data_ptr(): p.numel() * p.element_size()
            for g in rt.graphs.graphs.values()
            for p in g.module.parameters()
            if p.device.type == "cuda"
        }
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        frames = rt.animate(portrait, audio, None, **FAST).frames
        return frames, sum(resident.values()) + torch.cuda.max_memory_allocated() - start

    low = sonic_rt.Runtime(demo_dir, device="cuda", dtype="fp16", low_memory=True)
    for name in OFFLOADED_GRAPHS:
        assert all(p.device.type == "cpu" for p in low.graphs.graphs[name].module.parameters()), name
    assert all(p.device.type == "cuda" for p in low.graphs.unet.module.parameters())
    low_frames, low_peak = peak_of(low)
    for name in OFFLOADED_GRAPHS:  # back in host memory after the run
        assert all(p.device.type == "cpu" for p in low.graphs.graphs[name].module.parameters()), name
    monkeypatch.setattr(Components, "decode_frames", property(lambda self: 4))
    default_frames, default_peak = peak_of(sequential)
    print(f"demo, fp16: footprint {low_peak / 2**20:.1f} MiB low_memory vs {default_peak / 2**20:.1f} MiB default")
    assert low_peak < default_peak
    assert levels(low_frames, default_frames) <= FP16_LEVELS


def test_two_workers_on_one_gpu_give_the_sequential_frames(demo_dir, portrait, audio, sequential_frames):
    """``devices=["cuda:0", "cuda:0"]``: one UNet shared by two workers on their own CUDA streams, lone windows split
    by guidance row and joined with events (the multi-device path a one-GPU machine can run)."""
    import sonic_rt

    rt = sonic_rt.Runtime(demo_dir, dtype="fp16", devices=["cuda:0", "cuda:0"])
    assert len(rt._scheduler.workers) == 2 and all(w.stream is not None for w in rt._scheduler.workers)
    frames = rt.animate(portrait, audio, None, **FAST).frames
    assert levels(frames, sequential_frames) <= FP16_LEVELS


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_every_gpu_holds_a_replica_and_gives_the_sequential_frames(demo_dir, portrait, audio, sequential_frames):
    import sonic_rt

    rt = sonic_rt.Runtime(demo_dir, dtype="fp16", devices="all")
    assert [u.device for u in rt.components.unets] == [
        torch.device("cuda", i) for i in range(torch.cuda.device_count())
    ]
    frames = rt.animate(portrait, audio, None, **FAST).frames
    assert levels(frames, sequential_frames) <= FP16_LEVELS


@pytest.mark.parametrize("order", ["wavefront", "steps"])
def test_no_host_sync_inside_the_sampler(order):
    """``sample()`` with a device-only denoise under ``torch.cuda.set_sync_debug_mode("error")``, in both orders:
    building the window indices, timesteps and (wavefront) the frame groups, the Euler step and the per-frame
    averaging never block the host; both orders give the same latents."""
    from sonic_rt.architectures import SVD_XT_SCHEDULER_CONFIG
    from sonic_rt.sampling import SamplingConfig, karras_schedule, sample
    from sonic_rt.scheduler import SchedulerConfig, WindowScheduler

    sigmas, timesteps = karras_schedule(SVD_XT_SCHEDULER_CONFIG, 3)
    latents = torch.randn(1, 40, 4, 8, 8, device="cuda", dtype=torch.float16)
    config = SamplingConfig(steps=3)

    def denoise(x, windows):  # [g, T, C, h, w] -> the same shape, device ops only
        return x * 0.5 + windows[0].timestep

    steps_order = WindowScheduler(SchedulerConfig(order="steps"), "cuda")
    want = sample(latents, sigmas, timesteps, config, denoise, scheduler=steps_order)  # warm-up (lazy CUDA init)
    torch.cuda.synchronize()
    scheduler = WindowScheduler(SchedulerConfig(order=order), "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample(latents, sigmas, timesteps, config, denoise, scheduler=scheduler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_no_host_sync_in_a_denoising_step_of_the_demo_unet(demo_dir, attention):
    """The sampler around the demo UNet (3 CFG rows per window, the torch backend's graph call) under
    ``set_sync_debug_mode("error")``: a whole run of steps without one host synchronisation."""
    import sonic_rt
    from sonic_rt.architectures import SVD_XT_SCHEDULER_CONFIG
    from sonic_rt.models.unet import level_face_masks
    from sonic_rt.sampling import SamplingConfig, combine_guidance, karras_schedule, sample, scale_model_input

    rt = sonic_rt.Runtime(demo_dir, device="cuda", dtype="fp16", attention=attention)
    cfg, dtype = rt.graphs.config, rt.dtype
    h = w = 128 // cfg.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to("cuda", dtype)  # noqa: E731
    frames = 40
    tokens = rand(1, frames, cfg.audio_context_tokens, cfg.cross_attention_dim)
    image = rand(3, cfg.latent_channels, h, w)
    clip = rand(3, 1, cfg.cross_attention_dim)
    time_ids = torch.tensor([[12.5, 20.0, 24.0]] * 3, device="cuda")
    box = torch.zeros(1, 1, 128, 128)
    box[..., 32:96, 32:96] = 1
    masks = [m.to("cuda", dtype) for m in level_face_masks(box, (h, w), cfg.attention_levels)]

    def denoise(x, windows):
        (window,) = windows
        inp = torch.cat(
            [
                scale_model_input(torch.cat([x] * 3), window.sigma),
                image.unsqueeze(1).expand(-1, x.shape[1], -1, -1, -1),
            ],
            dim=2,
        )
        audio_rows = torch.cat([tokens[:, window.index]] * 3)
        v = rt.graphs.unet(inp, window.timestep.reshape(1).float(), clip, audio_rows, time_ids, *masks)
        return combine_guidance(v, 2.0, 7.5)

    sigmas, timesteps = karras_schedule(SVD_XT_SCHEDULER_CONFIG, 2)
    latents = torch.randn(1, frames, cfg.latent_channels, h, w, generator=gen).to("cuda", dtype)
    config = SamplingConfig(steps=2)
    with torch.inference_mode():
        sample(latents, sigmas, timesteps, config, denoise)  # warm-up: kernel compilation, cuDNN/cuBLAS set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sample(latents, sigmas, timesteps, config, denoise)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_the_kernels_pass_their_self_check_on_this_gpu(tmp_path):
    """Verify before use, on the real device: the compiled kernels match sdpa in fp16, bf16 and fp32, and
    ``auto`` then picks them."""
    from sonic_rt import attention_check
    from sonic_rt.attention import resolve_attention
    from sonic_rt.models.unet import AudioAttention

    result = attention_check.run_selfcheck(torch.device("cuda"), {64})
    for name, case in result["cases"].items():
        print(
            f"self-check {name}: kernel {case['kernel_err']:.3g}, sdpa {case['sdpa_err']:.3g}, "
            f"bound {case['bound']:.3g}"
        )
    assert result["passed"], result["reason"]
    assert len(result["cases"]) == 6
    attention_check.clear_memo()
    verdict = attention_check.verify_triton(torch.device("cuda"), {64}, cache=tmp_path / "c.json")
    assert verdict.passed and not verdict.cached and (tmp_path / "c.json").is_file()
    assert (
        resolve_attention("auto", torch.device("cuda"), {64}, selfcheck=lambda d, dims: verdict)
        is AudioAttention.TRITON
    )
