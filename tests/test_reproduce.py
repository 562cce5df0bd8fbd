"""normlab reproduce: verdict rules, each claim's statistic on hand-made runs, the smoke budget end
to end (report files, verdicts, disclaimer, resume), a bad claim id, and the HTML rendering."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.errors import ConfigError
from normlab.reproduce import CLAIMS, select_claims
from normlab.reproduce.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    RunData,
    claim_verdict,
    effect_verdict,
    evaluate_claim,
)
from normlab.reproduce.report import SMOKE_DISCLAIMER
from test_compare import _chromium, assert_renders_in_chromium

ROOT = Path(__file__).resolve().parents[1]


def run(rms=(0.1, 1.0, 2.0), angular=(0.5, 0.1), drop=(1.0, 0.2), grads=(1.0, 1.0), val_loss=2.0,
        saturation=None, pearson=None) -> RunData:
    """A hand-made run with the fields the statistics read."""
    diagnostics = {
        "residual": {"rms": list(rms)},
        "angular_distance": [[d] for d in angular],
        "layer_drop": {"layers": [{"delta_loss": d} for d in drop]},
        "norm_saturation": [{"layer": i, "slot": "input_layernorm", "saturation": s}
                            for i, s in enumerate(saturation or [])],
        "bhyt_statistic": [{"pearson_r": r} for r in pearson] if pearson else None,
    }
    return RunData({"final_val_loss": val_loss, "status": "finished"},
                   layers=[{"step": 1, "grad_norm": {"total": list(grads)}}], diagnostics=diagnostics)


def test_effect_verdicts_on_hand_made_numbers():
    # mean 0.2, sd 0.1, t(0.975, 2) = 4.302653: CI 0.2 +- 0.248414 includes 0
    assert effect_verdict([0.1, 0.2, 0.3])["verdict"] == INCONCLUSIVE
    up = effect_verdict([1.0, 1.1, 1.2])
    assert up["verdict"] == REPRODUCED
    assert (up["low"], up["high"]) == pytest.approx((1.1 - 0.248414, 1.1 + 0.248414), rel=1e-5)
    assert effect_verdict([-1.0, -1.1, -1.2])["verdict"] == NOT_REPRODUCED
    assert effect_verdict([5.0])["verdict"] == INCONCLUSIVE  # one seed: no CI
    assert effect_verdict([])["verdict"] == INCONCLUSIVE
    e = {"verdict": REPRODUCED}
    assert claim_verdict({"a": e, "b": e}) == REPRODUCED
    assert claim_verdict({"a": e, "b": {"verdict": INCONCLUSIVE}}) == INCONCLUSIVE
    assert claim_verdict({"a": e, "b": {"verdict": NOT_REPRODUCED}}) == NOT_REPRODUCED


def test_residual_growth_statistics():
    # the embedding output (0.1) is not part of the growth: ln(4 / 1)
    stat = CLAIMS["1"].statistic({"pre_norm": run(rms=(0.1, 1.0, 2.0, 4.0))})
    assert stat == {"Pre-Norm ln RMS growth": pytest.approx(math.log(4))}
    gap = CLAIMS["15"].statistic({"pre_norm": run(rms=(0.1, 1, 8)), "dyt": run(rms=(1.5, 1, 4)),
                                  "bhyt": run(rms=(0.1, 1, 2))})
    assert gap == {"Pre-Norm − BHyT ln RMS growth": pytest.approx(math.log(4)),
                   "DyT − BHyT ln RMS growth": pytest.approx(math.log(2))}
    assert CLAIMS["15"].statistic({"pre_norm": run(), "dyt": run()})["DyT − BHyT ln RMS growth"] is None


def test_angular_and_layer_drop_statistic():
    # shallow half (0.6, 0.4) mean 0.5, deep half (0.2, 0.0) mean 0.1 -> +0.4; drop 2.0 vs 0.5 -> +1.5
    stat = CLAIMS["2"].statistic({"pre_norm": run(angular=(0.6, 0.4, 0.2, 0.0), drop=(3.0, 1.0, 0.5, 0.5))})
    assert stat == {"angular distance shallow − deep": pytest.approx(0.4),
                    "layer-drop Δ shallow − deep": pytest.approx(1.5)}


def test_gradient_tilt_statistic():
    # Post-Norm: ln 1, ln 1 | ln e^2, ln e^2 -> tilt +2; Pre-Norm: deep half smaller by ln 4 -> -tilt = ln 4
    stat = CLAIMS["3"].statistic({"post_norm": run(grads=(1, 1, math.e ** 2, math.e ** 2)),
                                  "pre_norm": run(grads=(4, 4, 1, 1))})
    assert stat == {"Post-Norm ln-grad tilt (deep − shallow)": pytest.approx(2.0),
                    "−Pre-Norm ln-grad tilt": pytest.approx(math.log(4))}


def test_mixln_gradient_spread_and_deep_layer_statistics():
    # ln grads (0, 2): sample std sqrt(2); (0, 0): 0; (0, 4): 2 sqrt(2)
    stat = CLAIMS["5"].statistic({"pre_norm": run(grads=(1, math.e ** 2)), "mixln": run(grads=(3, 3)),
                                  "post_norm": run(grads=(1, math.e ** 4))})
    assert stat == {"Pre-Norm − Mix-LN ln-grad spread": pytest.approx(math.sqrt(2)),
                    "Post-Norm − Mix-LN ln-grad spread": pytest.approx(2 * math.sqrt(2))}
    # deep halves: angular (0.3, 0.5) -> 0.4 vs (0.0, 0.2) -> 0.1; drop (1.0, 2.0) -> 1.5 vs (0.1, 0.1) -> 0.1
    stat = CLAIMS["6"].statistic({"mixln": run(angular=(0.5, 0.5, 0.3, 0.5), drop=(3, 3, 1, 2)),
                                  "pre_norm": run(angular=(0.6, 0.4, 0.0, 0.2), drop=(3, 1, 0.1, 0.1))})
    assert stat == {"deep-half angular distance Mix-LN − Pre-Norm": pytest.approx(0.3),
                    "deep-half layer-drop Δ Mix-LN − Pre-Norm": pytest.approx(1.4)}


def test_hybridnorm_loss_statistic_and_missing_run():
    runs = {"pre_norm": run(val_loss=3.0), "hybridnorm": run(val_loss=2.9), "hybridnorm_star": run(val_loss=2.95)}
    assert CLAIMS["9"].statistic(runs) == {"Pre-Norm − HybridNorm val loss": pytest.approx(0.1),
                                           "Pre-Norm − HybridNorm* val loss": pytest.approx(0.05),
                                           "HybridNorm − HybridNorm* val loss": pytest.approx(-0.05)}
    # a diverged HybridNorm* seed is left out of its effects, not a crash
    by_seed = {0: runs, 1: {k: v for k, v in runs.items() if k != "hybridnorm_star"},
               2: {**runs, "hybridnorm": run(val_loss=2.8)}}
    result = evaluate_claim(CLAIMS["9"], by_seed)
    assert result["effects"]["Pre-Norm − HybridNorm val loss"]["n"] == 3
    assert result["effects"]["Pre-Norm − HybridNorm* val loss"]["n"] == 2
    assert result["effects"]["HybridNorm − HybridNorm* val loss"]["values"] == pytest.approx([-0.05, -0.15])
    nan = evaluate_claim(CLAIMS["16"], {0: {"bhyt": run(pearson=(0.999, float("nan")))},
                                            1: {"bhyt": run(pearson=(1.0,))}})
    assert nan["effects"]["min Pearson r − 0.99"]["values"] == pytest.approx([0.01])


def test_a_diverged_run_is_data_not_a_crash(tmp_path):
    from normlab.reproduce.report import claim_figure
    from normlab.reproduce.reproduce import measure
    from normlab.train.rundir import RunDir

    directory = RunDir(tmp_path / "bhyt-s1")
    directory.create()
    directory.write_status("diverged", reason="loss 1e9 at step 3")
    diverged = measure(directory, 1, batches=1)
    assert diverged.summary["status"] == "diverged" and diverged.diagnostics is None
    by_seed = {0: {"pre_norm": run(rms=(0.1, 1, 8)), "dyt": run(rms=(1, 1, 4)), "bhyt": run(rms=(0.1, 1, 2))},
               1: {"pre_norm": run(rms=(0.1, 1, 8)), "dyt": run(rms=(1, 1, 4)), "bhyt": diverged}}
    result = {"claim": CLAIMS["15"], "by_seed": by_seed, **evaluate_claim(CLAIMS["15"], by_seed)}
    assert [e["n"] for e in result["effects"].values()] == [1, 1]
    assert result["verdict"] == INCONCLUSIVE
    assert claim_figure(result).axes[0].get_lines()  # the finished seed is still drawn


def test_a_stalled_run_is_data_and_listed_in_the_report(tmp_path, monkeypatch):
    from normlab.config import RunConfig
    from normlab.data import unigram_loss
    from normlab.reproduce.claims import DYT_NO_SCALAR
    from normlab.reproduce.report import write_report
    from normlab.reproduce.reproduce import BUDGETS, measure
    from normlab.train.rundir import RunDir
    from normlab.train.trainer import load_data, run_config, train

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    raw = RunConfig.load(None, [*BUDGETS["smoke"].overrides, "train.eval_every=6", "train.lr=1e-7"])
    train(run_config(raw), tmp_path / "stuck", progress=False)  # 12 steps at lr 1e-7: val loss stays at ln 257
    shard_dir, _ = load_data(RunConfig.from_dict(raw, vocab_size=1).data, False)
    unigram = unigram_loss(shard_dir)
    stuck = measure(RunDir(tmp_path / "stuck"), 0, batches=1, unigram=unigram)
    assert stuck.summary["status"] == "stalled" and stuck.diagnostics is not None  # diagnosed like a finished run
    assert measure(RunDir(tmp_path / "stuck"), 0, batches=1).summary["status"] == "finished"  # no H: not judged
    by_seed = {0: {"pre_norm": run(), "dyt": run(val_loss=2.0), DYT_NO_SCALAR: stuck}}
    result = {"claim": CLAIMS["21"], "by_seed": by_seed, **evaluate_claim(CLAIMS["21"], by_seed)}
    effect = result["effects"]["DyT without − with √d scalar val loss"]
    assert effect["values"] == pytest.approx([stuck.summary["final_val_loss"] - 2.0])  # its loss counts
    write_report(tmp_path / "report", BUDGETS["smoke"], [0], [result], unigram)
    record = json.loads((tmp_path / "report" / "claims.json").read_text())
    assert record["unigram_loss"] == unigram
    assert record["claims"][0]["runs"] == {"0": {"dyt": "finished", DYT_NO_SCALAR: "stalled", "pre_norm": "finished"}}
    markdown = (tmp_path / "report" / "reproduce.md").read_text()
    assert f"- Runs: pre_norm,dyt,{DYT_NO_SCALAR} ({DYT_NO_SCALAR} seed 0: stalled)" in markdown
    assert "a stalled run is data" in markdown


def test_mixln_alpha_and_dyt_scalar_statistics():
    stat = CLAIMS["7"].statistic({"pre_norm": run(val_loss=2.3), "mixln": run(val_loss=2.1),
                                  "mixln[model.mixln_alpha=0.5]": run(val_loss=2.0)})
    assert stat == {"loss(α=0) − loss(α=0.25)": pytest.approx(0.2), "loss(α=0.5) − loss(α=0.25)": pytest.approx(-0.1)}
    assert CLAIMS["21"].statistic({"dyt": run(val_loss=2.0), "dyt[model.embed_scale=false]": run(val_loss=3.5)}) == {
        "DyT without − with √d scalar val loss": pytest.approx(1.5)}
    assert CLAIMS["21"].statistic({"dyt": run(val_loss=2.0), "dyt[model.embed_scale=false]": run(val_loss=None)}) == {
        "DyT without − with √d scalar val loss": None}


def test_bhyt_statistics():
    assert CLAIMS["16"].statistic({"bhyt": run(pearson=(0.999, 0.995))}) == {
        "min Pearson r − 0.99": pytest.approx(0.005)}
    stat = CLAIMS["18"].statistic({"bhyt": run(saturation=(0.0, 0.004)), "dyt": run(saturation=(0.0, 0.1, 0.2, 0.3))})
    assert stat == {"1% − max BHyT saturation": pytest.approx(0.006),
                    "DyT saturation deep − shallow": pytest.approx(0.2)}


def test_unknown_claim_id_is_one_line_exit_2(tmp_path):
    with pytest.raises(ConfigError, match=r"claim '19' is not implemented \(did you mean '9'\?\)"):
        select_claims("1,19")
    assert [c.id for c in select_claims("15, 1")] == ["15", "1"]
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "reproduce", "1,x7", "--out", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"normlab: error: claim 'x7' is not implemented (did you mean '7'?); choose from {', '.join(CLAIMS)} or all"]
    assert ", 9, 10, 11, 12, 14, 15, 16, 17, 18, 21 or all" in result.stderr


def test_unknown_budget_exits_2(tmp_path, capsys):
    from normlab.cli import main

    assert main(["reproduce", "1", "--budget", "tpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("normlab: error: --budget: unknown value 'tpu' (did you mean 'gpu'?); "
                                       "choose one of smoke, cpu, gpu\n")
    assert not any(tmp_path.iterdir())  # nothing trained


def test_an_interrupted_run_gives_no_verdicts_and_exit_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the sweep: nothing is diagnosed, no report from part of the runs."""
    from normlab.cli import main
    from normlab.compare import sweep
    from normlab.train.trainer import TrainResult

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep, "train", lambda config, out, **options: TrainResult("interrupted", 0, "signal"))
    assert main(["reproduce", "1", "--budget", "smoke", "--out", str(tmp_path / "out"), "-q"]) == 130
    assert "runs: 1 interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out" / "reproduce.html").exists() and not (tmp_path / "out" / "claims.json").exists()


