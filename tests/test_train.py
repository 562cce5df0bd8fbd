"""Trainer: exact resume after SIGKILL, checkpoint fallback, determinism, divergence, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.cli import main
from normlab.config import RunConfig, TrainConfig
from normlab.errors import CheckpointError
from normlab.train.checkpoint import list_checkpoints, save_checkpoint
from normlab.train.optim import build_optimizer, lr_factor, param_groups
from normlab.train.rundir import RunDir
from normlab.train.trainer import run_config, train

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
    "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=5", "train.lr=3e-3",
    "train.eval_batches=2", "train.log_every=1",
]


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    """One shard cache for the whole module, outside the user's home."""
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "normlab-cache"))


def raw(*overrides: str) -> RunConfig:
    """The tiny test config with ``overrides``, resolved as ``normlab train`` resolves it."""
    return run_config(RunConfig.load(None, [*TINY, *overrides]), progress=False)


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in RunDir(run).read_metrics()]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], capture_output=True,
                          text=True, env=env, **kwargs)


def test_lr_schedule_by_hand():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through cosine
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_scalars():
    from normlab import ModelConfig, build_model

    model = build_model(ModelConfig.from_strategy("bhyt", d_model=32, n_layers=2, n_heads=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.0.input_layernorm.lam" in no_decay_names
    assert "model.layers.1.post_attention_layernorm.weight" in no_decay_names
    assert "model.norm.weight" in no_decay_names
    assert all(n.endswith("proj.weight") or "embed" in n or "lm_head" in n
               for n in (names[id(p)] for p in decay["params"]))


def test_optimizer_is_fused_and_matches_the_reference_adamw():
    """build_optimizer's fused update equals torch's per-tensor AdamW (foreach=False, the reference
    loop) over steps with weight decay on matrices only."""
    from normlab import ModelConfig, build_model

    torch.manual_seed(0)
    fused_model = build_model(ModelConfig.from_strategy("pre_norm", d_model=32, n_layers=2, n_heads=2))
    loop_model = copy.deepcopy(fused_model)
    start = copy.deepcopy(fused_model.state_dict())
    settings = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(fused_model, settings)
    loop = torch.optim.AdamW(param_groups(loop_model, 0.1), lr=1e-2, betas=(settings.beta1, settings.beta2),
                             eps=1e-8, foreach=False)
    assert all(group["fused"] for group in fused.param_groups)
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            model(ids, targets=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = [name for name, p in fused_model.named_parameters() if not torch.equal(p, start[name])]
    assert "model.norm.weight" in moved and "model.layers.0.self_attn.q_proj.weight" in moved


def test_metrics_status_config_and_learning(tmp_path):
    run = tmp_path / "run"
    result = train(raw("train.max_steps=60", "train.eval_every=30", "train.save_every=30"), run,
                   progress=False)
    assert result.status == "finished" and result.step == 60
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records] == list(range(1, 61))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in records[0]
    assert records[-1]["tokens"] == 60 * 4 * 32
    assert [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    saved = RunConfig.from_dict(RunDir(run).read_config())
    assert saved.model.vocab_size == 257 and saved.model.bhyt_context_len == 32
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [30, 60]
    # resuming a finished run trains nothing more
    assert train(raw("train.max_steps=60", "train.eval_every=30", "train.save_every=30"), run,
                 resume=True, progress=False).step == 60
    assert len(RunDir(run).read_metrics()) == 60


def test_same_seed_same_losses_and_seed_changes_them(tmp_path):
    a = train(raw("train.max_steps=8", "model.strategy=hybridnorm_star"), tmp_path / "a", progress=False)
    b = train(raw("train.max_steps=8", "model.strategy=hybridnorm_star"), tmp_path / "b", progress=False)
    c = train(raw("train.max_steps=8", "model.strategy=hybridnorm_star", "train.seed=1"), tmp_path / "c",
              progress=False)
    assert a.status == b.status == c.status == "finished"
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_sigkill_and_resume_reproduce_every_logged_loss(tmp_path):
    """Kill at an arbitrary moment (after step 13 was logged), resume, compare bit-exactly."""
    args = ["train", "--out", None, "--quiet", *TINY, "train.max_steps=30", "train.save_every=4",
            "train.eval_every=10", "model.strategy=bhyt", "model.bhyt_refresh_every=3",
            "train.grad_accum=2"]
    reference = tmp_path / "reference"
    assert cli(*[a if a else str(reference) for a in args]).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "normlab.cli", *[a if a else str(killed) for a in args]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(RunDir(killed).read_metrics()) < 13:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(RunDir(killed).read_metrics())
    assert 13 <= logged < 30, "the run finished before it could be killed"
    assert RunDir(killed).read_status()["status"] == "running"

    resumed = cli(*[a if a else str(killed) for a in args], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(killed) == losses(reference)
    assert len(losses(reference)) == 30


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    overrides = ("train.max_steps=12", "train.save_every=4", "train.keep_last=3", "train.eval_every=6")
    train(raw(*overrides), tmp_path / "reference", progress=False)
    run = tmp_path / "run"
    train(raw(*overrides), run, progress=False)
    weights = run / "checkpoints" / "step_000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    RunDir(run).truncate_logs(9)  # as if killed after step 9 was logged
    RunDir(run).write_status("running", step=9)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step_000012: .*truncated"):
        result = train(raw(*overrides), run, resume=True, progress=False)
    assert result.status == "finished"
    assert (run / "checkpoints" / "corrupt-step_000012").is_dir()  # moved aside, not deleted
    assert losses(run) == losses(tmp_path / "reference")


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    """A checkpoint whose directory was never renamed into place is invisible to resume."""
    from normlab import ModelConfig, build_model

    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path, 5, model, {"step": 5}, keep_last=2)
    (tmp_path / ".tmp-step_000010").mkdir()
    assert [c.step for c in list_checkpoints(tmp_path)] == [5]
    for step in (10, 15):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [10, 15]
    state = torch.load(tmp_path / "step_000015" / "trainer.pt", weights_only=True)
    assert state == {"step": 15}


def test_divergence_is_marked_and_exits_3(tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--out", str(run), "--quiet", *TINY, "train.max_steps=20",
                 "train.save_every=2", "train.diverge_loss=7.0", "train.lr=0.5", "train.warmup_steps=0",
                 "train.grad_clip=0")  # starts at ln(257) = 5.5 and blows past 7 within a few steps
    assert result.returncode == 3, result.stderr
    status = RunDir(run).read_status()
    assert status["status"] == "diverged"
    good = status["step"]  # steps completed before the diverging one
    assert 1 <= good < 20
    assert status["reason"].startswith("loss ") and f"at step {good + 1} exceeds diverge_loss 7" in status["reason"]
    logged = RunDir(run).read_metrics()
    assert [r["step"] for r in logged] == list(range(1, good + 1))  # the diverged step is not logged
    assert all(r["loss"] <= 7.0 for r in logged)
    checkpoints = [c.step for c in list_checkpoints(run / "checkpoints")]
    assert checkpoints == [s for s in (good - good % 2 - 2, good - good % 2) if s > 0]  # last good ones kept
    assert "diverged (loss" in result.stderr and f"last good step {good}" in result.stderr


def test_nan_loss_marks_diverged(tmp_path):
    result = train(raw("train.max_steps=30", "train.lr=1e6", "train.warmup_steps=0", "train.grad_clip=0",
                       "train.diverge_loss=1e30"), tmp_path / "run", progress=False)
    assert result.status == "diverged" and result.exit_code == 3
    assert "nan" in result.reason.lower() or "inf" in result.reason.lower()


@pytest.mark.parametrize("overrides,message", [
    (["data.corpus=/nonexistent/corpus.txt"], "corpus '/nonexistent/corpus.txt'"),
    (["model.vocab_size=100"], "model.vocab_size: 100 is smaller than the tokenizer's vocabulary (257)"),
    (["train.seq_len=64"], "train.seq_len: 64 is above model.max_seq_len=32"),
    (["train.max_step=5"], "train.max_step: unknown key (did you mean 'max_steps'?)"),
    (["model.strategy=hybridnrom"], "did you mean 'hybridnorm'"),
    (["trian.lr=1"], "unknown section 'trian' (did you mean 'train'?)"),
    (["train.compile=sometimes"], "train.compile: expected true, false or auto, got 'sometimes'"),
    (["train.seed=99999999999999999999999"], "train.seed: 99999999999999999999999 is outside 0..18446744073709551615"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, overrides, message, capsys):
    """The CLI's main in this process (a new interpreter would spend seconds on imports; the
    exit status of a real process is checked by test_empty_corpus_and_non_utf8_bytes)."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--quiet", *TINY, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not (run / "config.yaml").exists()


def test_empty_corpus_and_non_utf8_bytes(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = cli("train", "--out", str(tmp_path / "a"), "--quiet", *TINY, f"data.corpus={empty}")
    assert result.returncode == 2 and "empty" in result.stderr
    noisy = tmp_path / "noisy.txt"
    noisy.write_bytes(("hello world " * 800).encode() + b"\xff\xfe bad bytes \xc3" + b" tail" * 100)
    result = cli("train", "--out", str(tmp_path / "b"), "--quiet", *TINY, f"data.corpus={noisy}",
                 "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert "3 " in result.stderr and "replace" in result.stderr


def test_output_dir_with_another_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--out", str(run), "--quiet", *TINY, "train.max_steps=2").returncode == 0
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    again = cli("train", "--out", str(run), "--quiet", *TINY, "train.max_steps=2")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    changed = cli("train", "--out", str(run), "--quiet", *TINY, "train.max_steps=2", "model.n_layers=3",
                  "--resume")
    assert changed.returncode == 2 and "model.n_layers 2 -> 3" in changed.stderr
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    result = cli("train", "--out", str(stranger), "--quiet", *TINY)
    assert result.returncode == 2 and "holds no normlab run" in result.stderr
    assert (stranger / "notes.txt").read_text() == "mine"


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("train", "--out", str(blocker / "run"), "--quiet", *TINY)
    assert result.returncode == 2 and "cannot write to" in result.stderr


def test_layer_grad_norms_add_up_to_the_global_norm():
    from normlab import ModelConfig, build_model
    from normlab.train.callbacks import ResidualProbe, layer_grad_norms

    model = build_model(ModelConfig.from_strategy("hybridnorm_star", d_model=32, n_layers=3, n_heads=2,
                                                  vocab_size=50))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with ResidualProbe(model) as probe:
        out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    norms = layer_grad_norms(model)
    for i in range(3):
        parts = sum(norms[g][i] ** 2 for g in ("attn", "ffn", "norm"))
        assert norms["total"][i] ** 2 == pytest.approx(parts, rel=1e-6)
        block = dict(model.model.layers[i].named_parameters())
        assert norms["norm"][i] ** 2 == pytest.approx(sum(
            p.grad.pow(2).sum().item() for n, p in block.items() if "norm" in n), rel=1e-6)
    outside = sum(p.grad.pow(2).sum().item() for n, p in model.named_parameters() if ".layers." not in n)
    global_sq = sum(p.grad.pow(2).sum().item() for p in model.parameters())
    assert sum(t ** 2 for t in norms["total"]) + outside == pytest.approx(global_sq, rel=1e-6)
    # residual statistics: entering each block, then leaving the last one
    hidden = out.hidden_states
    rms = [s[0] for s in probe.stats()]
    assert len(rms) == 4
    for i in range(3):
        assert rms[i] == pytest.approx(hidden[i].pow(2).mean().sqrt().item(), rel=1e-5)
    last = model.model.layers[2](hidden[2], model.model.rope_cos[:12], model.model.rope_sin[:12])
    assert rms[3] == pytest.approx(last.pow(2).mean().sqrt().item(), rel=1e-5)


def test_layer_stats_recorded_during_training(tmp_path):
    run = tmp_path / "run"
    train(raw("train.max_steps=10", "train.record_every=4", "model.n_layers=3"), run, progress=False)
    records = RunDir(run).read_layer_stats()
    assert [r["step"] for r in records] == [1, 4, 8, 10]
    assert all(len(r["residual_rms"]) == 4 and len(r["grad_norm"]["total"]) == 3 for r in records)


def test_raising_max_steps_on_resume_continues_on_the_longer_schedule(tmp_path):
    run = tmp_path / "run"
    train(raw("train.max_steps=10", "train.save_every=10"), run, progress=False)
    train(raw("train.max_steps=16", "train.save_every=10"), run, resume=True, progress=False)
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records] == list(range(1, 17))
    for r in records[10:]:  # step s (1-based) used lr * factor(s - 1) of the 16-step schedule
        assert r["lr"] == pytest.approx(3e-3 * lr_factor(r["step"] - 1, 5, 16, 0.1), rel=1e-9)


def test_unavailable_device_fails_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run = tmp_path / "run"
    result = cli("train", "--out", str(run), "--quiet", *TINY, "train.device=cuda")
    assert result.returncode == 2 and "train.device: 'cuda' requested but no CUDA device" in result.stderr
    assert not (run / "config.yaml").exists()


def test_resume_refuses_changed_corpus_contents(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    run = tmp_path / "run"
    train(raw("train.max_steps=4", "train.save_every=2", f"data.corpus={corpus}"), run, progress=False)
    corpus.write_text("an entirely different text about something else. " * 200)
    result = cli("train", "--out", str(run), "--quiet", "--resume", *TINY, "train.max_steps=6",
                 "train.save_every=2", f"data.corpus={corpus}")
    assert result.returncode == 2 and "the tokenized data differ" in result.stderr


def test_fields_added_after_a_run_was_written_are_not_changes():
    from normlab.config import RunConfig, config_changes

    new = RunConfig.from_dict({"model": {"strategy": "bhyt", "n_layers": 2}}, vocab_size=257).to_dict()
    old = {section: dict(values) for section, values in new.items()}
    for key in ("moe_experts", "moe_top_k", "moe_ffn_hidden", "moe_layers", "preset"):
        del old["model"][key]  # a config.yaml written before these fields existed
    assert config_changes(old, new) == []
    old["model"]["n_layers"] = 3
    assert config_changes(old, new) == ["model.n_layers 3 -> 2"]


def test_checkpoints_with_0_dim_scalars_still_load(tmp_path):
    """DyT's alpha and the embedding scale were saved 0-dim before they became shape (1,);
    such weights load into today's model, the tied LM head does not count as missing, and a
    wrong shape is still an error."""
    from safetensors.torch import save_file

    from normlab import ModelConfig, build_model
    from normlab.train.checkpoint import load_weights

    cfg = ModelConfig.from_strategy("dyt", d_model=32, n_layers=2, n_heads=2, tie_embeddings=True)
    old = build_model(cfg, seed=1)
    state = {k: (v.reshape(()) if v.shape == (1,) else v).clone() for k, v in old.state_dict().items()
             if k != "lm_head.weight"}
    assert state["model.embed_scale"].dim() == 0 and state["model.layers.0.input_layernorm.alpha"].dim() == 0
    save_file(state, str(tmp_path / "old.safetensors"))
    new = build_model(cfg, seed=2)
    assert load_weights(new, tmp_path / "old.safetensors") == ([], [])
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    torch.testing.assert_close(new(ids), old(ids), rtol=0, atol=0)
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 weights do not fit the model's config, e.g. model.norm.weight "
                       r"is \(3,\) there and \(32,\) in the model"):
        load_weights(new, tmp_path / "bad.safetensors")


def test_compile_break_even_by_hand():
    from normlab.train.compile import CompileMeasurement, measure

    m = CompileMeasurement(compile_s=10.0, eager_s=0.5, compiled_s=0.4)
    assert m.pays(101) and not m.pays(100)  # 101 * 0.1 s > 10 s of compiling; 100 * 0.1 is not
    assert not CompileMeasurement(1.0, 0.4, 0.5).pays(10**6)  # a slower compiled step never pays
    got = measure([1.0, 2.0, 3.0], [10.0, 1.5, 1.4])
    assert got == CompileMeasurement(compile_s=8.0, eager_s=2.0, compiled_s=pytest.approx(1.45))


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a wrapper that counts its calls (no compiling in the tests)."""
    calls = []

    def compile_(module):
        def compiled(*args, **kwargs):
            calls.append(1)
            return module(*args, **kwargs)
        return compiled

    monkeypatch.setattr("normlab.train.trainer.torch.compile", compile_)
    return calls


def test_compile_auto_follows_the_measured_break_even(tmp_path, fake_compile):
    """With a measurement for the run's signature, auto compiles exactly when it pays; without
    one, the run probes 3 eager and 3 compiled steps and records what it measured. The loss
    curve is the same either way (the fake compile is the identity)."""
    from normlab.train.compile import CompileLog, CompileMeasurement, signature
    from normlab.train.trainer import cache_root

    reference = tmp_path / "eager"
    train(raw("train.max_steps=10"), reference, progress=False)
    cfg = raw("train.max_steps=10", "train.compile=auto")
    log = CompileLog(cache_root(cfg.data))
    key = signature(cfg, torch.device("cpu"))
    log.put(key, CompileMeasurement(compile_s=100.0, eager_s=1.0, compiled_s=0.5))  # 10 steps save 5 s: no
    train(cfg, tmp_path / "slow-to-compile", progress=False)
    assert fake_compile == []
    log.put(key, CompileMeasurement(compile_s=1.0, eager_s=1.0, compiled_s=0.5))  # saves 5 s: yes
    train(cfg, tmp_path / "pays", progress=False)
    assert len(fake_compile) == 10  # every step (decided before the first)
    fake_compile.clear()
    path = log.path
    entries = json.loads(path.read_text())
    del entries[key]
    path.write_text(json.dumps(entries))
    train(cfg, tmp_path / "probe", progress=False)
    assert len(fake_compile) >= 3  # steps 4-6 probe the compiled path
    assert log.get(key) is not None  # and the measurement is recorded
    for run in ("slow-to-compile", "pays", "probe"):
        assert losses(tmp_path / run) == losses(reference)


FRESH_TENSOR_FAULTS = """
import resource, sys, torch
from normlab.device import keep_freed_host_memory
print(keep_freed_host_memory())
torch.empty(16 << 20).fill_(1)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_host_memory_is_reused_without_page_faults():
    """8 more 64 MiB tensors (16,384 pages each), each freed before the next: without the
    setting glibc returns each to the kernel and the next faults its pages in again; with it,
    at most one of them does (malloc may serve one from a second arena)."""
    def faults(**env):
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "NORMLAB_KEEP_FREED_MEMORY", "LD_PRELOAD"))}
        out = subprocess.run([sys.executable, "-c", FRESH_TENSOR_FAULTS], capture_output=True, text=True,
                             check=True, env={**clean, **env}).stdout.split()
        return out[0] == "True", int(out[1])

    applied, kept = faults()
    if not applied:
        pytest.skip("not glibc, or a glibc that refuses a 1 GiB mmap threshold")
    assert kept < 1.5 * 16384
    applied, returned = faults(NORMLAB_KEEP_FREED_MEMORY="0")
    assert not applied and returned > 6 * 16384  # what the setting saves
    assert faults(MALLOC_ARENA_MAX="2")[0] is False  # the user's own malloc settings stand


def test_step_floor_by_hand_and_below_a_measured_step():
    """Weights and AdamW's moments (12 bytes per parameter; 4 in a one-step run, whose moments
    appear only after its backward), then the larger of the gradients (4 bytes per parameter)
    and tokens x layers x 2 d_model activations; sharded over the processes under FSDP. And no
    more than one real train step holds (parameters, optimizer state and the step's peak),
    whether activations or gradients are the larger part."""
    from normlab.bench import TrainStep, step_memory
    from normlab.nn.model import build_model
    from normlab.train.memory import step_floor

    cases = [(strategy, ()) for strategy in ("pre_norm", "post_norm", "hybridnorm", "bhyt")]
    cases.append(("pre_norm", ("model.d_model=256", "train.batch_size=1", "train.seq_len=8")))  # gradients win
    for strategy, overrides in cases:
        cfg = raw(f"model.strategy={strategy}", *overrides)
        floor = step_floor(cfg.model, cfg.train)
        model = build_model(cfg.model)
        params = sum(p.numel() for p in model.parameters())
        tokens = cfg.train.batch_size * cfg.train.seq_len
        assert (floor.held, floor.gradients, floor.tokens) == (12 * params, 4 * params, tokens)
        assert floor.activations == tokens * cfg.model.n_layers * 2 * cfg.model.d_model * 4
        assert floor.total == 12 * params + max(4 * params, floor.activations)
        assert step_floor(cfg.model, TrainConfig(**{**vars(cfg.train), "max_steps": 1})).held == 4 * params
        sharded = step_floor(cfg.model, cfg.train, processes=2, sharded=True)
        assert (sharded.held, sharded.gradients) == (12 * (params // 2), 4 * (params // 2))
        if cfg.train.batch_size % 2 == 0:  # each of 2 processes takes half of the batch
            assert step_floor(cfg.model, cfg.train, processes=2).activations == floor.activations // 2
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len))
        step = TrainStep(model, ids)
        step()  # the optimizer's moments exist from the first step on
        measured = step_memory(step, torch.device("cpu"))
        assert floor.total <= measured["resident"] + measured["step_peak"], (strategy, overrides, floor, measured)
    assert floor.gradients > floor.activations  # the last case is the one it says


def test_a_run_that_cannot_fit_stops_before_allocating(tmp_path, capsys, monkeypatch):
    """A batch (or width) beyond the machine's memory is one line and exit status 1, a failed
    run (what the OOM killer's SIGKILL, exit 137 and no message, made of it before), refused
    before the model is built or the run directory made; the same --out then takes a run that
    fits."""
    import normlab.train.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the memory check")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "build_model", no_model)
        code = main(["train", "--out", str(run), "-q", *TINY, "train.batch_size=100000000"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "out of memory (a train step needs at least 1,638.4 GB" in err and "the CPU has" in err  # 1e8 x 32 x 2 x 64 x 4
    assert "a smaller train.batch_size with train.grad_accum raised as much keeps the tokens per step" in err
    assert not run.exists()
    assert main(["train", "--out", str(run), "-q", *TINY, "train.max_steps=2", "train.eval_every=2"]) == 0


def test_memory_capacity_takes_a_containers_limit_and_swap(tmp_path, monkeypatch):
    from normlab.train import memory

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, meminfo = tmp_path / "memory.max", tmp_path / "meminfo"
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (limit,))
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    meminfo.write_text("MemTotal:       1000 kB\nSwapTotal:       2048 kB\nSwapFree:        2048 kB\n")
    cpu = torch.device("cpu")
    for text, expected in (("max\n", physical), (f"{physical // 4}\n", physical // 4),
                           (f"{physical * 4}\n", physical)):
        limit.write_text(text)
        assert memory.memory_capacity(cpu) == expected + 2048 * 1024
    assert memory.memory_capacity(cpu, local_processes=2) == (physical + 2048 * 1024) // 2
    meminfo.unlink()  # no such file: no swap counted
    assert memory.memory_capacity(cpu) == physical
    assert memory.memory_capacity(torch.device("meta")) is None
    for value, expected in (("4", 4), ("", 1), ("two", 1), ("0", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)  # torchrun's processes on this machine
        assert memory.local_processes() == expected


def test_an_allocation_that_fails_is_one_line_and_a_failed_run(monkeypatch, capsys):
    """What the memory floor lets through can still fail to allocate: torch's CPU allocator's
    RuntimeError is one line and exit status 1, like the floor's MemoryError."""
    import normlab.cli

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(normlab.cli, "_cmd_train", allocate)
    assert main(["train", "--out", "unused", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: out of memory ([enforce fail") and len(err.strip().splitlines()) == 1
