"""The training processes and what makes each rank's epoch reproducible.

`setup_distributed` starts one process per GPU over nccl when CUDA is there, gloo on CPU otherwise
(torchrun's WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT:
https://pytorch.org/docs/stable/elastic/run.html#environment-variables) and answers with the
rank's `Context`. An epoch depends only on (seed, epoch, rank): `epoch_seed` is the rank's torch
seed, `epoch_order` its shard of the data order as DistributedSampler deals it, so a resumed run
continues where it stopped (training/train.py says why that makes resuming exact).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first start of the group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend:
            dist.barrier()

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that wall-clock timings mean something."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_distributed(expect_gpu: bool = False) -> Context:
    """One process per GPU over nccl when CUDA is there, gloo on CPU otherwise. `expect_gpu` (the
    spec's, true when the environment asks for GPUs) turns the CPU fallback into an error: a job
    that was given GPUs must not train on CPU for hours because the image has a CPU-only torch."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes in this pod (nprocPerNode)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            # Two ranks on one GPU: NCCL fails with "Duplicate GPU detected" (or, worse, it limps on).
            raise RuntimeError(f"{local_world_size} processes on this node (LOCAL_WORLD_SIZE) but torch sees only "
                               f"{gpus} GPU(s): one process per GPU; lower nproc-per-node/workers or request "
                               f"{local_world_size} GPUs")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif expect_gpu:
        raise RuntimeError(f"the job requested {local_world_size} GPU(s) on this node (expect_gpu) but torch sees "
                           f"none (CPU-only torch build or no device plugin); torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda or 'none'}")
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
        return Context(rank, world_size, device, backend, restart)
    return Context(0, 1, device, None, restart)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed for one rank's epoch: independent streams per rank, reproducible per epoch."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


def epoch_order(sampler: DistributedSampler, epoch: int) -> torch.Tensor:
    """This rank's positions into the training rows for `epoch`, as DistributedSampler deals them."""
    sampler.set_epoch(epoch)
    return torch.from_numpy(np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler)))
