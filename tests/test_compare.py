"""normlab compare: controlled sweep, resumability, divergence, statistics, report files."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.compare import compare, parse_variants
from normlab.compare.report import STALL_MARGIN, TABLE_HEADER, depth_profile, stalled, verdict
from normlab.compare.stats import mean_std, paired_difference
from normlab.config import RunConfig
from normlab.errors import ConfigError, NormlabError
from normlab.train.rundir import RunDir
from normlab.workers import WorkerPool, serve

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
    "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=3", "train.max_steps=16",
    "train.eval_every=8", "train.eval_batches=2", "train.log_every=2", "train.save_every=8",
]
VARIANTS = "pre_norm,hybridnorm_star,post_norm[train.lr=5 train.warmup_steps=0]"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    os.environ["NORMLAB_CACHE"] = str(root / "cache")
    out = root / "out"
    report, statuses = compare(RunConfig.load(None, TINY), parse_variants(VARIANTS), [0, 1], out,
                               progress=False)
    return out, report, statuses


def test_depth_profile_by_hand():
    """Residual growth ln(RMS_L/RMS_1) from the last record, gradient tilt (deep − shallow mean
    ln grad norm) from the first; the embedding output RMS_0 is left out."""
    first = {"step": 1, "grad_norm": {"total": [4.0, 2.0, 1.0, 0.5]}, "residual_rms": [9.0, 1.0, 1.0, 1.0, 1.0]}
    last = {"step": 50, "grad_norm": {"total": [1.0, 1.0, 1.0, 1.0]}, "residual_rms": [0.1, 2.0, 3.0, 5.0, 6.0]}
    profile = depth_profile([first, last])
    assert profile["residual_growth"] == pytest.approx(math.log(6.0 / 2.0))
    tilt = (math.log(1.0) + math.log(0.5)) / 2 - (math.log(4.0) + math.log(2.0)) / 2
    assert profile["grad_tilt"] == pytest.approx(tilt) and tilt < 0
    one_layer = {"step": 1, "grad_norm": {"total": [1.0]}, "residual_rms": [1.0, 2.0]}
    assert depth_profile([one_layer]) == {"residual_growth": None, "grad_tilt": None}
    assert depth_profile([]) == {"residual_growth": None, "grad_tilt": None}


def test_hand_computed_confidence_interval():
    # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414
    d = paired_difference([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(0.2)
    assert d["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert (d["low"], d["high"]) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), rel=1e-5)
    assert paired_difference([2.0], [1.5])["half_width"] is None
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_verdict_sentences():
    def entry(delta, diverged=0, stalled_runs=0):
        return {"n_runs": 3, "diverged": diverged, "stalled": stalled_runs, "failed": 0,
                "val_loss": {"mean": 2.0, "std": 0.01, "n": 3}, "delta_val_loss": delta}

    lower = entry({"mean": -0.05, "half_width": 0.02, "low": -0.07, "high": -0.03, "n": 3})
    assert verdict("x", lower, "pre_norm") == "lower val loss than pre_norm by 0.0500 ± 0.0200 (95% CI, 3 seeds)"
    higher = entry({"mean": 0.05, "half_width": 0.02, "low": 0.03, "high": 0.07, "n": 3}, diverged=1)
    assert verdict("x", higher, "pre_norm").endswith("; diverged in 1/3 seeds")
    assert verdict("x", higher, "pre_norm").startswith("higher val loss than pre_norm by 0.0500")
    unclear = entry({"mean": 0.01, "half_width": 0.02, "low": -0.01, "high": 0.03, "n": 3})
    assert "no clear difference" in verdict("x", unclear, "pre_norm")
    flat = entry({"mean": 0.9, "half_width": 0.02, "low": 0.88, "high": 0.92, "n": 3}, stalled_runs=2)
    assert verdict("x", flat, "pre_norm").endswith("; stalled at or above the unigram loss in 2/3 seeds")


def test_parse_variants():
    variants = parse_variants("pre_norm, hybridnorm[model.init=normal train.lr=1e-3],dyt")
    assert [v.label for v in variants] == ["pre_norm", "hybridnorm[model.init=normal train.lr=1e-3]", "dyt"]
    assert variants[1].strategy == "hybridnorm"
    assert variants[1].overrides == ["model.init=normal", "train.lr=1e-3"]
    assert variants[1].slug == "hybridnorm_model.init=normal_train.lr=1e-3"
    with pytest.raises(ConfigError, match="did you mean 'hybridnorm'"):
        parse_variants("pre_norm,hybridnrom")
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_variants("pre_norm[train.lr=1")
    with pytest.raises(ConfigError, match="distinct"):
        parse_variants("pre_norm,pre_norm")


def test_controlled_runs_share_batches_and_init(sweep):
    out, _, _ = sweep
    runs = json.loads((out / "compare.json").read_text())["variants"]
    configs = {v["label"]: RunConfig.from_dict(RunDir(out / "runs" / v["runs"][0]).read_config()) for v in runs}
    seeds = {label: (c.train.seed, c.train.batch_size, c.train.seq_len) for label, c in configs.items()}
    assert len(set(seeds.values())) == 1
    assert configs["hybridnorm_star"].model.init == "megatron" and configs["pre_norm"].model.init == "normal"


def test_report_files_hold_the_summary_numbers(sweep):
    out, report, statuses = sweep
    assert report == out / "report.html"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"pre_norm", "hybridnorm_star", "post_norm[train.lr=5 train.warmup_steps=0]"}
    markdown = (out / "report.md").read_text()
    html = report.read_text()
    for label in ("pre_norm", "hybridnorm_star"):
        entry = summary["strategies"][label]
        assert [r["status"] for r in entry["runs"]] == ["finished", "finished"]
        val = entry["val_loss"]
        assert val["n"] == 2
        cell = f"{val['mean']:.4f} ± {val['std']:.4f}"
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
        assert cell in row and cell in html
        finals = [RunDir(out / "runs" / f"{label}-s{s}").read_metrics()[-1]["val_loss"] for s in (0, 1)]
        assert val["mean"] == pytest.approx(sum(finals) / 2)
    delta = summary["strategies"]["hybridnorm_star"]["delta_val_loss"]
    pre = [r["final_val_loss"] for r in summary["strategies"]["pre_norm"]["runs"]]
    star = [r["final_val_loss"] for r in summary["strategies"]["hybridnorm_star"]["runs"]]
    assert delta["mean"] == pytest.approx(sum(s - p for s, p in zip(star, pre, strict=True)) / 2)
    assert f"{delta['mean']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]" in markdown
    assert summary["headline"] in markdown and summary["ranking"][0] in summary["headline"]
    growth = [depth_profile(RunDir(out / "runs" / f"pre_norm-s{s}").read_layer_stats())["residual_growth"]
              for s in (0, 1)]
    assert summary["strategies"]["pre_norm"]["residual_growth"]["mean"] == pytest.approx(sum(growth) / 2)
    row = next(line for line in markdown.split("## Depth")[1].splitlines() if line.startswith("| pre_norm"))
    assert f"×{math.exp(sum(growth) / 2):.2f}" in row and "<h2>Depth</h2>" in html
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == 4  # loss, grad norm, per-layer grad norm, residual RMS
    for name in ("loss", "grad_norm", "layer_grad_norm", "residual_rms"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diverged_run_is_reported_and_others_complete(sweep):
    out, _, statuses = sweep
    summary = json.loads((out / "summary.json").read_text())
    bad = summary["strategies"]["post_norm[train.lr=5 train.warmup_steps=0]"]
    assert bad["diverged"] == 2 and bad["verdict"] == "diverged in 2/2 seeds"
    assert all(r["reason"] and "diverge_loss" in r["reason"] for r in bad["runs"])
    assert sorted(statuses.values()) == ["diverged", "diverged", "finished", "finished", "finished", "finished"]
    assert "Diverged: post_norm" in summary["headline"]


def test_rerun_skips_finished_and_resumes_interrupted(sweep, tmp_path):
    out, _, _ = sweep
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    victim = RunDir(copy / "runs" / "pre_norm-s1")
    reference = victim.read_metrics()
    shutil.rmtree(victim.checkpoints / "step_000016")  # as if killed after step 8's checkpoint
    victim.write_status("running", step=8)
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("runs/*/metrics.jsonl") if "pre_norm-s1" not in str(p)}
    env = {**os.environ, "NORMLAB_CACHE": os.environ["NORMLAB_CACHE"]}
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "compare", "--strategies", VARIANTS,
                             "--seeds", "0,1", "--out", str(copy), *TINY], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("already done, skipped") == 5
    assert "strategy=pre_norm seed=1: resuming" in result.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing else retrained
    def without_timing(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert without_timing(victim.read_metrics()) == without_timing(reference)  # same losses as before
    assert result.stdout.strip() == f"report: {copy / 'report.html'}"


def test_bad_compare_arguments_exit_2(tmp_path, capsys):
    """The CLI's main in this process (a new interpreter would spend seconds on imports)."""
    for args, message in [
        (["--strategies", "pre_norm,post_norm", "--baseline", "dyt"], "--baseline: 'dyt' is not among"),
        (["--strategies", "pre_norm", "--seeds", "0,x"], "--seeds: '0,x' is not a comma-separated list"),
        (["--strategies", "pre_norm", "--same-init", "megatrom"], "did you mean 'megatron'"),
        (["--strategies", "pre_norm[model.strategy=dyt],dyt"], "'pre_norm[model.strategy=dyt]' sets model.strategy"),
        (["--strategies", "pre_norm[train.seed=3]"], "sets train.seed, which the strategy's name and --seeds decide"),
        (["--strategies", "pre_norm", "--eval-limit", "5"], "--eval-limit apply to --eval-tasks, which is not given"),
        (["--strategies", "pre_norm", "model.strategy=dyt"], "model.strategy=dyt: --strategies sets model.strategy"),
        (["--strategies", "pre_norm", "--seeds", "-1"], "train.seed: expected a non-negative integer"),
    ]:
        assert main(["compare", "--out", str(tmp_path / "o"), *args, *TINY]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def assert_renders_in_chromium(page, tmp_path) -> None:
    """Screenshot ``page`` (an HTML file) in headless Chromium: not blank, and coloured pixels
    (the embedded plots) present."""
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = imread(shot)[..., :3]
    not_white = (pixels < 0.9).any(axis=-1).mean()
    assert not_white > 0.05, f"screenshot is nearly blank ({not_white:.1%} non-white pixels)"
    colourful = (pixels.max(-1) - pixels.min(-1) > 0.25).mean()
    assert colourful > 0.002, "no coloured pixels: the plots did not render"


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(sweep, tmp_path):
    _, report, _ = sweep
    assert_renders_in_chromium(report, tmp_path)


def test_rerun_with_another_config_is_refused(sweep, tmp_path):
    out, _, _ = sweep
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    spec = (copy / "compare.json").read_bytes()
    with pytest.raises(NormlabError, match=r"was trained with another config \(model.n_layers 2 -> 3"):
        compare(RunConfig.load(None, [*TINY, "model.n_layers=3"]), parse_variants(VARIANTS), [0, 1], copy,
                progress=False)
    assert (copy / "compare.json").read_bytes() == spec  # the refused re-run changed nothing


def test_a_run_out_of_memory_fails_alone_and_the_sweep_goes_on(tmp_path, capsys):
    """A variant too large for any machine (d_model 1e12, refused by the trainer's memory floor
    before it allocates) is one line and a failed run (exit status 1, not 2: a user error would
    stop the sweep); the other run trains, in worker processes."""
    from normlab.cli import main

    out = tmp_path / "out"
    code = main(["compare", "--strategies", "pre_norm,dyt[model.d_model=1000000000000]", "--seeds", "0",
                 "--jobs", "2", "--out", str(out), "-q", *TINY, "train.max_steps=2", "train.eval_every=2"])
    err = capsys.readouterr().err
    assert code == 1 and "runs: 1 finished, 1 failed" in err, err
    log = (out / "sweep" / "dyt_model.d_model=1000000000000-s0.log")
    assert "normlab: error: out of memory (" in log.read_text() and "Traceback" not in log.read_text()


@pytest.mark.parametrize("verb", ["compare", "stability", "reproduce", "diagnose", "bench"])
def test_an_out_dir_holding_other_files_is_refused_before_anything_is_written(tmp_path, capsys, verb):
    """A user's folder (or another run) as --out: one line, exit 2, nothing written or replaced;
    a file as --out and an empty --out likewise."""
    from normlab.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    (tmp_path / "notes.txt").write_text("my notes")
    args = {"compare": ["compare", "--strategies", "pre_norm", "--seeds", "0", *TINY],
            "stability": ["stability", "--strategies", "pre_norm", "--lrs", "1e-3", "--depths", "2", "--seeds", "0",
                          *(o for o in TINY if not o.startswith("model.n_layers="))],  # --depths sets it
            "reproduce": ["reproduce", "1"],
            "diagnose": ["diagnose", str(tmp_path / "no-run")],
            "bench": ["bench", "--sections", "norms"]}[verb]
    for out, message in ((tmp_path / "mine", "holds other files"), (tmp_path / "notes.txt", "is a file"),
                         ("", "empty path")):
        assert main([*args, "--out", str(out)]) == 2
        assert "normlab: error: --out: " in (err := capsys.readouterr().err) and message in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt", "report.md"]
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"


def test_diverged_strategies_rank_last():
    from normlab.compare.report import headline, rank

    def entry(mean, n, diverged=0, stalled_runs=0):
        return {"diverged": diverged, "stalled": stalled_runs, "n_runs": 2, "verdict": "v",
                "val_loss": {"mean": mean, "std": None, "n": n}}

    entries = {"a": entry(1.0, 1, diverged=1), "b": entry(2.0, 2), "c": entry(1.5, 2),
               "d": entry(None, 0, diverged=2), "e": entry(0.5, 2, stalled_runs=1)}
    ranking = rank(entries)
    assert ranking == ["c", "b", "e", "a"]  # a and e have lower losses but diverged or stalled; d never finished
    text = headline(entries, ranking, "b")
    assert text.startswith("Lowest validation loss: c") and text.endswith("Diverged: a (1/2), d (2/2). Stalled: e (1/2).")
    only_stalled = {"e": entries["e"]}
    assert headline(only_stalled, rank(only_stalled), "e").startswith(
        "Lowest validation loss (every strategy diverged or stalled at least once): e")


def evaluations(*points):
    """Metrics records: a training record every 10 steps, val_loss at the given (step, loss)."""
    losses = dict(points)
    return [{"step": s, "loss": 9.0, **({"val_loss": losses[s]} if s in losses else {})}
            for s in range(10, max(losses) + 1, 10)]


def test_stall_rule_on_hand_made_metrics():
    h = 3.0  # unigram loss; the margin is 5% of it: 0.15
    assert STALL_MARGIN == 0.05
    assert stalled(evaluations((50, 3.4), (80, 3.02), (90, 3.01), (100, 3.0)), h)  # a plateau at H
    assert stalled(evaluations((50, 5.5), (80, 5.5), (100, 5.49)), h)  # never learned even the frequencies
    assert stalled(evaluations((80, 2.9), (100, 2.86)), h)  # inside the margin: >= 2.85, fell 0.04
    assert not stalled(evaluations((80, 2.9), (100, 2.84)), h)  # 0.01 more below H than the margin
    assert not stalled(evaluations((80, 3.5), (100, 3.0)), h)  # still falling through H by 0.5 > 0.15
    assert stalled(evaluations((80, 3.14), (100, 3.0)), h)  # falling by 0.14 < 0.15 only
    assert not stalled(evaluations((50, 2.0), (80, 1.9), (100, 1.9)), h)  # learned
    assert not stalled(evaluations((80, 3.0), (90, 2.5), (100, 3.0)), h)  # went below H in the last part
    assert stalled(evaluations((70, 2.5), (80, 3.1), (100, 3.0)), h)  # back at H before the last part began
    assert not stalled(evaluations((100, 3.0)), h)  # one evaluation: cannot tell whether it sits
    assert not stalled([], h)


def test_a_run_that_cannot_learn_is_reported_stalled(tmp_path, monkeypatch, capsys):
    from normlab.data import unigram_loss
    from normlab.train.trainer import load_data

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))

    stuck = "pre_norm[train.lr=1e-7]"  # 16 steps at lr 1e-7: the loss stays at ln 257 = 5.55, above H
    report, statuses = compare(RunConfig.load(None, TINY), parse_variants(f"pre_norm,{stuck}"), [0],
                               tmp_path / "out", progress=False)
    assert set(statuses.values()) == {"finished"}  # training went fine: stalled is a reading of the result
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    shard_dir, _ = load_data(RunConfig.from_dict(RunConfig.load(None, TINY), vocab_size=1).data, False)
    assert summary["unigram_loss"] == pytest.approx(unigram_loss(shard_dir)) == pytest.approx(3.292, abs=1e-3)
    entry = summary["strategies"][stuck]
    assert [r["status"] for r in entry["runs"]] == ["stalled"] and entry["stalled"] == 1
    assert entry["failed"] == 0 and entry["val_loss"]["mean"] > summary["unigram_loss"]
    assert [r["status"] for r in summary["strategies"]["pre_norm"]["runs"]] == ["finished"]
    assert summary["ranking"] == ["pre_norm", stuck]
    assert summary["headline"].endswith(f"Stalled: {stuck} (1/1).")
    assert entry["verdict"].endswith("; stalled at or above the unigram loss in 1/1 seeds")
    markdown = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {stuck}"))
    assert row.split(" | ")[TABLE_HEADER.index("stalled")] == "1/1"
    assert f"- {stuck} seed 0: stalled (final val loss" in markdown
    page = report.read_text()
    assert "Runs that did not finish normally" in page and f"{stuck} seed 0: stalled" in page
    assert "<tr class='best'><td>pre_norm (baseline)" in page
    # the command's closing line counts it (a second compare trains nothing)
    assert main(["compare", "--strategies", f"pre_norm,{stuck}", "--seeds", "0", "--out", str(tmp_path / "out"),
                 "-q", *TINY]) == 0
    assert "runs: 2 finished (1 of them stalled at the unigram loss)" in capsys.readouterr().err


