"""``normlab reproduce``: train what the chosen claims need (once per run, resumable), measure
the final checkpoints with ``diagnose`` and write the verdict report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.compare.compare import Variant, parse_variants
from normlab.compare.report import COMPLETED, run_summary
from normlab.compare.sweep import plan_runs, run_dir, run_sweep, write_plan
from normlab.config import RunConfig
from normlab.data import unigram_loss
from normlab.diagnostics import diagnose
from normlab.errors import ConfigError, check_output_dir, did_you_mean
from normlab.reproduce.claims import CLAIMS, Claim, RunData, evaluate_claim
from normlab.reproduce.report import write_report
from normlab.train.checkpoint import list_checkpoints
from normlab.train.rundir import RunDir


@dataclass(frozen=True)
class Budget:
    """How big every run of a reproduction is; a claim's variants add their own overrides."""

    name: str
    overrides: tuple[str, ...]  # model size and schedule shared by every run of the budget
    seeds: tuple[int, ...]
    diagnose_batches: int
    note: str
    short: tuple[str, ...] = ()  # the shorter schedule of the stability claims' runs (high LR, deeper)


_SCHEDULE = ("train.log_every=10", "train.eval_batches=8", "train.keep_last=1", "train.min_lr_ratio=0.1",
             "train.weight_decay=0.1", "train.grad_clip=1.0")
BUDGETS: dict[str, Budget] = {b.name: b for b in (
    Budget("smoke", ("model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.n_kv_heads=2",
                     "model.max_seq_len=32", "train.batch_size=4", "train.seq_len=32", "train.max_steps=12",
                     "train.warmup_steps=2", "train.eval_every=12", "train.eval_batches=2", "train.log_every=4",
                     "train.save_every=12", "train.keep_last=1", "train.record_every=6"),
           (0,), 1, "d_model 32, 4 layers, 12 steps × 128 tokens: checks the machinery only"),
    Budget("cpu", ("model.d_model=64", "model.n_layers=12", "model.n_heads=4", "model.n_kv_heads=4",
                   "model.max_seq_len=128", "train.batch_size=16", "train.seq_len=128", "train.max_steps=1500",
                   "train.warmup_steps=150", "train.lr=3e-3", "train.eval_every=150", "train.save_every=750",
                   "train.record_every=150", *_SCHEDULE),
           (0, 1, 2), 4, "d_model 64, 12 layers, 1500 steps × 2,048 tokens (stability claims: 500 steps); "
           "~2¼ h on 2 idle cores with --jobs 2",
           ("train.max_steps=500", "train.warmup_steps=50", "train.eval_every=100", "train.save_every=500",
            "train.record_every=100")),
    Budget("gpu", ("model.d_model=256", "model.n_layers=24", "model.n_heads=4", "model.n_kv_heads=4",
                   "model.max_seq_len=256", "train.batch_size=32", "train.seq_len=256", "train.max_steps=10000",
                   "train.warmup_steps=500", "train.lr=1e-3", "train.eval_every=1000", "train.save_every=2000",
                   "train.record_every=500", *_SCHEDULE),
           (0, 1, 2, 3, 4), 16, "d_model 256, 24 layers, 10,000 steps × 8,192 tokens (stability claims: 3,000)",
           ("train.max_steps=3000", "train.warmup_steps=300", "train.eval_every=500", "train.save_every=1500",
            "train.record_every=300")),
)}


def select_claims(text: str) -> list[Claim]:
    """'all' or comma-separated claim ids; an unknown id is a one-line error with a suggestion."""
    if text.strip() == "all":
        return list(CLAIMS.values())
    chosen = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item not in CLAIMS:
            raise ConfigError(f"claim '{item}' is not implemented{did_you_mean(item, [*CLAIMS, 'all'])}; "
                              f"choose from {', '.join(CLAIMS)} or all")
        chosen.append(CLAIMS[item])
    if not chosen:
        raise ConfigError("give claim ids (e.g. 1,15) or all")
    return chosen


def claim_variants(claim: Claim, budget: Budget) -> dict[str, Variant]:
    """The claim's variant labels -> the variants to train: as written, or with the budget's
    shorter schedule (and " @short" in the label and run names) for a stability claim."""
    variants = {v.label: v for v in parse_variants(claim.variants)}
    if not (claim.short_schedule and budget.short):
        return variants
    return {label: Variant(f"{label} @short", v.strategy, [*v.overrides, *budget.short])
            for label, v in variants.items()}


#: the claims, budget, seeds and runs of a reproduction, written before training: it marks OUT as
#: this verb's
PLAN_FILE = "reproduce-plan.json"


def reproduce(claims: list[Claim], budget: Budget, out: str | Path, seeds: list[int] | None = None,
              jobs: int = 1, progress: bool = True) -> tuple[Path | None, dict[str, str]]:
    """Train every (variant, seed) the claims need into OUT/runs, diagnose each finished run's
    last checkpoint into RUN/diagnose, evaluate the claims and write the report. Returns
    reproduce.html's path (None when a run was interrupted: no verdicts from a part of the
    runs) and each run's status."""
    out = check_output_dir(out, "--out", (PLAN_FILE, "claims.json"))
    seeds = list(seeds or budget.seeds)
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {jobs}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds: give distinct integers, e.g. 0,1,2")
    raw = RunConfig.load(None, list(budget.overrides))
    trained = {v.label: v for claim in claims for v in claim_variants(claim, budget).values()}  # shared runs once
    runs, shard_dir = plan_runs(raw, [(f"{v.slug}-s{seed}", {"variant": v.label, "seed": seed},
                                       [f"model.strategy={v.strategy}", *v.overrides, f"train.seed={seed}"])
                                      for v in trained.values() for seed in seeds], progress)
    write_plan(runs, out, PLAN_FILE, {"claims": [claim.id for claim in claims], "budget": budget.name,
                                      "seeds": seeds, "runs": [run.name for run in runs]})
    statuses = run_sweep(runs, out, progress, jobs)
    if "interrupted" in statuses.values():
        return None, statuses
    unigram = unigram_loss(shard_dir)
    data = {(run.labels["variant"], run.labels["seed"]): measure(run_dir(out, run), run.labels["seed"],
                                                                 budget.diagnose_batches, unigram)
            for run in runs}
    results = []
    for claim in claims:
        variants = claim_variants(claim, budget)
        by_seed = {seed: {label: data[v.label, seed] for label, v in variants.items()} for seed in seeds}
        results.append({"claim": claim, "by_seed": by_seed, **evaluate_claim(claim, by_seed)})
    return write_report(out, budget, seeds, results, unigram), statuses


def measure(run: RunDir, seed: int, batches: int, unigram: float | None = None) -> RunData:
    """A run's summary (status "stalled" when it sat at the ``unigram`` loss), layer records and,
    when it trained to the end (finished or stalled), diagnostics (computed once, into
    RUN/diagnose/diagnostics.json, for its newest checkpoint). A diverged run is data too."""
    summary = run_summary(run, seed, unigram_loss=unigram)
    if summary["status"] not in COMPLETED:
        return RunData(summary, run.read_metrics(), run.read_layer_stats(), unigram_loss=unigram)
    step = list_checkpoints(run.checkpoints)[-1].step
    saved = run.path / "diagnose" / "diagnostics.json"
    diagnostics: dict[str, Any] | None = json.loads(saved.read_text()) if saved.is_file() else None
    if diagnostics is None or diagnostics["step"] != step:
        diagnostics = diagnose(run.path, run.path / "diagnose", step=step, batches=batches, progress=False)
    return RunData(summary, run.read_metrics(), run.read_layer_stats(), diagnostics, unigram)

