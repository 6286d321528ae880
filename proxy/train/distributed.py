"""Data-parallel training with torch.distributed: who am I, and the few collectives the loop needs.

Started by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) or by a
SLURM job with several tasks (Hydra's submitit launcher): there submitit's
``TorchDistributedEnvironment`` exports the same variables. Without either, the run is a single
process and every function here is a cheap no-op.

The loop stays identical on every rank: gradients are averaged by DDP, and the numbers that steer
it (loss, grad norm, statistics) are reduced so each rank makes the same decision - a diverged
step or a remedy's skip stops or skips all ranks together. Only rank 0 writes the run record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_slurm_env() -> None:
    """Inside a multi-task SLURM job (and no torchrun), let submitit fill in the torch variables."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        raise RuntimeError(
            "several SLURM tasks but no torchrun and no submitit job: launch with "
            "hydra/launcher=slurm_ddp or wrap the command in torchrun"
        )
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def from_env() -> DistInfo:
    _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(minutes=10))


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()


def mean(value: float, device: torch.device) -> float:
    """The mean of a float over ranks (the same result on every rank)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def max_int(value: int, device: torch.device) -> int:
    """The largest value of an int over ranks (every rank gets it): e.g. a stop request that
    reached only some of them."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def reduce_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Max over ranks for maxima (``.../max_logit...``, ``logit_max``), mean for the rest."""
    if not dist.is_initialized() or not stats:
        return stats
    keys = sorted(stats)
    is_max = [("max_logit" in k or k.endswith("_max")) for k in keys]
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    maxima = torch.where(torch.tensor(is_max, device=device), values, torch.full_like(values, -torch.inf))
    sums = torch.where(torch.tensor(is_max, device=device), torch.zeros_like(values), values)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    merged = torch.where(torch.tensor(is_max, device=device), maxima, sums / dist.get_world_size())
    return dict(zip(keys, merged.tolist()))


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
