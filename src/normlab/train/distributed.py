"""Process-group helpers for ``torchrun`` (DDP). A plain ``normlab train`` is world size 1 and
none of these calls communicate."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: a plain single-process run
SINGLE = World()


def setup() -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            # NCCL for the model's CUDA tensors, gloo for the small CPU reductions below
            dist.init_process_group("cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few floats (float64 on CPU)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)  # CPU: gloo
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank."""
    return all_reduce_sum(world, [float(flag)])[0] > 0
