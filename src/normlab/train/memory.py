"""A lower bound on the memory of a train step, checked before anything is allocated.

A batch size or width that cannot fit (``train.batch_size=100000000`` for 100) used to show up
late: on the CPU, Linux hands out the pages lazily until the kernel's OOM killer ends the process
with SIGKILL (no message, exit status 137, and sometimes another process of the machine killed
instead). ``check_step_fits`` compares a floor that every train step needs with what the device
holds at most and raises ``MemoryError`` first: the CLI's one line and exit status 1 for a run
out of memory, so a sweep goes on with its other runs.

The floor is deliberately low (a real step needs several times more), so it refuses only runs
that cannot fit; it does not promise that the others do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.nn.model import meta_model

#: bytes per parameter held through a step: fp32 weight, gradient and AdamW's two moments
STATE_BYTES_PER_PARAM = 16
#: cgroup files holding a container's memory limit (v2, then v1)
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class StepFloor:
    """At least ``state`` bytes of parameters, gradients and AdamW moments plus ``activations``
    bytes that backward needs, per process."""

    state: int
    activations: int
    tokens: int

    @property
    def total(self) -> int:
        return self.state + self.activations


def step_floor(model: ModelConfig, train: TrainConfig, processes: int = 1, sharded: bool = False) -> StepFloor:
    """The floor of one process's train step:

    state = 16 bytes x parameters (/ processes when FSDP shards them);
    activations = tokens x n_layers x 2 d_model x (4 bytes, 2 under bf16), tokens = the
    micro-batch's batch_size / processes x seq_len: every block keeps at least its input and
    its attention output, d_model values each per token, for the backward pass. A MemoryError
    when a weight is too large for torch to describe (over 2^63 bytes)."""
    try:
        params = meta_model(model).num_params()
    except RuntimeError as err:  # a weight above 2^63 bytes: torch cannot even describe its storage
        if "overflow" not in str(err):
            raise
        raise MemoryError(f"a weight of this model exceeds any memory: {str(err).splitlines()[0]}") from None
    state = STATE_BYTES_PER_PARAM * params // (processes if sharded else 1)
    tokens = train.batch_size // processes * train.seq_len
    element = 2 if train.precision == "bf16" else 4
    return StepFloor(state, tokens * model.n_layers * 2 * model.d_model * element, tokens)


def memory_capacity(device: torch.device) -> int | None:
    """The most bytes one process may hold on ``device``: a CUDA device's total memory; on the
    CPU the physical memory, or a container's cgroup limit when that is lower, shared by
    torchrun's processes on this machine (``LOCAL_WORLD_SIZE``); None when unknown (MPS, a
    system without these counters)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    limits = [physical] + [limit for path in CGROUP_LIMITS if (limit := _cgroup_limit(path)) is not None]
    return min(limits) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _cgroup_limit(path: Path) -> int | None:
    """The byte limit in a cgroup memory file; None when absent, unreadable or unlimited ('max')."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_step_fits(model: ModelConfig, train: TrainConfig, device: torch.device, processes: int = 1,
                    sharded: bool = False) -> None:
    """MemoryError when ``step_floor`` exceeds ``memory_capacity(device)``; nothing when it fits
    or the capacity is unknown."""
    capacity = memory_capacity(device)
    if capacity is None:
        return
    floor = step_floor(model, train, processes, sharded)
    if floor.total > capacity:
        hint = ""
        if floor.activations > floor.state and floor.state < capacity:
            hint = ("; a smaller train.batch_size with train.grad_accum raised as much keeps the tokens per step "
                    "(batch_size x seq_len x grad_accum)")
        raise MemoryError(
            f"a train step needs at least {_gb(floor.total)}: parameters, gradients and AdamW state "
            f"{_gb(floor.state)}, activations of {floor.tokens:,} tokens per micro-batch at least "
            f"{_gb(floor.activations)}; the {device.type.upper()} has {_gb(capacity)}{hint}")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"
