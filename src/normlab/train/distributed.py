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
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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
    on_gpu = dist.get_backend() == "nccl"
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=torch.device("cuda", world.local_rank) if on_gpu else None)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank."""
    return all_reduce_sum(world, [float(flag)])[0] > 0
