"""Training: optimizer and schedule, atomic checkpoints, run directories, the trainer loop."""

from normlab.train.rundir import RunDir
from normlab.train.trainer import TrainResult, train

__all__ = ["RunDir", "TrainResult", "train"]