def test_eval_tasks_reach_the_report(sweep, tmp_path):
    from normlab.compare.compare import EvalSpec

    out, _, statuses = sweep
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    task = tmp_path / "tiny_mc.jsonl"
    items = [{"query": f"Question {i}: which word?", "choices": ["alpha", "be", "gamma ray"], "gold": i % 3}
             for i in range(12)]
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    spec = EvalSpec([str(task)], limit=10)
    compare(RunConfig.load(None, TINY), parse_variants(VARIANTS), [0, 1], copy, progress=False, evaluation=spec)

    accs = {}
    for name, status in statuses.items():
        scored = copy / "runs" / name / "eval" / "step_000016.json"
        assert scored.is_file() == (status == "finished"), name
        if scored.is_file():
            result = json.loads(scored.read_text())["tasks"]["tiny_mc"]
            assert result["items"] == 10
            accs[name] = result["metrics"]["acc"]["value"]
    summary = json.loads((copy / "summary.json").read_text())
    star = summary["strategies"]["hybridnorm_star"]["downstream"]["tiny_mc"]
    assert star["metric"] == "acc"
    assert star["value"]["mean"] == pytest.approx((accs["hybridnorm_star-s0"] + accs["hybridnorm_star-s1"]) / 2)
    diffs = [accs[f"hybridnorm_star-s{s}"] - accs[f"pre_norm-s{s}"] for s in (0, 1)]
    assert star["delta"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert summary["strategies"]["pre_norm"]["downstream"]["tiny_mc"]["delta"] is None
    diverged = summary["strategies"]["post_norm[train.lr=5 train.warmup_steps=0]"]["downstream"]["tiny_mc"]
    assert diverged["value"]["n"] == 0
    report = (copy / "report.md").read_text()
    assert "## Downstream" in report and "tiny_mc acc" in report

    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("runs/*/eval/*.json")}
    compare(RunConfig.load(None, TINY), parse_variants(VARIANTS), [0, 1], copy, progress=False, evaluation=spec)
    assert {p: p.stat().st_mtime_ns for p in copy.glob("runs/*/eval/*.json")} == stamps  # not scored again


