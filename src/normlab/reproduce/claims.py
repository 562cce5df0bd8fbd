"""The papers' claims (numbered as in docs/reproduce.md) as data: what to train, what to measure, what the paper says.

A claim's ``statistic`` maps the runs of one seed (variant label -> ``RunData``) to named
effects, each signed so that a positive value is what the paper claims. ``verdict`` turns the
per-seed effects into reproduced / not reproduced / inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normlab.compare.stats import deep_minus_shallow, half_means, log_growth, paired_difference

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass
class RunData:
    """What a statistic may read of one run: ``summary`` (compare's ``run_summary``; its
    ``status`` is finished, stalled (finished at the unigram loss: a claim about stalls counts
    it), diverged, ...; its losses are None unless the run trained to the end), ``layers``
    (``layers.jsonl`` records) and ``diagnostics`` (``diagnose`` on the last checkpoint; None
    unless the run finished or stalled), ``metrics`` (``metrics.jsonl``) and the corpus's
    ``unigram_loss``."""

    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    unigram_loss: float | None = None  # of the corpus: what a run that learned nothing scores


Runs = dict[str, RunData]  # variant label -> the run of one seed


@dataclass(frozen=True)
class Claim:
    id: str  # the claim's number in docs/reproduce.md
    paper: str  # paper and table/figure
    statement: str
    paper_number: str  # the paper's number(s), as text
    variants: str  # compare's variant syntax: "pre_norm,bhyt[model.bhyt_kappa=5]"
    statistic: Callable[[Runs], dict[str, float | None]]
    effect: str  # what a positive effect means, with its unit
    profile: Callable[[RunData], list[float]]  # the curve the claim's plot shows per variant
    profile_label: str
    profile_axis: str = "layer"
    short_schedule: bool = False  # its runs use the budget's shorter schedule (stability claims)


# ---------------------------------------------------------------- per-layer profiles
def residual_rms(run: RunData) -> list[float]:
    """RMS of the residual stream entering each block and leaving the last (final checkpoint)."""
    return run.diagnostics["residual"]["rms"]


def first_step_grad_norms(run: RunData) -> list[float]:
    """Per-block gradient norm at the first recorded training step (step 1: at initialisation)."""
    return run.layers[0]["grad_norm"]["total"]


def adjacent_angular_distance(run: RunData) -> list[float]:
    """d(x_l, x_{l+1}) on the last token, per block."""
    return [row[0] for row in run.diagnostics["angular_distance"]]


def layer_drop_delta(run: RunData) -> list[float]:
    """Validation-loss increase when block l becomes the identity."""
    return [row["delta_loss"] for row in run.diagnostics["layer_drop"]["layers"]]


def tanh_saturation(run: RunData) -> list[float]:
    """Share of tanh arguments with |arg| > 2 at the attention-input site of each block."""
    rows = [e for e in run.diagnostics["norm_saturation"]
            if e["slot"] == "input_layernorm" and e["saturation"] is not None]
    return [e["saturation"] for e in sorted(rows, key=lambda e: e["layer"])]


def bhyt_pearson(run: RunData) -> list[float]:
    """Pearson r between BHyT's approximated and exact FFN-site statistic, per block."""
    return [row["pearson_r"] for row in run.diagnostics["bhyt_statistic"] or []]


def validation_curve(run: RunData) -> list[float]:
    """Validation loss at each evaluation."""
    return [r["val_loss"] for r in run.metrics if r.get("val_loss") is not None]


# ---------------------------------------------------------------- statistics
def _measured(runs: Runs, *labels: str) -> bool:
    return all(label in runs and runs[label].diagnostics is not None for label in labels)


def pre_norm_residual_growth(runs: Runs) -> dict[str, float | None]:
    """ln(RMS_L / RMS_1) of the Pre-Norm residual stream (> 0: grows with depth)."""
    return {"Pre-Norm ln RMS growth": log_growth(residual_rms(runs["pre_norm"]))
            if _measured(runs, "pre_norm") else None}


