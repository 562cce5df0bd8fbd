"""Device names in configs and options: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."""

from __future__ import annotations

import torch

from normlab.errors import ConfigError


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'; a requested
    device that is not there is a ConfigError naming ``option``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}: '{name}' requested but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}: 'mps' requested but it is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: '{name}' is not auto, cpu, cuda, cuda:N or mps") from None