def test_unknown_eval_task_fails_before_training(tmp_path):
    from normlab.compare.compare import EvalSpec

    data = tmp_path / "data"
    (data / "copa").mkdir(parents=True)
    (data / "copa" / "copa.jsonl").write_text(json.dumps({"query": "q", "choices": ["a"], "gold": 0}) + "\n")
    with pytest.raises(NormlabError, match="did you mean 'copa'"):
        compare(RunConfig.load(None, TINY), parse_variants("pre_norm"), [0], tmp_path / "o", progress=False,
                evaluation=EvalSpec(["cope"], data_dir=str(data)))
    assert not (tmp_path / "o").exists()


def test_budget_check_warns_when_losses_still_fall_faster_than_the_gaps(sweep):
    from normlab.compare.report import budget_check

    def entry(mean, drop):
        return {"val_loss": {"mean": mean, "std": None, "n": 1}, "late_val_drop": {"mean": drop, "std": None, "n": 1}}

    calm = budget_check({"a": entry(2.0, 0.01), "b": entry(2.1, 0.02), "c": entry(2.5, 0.0)}, ["a", "b", "c"])
    assert calm["adequate"] and calm["min_gap"] == pytest.approx(0.1) and calm["message"] == ""
    busy = budget_check({"a": entry(2.0, 0.01), "b": entry(2.1, 0.3)}, ["a", "b"])
    assert not busy["adequate"] and busy["max_late_drop"] == 0.3 and "(b)" in busy["message"]

    out, _, _ = sweep  # 16 steps, evaluated at 8 and 16: the late drop is val(8) - val(16)
    summary = json.loads((out / "summary.json").read_text())
    evaluated = [r for r in RunDir(out / "runs" / "pre_norm-s0").read_metrics() if r.get("val_loss") is not None]
    assert [r["step"] for r in evaluated] == [8, 16]
    run = summary["strategies"]["pre_norm"]["runs"][0]
    assert run["late_val_drop"] == pytest.approx(evaluated[0]["val_loss"] - evaluated[1]["val_loss"])
    report = (out / "report.md").read_text()
    assert (summary["budget"]["message"] in report) and (summary["budget"]["adequate"] is not None)