def bhyt_growth_gap(runs: Runs) -> dict[str, float | None]:
    """ln-RMS growth of Pre-Norm (and of DyT) minus BHyT's (> 0: BHyT grows less)."""
    out = {}
    for other, name in (("pre_norm", "Pre-Norm"), ("dyt", "DyT")):
        ok = _measured(runs, other, "bhyt")
        out[f"{name} − BHyT ln RMS growth"] = (
            log_growth(residual_rms(runs[other])) - log_growth(residual_rms(runs["bhyt"])) if ok else None)
    return out


def pre_norm_deep_layers_matter_less(runs: Runs) -> dict[str, float | None]:
    """Shallow-half minus deep-half mean of d(l, l+1) and of the layer-drop Δ loss (> 0: deep
    blocks change the stream less and matter less)."""
    if not _measured(runs, "pre_norm"):
        return {"angular distance shallow − deep": None, "layer-drop Δ shallow − deep": None}
    run = runs["pre_norm"]
    return {"angular distance shallow − deep": -deep_minus_shallow(adjacent_angular_distance(run)),
            "layer-drop Δ shallow − deep": -deep_minus_shallow(layer_drop_delta(run))}


def gradient_tilt(runs: Runs) -> dict[str, float | None]:
    """Tilt = deep-half minus shallow-half mean of ln ‖∂L/∂θ_l‖ at step 1; the claim: Post-Norm
    tilt > 0 (early layers smaller) and Pre-Norm tilt < 0 (reported as −tilt)."""
    def tilt(label: str) -> float | None:
        if label not in runs or not runs[label].layers:
            return None
        return deep_minus_shallow([math.log(g) for g in first_step_grad_norms(runs[label])])

    pre = tilt("pre_norm")
    return {"Post-Norm ln-grad tilt (deep − shallow)": tilt("post_norm"),
            "−Pre-Norm ln-grad tilt": None if pre is None else -pre}


def loss_gap(runs: Runs, worse: str, better: str) -> float | None:
    """Final validation loss of ``worse`` minus ``better``; None unless both finished."""
    losses = [runs[label].summary["final_val_loss"] if label in runs else None for label in (worse, better)]
    return None if None in losses else losses[0] - losses[1]


def gradient_spread(run: RunData) -> float:
    """Sample std over layers of ln ‖∂L/∂θ_l‖ at step 1 (0 = perfectly uniform)."""
    logs = [math.log(g) for g in first_step_grad_norms(run)]
    mean = sum(logs) / len(logs)
    return math.sqrt(sum((v - mean) ** 2 for v in logs) / (len(logs) - 1))


def mixln_gradients_more_uniform(runs: Runs) -> dict[str, float | None]:
    """Spread of ln gradient norms over layers (``gradient_spread``) of Pre-Norm and of
    Post-Norm minus Mix-LN's (> 0: Mix-LN more uniform)."""
    def gap(other: str) -> float | None:
        if not all(label in runs and runs[label].layers for label in (other, "mixln")):
            return None
        return gradient_spread(runs[other]) - gradient_spread(runs["mixln"])

    return {"Pre-Norm − Mix-LN ln-grad spread": gap("pre_norm"),
            "Post-Norm − Mix-LN ln-grad spread": gap("post_norm")}


def mixln_deep_layers_matter_more(runs: Runs) -> dict[str, float | None]:
    """Deep-half mean of d(l, l+1) and of the layer-drop Δ val loss, Mix-LN minus Pre-Norm
    (> 0: Mix-LN's deep blocks do more)."""
    if not _measured(runs, "mixln", "pre_norm"):
        return {"deep-half angular distance Mix-LN − Pre-Norm": None, "deep-half layer-drop Δ Mix-LN − Pre-Norm": None}
    mix, pre = runs["mixln"], runs["pre_norm"]
    return {"deep-half angular distance Mix-LN − Pre-Norm":
            half_means(adjacent_angular_distance(mix))[1] - half_means(adjacent_angular_distance(pre))[1],
            "deep-half layer-drop Δ Mix-LN − Pre-Norm":
            half_means(layer_drop_delta(mix))[1] - half_means(layer_drop_delta(pre))[1]}


