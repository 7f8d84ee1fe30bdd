"""Run by tests/test_scheduler.py under torchrun: the sampler with windows sharded over the ranks (gloo).

Usage: torchrun --nproc_per_node R tests/scripts/distributed_sample.py OUT.pt N [FAIL_RANK]
Rank 0 saves the final latents to OUT.pt. FAIL_RANK (optional) makes that rank's denoiser raise.
"""

import sys

import torch

from sonic_rt.sampling import SamplingConfig, sample
from sonic_rt.scheduler import Distributed, SchedulerConfig, WindowScheduler

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from toy import toy_denoise, toy_problem  # noqa: E402


def main() -> None:
    out, num_frames = sys.argv[1], int(sys.argv[2])
    fail_rank = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    distributed = Distributed.from_environment(torch.device("cpu"))
    latents, sigmas, timesteps = toy_problem(num_frames)

    def denoise(x, windows):
        if distributed.rank == fail_rank:
            raise ValueError(f"rank {fail_rank} failed on purpose")
        return toy_denoise(x, windows)

    scheduler = WindowScheduler(SchedulerConfig(), "cpu", distributed)
    result = sample(latents, sigmas, timesteps, SamplingConfig(steps=len(timesteps)), denoise, scheduler=scheduler)
    if distributed.rank == 0:
        torch.save(result, out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
