"""Atomic checkpoints: safetensors weights + trainer state, verified by a manifest on load.

Layout: ``RUN/checkpoints/step_000100/{model.safetensors, trainer.pt, manifest.json}``. A
checkpoint is written into a hidden temporary directory, every file is fsynced, the manifest
(sizes and sha256 of the other files) is written last, and the directory is renamed into place,
so a kill at any moment leaves either the whole checkpoint or none. Loading never unpickles
arbitrary objects (safetensors, and ``torch.load(weights_only=True)``).

An FSDP run's checkpoint adds ``sharded/``: model and optimizer state written by every rank
through ``torch.distributed.checkpoint`` (one file per rank plus ``.metadata``), which loads
back on any number of processes, sharded or not; its ``trainer.pt`` then holds no optimizer.
``model.safetensors`` is still there, gathered from the shards at every save, so that every
checkpoint of every run reads back the same way (``load_run``: evaluate, diagnose, export-hf,
compare) with no conversion step; the price is one all-gather of the weights to rank 0's CPU
per save, the memory a DDP rank holds anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from normlab.errors import CheckpointError
from normlab.train import distributed
from normlab.train.distributed import World

WEIGHTS, STATE, MANIFEST, SHARDED = "model.safetensors", "trainer.pt", "manifest.json", "sharded"


@dataclass
class Checkpoint:
    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (the latter makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename; the temporary file is
    removed when that fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    tmp = _temporary(directory, step)
    save_model(model, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    return _commit(tmp, step, keep_last)


def save_sharded_checkpoint(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], keep_last: int, world: World) -> Path:
    """Every rank: write its shards of model and optimizer to ``sharded/`` and send its part of
    the weights to rank 0, which writes ``model.safetensors`` (a tied weight once), ``trainer.pt``
    (``state``, no optimizer) and, after a barrier (all shards on disk), the manifest; then it
    renames the directory into place. Needs a file system every rank sees."""
    import torch.distributed.checkpoint as dcp  # 0.6 s to import: only sharded (FSDP) runs pay it
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    tmp = directory / f".tmp-step_{step:06d}"
    if world.is_main:
        _temporary(directory, step)
    distributed.barrier(world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    distributed.barrier(world)
    if world.is_main:
        unique = {name for name, _ in model.named_parameters()}
        aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
        save_file({k: v.contiguous() for k, v in full.items() if k not in aliases}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        torch.save(state, tmp / STATE)
        _commit(tmp, step, keep_last)
    distributed.barrier(world)  # nobody reads or writes checkpoints before the rename
    return directory / f"step_{step:06d}"


def _temporary(directory: Path, step: int) -> Path:
    """A fresh hidden directory for checkpoint ``step``."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, step: int, keep_last: int) -> Path:
    """fsync every file in ``tmp``, write the manifest (sizes, sha256) last, rename ``tmp`` to
    ``step_N`` and delete all but the newest ``keep_last`` checkpoints."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(path)
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    for folder in (p for p in tmp.rglob("*") if p.is_dir()):
        fsync_path(folder)
    fsync_path(tmp)
    directory, final = tmp.parent, tmp.parent / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Completed checkpoints (renamed into place), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("step_*"):
        suffix = path.name[len("step_"):]
        if path.is_dir() and suffix.isdigit():
            found.append(Checkpoint(path, int(suffix)))
    return sorted(found, key=lambda c: c.step)


def verify(ckpt: Checkpoint) -> None:
    """Raise CheckpointError when a file is missing, truncated or altered."""
    manifest_path = ckpt.path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{ckpt.path}: manifest missing or unreadable") from None
    for name, info in manifest.get("files", {}).items():
        path = ckpt.path / name
        if not path.is_file():
            raise CheckpointError(f"{ckpt.path}: {name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{ckpt.path}: {name} is truncated ({path.stat().st_size} of {info['bytes']} bytes)"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{ckpt.path}: {name} is corrupt (checksum mismatch)")


def load_weights(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load a safetensors file into ``model``; return (missing, unexpected) names, where a
    parameter tied to a loaded one (the LM head) does not count as missing. Scalars saved
    0-dim (DyT alpha, BHyT lam, the embedding scale, before they became shape (1,) for FSDP2)
    are reshaped to the model's shape. Weights of another shape than the model's (a checkpoint
    of another config) are a CheckpointError naming the first."""
    state = load_file(str(path))
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tensor.dim() == 0 and own[name].shape == (1,):
            state[name] = tensor.reshape(1)
    misfits = [name for name, tensor in state.items() if name in own and tensor.shape != own[name].shape]
    if misfits:
        name = misfits[0]
        raise CheckpointError(f"{path}: {len(misfits)} weights do not fit the model's config, e.g. {name} is "
                              f"{tuple(state[name].shape)} there and {tuple(own[name].shape)} in the model "
                              "(a checkpoint of another config, or an edited config.yaml)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[name].data_ptr() for name in state if name in own}
    return [name for name in missing if own[name].data_ptr() not in loaded], list(unexpected)


def load_checkpoint(ckpt: Checkpoint, model: nn.Module) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the trainer state."""
    verify(ckpt)
    return load_verified(ckpt, model)


def load_verified(ckpt: Checkpoint, model: nn.Module) -> dict[str, Any]:
    """``load_checkpoint`` without the verification (done already)."""
    missing, unexpected = load_weights(model, ckpt.path / WEIGHTS)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return torch.load(ckpt.path / STATE, map_location="cpu", weights_only=True)


def is_sharded(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` holds ``torch.distributed.checkpoint`` shards (an FSDP run's)."""
    return (ckpt.path / SHARDED).is_dir()


def load_sharded(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: load model and optimizer from ``sharded/`` (resharded to however many
    processes and whatever wrapping load it: FSDP, DDP or none) and return the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process without a process group is meant, not a mistake
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(loaded, checkpoint_id=ckpt.path / SHARDED, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    return torch.load(ckpt.path / STATE, map_location="cpu", weights_only=True)


def load_full_into_sharded(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
                           plain: nn.Module, plain_optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: load a one-file checkpoint (single-process or DDP run) into an FSDP ``model``
    and ``optimizer``, through an unsharded copy (``plain``, built like ``model``) that maps
    the optimizer's parameter indices to names; each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    state = load_verified(ckpt, plain)
    plain_optimizer.load_state_dict(state.pop("optimizer"))
    model_state, optimizer_state = get_state_dict(plain, plain_optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
    return state


def latest_verified(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies. A bad one is reported, moved aside to
    ``corrupt-step_N`` (never deleted) and the previous good one used instead."""
    for ckpt in reversed(list_checkpoints(directory)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as err:
            aside = ckpt.path.with_name(f"corrupt-{ckpt.path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt.path, aside)
            warnings.warn(f"skipping checkpoint {ckpt.path.name}: {err}; moved to {aside.name}",
                          stacklevel=2)
    return None