def hybridnorm_loss_gain(runs: Runs) -> dict[str, float | None]:
    """Pre-Norm minus HybridNorm(*) final validation loss, and HybridNorm minus HybridNorm*
    (> 0: the claimed order)."""
    return {"Pre-Norm − HybridNorm val loss": loss_gap(runs, "pre_norm", "hybridnorm"),
            "Pre-Norm − HybridNorm* val loss": loss_gap(runs, "pre_norm", "hybridnorm_star"),
            "HybridNorm − HybridNorm* val loss": loss_gap(runs, "hybridnorm", "hybridnorm_star")}


MIXLN_HALF = "mixln[model.mixln_alpha=0.5]"  # α = 0 is Pre-Norm; the default mixln is α = 0.25


def mixln_alpha_u_shape(runs: Runs) -> dict[str, float | None]:
    """Final validation loss at α = 0 (Pre-Norm) and at α = 0.5 minus at α = 0.25 (> 0 both:
    a U with its minimum near 0.25)."""
    return {"loss(α=0) − loss(α=0.25)": loss_gap(runs, "pre_norm", "mixln"),
            "loss(α=0.5) − loss(α=0.25)": loss_gap(runs, MIXLN_HALF, "mixln")}


DYT_NO_SCALAR = "dyt[model.embed_scale=false]"


def dyt_needs_embedding_scalar(runs: Runs) -> dict[str, float | None]:
    """Final validation loss of DyT without the √d embedding scalar minus with it (> 0: worse
    without; a run that diverged or stalled counts through its loss or is left out)."""
    return {"DyT without − with √d scalar val loss": loss_gap(runs, DYT_NO_SCALAR, "dyt")}


def outcome_loss(run: RunData) -> float | None:
    """The stability claims' score: the final validation loss of a run that trained to the end
    (a stalled one sits near the unigram loss anyway), the corpus's unigram loss H for a
    diverged one (it learned nothing usable). None for a run that failed otherwise."""
    if run.summary["status"] == "diverged":
        return run.unigram_loss
    return run.summary["final_val_loss"]


def outcome_gap(runs: Runs, worse: str, better: str) -> float | None:
    """outcome_loss of ``worse`` minus ``better`` (> 0: ``worse`` did worse, diverging counts)."""
    scores = [outcome_loss(runs[label]) if label in runs else None for label in (worse, better)]
    return None if None in scores else scores[0] - scores[1]


HIGH_LR = "1e-2"  # ~3x the cpu budget's 3e-3 and 10x the gpu budget's 1e-3
PRE_HIGH_LR, POST_HIGH_LR, HYBRID_HIGH_LR = (f"{name}[train.lr={HIGH_LR}]" for name in ("pre_norm", "post_norm", "hybridnorm"))
QK_POST_HIGH_LR = f"hybridnorm[model.qk_norm=qk train.lr={HIGH_LR}]"  # QK-norm, no V-norm, Post-Norm FFN
POST_DEEP, HYBRID_DEEP = (f"{name}[model.n_layers=24]" for name in ("post_norm", "hybridnorm"))


def post_norm_unstable_at_high_lr(runs: Runs) -> dict[str, float | None]:
    """At lr 1e-2: Post-Norm's outcome loss minus Pre-Norm's and minus HybridNorm's (> 0:
    Post-Norm ends worse; a diverged run scores the unigram loss)."""
    return {"Post-Norm − Pre-Norm outcome loss": outcome_gap(runs, POST_HIGH_LR, PRE_HIGH_LR),
            "Post-Norm − HybridNorm outcome loss": outcome_gap(runs, POST_HIGH_LR, HYBRID_HIGH_LR)}


def post_norm_unstable_when_deep(runs: Runs) -> dict[str, float | None]:
    """At 24 layers: Post-Norm's outcome loss minus HybridNorm's (> 0: Post-Norm ends worse)."""
    return {"Post-Norm − HybridNorm outcome loss, 24 layers": outcome_gap(runs, POST_DEEP, HYBRID_DEEP)}


def qkv_norm_more_stable_than_qk_post(runs: Runs) -> dict[str, float | None]:
    """At lr 1e-2: QK-Post (QK-norm without V-norm, Post-Norm FFN) minus HybridNorm (QKV-norm)
    outcome loss (> 0: dropping the V-norm hurts)."""
    return {"QK-Post − HybridNorm outcome loss": outcome_gap(runs, QK_POST_HIGH_LR, HYBRID_HIGH_LR)}