def test_stability_claims_score_a_diverged_run_as_the_unigram_loss():
    from normlab.reproduce.claims import (
        HYBRID_DEEP,
        HYBRID_HIGH_LR,
        POST_DEEP,
        POST_HIGH_LR,
        PRE_HIGH_LR,
        QK_POST_HIGH_LR,
    )

    diverged = RunData({"final_val_loss": None, "status": "diverged"}, unigram_loss=3.3)
    stalled = RunData({"final_val_loss": 3.25, "status": "stalled"}, unigram_loss=3.3)
    stat = CLAIMS["14"].statistic({PRE_HIGH_LR: run(val_loss=2.0), POST_HIGH_LR: diverged, HYBRID_HIGH_LR: run(val_loss=1.9)})
    assert stat == {"Post-Norm − Pre-Norm outcome loss": pytest.approx(1.3),
                    "Post-Norm − HybridNorm outcome loss": pytest.approx(1.4)}
    assert CLAIMS["11"].statistic({POST_DEEP: stalled, HYBRID_DEEP: run(val_loss=2.05)}) == {
        "Post-Norm − HybridNorm outcome loss, 24 layers": pytest.approx(1.2)}
    assert CLAIMS["10"].statistic({QK_POST_HIGH_LR: run(val_loss=1.8), HYBRID_HIGH_LR: run(val_loss=1.9)}) == {
        "QK-Post − HybridNorm outcome loss": pytest.approx(-0.1)}
    failed = RunData({"final_val_loss": None, "status": "failed"}, unigram_loss=3.3)
    assert CLAIMS["10"].statistic({QK_POST_HIGH_LR: failed, HYBRID_HIGH_LR: run()}) == {
        "QK-Post − HybridNorm outcome loss": None}


