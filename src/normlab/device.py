"""Device names in configs and options ('auto', 'cpu', 'cuda', 'cuda:N' or 'mps') and the host
allocator setting that CPU training relies on."""

from __future__ import annotations

import ctypes
import os
import platform

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


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (mmap and trim thresholds raised to 1 GiB)
    and return whether it did.

    By default glibc hands every freed block above its mmap threshold (at most 32 MiB) back to
    the kernel, so each new tensor that large page-faults on first touch: 8,193 faults and
    10 ms for a fresh 32 MiB tensor where copying into an existing one takes 0.7 ms, and a train
    step at vocab 50,257 (d_model 256, batch 8 x 256, 2 threads) page-faulted about 350,000 times,
    none with this setting and the chunked loss (1.77 -> 1.50 s, one process, interleaved;
    separate processes with the formula's loss: 1.81-1.88 s without, 1.50-1.79 s with). jemalloc and
    tcmalloc keep such memory by design. Not applied when the user set ``MALLOC_*`` or
    ``GLIBC_TUNABLES`` (their choice stands), off glibc, on a glibc that refuses the 1 GiB
    threshold, or with ``NORMLAB_KEEP_FREED_MEMORY=0``."""
    if (os.environ.get("NORMLAB_KEEP_FREED_MEMORY") == "0" or platform.libc_ver()[0] != "glibc"
            or "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # an older glibc caps the mmap threshold at 32 MiB and refuses 1 GiB: then nothing is set (a
    # 32 MiB threshold would leave the tensors that need it on mmap)
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
