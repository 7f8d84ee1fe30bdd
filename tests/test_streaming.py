"""Streaming output: an HLS stream a player can read while it is written, chunk events with their times, and
nothing left behind by a failed run."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from sonic_rt import media
from sonic_rt.errors import OutputPathError


def _frames(n: int, size: int = 64) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    return np.stack([np.broadcast_to((ramp[None, :, None] + 3 * i) % 256, (size, size, 3)) for i in range(n)]).astype(
        np.uint8
    )


def _decoded_frames(playlist) -> int:
    """Frames a player decodes from a finished (``#EXT-X-ENDLIST``) playlist."""
    with av.open(str(playlist)) as container:
        return sum(1 for _ in container.decode(video=0))


def _decoded_live_frames(playlist) -> int:
    """Frames a player decodes now from the segments a live playlist lists (FFmpeg's own HLS reader would wait
    for the playlist to grow): the init segment and the listed fMP4 fragments, concatenated, in order."""
    lines = [line for line in playlist.read_text().splitlines() if line and not line.startswith("#")]
    init = playlist.with_name(playlist.stem + "_init.mp4")
    data = init.read_bytes() + b"".join(playlist.with_name(name).read_bytes() for name in lines)
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_an_hls_stream_is_readable_while_it_is_written_and_complete_after(tmp_path):
    playlist = tmp_path / "live.m3u8"
    samples = (0.1 * np.sin(np.arange(16000 * 6) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    frames = _frames(150)  # 6 s at 25 fps: three 2 s segments
    with media.HlsWriter(playlist, fps=25, width=64, height=64, samples=samples) as writer:
        writer.write(frames[:125])
        text = playlist.read_text()
        assert "#EXT-X-PLAYLIST-TYPE:EVENT" in text and "#EXT-X-ENDLIST" not in text
        assert text.count("#EXTINF:2.0") == 2  # two whole segments are out while frames are still coming
        assert _decoded_live_frames(playlist) == 100  # a player reads them now
        writer.write(frames[125:])
    text = playlist.read_text()
    assert "#EXT-X-ENDLIST" in text and text.count(".m4s") == 3
    assert _decoded_frames(playlist) == 150
    with av.open(str(playlist)) as container:
        audio = sum(f.samples for f in container.decode(audio=0)) / 16000
    assert 6.0 <= audio <= 6.0 + 2048 / 16000  # the whole audio, plus AAC priming and padding
    assert sorted(p.name for p in writer.files()) == sorted(
        ["live.m3u8", "live_init.mp4", "live_00000.m4s", "live_00001.m4s", "live_00002.m4s"]
    )


def test_an_aborted_hls_stream_leaves_no_file(tmp_path):
    playlist = tmp_path / "live.m3u8"
    with pytest.raises(KeyError):
        with media.HlsWriter(playlist, fps=25, width=64, height=64) as writer:
            writer.write(_frames(120))
            assert writer.files()
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_hls_paths_are_checked(tmp_path):
    with pytest.raises(OutputPathError, match="must end in .m3u8"):
        media.HlsWriter(tmp_path / "live.mp4", fps=25, width=64, height=64)
    (tmp_path / "live_00000.m4s").write_bytes(b"")
    with pytest.raises(OutputPathError, match="already there"):
        media.HlsWriter(tmp_path / "live.m3u8", fps=25, width=64, height=64)


def test_the_runtime_streams_hls_while_it_runs_and_reports_each_chunk(runtime, portrait, long_speech, tmp_path):
    """N = 51 (4 s of video at 25 fps, 3 windows per step): while frames are still being generated the playlist
    already lists a segment a player can read, and the mp4 does not exist yet (it appears whole at the end)."""
    out, playlist = tmp_path / "o.mp4", tmp_path / "live.m3u8"
    seen = []

    def events(kind, info):
        if kind == "frames":
            segments = playlist.read_text().count(".m4s") if playlist.exists() else 0
            seen.append((info, segments, out.exists()))

    result = runtime.animate(portrait, long_speech, out, steps=2, progress=False, hls=playlist, events=events)
    infos = [info for info, _, _ in seen]
    assert infos[-1]["written"] == result.num_frames == 101
    assert infos[-1]["video_seconds"] == pytest.approx(101 / 25)
    elapsed = [i["elapsed_seconds"] for i in infos]
    assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= sum(v for k, v in result.timings.items() if k == "total")
    assert any(segments >= 1 and not exists for _, segments, exists in seen[:-1])  # listed before the end
    assert _decoded_frames(playlist) == result.num_frames
    mp4, _, _ = media.read_video(out)
    with av.open(str(playlist)) as container:
        hls = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert (
        hls.shape == mp4.shape and np.abs(hls.astype(int) - mp4.astype(int)).mean() < 6.0
    )  # both x264 crf 18; HLS tuned for latency


def test_a_failed_run_removes_the_hls_stream(runtime, portrait, long_speech, tmp_path):
    playlist = tmp_path / "live.m3u8"

    def events(kind, info):
        if kind == "frames" and info["written"] > 60:
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        runtime.animate(portrait, long_speech, tmp_path / "o.mp4", steps=2, progress=False, hls=playlist, events=events)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_hls_path_is_refused_before_any_model_runs(runtime, portrait, speech, tmp_path):
    calls = []
    with pytest.raises(OutputPathError, match="must end in .m3u8"):
        runtime.animate(portrait, speech, None, hls=tmp_path / "live.mp4", events=lambda k, i: calls.append(k))
    assert calls == []


def test_the_vae_decoder_graph_works_in_place_and_decodes_the_same_frames_bit_for_bit(runtime):
    """The runtime's decode graph writes every SiLU, residual sum and spatial/temporal blend into a tensor it
    already has (hooks see the output be the input, or the block's last convolution's output) and gives diffusers'
    frames bit for bit; diffusers' own ``vae.decode`` (the eager baseline) still makes new tensors."""
    import torch
    from diffusers.models.resnet import AlphaBlender, ResnetBlock2D, TemporalResnetBlock

    graph = runtime.graphs.vae_decoder
    vae = graph.module.vae
    seen: list[tuple[str, bool]] = []
    last_conv: dict[int, torch.Tensor] = {}
    hooks = []
    for module in vae.decoder.modules():
        if isinstance(module, torch.nn.SiLU):
            hooks.append(module.register_forward_hook(lambda m, a, out: seen.append(("silu", out is a[0]))))
        elif isinstance(module, (ResnetBlock2D, TemporalResnetBlock)):
            conv = module.conv2
            hooks.append(conv.register_forward_hook(lambda m, a, out, key=id(module): last_conv.update({key: out})))
            hooks.append(
                module.register_forward_hook(lambda m, a, out: seen.append(("residual", out is last_conv[id(m)])))
            )
        elif isinstance(module, AlphaBlender):
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, kw, out: seen.append(("blend", out is kw["x_temporal"])), with_kwargs=True
                )
            )
    z = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            frames = graph(z)
            kinds = {kind for kind, _ in seen}
            assert kinds == {"silu", "residual", "blend"} and all(ok for _, ok in seen)
            seen.clear()
            official = vae.decode(z, num_frames=5).sample  # diffusers' own call: new tensors, as before
            assert seen and not any(ok for _, ok in seen)
    finally:
        for hook in hooks:
            hook.remove()
    assert frames.shape == (5, 3, 128, 128) and torch.equal(frames, official)