def test_init_preference_and_bhyt_equivalence_statistics():
    from normlab.reproduce.claims import HYBRID_NORMAL, PRE_MEGATRON

    stat = CLAIMS["12"].statistic({"pre_norm": run(val_loss=2.0), PRE_MEGATRON: run(val_loss=2.05),
                                   "hybridnorm": run(val_loss=1.9), HYBRID_NORMAL: run(val_loss=1.85)})
    assert stat == {"Pre-Norm Megatron − normal val loss": pytest.approx(0.05),
                    "HybridNorm normal − Megatron val loss": pytest.approx(-0.05)}
    # Δ = loss(BHyT) − loss(BHyT*) inside ±0.02 in every seed: both margins' CIs above 0
    by_seed = {seed: {"bhyt": run(val_loss=2.0 + d), "bhyt_star": run(val_loss=2.0)}
               for seed, d in enumerate((0.004, -0.002, 0.001))}
    assert evaluate_claim(CLAIMS["17"], by_seed)["verdict"] == REPRODUCED
    by_seed[1]["bhyt"] = run(val_loss=2.1)  # one seed 0.1 worse: the upper margin's CI reaches below 0
    assert evaluate_claim(CLAIMS["17"], by_seed)["verdict"] != REPRODUCED


def test_stability_claims_train_on_the_budgets_shorter_schedule():
    from normlab.reproduce.reproduce import BUDGETS, claim_variants

    short = claim_variants(CLAIMS["14"], BUDGETS["cpu"])
    assert list(short) == ["pre_norm[train.lr=1e-2]", "post_norm[train.lr=1e-2]", "hybridnorm[train.lr=1e-2]"]
    assert short["post_norm[train.lr=1e-2]"].label == "post_norm[train.lr=1e-2] @short"
    assert short["post_norm[train.lr=1e-2]"].overrides == ["train.lr=1e-2", *BUDGETS["cpu"].short]
    assert "train.max_steps=500" in BUDGETS["cpu"].short
    plain = claim_variants(CLAIMS["12"], BUDGETS["cpu"])
    assert plain["pre_norm"].label == "pre_norm" and plain["pre_norm"].overrides == []
    assert claim_variants(CLAIMS["14"], BUDGETS["smoke"])["pre_norm[train.lr=1e-2]"].label == "pre_norm[train.lr=1e-2]"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NORMLAB_CACHE": str(root / "cache")}
    cmd = [sys.executable, "-m", "normlab.cli", "reproduce", "all", "--budget", "smoke", "--out", str(root / "out"),
           "--jobs", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return root / "out", first, second


def test_smoke_budget_end_to_end(smoke):
    out, _, second = smoke
    for name in ("reproduce.html", "reproduce.md", "claims.json"):
        assert (out / name).is_file()
    record = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in record["claims"]] == list(CLAIMS)
    assert all(c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for c in record["claims"])
    assert all(c["verdict"] == INCONCLUSIVE for c in record["claims"])  # one seed never decides
    assert all(e["n"] == 1 for c in record["claims"] for e in c["effects"].values())  # every effect measured
    assert (out / "reproduce.md").read_text().splitlines()[0] == SMOKE_DISCLAIMER
    assert all((out / "plots" / f"claim-{c}.png").is_file() for c in CLAIMS)
    # runs shared between claims are trained once: pre_norm serves claims 1, 2, 3, 5, 6, 7, 9, 12, 15 and 21
    variants = ("pre_norm", "post_norm", "mixln", "mixln_model.mixln_alpha=0.5", "hybridnorm", "hybridnorm_star",
                "dyt", "dyt_model.embed_scale=false", "bhyt", "bhyt_star", "pre_norm_model.init=megatron",
                "hybridnorm_model.init=normal", "pre_norm_train.lr=1e-2", "post_norm_train.lr=1e-2",
                "hybridnorm_train.lr=1e-2", "hybridnorm_model.qk_norm=qk_train.lr=1e-2",
                "post_norm_model.n_layers=24", "hybridnorm_model.n_layers=24")
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{v}-s0" for v in variants)
    # re-running trains nothing
    assert second.returncode == 0
    assert second.stderr.count("already done, skipped") == len(variants)
    assert "training" not in second.stderr


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(smoke, tmp_path):
    out, _, _ = smoke
    assert_renders_in_chromium(out / "reproduce.html", tmp_path)
