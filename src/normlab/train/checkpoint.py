"""Atomic checkpoints: safetensors weights + trainer state, verified by a manifest on load.

Layout: ``RUN/checkpoints/step_000100/{model.safetensors, trainer.pt, manifest.json}``. A
checkpoint is written into a hidden temporary directory, every file is fsynced, the manifest
(sizes and sha256 of the other files) is written last, and the directory is renamed into place,
so a kill at any moment leaves either the whole checkpoint or none. Loading never unpickles
arbitrary objects (safetensors, and ``torch.load(weights_only=True)``).
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
from safetensors.torch import load_file, save_model
from torch import nn

from normlab.errors import CheckpointError

WEIGHTS, STATE, MANIFEST = "model.safetensors", "trainer.pt", "manifest.json"


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
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:06d}"
    tmp = directory / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    files = {}
    for name in (WEIGHTS, STATE):
        fsync_path(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    fsync_path(tmp)
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
    are reshaped to the model's shape."""
    state = load_file(str(path))
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tensor.dim() == 0 and own[name].shape == (1,):
            state[name] = tensor.reshape(1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[name].data_ptr() for name in state if name in own}
    return [name for name in missing if own[name].data_ptr() not in loaded], list(unexpected)


def load_checkpoint(ckpt: Checkpoint, model: nn.Module) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the trainer state."""
    verify(ckpt)
    missing, unexpected = load_weights(model, ckpt.path / WEIGHTS)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return torch.load(ckpt.path / STATE, map_location="cpu", weights_only=True)


def load_latest(directory: Path, model: nn.Module) -> tuple[Checkpoint, dict[str, Any]] | None:
    """Load the newest checkpoint that verifies. A bad one is reported, moved aside to
    ``corrupt-step_N`` (never deleted) and the previous good one used instead."""
    for ckpt in reversed(list_checkpoints(directory)):
        try:
            return ckpt, load_checkpoint(ckpt, model)
        except (CheckpointError, RuntimeError, ValueError) as err:
            aside = ckpt.path.with_name(f"corrupt-{ckpt.path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt.path, aside)
            warnings.warn(f"skipping checkpoint {ckpt.path.name}: {err}; moved to {aside.name}",
                          stacklevel=2)
    return None