PRE_MEGATRON, HYBRID_NORMAL = "pre_norm[model.init=megatron]", "hybridnorm[model.init=normal]"


def init_preference(runs: Runs) -> dict[str, float | None]:
    """Each strategy with the other's init minus with its paper's own (> 0 both: Pre-Norm
    prefers normal, HybridNorm Megatron)."""
    return {"Pre-Norm Megatron − normal val loss": loss_gap(runs, PRE_MEGATRON, "pre_norm"),
            "HybridNorm normal − Megatron val loss": loss_gap(runs, HYBRID_NORMAL, "hybridnorm")}


#: |loss(BHyT) − loss(BHyT*)| below this counts as "about the same" (claim 17), nats/token
EQUIVALENCE_MARGIN = 0.02


def bhyt_matches_exact(runs: Runs) -> dict[str, float | None]:
    """Equivalence of BHyT and BHyT* within ±m (m = 0.02 nats), as two one-sided effects:
    m − Δ and m + Δ with Δ = loss(BHyT) − loss(BHyT*); both CIs above 0 ⇔ Δ's CI inside ±m."""
    gap = loss_gap(runs, "bhyt", "bhyt_star")
    return {"0.02 − (BHyT − BHyT*) val loss": None if gap is None else EQUIVALENCE_MARGIN - gap,
            "0.02 + (BHyT − BHyT*) val loss": None if gap is None else EQUIVALENCE_MARGIN + gap}


#: the paper's correlation between BHyT's approximated and exact FFN-site statistic
PAPER_BHYT_PEARSON = 0.99
#: BHyT's bound on the tanh saturation rate, 1/κ² with κ = 10
BHYT_SATURATION_BOUND = 0.01


def bhyt_statistic_tracks_exact(runs: Runs) -> dict[str, float | None]:
    """min over blocks of Pearson r(ŝ², ms(Y)) minus 0.99 (> 0: r > 0.99 in every block); NaN
    when a block's r is undefined (a constant statistic)."""
    if not _measured(runs, "bhyt"):
        return {"min Pearson r − 0.99": None}
    r = bhyt_pearson(runs["bhyt"])
    return {"min Pearson r − 0.99": min(r) - PAPER_BHYT_PEARSON if all(map(math.isfinite, r)) else math.nan}


