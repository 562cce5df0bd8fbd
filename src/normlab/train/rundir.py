"""A run directory: ``config.yaml``, ``plugins.json``, ``status.json``, ``metrics.jsonl``, ``tokenizer/``,
``checkpoints/``.

Reports and diagnostics read runs only through this module.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from normlab.config import load_yaml
from normlab.errors import CheckpointError
from normlab.train.checkpoint import atomic_write_text

STATUSES = ("running", "finished", "diverged", "failed", "interrupted")


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.plugins_path = self.path / "plugins.json"
        self.status_path = self.path / "status.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.layers_path = self.path / "layers.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.tokenizer_path = self.path / "tokenizer"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def create(self) -> None:
        """Make the directory and prove it is writable (one clear error instead of a late crash)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"cannot write to '{self.path}': {err.strerror or err}") from None

    # ---------------------------------------------------------------- config and status
    def read_config(self) -> dict[str, Any]:
        """The run's config.yaml; unreadable or invalid YAML is a one-line ConfigError."""
        return load_yaml(self.config_path)

    def write_config(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False))

    def read_plugins(self) -> list[dict[str, str]]:
        """The plugins the run was trained with (``normlab.plugins.record``); [] when none."""
        if not self.plugins_path.is_file():
            return []
        return json.loads(self.plugins_path.read_text())

    def write_plugins(self, records: list[dict[str, str]]) -> None:
        atomic_write_text(self.plugins_path, json.dumps(records, indent=1) + "\n")

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {"status": "missing"}

    def write_status(self, status: str, **info: Any) -> None:
        assert status in STATUSES, status
        record = {"status": status, **info, "pid": os.getpid(), "updated": time.time()}
        atomic_write_text(self.status_path, json.dumps(record, indent=1) + "\n")

    # ---------------------------------------------------------------- metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def read_layer_stats(self) -> list[dict[str, Any]]:
        """Per-layer gradient norms and residual statistics recorded during training."""
        return read_jsonl(self.layers_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()

    def truncate_logs(self, last_step: int) -> None:
        """Drop metrics and layer records after ``last_step`` (a resumed run logs them again)."""
        for path in (self.metrics_path, self.layers_path):
            if path.is_file():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines file; a line cut by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
