"""``low_memory``: weights offloaded between calls, feed-forward chunking, smaller decode chunks (CPU side; the
CUDA peak-memory check is in tests/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sonic_rt.backends.torch_backend import TorchGraph
from sonic_rt.errors import InputError
from sonic_rt.pipeline.memory import LOW_MEMORY_DECODE_FRAMES, decode_frames, feed_forward_chunk
from sonic_rt.scheduler import SchedulerConfig


class RecordingModule(nn.Module):
    """A linear layer whose ``to()`` records the device it is asked for (and does not move: the test runs on
    the CPU, the recorded devices stand in for the GPU and the host)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.linear, self.fail, self.moves = nn.Linear(4, 4), fail, []

    def to(self, device):
        self.moves.append(torch.device(device))
        return self

    def forward(self, x):
        self.moves.append("run")
        if self.fail:
            raise RuntimeError("boom")
        return self.linear(x)


def test_an_offloaded_graph_moves_its_weights_to_the_device_only_while_it_runs():
    module = RecordingModule()
    graph = TorchGraph(None, module, torch.device("cpu"))
    graph.offload("meta")  # "meta" stands in for the host memory of a CUDA run
    assert graph.run([torch.randn(2, 4)], {})[0].shape == (2, 4)
    assert module.moves == [torch.device("meta"), torch.device("cpu"), "run", torch.device("meta")]


def test_an_offloaded_graph_gives_the_device_back_after_a_failure():
    module = RecordingModule(fail=True)
    graph = TorchGraph(None, module, torch.device("cpu"))
    graph.offload("meta")
    with pytest.raises(RuntimeError, match="boom"):
        graph.run([torch.randn(2, 4)], {})
    assert module.moves[-1] == torch.device("meta")


def test_offloading_to_the_device_itself_changes_nothing():
    module = RecordingModule()
    graph = TorchGraph(None, module, torch.device("cpu"))
    graph.offload("cpu")
    graph.run([torch.randn(2, 4)], {})
    assert graph.home is None and module.moves == ["run"]


@pytest.mark.parametrize("frames, chunk", [(25, 5), (24, 4), (23, 1), (3, 3), (1, 1)])
def test_the_feed_forward_chunk_divides_the_window(frames, chunk):
    assert feed_forward_chunk(frames) == chunk


def test_decode_frames_default_to_the_graphs_largest_and_shrink_under_low_memory():
    assert decode_frames(False, 1, 8) == 8
    assert decode_frames(True, 1, 8) == LOW_MEMORY_DECODE_FRAMES == 4
    assert decode_frames(True, 6, 8) == 6  # an engine that takes no fewer
    assert decode_frames(True, 1, 2) == 2


def test_feed_forward_chunking_gives_the_same_unet_output_bit_for_bit_on_cpu(runtime):
    unet = runtime.graphs.unet
    inputs = unet.spec.sample_inputs({"batch": 3, "frames": 25, "height": 16, "width": 16}, seed=3)
    unchunked = unet(*inputs)
    try:
        unet.module.set_feed_forward_chunk(5)
        chunked = unet(*inputs)
    finally:
        unet.module.set_feed_forward_chunk(None)
    assert torch.equal(chunked, unchunked)


def test_low_memory_refuses_several_windows_per_call(demo_dir):
    import sonic_rt

    with pytest.raises(InputError, match="one window per UNet call"):
        sonic_rt.Runtime(demo_dir, low_memory=True, scheduler=SchedulerConfig(windows_per_call=2))


def test_on_cpu_a_low_memory_run_differs_from_the_default_only_by_its_decode_chunks(
    demo_dir, runtime, portrait, speech, monkeypatch
):
    """On the CPU nothing is offloaded (host and device are one) and the feed-forward chunking is exact, so a
    low_memory video equals, bit for bit, the default runtime's with 4 frames per VAE decode call."""
    import sonic_rt
    from sonic_rt.pipeline.components import Components

    low = sonic_rt.Runtime(demo_dir, low_memory=True)
    assert low.low_memory and low.components.decode_frames == 4 and runtime.components.decode_frames == 8
    events = []
    result = low.animate(
        portrait, speech, None, steps=2, progress=False, events=lambda kind, info: events.append((kind, info))
    )
    assert [info["generated"] for kind, info in events if kind == "frames"][:2] == [4, 8]  # 4 frames per chunk
    # the feed-forward chunking is that runtime's own: the default runtime's UNet stays unchunked
    blocks = [m for m in runtime.graphs.unet.module.modules() if hasattr(m, "set_chunk_feed_forward")]
    assert blocks and all(m._chunk_size is None for m in blocks)
    monkeypatch.setattr(Components, "decode_frames", property(lambda self: 4))
    default = runtime.animate(portrait, speech, None, steps=2, progress=False)
    np.testing.assert_array_equal(result.frames, default.frames)