def saturation_by_depth(runs: Runs) -> dict[str, float | None]:
    """1% minus BHyT's largest per-block saturation rate (> 0: below 1/κ²), and DyT's deep-half
    minus shallow-half mean saturation (> 0: grows with depth)."""
    return {"1% − max BHyT saturation": BHYT_SATURATION_BOUND - max(tanh_saturation(runs["bhyt"]))
            if _measured(runs, "bhyt") else None,
            "DyT saturation deep − shallow": deep_minus_shallow(tanh_saturation(runs["dyt"]))
            if _measured(runs, "dyt") else None}


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("1", "BHyT Fig. 3; LNS; Peri-LN",
          "Pre-Norm: residual-stream variance and magnitude grow monotonically with depth.",
          "RMSNorm Llama-1B last layer: mean |x| ≈ 700, variance ≈ 270–350",
          "pre_norm", pre_norm_residual_growth, "ln(RMS leaving the last block / RMS leaving the first)",
          residual_rms, "residual RMS"),
    Claim("2", "Mix-LN Fig. 2–3",
          "Pre-Norm: deeper blocks have smaller angular distance and smaller layer-drop ΔP than shallow ones.",
          "LLaMA2-7B: deep layers' d(l, l+1) near 0, dropping them barely changes MMLU",
          "pre_norm", pre_norm_deep_layers_matter_less,
          "shallow-half minus deep-half mean of d(l, l+1) [0, 1] and of Δ val loss (nats)",
          adjacent_angular_distance, "d(x_l, x_{l+1})"),
    Claim("3", "Mix-LN Fig. 3e; HybridNorm Fig. 2",
          "Post-Norm: early-layer gradient norms are smaller than late-layer ones; Pre-Norm the opposite tilt.",
          "qualitative (figure): Post-Norm early gradients vanish, Pre-Norm deep gradients explode/shrink",
          "pre_norm,post_norm", gradient_tilt, "deep-half minus shallow-half mean ln ‖∂L/∂θ_l‖ at step 1",
          first_step_grad_norms, "‖∂L/∂θ_l‖ at step 1"),
    Claim("5", "Mix-LN Fig. 3e",
          "With α ≈ 0.25, per-layer gradient norms are more uniform than under Pre-LN or Post-LN.",
          "qualitative (figure): Mix-LN's gradient norms flat across layers",
          "pre_norm,post_norm,mixln", mixln_gradients_more_uniform,
          "difference in std over layers of ln ‖∂L/∂θ_l‖ at step 1",
          first_step_grad_norms, "‖∂L/∂θ_l‖ at step 1"),
    Claim("6", "Mix-LN Fig. 2–3",
          "Mix-LN's deep layers show larger angular distances and larger layer-drop ΔP than Pre-LN's.",
          "LLaMA-1B: Mix-LN deep-layer d(l, l+1) and ΔP clearly above Pre-LN's (figures)",
          "pre_norm,mixln", mixln_deep_layers_matter_more,
          "deep-half mean of d(l, l+1) [0, 1] and of Δ val loss (nats), Mix-LN minus Pre-Norm",
          layer_drop_delta, "Δ val loss when block l is dropped"),
    Claim("7", "Mix-LN Table 5",
          "Mix-LN perplexity is U-shaped in α, with its minimum near 0.17–0.25.",
          "LLaMA-71M PPL against α: minimum at α ≈ 0.25 (Table 5)",
          f"pre_norm,mixln,{MIXLN_HALF}", mixln_alpha_u_shape, "val loss difference (nats/token)",
          validation_curve, "val loss", "evaluation"),
    Claim("9", "HybridNorm Tables 6, 7",
          "HybridNorm and HybridNorm* reach lower loss than Pre-Norm at equal tokens; HybridNorm* ≤ HybridNorm.",
          "550M: loss Pre-Norm 2.751, HybridNorm 2.737, HybridNorm* 2.731",
          "pre_norm,hybridnorm,hybridnorm_star", hybridnorm_loss_gain, "val loss difference (nats/token)",
          validation_curve, "val loss", "evaluation"),
    Claim("10", "HybridNorm Table 6 (QK-Post)",
          "QKV-norm is more stable than QK-norm without V-norm plus a Post-Norm FFN (QK-Post), which diverged.",
          "550M: QK-Post diverged; HybridNorm (QKV-Post) loss 2.737",
          f"{QK_POST_HIGH_LR},{HYBRID_HIGH_LR}", qkv_norm_more_stable_than_qk_post,
          "outcome-loss difference at lr 1e-2 (nats/token; diverged = unigram loss)",
          validation_curve, "val loss", "evaluation", short_schedule=True),
    Claim("11", "HybridNorm Table 7",
          "HybridNorm trains stably at a depth where Post-Norm becomes unstable.",
          "543M, 29 layers: Post-Norm diverged, HybridNorm loss 2.72",
          f"{POST_DEEP},{HYBRID_DEEP}", post_norm_unstable_when_deep,
          "outcome-loss difference at 24 layers (nats/token; diverged = unigram loss)",
          validation_curve, "val loss", "evaluation", short_schedule=True),
    Claim("12", "HybridNorm Table 5",
          "Init preference: HybridNorm does best with Megatron init, Pre-Norm with plain normal init.",
          "550M loss: Pre-Norm normal 2.75 / Megatron 2.76; HybridNorm normal 2.76 / Megatron 2.74",
          f"pre_norm,{PRE_MEGATRON},hybridnorm,{HYBRID_NORMAL}", init_preference,
          "val loss difference, other init minus own (nats/token)",
          validation_curve, "val loss", "evaluation"),
    Claim("14", "HybridNorm Table 7; Mix-LN (LR 1e-3, ≥ 250M)",
          "At high LR Post-Norm diverges or ends worse while Pre-Norm and HybridNorm train.",
          "Post-Norm diverged at LR 1e-3 (Mix-LN, ≥ 250M); counts of divergent runs (HybridNorm)",
          f"{PRE_HIGH_LR},{POST_HIGH_LR},{HYBRID_HIGH_LR}", post_norm_unstable_at_high_lr,
          "outcome-loss difference at lr 1e-2 (nats/token; diverged = unigram loss)",
          validation_curve, "val loss", "evaluation", short_schedule=True),
    Claim("15", "BHyT Fig. 3",
          "BHyT's residual-stream magnitude grows far less with depth than under Pre-Norm (RMSNorm) or DyT.",
          "Llama-1B last layer mean |x|: RMSNorm ≈ 700, DyT ≈ 320–390, BHyT ≈ 140",
          "pre_norm,dyt,bhyt", bhyt_growth_gap, "difference in ln RMS growth over the stack",
          residual_rms, "residual RMS"),
    Claim("16", "BHyT note (approximation ablation)",
          "BHyT's approximated FFN-site statistic ŝ² tracks the exact ms(Y).",
          "Pearson r > 0.99",
          "bhyt", bhyt_statistic_tracks_exact, "min over blocks of Pearson r, minus 0.99",
          bhyt_pearson, "Pearson r(ŝ², ms(Y))"),
    Claim("17", "BHyT (approximation ablation)",
          "BHyT with the approximated FFN-site statistic matches BHyT* (exact) in loss.",
          "the approximation costs about nothing (loss within noise)",
          "bhyt,bhyt_star", bhyt_matches_exact,
          "equivalence margins: 0.02 ∓ (BHyT − BHyT*) val loss (nats/token)",
          validation_curve, "val loss", "evaluation"),
    Claim("18", "BHyT §3 (bound 1/κ²)",
          "BHyT keeps the tanh saturation rate (|arg| > 2) below ~1%; DyT's grows with depth.",
          "BHyT saturation ≤ 1/κ² = 1% (κ = 10)",
          "dyt,bhyt", saturation_by_depth, "saturation-rate margin / depth trend (fraction of elements)",
          tanh_saturation, "share |tanh arg| > 2"),
    Claim("21", "DyT §4 (LLaMA: learnable scalar after the embedding)",
          "DyT trains like RMSNorm with the width-rule α₀ and the √d embedding scalar; without the scalar it stalls.",
          "LLaMA 7B–70B: without the scalar, DyT training stalls early (no number given)",
          f"pre_norm,dyt,{DYT_NO_SCALAR}", dyt_needs_embedding_scalar, "val loss difference (nats/token)",
          validation_curve, "val loss", "evaluation"),
)}


