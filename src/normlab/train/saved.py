"""A trained (or imported) run read back for use: its config, its model at a checkpoint and its
tokenizer. Evaluation, generation, diagnostics and export all start here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from normlab.config import RunConfig
from normlab.data import Tokenizer, load_tokenizer
from normlab.errors import CheckpointError
from normlab.nn.model import NormLM, build_model
from normlab.plugins import load_recorded
from normlab.train.checkpoint import list_checkpoints, load_checkpoint
from normlab.train.rundir import RunDir


@dataclass
class SavedRun:
    path: Path
    config: RunConfig
    model: NormLM  # in eval mode
    step: int  # the checkpoint's optimizer step

    def tokenizer(self, progress: bool = False) -> Tokenizer:
        """The run's tokenizer: ``RUN/tokenizer`` (saved by the trainer), else rebuilt from the
        data config (runs from before it was saved; a trained ``bpe:N`` comes from the cache)."""
        saved = RunDir(self.path).tokenizer_path
        if saved.is_dir():
            return load_tokenizer(saved)
        from normlab.train.trainer import load_data

        return load_data(self.config.data, progress)[1]


def load_run(run_dir: str | Path, step: int | None = None, device: str = "cpu") -> SavedRun:
    """The run in ``run_dir`` with the weights of checkpoint ``step`` (default: the newest), on
    ``device`` ('auto': CUDA when available), after loading the plugins it was trained with."""
    from normlab.device import pick_device

    target = pick_device(device, "--device")
    run = RunDir(run_dir)
    if not run.exists():
        raise CheckpointError(f"'{run.path}' holds no normlab run (no config.yaml)")
    load_recorded(run.read_plugins(), run.path)
    cfg = RunConfig.from_dict(run.read_config())
    checkpoints = list_checkpoints(run.checkpoints)
    if not checkpoints:
        raise CheckpointError(f"'{run.path}' has no checkpoint yet")
    if step is None:
        ckpt = checkpoints[-1]
    else:
        matches = [c for c in checkpoints if c.step == step]
        if not matches:
            raise CheckpointError(
                f"'{run.path}' has no checkpoint at step {step} (have {', '.join(str(c.step) for c in checkpoints)})")
        ckpt = matches[0]
    model = build_model(cfg.model)
    load_checkpoint(ckpt, model)
    return SavedRun(run.path, cfg, model.to(target).eval(), ckpt.step)
