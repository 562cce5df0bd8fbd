"""DDP under torchrun: 2 CPU processes with the gloo backend follow the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from normlab.train.checkpoint import list_checkpoints
from normlab.train.rundir import RunDir

ARGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=5",
        "train.save_every=5", "train.grad_accum=2", "train.record_every=5", "model.strategy=bhyt"]


def normlab(*args, processes=1, tmp_path):
    env = {**os.environ, "NORMLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "normlab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_two_process_ddp_matches_single_process_and_resumes_on_one(tmp_path):
    single = normlab("train", "--quiet", "--out", str(tmp_path / "single"), *ARGS, "train.max_steps=10",
                     tmp_path=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = normlab("train", "--quiet", "--out", str(tmp_path / "ddp"), *ARGS, "train.max_steps=10",
                  processes=2, tmp_path=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("finished at step 10") == 1  # one line, from rank 0
    a, b = RunDir(tmp_path / "single").read_metrics(), RunDir(tmp_path / "ddp").read_metrics()
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b, strict=True):  # same global batches; only the reduction order differs
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["tokens"] == x["tokens"]
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)
    assert [c.step for c in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [5, 10]
    assert len(RunDir(tmp_path / "ddp").read_layer_stats()) == 3  # steps 1, 5, 10, written once each
    # the global batch does not depend on the process count, so one process can carry on
    more = normlab("train", "--quiet", "--resume", "--out", str(tmp_path / "ddp"), *ARGS, "train.max_steps=14",
                   tmp_path=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [r["step"] for r in RunDir(tmp_path / "ddp").read_metrics()][-4:] == [11, 12, 13, 14]


def test_batch_not_divisible_by_processes(tmp_path):
    result = normlab("train", "--quiet", "--out", str(tmp_path / "odd"), *ARGS, "train.batch_size=3",
                     "train.max_steps=2", processes=2, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "train.batch_size: 3 is not divisible by the 2 processes" in result.stderr
    # torchrun's agent prints its own traceback for a failed child; none comes from normlab
    assert "/normlab/" not in "".join(line for line in result.stderr.splitlines() if line.strip().startswith("File"))
