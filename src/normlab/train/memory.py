"""A lower bound on the memory of a training run, checked before the model is built.

A batch size or width that cannot fit (``train.batch_size=100000000`` for 100) used to show up
late: on the CPU, Linux hands out the pages lazily until the kernel's OOM killer ends the process
with SIGKILL (no message, exit status 137, and sometimes another process of the machine killed
instead). ``check_step_fits`` compares a floor that the run must reach with what the device
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

#: fp32 bytes per parameter: the weight, its gradient, and AdamW's two moments
WEIGHT_BYTES = GRADIENT_BYTES = MOMENT_BYTES = 4
#: cgroup files holding a container's memory limit (v2, then v1)
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class StepFloor:
    """Bytes one process must hold at once: ``held`` (weights, and AdamW's moments from the
    second step on) plus the larger of ``gradients`` (all of them exist when the optimizer
    steps) and ``activations`` (all of them exist when backward starts; the trainer sets the
    gradients to None after each step, so the two need not coincide)."""

    held: int
    gradients: int
    activations: int
    tokens: int

    @property
    def total(self) -> int:
        return self.held + max(self.gradients, self.activations)


def step_floor(model: ModelConfig, train: TrainConfig, processes: int = 1, sharded: bool = False) -> StepFloor:
    """The floor of one process's training run, with P parameters (/ processes when FSDP shards
    them) and a micro-batch of tokens = batch_size / processes x seq_len:

    held = P x (4 bytes of weight + 8 of AdamW moments; the moments only when a second step
    follows the one that creates them), gradients = 4 P;
    activations = tokens x n_layers x 2 d_model x (4 bytes, 2 under bf16): every block keeps at
    least the inputs of its attention and of its FFN, d_model values each per token, for the
    backward pass.

    A MemoryError when a weight is too large for torch to describe (over 2^63 bytes)."""
    try:
        params = meta_model(model).num_params()
    except RuntimeError as err:  # a weight above 2^63 bytes: torch cannot even describe its storage
        if "overflow" not in str(err):
            raise
        raise MemoryError(f"a weight of this model exceeds any memory: {str(err).splitlines()[0]}") from None
    params //= processes if sharded else 1
    moments = 2 * MOMENT_BYTES if train.max_steps > 1 else 0
    tokens = train.batch_size // processes * train.seq_len
    element = 2 if train.precision == "bf16" else 4
    return StepFloor(held=params * (WEIGHT_BYTES + moments), gradients=params * GRADIENT_BYTES,
                     activations=tokens * model.n_layers * 2 * model.d_model * element, tokens=tokens)


def memory_capacity(device: torch.device, local_processes: int = 1) -> int | None:
    """The most bytes one process may hold on ``device``: a CUDA device's total memory (one
    device per process); on the CPU the physical memory, or a container's cgroup limit when
    that is lower, plus swap, shared by the ``local_processes`` of a run on this machine; None
    when unknown (MPS, a system without these counters)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    limits = [physical] + [limit for path in CGROUP_LIMITS if (limit := _cgroup_limit(path)) is not None]
    return (min(limits) + swap_bytes()) // max(1, local_processes)


def _cgroup_limit(path: Path) -> int | None:
    """The byte limit in a cgroup memory file; None when absent, unreadable or unlimited ('max')."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def swap_bytes() -> int:
    """SwapTotal from /proc/meminfo (0 where there is none or no such file)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def local_processes() -> int:
    """The processes of a torchrun launch on this machine (``LOCAL_WORLD_SIZE``; 1 without)."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def check_step_fits(model: ModelConfig, train: TrainConfig, device: torch.device, processes: int = 1,
                    sharded: bool = False) -> None:
    """MemoryError when ``step_floor`` exceeds ``memory_capacity(device)``; nothing when it fits
    or the capacity is unknown. ``processes``: the run's world size (1: a single process)."""
    capacity = memory_capacity(device, local_processes() if processes > 1 else 1)
    if capacity is None:
        return
    floor = step_floor(model, train, processes, sharded)
    if floor.total > capacity:
        hint = ""
        if floor.activations > floor.gradients and floor.held + floor.gradients < capacity:
            hint = ("; a smaller train.batch_size with train.grad_accum raised as much keeps the tokens per step "
                    "(batch_size x seq_len x grad_accum)")
        raise MemoryError(
            f"a train step needs at least {_gb(floor.total)}: weights and AdamW moments {_gb(floor.held)}, "
            f"then gradients {_gb(floor.gradients)} or activations of {floor.tokens:,} tokens per micro-batch "
            f"{_gb(floor.activations)}, whichever is more; the {device.type.upper()} has {_gb(capacity)}{hint}")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"
