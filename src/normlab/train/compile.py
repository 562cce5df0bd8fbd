"""``train.compile: auto``: compile the model only where a measurement on this machine says it pays.

torch.compile costs seconds to minutes up front and may make a step faster or slower (on a
2-core CPU one tiny model's step went from 411 ms eager to 493 ms compiled, after 74 s of
compiling). So ``auto`` never assumes: it keeps one measurement per *signature* (torch version,
device, threads, model config, batch, seq_len, precision) in ``CACHE/compile.json``:
``compile_s`` (the first compiled step minus an eager one), ``eager_s`` and ``compiled_s`` (median
step times). Break-even:

    compile  iff  steps_left * (eager_s - compiled_s) > compile_s

With no measurement yet, a run that ``auto`` sees for the first time measures it on itself:
``PROBE_STEPS`` eager steps, then the same number compiled, then keeps whichever path the rule
picks for the rest (the steps are real training steps; only the compile time is extra, paid once
per signature).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.train.checkpoint import atomic_write_text

#: steps timed on each path when a signature has no measurement
PROBE_STEPS = 3


@dataclass(frozen=True)
class CompileMeasurement:
    compile_s: float  # extra time of the first compiled step
    eager_s: float  # median eager step
    compiled_s: float  # median compiled step after the first

    def pays(self, steps_left: int) -> bool:
        """steps_left * (eager_s - compiled_s) > compile_s."""
        return steps_left * (self.eager_s - self.compiled_s) > self.compile_s


def signature(cfg: Any, device: torch.device) -> str:
    """What a measurement holds for: torch, device, threads, model and the step's shape."""
    key = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "model": cfg.model.to_dict(), "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
           "grad_accum": cfg.train.grad_accum, "precision": cfg.train.precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class CompileLog:
    """``CACHE/compile.json``: signature -> CompileMeasurement."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / "compile.json"

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> CompileMeasurement | None:
        entry = self._read().get(key)
        return CompileMeasurement(**entry) if entry else None

    def put(self, key: str, measurement: CompileMeasurement) -> None:
        entries = self._read()
        entries[key] = asdict(measurement)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(entries, indent=1) + "\n")


def measure(eager_times: list[float], compiled_times: list[float]) -> CompileMeasurement:
    """From step times on both paths (the first compiled one includes compiling)."""
    eager = statistics.median(eager_times)
    compiled = statistics.median(compiled_times[1:]) if len(compiled_times) > 1 else compiled_times[0]
    return CompileMeasurement(max(0.0, compiled_times[0] - eager), eager, compiled)