def test_worker_pool_runs_commands_in_forked_children_and_survives_a_lost_server(tmp_path):
    """Exit statuses and logs of ``normlab ARGV`` through one server (jobs=1): a good command,
    a user error (2, its one line last in the log), and a command after the server was killed
    (a new server takes over)."""
    config = str(ROOT / "configs" / "tiny.yaml")
    with WorkerPool(1) as workers:
        assert workers.run(["model", "--config", config], tmp_path / "a.log") == 0
        assert "layer" in (tmp_path / "a.log").read_text()
        assert workers.run(["model", "--config", str(tmp_path / "missing.yaml")], tmp_path / "b.log") == 2
        assert (tmp_path / "b.log").read_text().strip().splitlines()[-1].startswith("normlab: error:")
        assert workers.started == 1  # both ran in children of the one server
        server = workers.idle.queue[0]
        server.kill()
        server.wait()
        assert workers.run(["model", "--config", config], tmp_path / "c.log") == 1  # sent to the dead one
        assert workers.run(["model", "--config", config], tmp_path / "d.log") == 0  # a new server
    assert server.returncode is not None and workers.idle.empty()


def test_an_interrupted_server_runs_no_further_commands(tmp_path):
    replies = io.StringIO()
    serve(io.StringIO(json.dumps({"argv": ["model"], "log": str(tmp_path / "x.log"), "threads": 1}) + "\n"),
          replies, [True], main)
    assert replies.getvalue() == "130\n" and not (tmp_path / "x.log").exists()


def test_ctrl_c_stops_a_parallel_sweep_and_its_workers(tmp_path):
    """Ctrl-C (SIGINT to the process group) while two runs train: both stop at a step boundary
    and are marked interrupted, the third never starts, compare exits 130, no process is left."""
    env = {**os.environ, "NORMLAB_CACHE": os.environ.get("NORMLAB_CACHE", str(tmp_path / "cache"))}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "normlab.cli", "compare", "--strategies", "pre_norm,post_norm,dyt",
                             "--seeds", "0", "--jobs", "2", "--out", str(out), *TINY, "train.max_steps=100000",
                             "train.save_every=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    metrics = [out / "runs" / name / "metrics.jsonl" for name in ("pre_norm-s0", "post_norm-s0")]
    while not all(m.exists() and m.stat().st_size for m in metrics):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert [RunDir(out / "runs" / n).read_status()["status"] for n in ("pre_norm-s0", "post_norm-s0")] == [
        "interrupted", "interrupted"]
    assert not (out / "runs" / "dyt-s0").exists()
    with pytest.raises(ProcessLookupError):  # nothing of the group is left
        os.killpg(proc.pid, 0)
