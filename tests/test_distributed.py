"""torchrun on CPU: 2 gloo processes with DDP or FSDP2 follow the single-process run, and their
checkpoints resume on another number of processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from normlab.train.checkpoint import list_checkpoints
from normlab.train.rundir import RunDir
from normlab.train.saved import load_run

# grad_clip 0.5 clips every step (the norms are about 1), so the clipping norm must be the global one
ARGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=5",
        "train.save_every=5", "train.grad_accum=2", "train.record_every=5", "train.grad_clip=0.5"]
BHYT = [*ARGS, "model.strategy=bhyt"]  # BHyT's lam is a shape-(1,) parameter: one rank's shard is empty
PRE_NORM = [*ARGS, "model.strategy=pre_norm", "model.tie_embeddings=true"]


def normlab(*args, processes=1, tmp_path, env=None):
    env = {**os.environ, "NORMLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "normlab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def trained(tmp_path, name, args, steps=10, processes=1, resume=False, env=None):
    result = normlab("train", "--quiet", *(["--resume"] if resume else []), "--out", str(tmp_path / name),
                     *args, f"train.max_steps={steps}", processes=processes, tmp_path=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return RunDir(tmp_path / name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process BHyT run every distributed run is compared with."""
    tmp_path = tmp_path_factory.mktemp("single")
    return trained(tmp_path, "single", BHYT)


def assert_same_run(a: RunDir, b: RunDir, tol: float = 1e-4) -> None:
    """Same steps, losses, gradient norms (after clipping changed every step) and tokens."""
    x, y = a.read_metrics(), b.read_metrics()
    assert [r["step"] for r in y] == [r["step"] for r in x]
    for p, q in zip(x, y, strict=True):
        assert q["loss"] == pytest.approx(p["loss"], abs=tol)
        assert q["grad_norm"] == pytest.approx(p["grad_norm"], abs=tol)
        assert q["tokens"] == p["tokens"]
        assert q.get("val_loss", 0) == pytest.approx(p.get("val_loss", 0), abs=tol)


def assert_same_layer_stats(a: RunDir, b: RunDir) -> None:
    """layers.jsonl: per-layer gradient norms and residual statistics of the whole batch."""
    for p, q in zip(a.read_layer_stats(), b.read_layer_stats(), strict=True):
        assert q["step"] == p["step"]
        for group in ("attn", "ffn", "norm", "total"):
            assert q["grad_norm"][group] == pytest.approx(p["grad_norm"][group], rel=1e-4)
        for key in ("residual_rms", "residual_var", "residual_absmax"):
            assert q[key] == pytest.approx(p[key], rel=1e-5)


def stopped_at(run: RunDir, tmp_path, name: str, step: int) -> RunDir:
    """A copy of ``run`` as a kill right after checkpoint ``step`` leaves it: the later
    checkpoints are gone (the later log lines are dropped on resume)."""
    shutil.copytree(run.path, tmp_path / name)
    for ckpt in list_checkpoints(tmp_path / name / "checkpoints"):
        if ckpt.step > step:
            shutil.rmtree(ckpt.path)
    return RunDir(tmp_path / name)


def test_two_process_ddp_matches_single_process_and_resumes_on_one(tmp_path, single):
    ddp = trained(tmp_path, "ddp", BHYT, processes=2)
    assert_same_run(single, ddp, tol=1e-5)  # same global batches; only the reduction order differs
    assert [c.step for c in list_checkpoints(ddp.checkpoints)] == [5, 10]
    assert len(ddp.read_layer_stats()) == 3  # steps 1, 5, 10, written once each
    assert_same_layer_stats(single, ddp)
    # the global batch does not depend on the process count, so one process can carry on
    trained(tmp_path, "ddp", BHYT, steps=14, resume=True)
    assert [r["step"] for r in ddp.read_metrics()][-4:] == [11, 12, 13, 14]


def test_fsdp_matches_single_process_resumes_on_one_process_and_reads_back(tmp_path, single):
    fsdp = trained(tmp_path, "fsdp", [*BHYT, "train.distributed=fsdp"], processes=2)
    assert_same_run(single, fsdp)
    assert_same_layer_stats(single, fsdp)  # sharded gradients and split batches reduced over ranks
    last = list_checkpoints(fsdp.checkpoints)[-1].path
    assert (last / "sharded" / ".metadata").is_file() and "optimizer" not in torch.load(
        last / "trainer.pt", weights_only=True)
    # stopped after step 5, resumed in one plain process or on 2 again: the uninterrupted run
    resumed = stopped_at(fsdp, tmp_path, "resumed", 5)
    trained(tmp_path, "resumed", [*BHYT, "train.distributed=fsdp"], resume=True)
    assert_same_run(single, resumed)
    again = stopped_at(fsdp, tmp_path, "again", 5)
    trained(tmp_path, "again", [*BHYT, "train.distributed=fsdp"], processes=2, resume=True)
    assert_same_run(single, again)
    # the gathered model.safetensors is what evaluate, diagnose and export read
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = load_run(single.path).model(ids)
    for run in (fsdp, resumed, again):
        assert torch.allclose(load_run(run.path).model(ids), expected, atol=1e-4)


def test_fsdp_with_tied_embeddings_matches_and_resumes_a_single_process_checkpoint(tmp_path):
    """Also the chunked loss (nn/loss.py, forced on: 1000 logits per chunk) under FSDP against
    the single process's formula: the tied head's gradient reaches the sharded embedding."""
    single = trained(tmp_path, "single", PRE_NORM)
    fsdp = trained(tmp_path, "fsdp", [*PRE_NORM, "train.distributed=fsdp"], processes=2,
                   env={"NORMLAB_LOSS_CHUNK_ELEMENTS": "1000"})
    assert_same_run(single, fsdp)
    # a one-file checkpoint goes into FSDP shards too (optimizer state mapped by parameter name)
    switched = stopped_at(single, tmp_path, "switched", 5)
    trained(tmp_path, "switched", [*PRE_NORM, "train.distributed=fsdp"], processes=2, resume=True)
    assert_same_run(single, switched)


def test_bad_distributed_mode_is_one_line_exit_2(tmp_path, capsys):
    from normlab.cli import main

    assert main(["train", "--quiet", "--out", str(tmp_path / "bad"), *BHYT, "train.distributed=zero3"]) == 2
    message = "normlab: error: train.distributed: unknown value 'zero3'; choose one of ddp, fsdp"
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "bad").exists()


def test_batch_not_divisible_by_processes(tmp_path):
    result = normlab("train", "--quiet", "--out", str(tmp_path / "odd"), *BHYT, "train.batch_size=3",
                     "train.max_steps=2", processes=2, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "train.batch_size: 3 is not divisible by the 2 processes" in result.stderr
    # torchrun's agent prints its own traceback for a failed child; none comes from normlab
    assert "/normlab/" not in "".join(line for line in result.stderr.splitlines() if line.strip().startswith("File"))
