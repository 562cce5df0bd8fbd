"""Diagnostics: angular distance, layer drop, gradient norms, BHyT statistic, diagnose, stability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from normlab import ModelConfig, build_model
from normlab.cli import main
from normlab.config import RunConfig
from normlab.diagnostics import diagnose, measures
from normlab.diagnostics.stability import stability
from normlab.train.trainer import run_config, train

TINY = ["model.d_model=32", "model.n_layers=3", "model.n_heads=2", "model.max_seq_len=32",
        "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2", "train.max_steps=12",
        "train.eval_every=6", "train.eval_batches=2", "train.log_every=3", "train.save_every=6"]


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "normlab-cache"))


def small_model(strategy="pre_norm", **fields):
    return build_model(ModelConfig.from_strategy(strategy, vocab_size=40, d_model=32, n_layers=3, n_heads=2,
                                                 max_seq_len=16, **fields), seed=0)


def batches(n=2, vocab=40):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, vocab, (2, 16), generator=gen), torch.randint(0, vocab, (2, 16), generator=gen))
            for _ in range(n)]


def test_angular_distance_values():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert measures.angular_distance(a, a).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    b = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, -1.0]])
    assert measures.angular_distance(a, b).tolist() == pytest.approx([0.5, 0.5])
    assert measures.angular_distance(a, -a).tolist() == pytest.approx([1.0, 1.0])
    assert measures.angular_distance(a, torch.tensor([[0.5, 0.5 * math.sqrt(3), 0.0]] * 2))[0].item() == pytest.approx(1 / 3)
    assert measures.angular_distance(torch.zeros(1, 3), a[:1]).item() == 0.5  # undefined -> 0.5


def test_angular_distance_matrix_geometry():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

    def state(v):  # (B=2, T=3, d=2); only the last token matters
        s = torch.randn(2, 3, 2)
        s[:, -1] = v
        return s

    matrix = measures.angular_distance_matrix([[state(e1), state(e2), state(e1)]])
    assert matrix.shape == (2, 2)
    assert matrix[0, 0] == pytest.approx(0.5) and matrix[0, 1] == pytest.approx(0.0)
    assert matrix[1, 0] == pytest.approx(0.5) and np.isnan(matrix[1, 1])


def test_dropping_a_block_with_zero_outputs_changes_nothing():
    model = small_model().eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    drop = measures.layer_drop(model, batches())
    assert drop["layers"][1]["delta_loss"] == 0.0 and drop["layers"][1]["delta_ppl"] == 0.0
    assert abs(drop["layers"][0]["delta_loss"]) > 1e-4 and abs(drop["layers"][2]["delta_loss"]) > 1e-4
    assert len(model.model.layers) == 3 and not isinstance(model.model.layers[1], measures._SkipBlock)


def test_gradient_norms_over_batches_match_direct_computation():
    model = small_model("mixln")
    data = batches(3)
    norms = measures.gradient_norms(model, data)
    loss = sum(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in data) / 3
    loss.backward()
    direct = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in block.parameters()))
              for block in model.model.layers]
    assert norms["total"] == pytest.approx(direct, rel=1e-5)
    for i in range(3):
        assert norms["total"][i] ** 2 == pytest.approx(sum(norms[g][i] ** 2 for g in ("attn", "ffn", "norm")), rel=1e-6)


def test_bhyt_approximation_is_exact_when_attention_output_vanishes():
    model = small_model("bhyt").eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
    model.refresh_bhyt_constants()
    rows = measures.bhyt_statistic_check(model, batches())
    assert [r["c_attn"] for r in rows] == [0.0, 0.0, 0.0]
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=1e-12)
        assert r["mean_approx"] == pytest.approx(r["mean_exact"], rel=1e-12)
    trained_like = small_model("bhyt").eval()
    rows = measures.bhyt_statistic_check(trained_like, batches())
    assert all(r["c_attn"] > 0 and r["ratio"] != pytest.approx(1.0, abs=1e-9) for r in rows)
    assert measures.bhyt_statistic_check(small_model(), batches()) is None


def test_tanh_saturation_share():
    model = small_model("dyt").eval()
    site = model.model.layers[0].input_layernorm
    with torch.no_grad():
        site.alpha.fill_(1e4)
    entries = {(e["layer"], e["slot"]): e for e in measures.norm_io(model, batches())}
    assert entries[(0, "input_layernorm")]["saturation"] > 0.99
    assert entries[(1, "post_attention_layernorm")]["saturation"] < 0.5
    rms = {(e["layer"], e["slot"]): e for e in measures.norm_io(small_model(), batches())}
    assert rms[(0, "input_layernorm")]["saturation"] is None and len(rms[(0, "input_layernorm")]["x"]) == 1500
    bhyt = {(e["layer"], e["slot"]): e for e in measures.norm_io(small_model("bhyt"), batches())}
    # lambda/kappa = 0.2 bounds BHyT's arguments well inside tanh's linear range at init
    assert bhyt[(2, "post_attention_layernorm")]["saturation"] == 0.0


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    import os

    os.environ["NORMLAB_CACHE"] = str(root / "cache")
    runs = {}
    for strategy in ("pre_norm", "bhyt"):
        runs[strategy] = root / strategy
        train(run_config(RunConfig.load(None, [*TINY, f"model.strategy={strategy}"])), runs[strategy], progress=False)
    return root, runs


def test_diagnose_writes_every_diagnostic(trained_runs):
    root, runs = trained_runs
    out = root / "diag-bhyt"
    result = diagnose(runs["bhyt"], out, batches=2, progress=False)
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved["step"] == 12 and saved["n_layers"] == 3
    for key in ("gradient_norms", "residual", "angular_distance", "layer_drop", "norm_saturation", "bhyt_statistic"):
        assert saved[key], key
    assert len(saved["residual"]["rms"]) == 4 and len(saved["gradient_norms"]["attn"]) == 3
    matrix = saved["angular_distance"]
    assert len(matrix) == 3 and matrix[2][1] is None and 0 < matrix[0][0] < 1
    assert all(-1 <= r["pearson_r"] <= 1 for r in saved["bhyt_statistic"])
    assert {p.name for p in out.glob("*.png")} == {
        "gradient_norms.png", "residual.png", "angular_distance.png", "layer_drop.png", "norm_io.png",
        "bhyt_statistic.png"}
    summary = (out / "summary.md").read_text()
    assert f"{result['layer_drop']['base_loss']:.4f}" in summary and "Pearson r" in summary
    older = diagnose(runs["pre_norm"], root / "diag-pre", step=6, batches=1, progress=False)
    assert older["step"] == 6 and older["bhyt_statistic"] is None


def test_diagnose_bad_input_exit_2(trained_runs, tmp_path, capsys):
    """The CLI's main in this process (a new interpreter would spend seconds on imports)."""
    root, runs = trained_runs
    assert main(["diagnose", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no normlab run" in err and err.count("\n") == 1
    assert main(["diagnose", str(runs["pre_norm"]), "--out", str(tmp_path / "o"), "--checkpoint", "5"]) == 2
    assert "no checkpoint at step 5 (have 6, 12)" in capsys.readouterr().err


def test_stability_marks_absurd_lr_as_diverged(tmp_path):
    raw = RunConfig.load(None, [*TINY, "train.max_steps=8", "train.warmup_steps=0", "train.grad_clip=0"])
    out = tmp_path / "new-dir"
    path, statuses = stability(raw, ["pre_norm", "post_norm"], [3e-3, 30.0], [2], [0], out, progress=False, jobs=2)
    assert sorted(statuses.values()) == ["diverged", "diverged", "finished", "finished"]
    result = json.loads((out / "stability.json").read_text())
    for strategy in ("pre_norm", "post_norm"):
        assert result["grid"][strategy]["2|0.003"]["diverged"] == 0
        assert result["grid"][strategy]["2|0.003"]["val_loss"] is not None
        assert result["grid"][strategy]["2|30.0"]["diverged"] == 1
    assert path.read_bytes()[:4] == b"\x89PNG"
    table = (out / "stability.md").read_text()
    assert "| 2 | " in table and "✕1" in table
    # resumable: a second call (in-process this time) trains nothing
    stamp = (out / "runs" / "pre_norm-L2-lr0.003-s0" / "metrics.jsonl").stat().st_mtime_ns
    stability(raw, ["pre_norm", "post_norm"], [3e-3, 30.0], [2], [0], out, progress=False)
    assert (out / "runs" / "pre_norm-L2-lr0.003-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("ending", ["failed", "interrupted"])
def test_stability_exit_status_when_a_run_fails_or_is_interrupted(tmp_path, monkeypatch, capsys, ending):
    """A failed run: the map is drawn from the others and the exit status is 1. An interrupted
    one (Ctrl-C): no map from part of the grid, exit status 130, and the next call resumes."""
    from normlab.compare import sweep
    from normlab.train.trainer import TrainResult

    def second_run_ends(config, out, **options):
        if "lr0.003" in str(out):
            return train(config, out, **options)
        if ending == "failed":
            raise RuntimeError("out of memory")
        return TrainResult("interrupted", 0, "stopped by a signal")

    monkeypatch.setattr(sweep, "train", second_run_ends)
    args = ["stability", "--strategies", "pre_norm", "--lrs", "3e-3,1e-2", "--depths", "2", "--seeds", "0",
            "--out", str(tmp_path), "-q", *(o for o in TINY if not o.startswith("model.n_layers="))]
    assert main(args) == (1 if ending == "failed" else 130)
    err = capsys.readouterr().err
    assert f"runs: 1 finished, 1 {ending}" in err
    assert (tmp_path / "stability.png").exists() == (ending == "failed")
    if ending == "interrupted":
        assert "run the same command again to resume" in err
        monkeypatch.setattr(sweep, "train", train)
        assert main(args) == 0
        assert json.loads((tmp_path / "stability.json").read_text())["grid"]["pre_norm"]["2|0.01"]["n"] == 1


def test_stability_marks_a_run_that_cannot_learn_as_stalled(tmp_path):
    raw = RunConfig.load(None, [*TINY, "model.n_layers=2"])  # evaluated at steps 6 and 12
    out = tmp_path / "stab"
    path, _ = stability(raw, ["pre_norm"], [3e-3, 1e-7], [2], [0], out, progress=False)
    result = json.loads((out / "stability.json").read_text())
    assert result["unigram_loss"] == pytest.approx(3.292, abs=1e-3)  # the default corpus, bytes
    learning, stuck = result["grid"]["pre_norm"]["2|0.003"], result["grid"]["pre_norm"]["2|1e-07"]
    assert (learning["stalled"], learning["diverged"]) == (0, 0)
    assert (stuck["stalled"], stuck["diverged"]) == (1, 0) and stuck["runs"][0]["status"] == "stalled"
    assert stuck["val_loss"] > result["unigram_loss"]  # still the cell's number: a stall is data
    table = (out / "stability.md").read_text()
    assert " ≈1 |" in table and "≈k = k runs stalled" in table
    assert path.read_bytes()[:4] == b"\x89PNG"
