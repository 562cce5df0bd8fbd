"""Process-group helpers for ``torchrun`` (DDP or FSDP2). A plain ``normlab train`` is world
size 1 and none of these calls communicate."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from normlab.errors import ConfigError


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
    return _all_reduce(world, values, dist.ReduceOp.SUM)


def all_reduce_max(world: World, values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a few floats."""
    return _all_reduce(world, values, dist.ReduceOp.MAX)


def _all_reduce(world: World, values: list[float], op) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)  # CPU: gloo
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank."""
    return all_reduce_sum(world, [float(flag)])[0] > 0


def wrap(model: nn.Module, world: World, mode: str, device: torch.device, bf16: bool) -> nn.Module:
    """The module the training step calls: ``model`` itself in a single process, a DDP wrapper,
    or, for ``mode='fsdp'``, ``model`` sharded in place by FSDP2 (``fully_shard`` on every block,
    then on the root, which holds the embedding, the final norm and the head, so a tied
    embedding/head weight is one sharded parameter). ``bf16`` on CUDA computes in bf16 from
    fp32 master weights and reduces gradients in fp32."""
    if not world.distributed:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # public FSDP2 API since torch 2.6
        raise ConfigError(f"train.distributed: fsdp needs torch>=2.6 (this is {torch.__version__})") from None
    mesh = init_device_mesh(device.type, (world.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``wrap`` sharded ``model`` with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