# ---------------------------------------------------------------- verdicts
def effect_verdict(values: list[float]) -> dict[str, Any]:
    """Mean of the per-seed effects with its 95% Student-t CI; reproduced when the CI lies
    above 0, not reproduced when it lies below 0, else (or with fewer than 2 seeds) inconclusive."""
    ci = paired_difference(values, [0.0] * len(values))
    if ci["half_width"] is None:
        outcome = INCONCLUSIVE
    elif ci["low"] > 0:
        outcome = REPRODUCED
    elif ci["high"] < 0:
        outcome = NOT_REPRODUCED
    else:
        outcome = INCONCLUSIVE
    return {**ci, "values": values, "verdict": outcome}


def claim_verdict(effects: dict[str, dict[str, Any]]) -> str:
    """Reproduced when every effect is; not reproduced when any effect has the opposite sign
    with a CI excluding 0; otherwise inconclusive."""
    outcomes = [e["verdict"] for e in effects.values()]
    if outcomes and all(o == REPRODUCED for o in outcomes):
        return REPRODUCED
    if NOT_REPRODUCED in outcomes:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def evaluate_claim(claim: Claim, runs_by_seed: dict[int, Runs]) -> dict[str, Any]:
    """Per-seed effects of ``claim`` (seeds where an effect is None or not finite, e.g. a
    diverged run or a constant statistic's NaN correlation, are left out), each effect's CI and
    verdict, and the claim's verdict."""
    per_seed = {seed: claim.statistic(runs) for seed, runs in runs_by_seed.items()}
    names = list(next(iter(per_seed.values()))) if per_seed else []
    effects = {name: effect_verdict([v[name] for v in per_seed.values()
                                     if v[name] is not None and math.isfinite(v[name])])
               for name in names}
    return {"effects": effects, "verdict": claim_verdict(effects)}
