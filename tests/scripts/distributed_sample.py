"""Run by the tests under torchrun (or as plain processes): the sampler over the ranks, each owning a range of frames.

Usage: torchrun --nproc_per_node R tests/scripts/distributed_sample.py OUT.pt N [--fail-rank K] [--kill-rank K]
       [--lanes L] [--windows-per-call W] [--order O] [--steps S]
Rank 0 saves the final latents to OUT.pt. ``--fail-rank`` makes that rank's denoiser raise on its second call;
``--kill-rank`` makes that rank kill itself (SIGKILL) there instead.
"""

import argparse
import os
import signal
import sys

import torch

from sonic_rt.sampling import SamplingConfig, sample
from sonic_rt.scheduler import Distributed, SchedulerConfig, WindowScheduler

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from toy import toy_denoise, toy_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("frames", type=int)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--windows-per-call", type=int, default=1)
    parser.add_argument("--order", default="wavefront")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    distributed = Distributed.from_environment(torch.device("cpu"))
    latents, sigmas, timesteps = toy_problem(args.frames, args.steps)
    calls = []

    def denoise(x, windows):
        calls.append(len(windows))
        if len(calls) == 2 and distributed.rank == args.fail_rank:
            raise ValueError(f"rank {args.fail_rank} failed on purpose")
        if len(calls) == 2 and distributed.rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return toy_denoise(x, windows)

    config = SchedulerConfig(lanes=args.lanes, windows_per_call=args.windows_per_call, order=args.order)
    scheduler = WindowScheduler(config, "cpu", distributed)
    result = sample(latents, sigmas, timesteps, SamplingConfig(steps=len(timesteps)), denoise, scheduler=scheduler)
    if distributed.rank == 0:
        torch.save(result, args.out)
    scheduler.close()
    distributed.shutdown()


if __name__ == "__main__":
    main()
