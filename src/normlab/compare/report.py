"""The comparison report: ``summary.json`` (every number), ``report.md``, ``report.html``
(one self-contained file, plots embedded) and ``plots/*.png``. Reads run directories only."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from normlab.compare import plots
from normlab.compare.stats import deep_minus_shallow, log_growth, mean_std, paired_difference
from normlab.eval import default_results_path
from normlab.train.checkpoint import atomic_write_text, list_checkpoints
from normlab.train.rundir import RunDir

#: share of the last logged training steps averaged into the "final training loss"
FINAL_WINDOW = 0.1
#: the last part of training over which the report asks whether validation loss still falls
LATE_PART = 0.2
#: a run is ``stalled`` within this share of the unigram loss (see ``stalled``)
STALL_MARGIN = 0.05
#: statuses of runs that trained to the end: their losses count (a stalled one is flagged)
COMPLETED = ("finished", "stalled")
#: the downstream number a task is compared by: the first of these its results hold
PRIMARY_METRICS = ("acc", "bits_per_byte", "perplexity")
HIGHER_IS_BETTER = {"acc": True, "bits_per_byte": False, "perplexity": False}


def eval_results(run: RunDir, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The results JSON (``normlab.eval``) of ``run``'s newest checkpoint if it holds every task
    of ``evaluation`` ({tasks, names, num_fewshot, limit, data_dir}) scored with the same
    options, else None."""
    checkpoints = list_checkpoints(run.checkpoints)
    if not checkpoints:
        return None
    try:
        results = json.loads(default_results_path(run.path, checkpoints[-1].step).read_text())
    except (OSError, ValueError):
        return None
    if results.get("num_fewshot") != evaluation["num_fewshot"] or results.get("limit") != evaluation["limit"]:
        return None
    return results if set(evaluation["names"]) <= set(results.get("tasks", {})) else None


def primary_metric(task_result: dict[str, Any]) -> str:
    return next(m for m in PRIMARY_METRICS if m in task_result["metrics"])


def _late_drop(evaluated: list[dict[str, Any]]) -> float | None:
    """How much the validation loss fell over the last LATE_PART of training: the value at the
    last evaluation at or before (1 - LATE_PART) of the final step, minus the final value."""
    if len(evaluated) < 2:
        return None
    cut = (1 - LATE_PART) * evaluated[-1]["step"]
    before = [r for r in evaluated[:-1] if r["step"] <= cut] or evaluated[:1]
    return before[-1]["val_loss"] - evaluated[-1]["val_loss"]


def stalled(metrics: list[dict[str, Any]], unigram_loss: float) -> bool:
    """Whether a run sat at the unigram loss H of its corpus (the loss of a model that learned
    only token frequencies, ``normlab.data.unigram_loss``) for the last LATE_PART of training:
    every validation loss in that part is >= (1 - STALL_MARGIN)·H, and the loss fell by less
    than STALL_MARGIN·H over it (``_late_drop``), so it is not on its way down either (a run
    still falling is under-trained, which the budget check reports). Needs two evaluations.

    STALL_MARGIN = 5% of H: on the default corpus (bytes, H = 3.29 nats) it is 0.16 nats, about
    5 times the seed-to-seed spread of a final validation loss in the tests' tiny runs (0.03),
    while one token of context already brings the loss to 2.58 (the bigram conditional
    entropy, 22% below H)."""
    evaluated = [r for r in metrics if r.get("val_loss") is not None]
    drop = _late_drop(evaluated)
    if drop is None:
        return False
    cut = (1 - LATE_PART) * evaluated[-1]["step"]
    late = [r["val_loss"] for r in evaluated if r["step"] > cut]
    return min(late) >= (1 - STALL_MARGIN) * unigram_loss and drop < STALL_MARGIN * unigram_loss


def run_summary(run: RunDir, seed: int, evaluation: dict[str, Any] | None = None,
                unigram_loss: float | None = None) -> dict[str, Any]:
    """Final numbers of one run (None where it has none, e.g. diverged before evaluating);
    ``downstream`` maps each task of ``evaluation`` to its primary metric's value. A finished
    run that ``stalled`` at ``unigram_loss`` has status "stalled" (its numbers are kept)."""
    status = run.read_status()
    metrics = run.read_metrics()
    evaluated = [r for r in metrics if r.get("val_loss") is not None]
    tail = metrics[-max(1, math.ceil(len(metrics) * FINAL_WINDOW)):] if metrics else []
    finished = status.get("status") == "finished"
    is_stalled = finished and unigram_loss is not None and stalled(metrics, unigram_loss)
    rates = sorted(r["tokens_per_s"] for r in metrics if r.get("tokens_per_s"))
    return {
        "seed": seed,
        "status": "stalled" if is_stalled else status.get("status", "missing"),
        "reason": (f"final val loss {evaluated[-1]['val_loss']:.4f}: over the last {LATE_PART:.0%} of training "
                   f"never {STALL_MARGIN:.0%} below the unigram loss {unigram_loss:.4f}, and fell by less "
                   f"than {STALL_MARGIN:.0%} of it") if is_stalled else status.get("reason"),
        "steps": metrics[-1]["step"] if metrics else 0,
        "tokens": metrics[-1]["tokens"] if metrics else 0,
        "final_train_loss": sum(r["loss"] for r in tail) / len(tail) if finished and tail else None,
        "final_val_loss": evaluated[-1]["val_loss"] if finished and evaluated else None,
        "late_val_drop": _late_drop(evaluated) if finished else None,
        "final_val_ppl": evaluated[-1]["val_ppl"] if finished and evaluated else None,
        "tokens_per_s": rates[len(rates) // 2] if rates else None,
        "downstream": _downstream(run, evaluation) if finished and evaluation else {},
    }


def _downstream(run: RunDir, evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    results = eval_results(run, evaluation)
    if results is None:
        return {}
    tasks = {name: results["tasks"][name] for name in evaluation["names"]}
    return {name: {"metric": primary_metric(t), "value": t["metrics"][primary_metric(t)]["value"]}
            for name, t in tasks.items()}


def depth_profile(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Two depth effects from a run's ``layers.jsonl`` (claims 1 and 3 of docs/reproduce.md):
    ``residual_growth`` = ln(RMS_L / RMS_1), the residual stream leaving the last block over
    leaving the first, at the last record; ``grad_tilt`` = deep-half minus shallow-half mean of
    ln ‖∂L/∂θ_l‖ at the first record (step 1: at init; > 0 = early layers get smaller
    gradients, as the papers find for Post-Norm; < 0 as for Pre-Norm). None when not recorded
    or the model has fewer than 2 layers."""
    out: dict[str, float | None] = {"residual_growth": None, "grad_tilt": None}
    if not records or len(records[0]["grad_norm"]["total"]) < 2:
        return out
    rms = records[-1]["residual_rms"]
    if rms[1] > 0 and all(math.isfinite(v) for v in rms):
        out["residual_growth"] = log_growth(rms)
    grads = records[0]["grad_norm"]["total"]
    if all(g > 0 and math.isfinite(g) for g in grads):
        out["grad_tilt"] = deep_minus_shallow([math.log(g) for g in grads])
    return out


def summarize(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """All numbers of the report, from ``spec`` (what compare ran) and the run directories."""
    baseline = spec["baseline"]
    unigram_loss = spec["setup"].get("unigram_loss")  # None in compare.json written before it existed
    entries: dict[str, dict[str, Any]] = {}
    for variant in spec["variants"]:
        runs = [run_summary(RunDir(out / "runs" / name), seed, spec.get("eval"), unigram_loss)
                for seed, name in zip(spec["seeds"], variant["runs"], strict=True)]
        ok = [r for r in runs if r["final_val_loss"] is not None]
        entries[variant["label"]] = {
            "strategy": variant["strategy"],
            "init": variant["init"],
            "runs": runs,
            "train_loss": mean_std([r["final_train_loss"] for r in ok]),
            "val_loss": mean_std([r["final_val_loss"] for r in ok]),
            "val_ppl": mean_std([r["final_val_ppl"] for r in ok]),
            "late_val_drop": mean_std([r["late_val_drop"] for r in ok if r["late_val_drop"] is not None]),
            "tokens_per_s": mean_std([r["tokens_per_s"] for r in runs if r["tokens_per_s"]]),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "stalled": sum(r["status"] == "stalled" for r in runs),
            "failed": sum(r["status"] not in (*COMPLETED, "diverged") for r in runs),
            "n_runs": len(runs),
            **_depth_entry([RunDir(out / "runs" / name) for name in variant["runs"]]),
        }
    base = entries[baseline]
    for label, entry in entries.items():
        entry["delta_val_loss"] = None
        if label != baseline:
            pairs = [(r["final_val_loss"], b["final_val_loss"])
                     for r, b in zip(entry["runs"], base["runs"], strict=True)
                     if r["final_val_loss"] is not None and b["final_val_loss"] is not None]
            if pairs:
                entry["delta_val_loss"] = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
        entry["verdict"] = verdict(label, entry, baseline)
        entry["downstream"] = downstream_summary(entry["runs"], base["runs"], (spec.get("eval") or {}).get("names", []),
                                                 paired=label != baseline)
    ranking = rank(entries)
    return {
        "budget": budget_check(entries, ranking),
        "baseline": baseline,
        "unigram_loss": unigram_loss,
        "stall_margin": STALL_MARGIN,
        "setup": spec["setup"],
        "seeds": spec["seeds"],
        "same_init": spec["same_init"],
        "eval": spec.get("eval"),
        "final_train_loss_window": FINAL_WINDOW,
        "strategies": entries,
        "ranking": ranking,
        "headline": headline(entries, ranking, baseline),
    }


def _depth_entry(runs: list[RunDir]) -> dict[str, Any]:
    """``depth_profile`` over seeds: mean ± std of residual growth and gradient tilt, and the
    step of the first record the tilt comes from."""
    recorded = [records for records in (run.read_layer_stats() for run in runs) if records]
    profiles = [depth_profile(records) for records in recorded]
    entry = {key: mean_std([p[key] for p in profiles if p[key] is not None])
             for key in ("residual_growth", "grad_tilt")}
    entry["grad_tilt_step"] = min(records[0]["step"] for records in recorded) if recorded else None
    return entry


def downstream_summary(runs: list[dict], base_runs: list[dict], tasks: list[str],
                       paired: bool) -> dict[str, dict[str, Any]]:
    """Per task: the primary metric's mean ± std over seeds and, for a non-baseline strategy, the
    difference to the baseline paired by seed with its 95% CI (as for the validation loss)."""
    out = {}
    for task in tasks:
        scored = [r["downstream"][task] for r in runs if task in r["downstream"]]
        pairs = [(r["downstream"][task]["value"], b["downstream"][task]["value"])
                 for r, b in zip(runs, base_runs, strict=True)
                 if task in r["downstream"] and task in b["downstream"]]
        out[task] = {
            "metric": scored[0]["metric"] if scored else None,
            "value": mean_std([s["value"] for s in scored]),
            "delta": paired_difference([p[0] for p in pairs], [p[1] for p in pairs]) if paired and pairs else None,
        }
    return out


def rank(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Strategies with a finished run by mean validation loss; those that diverged or stalled
    in some seed come after those that never did."""
    return sorted((label for label, e in entries.items() if e["val_loss"]["n"]),
                  key=lambda label: (_unstable(entries[label]), entries[label]["val_loss"]["mean"]))


def _unstable(entry: dict[str, Any]) -> bool:
    return entry["diverged"] + entry["stalled"] > 0


def verdict(label: str, entry: dict[str, Any], baseline: str) -> str:
    """One plain sentence per strategy."""
    n, diverged, stalled_runs = entry["n_runs"], entry["diverged"], entry["stalled"]
    if entry["val_loss"]["n"] == 0:
        return f"diverged in {diverged}/{n} seeds" if diverged else f"no finished run ({n - entry['failed']}/{n} ok)"
    unstable = (f"; diverged in {diverged}/{n} seeds" if diverged else "") + \
        (f"; stalled at or above the unigram loss in {stalled_runs}/{n} seeds" if stalled_runs else "")
    if label == baseline:
        return f"baseline: val loss {_pm(entry['val_loss'])}{unstable}"
    delta = entry["delta_val_loss"]
    if delta is None:
        return f"val loss {_pm(entry['val_loss'])}; no seed where {baseline} also finished{unstable}"
    size = abs(delta["mean"])
    if delta["half_width"] is None:
        side = "lower" if delta["mean"] < 0 else "higher"
        return (f"{side} val loss than {baseline} by {size:.4f} (1 seed: no confidence interval; "
                f"use more seeds){unstable}")
    pm = f"{size:.4f} ± {delta['half_width']:.4f} (95% CI, {delta['n']} seeds)"
    if delta["high"] < 0:
        return f"lower val loss than {baseline} by {pm}{unstable}"
    if delta["low"] > 0:
        return f"higher val loss than {baseline} by {pm}{unstable}"
    return f"no clear difference from {baseline}: {delta['mean']:+.4f} ± {delta['half_width']:.4f} (CI includes 0){unstable}"


def budget_check(entries: dict[str, Any], ranking: list[str]) -> dict[str, Any]:
    """Whether the budget can rank the strategies: not when some strategy's validation loss
    still fell, over the last LATE_PART of training (mean over seeds), by more than the
    smallest gap between the mean final losses of two strategies next to each other in the
    ranking; the ranking may then change with more training."""
    drops = {label: entries[label]["late_val_drop"]["mean"] for label in ranking
             if entries[label]["late_val_drop"]["mean"] is not None}
    means = [entries[label]["val_loss"]["mean"] for label in ranking]
    gaps = [b - a for a, b in zip(means, means[1:], strict=False)]
    if not drops or not gaps:
        return {"adequate": None, "max_late_drop": None, "min_gap": None, "message": ""}
    fastest = max(drops, key=drops.get)
    max_drop, min_gap = drops[fastest], min(gaps)
    adequate = max_drop <= min_gap
    message = "" if adequate else (
        f"The ranking may change with more training: over the last {LATE_PART:.0%} of training the "
        f"validation loss still fell by {max_drop:.4f} ({fastest}), more than the smallest gap between "
        f"neighbouring strategies ({min_gap:.4f}).")
    return {"adequate": adequate, "max_late_drop": max_drop, "min_gap": min_gap, "message": message}


def headline(entries: dict[str, Any], ranking: list[str], baseline: str) -> str:
    if not ranking:
        return "No strategy finished a run."
    best = ranking[0]
    caveat = " (every strategy diverged or stalled at least once)" if _unstable(entries[best]) else ""
    text = f"Lowest validation loss{caveat}: {best} ({_pm(entries[best]['val_loss'])})"
    if best != baseline:
        text += f"; vs {baseline}: {entries[best]['verdict']}"
    for status in ("diverged", "stalled"):
        hit = [label for label, e in entries.items() if e[status]]
        if hit:
            text += f". {status.capitalize()}: " + ", ".join(f"{u} ({entries[u][status]}/{entries[u]['n_runs']})"
                                                             for u in hit)
    return text + "."


def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _delta(entry: dict[str, Any]) -> str:
    d = entry["delta_val_loss"]
    if d is None:
        return "—"
    if d["half_width"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


TABLE_HEADER = ["strategy", "init", "val loss", "val ppl", "train loss", "Δ val loss vs baseline (95% CI)",
                "diverged", "stalled", "tokens/s"]


def downstream_header(summary: dict[str, Any]) -> list[str]:
    """strategy, then per task its metric and the paired Δ vs the baseline."""
    header = ["strategy"]
    for task in summary["eval"]["names"]:
        metric = next((e["downstream"][task]["metric"] for e in summary["strategies"].values()
                       if e["downstream"][task]["metric"]), "")
        header += [f"{task} {metric}".strip(), f"Δ {task} (95% CI)"]
    return header


def downstream_rows(summary: dict[str, Any]) -> list[list[tuple[str, str]]]:
    """Rows of (text, css class) cells; the class marks a Δ whose CI excludes 0 as better/worse."""
    order = summary["ranking"] + [s for s in summary["strategies"] if s not in summary["ranking"]]
    rows = []
    for label in order:
        row = [(label + (" (baseline)" if label == summary["baseline"] else ""), "")]
        for task in summary["eval"]["names"]:
            cell = summary["strategies"][label]["downstream"][task]
            row.append((_pm(cell["value"]), ""))
            row.append(_delta_cell(cell["delta"], HIGHER_IS_BETTER.get(cell["metric"], True)))
        rows.append(row)
    return rows


def _delta_cell(delta: dict[str, Any] | None, higher_is_better: bool) -> tuple[str, str]:
    if delta is None:
        return "—", ""
    if delta["half_width"] is None:
        return f"{delta['mean']:+.4f}", ""
    up = delta["low"] > 0
    down = delta["high"] < 0
    css = "better" if (up and higher_is_better) or (down and not higher_is_better) else \
        "worse" if up or down else ""
    return f"{delta['mean']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]", css


def depth_header(summary: dict[str, Any]) -> list[str]:
    steps = {e["grad_tilt_step"] for e in summary["strategies"].values()} - {None}
    at = f"step {min(steps)}" if steps else "first record"
    return ["strategy", "residual growth RMS_L / RMS_1", "ln growth",
            f"gradient tilt at {at} (deep − shallow mean ln ‖∂L/∂θ_l‖)"]


def depth_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, e in summary["strategies"].items():
        growth = e["residual_growth"]
        factor = "—" if growth["mean"] is None else f"×{math.exp(growth['mean']):.2f}"
        rows.append([label, factor, _pm(growth, 3), _pm(e["grad_tilt"], 3)])
    return rows


def depth_note(summary: dict[str, Any]) -> str | None:
    """What the depth table shows, in words, with the Pre-/Post-Norm contrast the papers draw
    when both were compared; None when nothing was recorded."""
    entries = summary["strategies"]
    if all(e["residual_growth"]["mean"] is None and e["grad_tilt"]["mean"] is None for e in entries.values()):
        return None
    note = ("Depth effects the papers describe: the residual stream grows with depth "
            "under Pre-Norm and stays flat under Post-Norm (claim 1); Pre-Norm's early layers get "
            "larger gradients than its deep ones (tilt < 0) and Post-Norm's smaller (tilt > 0; claim 3). "
            "Mean ± std over seeds, from the layer records of training.")
    pre, post = (entries.get(name) for name in ("pre_norm", "post_norm"))
    if pre and post and None not in (pre["residual_growth"]["mean"], post["residual_growth"]["mean"],
                                     pre["grad_tilt"]["mean"], post["grad_tilt"]["mean"]):
        layers = summary["setup"]["n_layers"]
        note += (f" Here, over {layers} layers: Pre-Norm's stream grows ×{math.exp(pre['residual_growth']['mean']):.2f} "
                 f"from the first block's output to the last, Post-Norm's ×{math.exp(post['residual_growth']['mean']):.2f}; "
                 f"gradient tilt {pre['grad_tilt']['mean']:+.2f} (Pre-Norm) and {post['grad_tilt']['mean']:+.2f} (Post-Norm).")
    return note


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    order = summary["ranking"] + [s for s in summary["strategies"] if s not in summary["ranking"]]
    rows = []
    for label in order:
        e = summary["strategies"][label]
        tps = e["tokens_per_s"]["mean"]
        rows.append([label + (" (baseline)" if label == summary["baseline"] else ""), e["init"],
                     _pm(e["val_loss"]), _pm(e["val_ppl"], 2), _pm(e["train_loss"]), _delta(e),
                     f"{e['diverged']}/{e['n_runs']}", f"{e['stalled']}/{e['n_runs']}", f"{tps:,.0f}" if tps else "—"])
    return rows


def make_figures(out: Path, summary: dict[str, Any], spec: dict[str, Any]) -> dict[str, Path]:
    """Write the PNG plots; returns caption -> path."""
    labels = list(summary["strategies"])
    palette = plots.colors(labels)
    metrics, layer_stats = {}, {}
    for variant in spec["variants"]:
        runs = [RunDir(out / "runs" / name) for name in variant["runs"]]
        metrics[variant["label"]] = [r.read_metrics() for r in runs]
        layer_stats[variant["label"]] = runs[0].read_layer_stats()
    figures = {
        "Loss against tokens (band: min–max over seeds)": ("loss.png", plots.loss_curves(metrics, palette, summary["unigram_loss"])),
        "Global gradient norm": ("grad_norm.png", plots.grad_norm_curves(metrics, palette)),
    }
    recorded = sorted({r["step"] for records in layer_stats.values() for r in records})
    if recorded:
        chosen = sorted({recorded[0], recorded[len(recorded) // 2], recorded[-1]})
        figures["Gradient norm per layer (first seed)"] = (
            "layer_grad_norm.png", plots.layer_grad_norms(layer_stats, palette, chosen))
        figures["Residual-stream RMS entering each layer, end of training (first seed)"] = (
            "residual_rms.png", plots.residual_rms(layer_stats, palette))
    return {caption: plots.save(fig, out / "plots" / name) for caption, (name, fig) in figures.items()}


def write_report(out: Path, spec: dict[str, Any]) -> Path:
    """Write summary.json, plots, report.md and report.html into ``out``; returns the HTML path."""
    summary = summarize(out, spec)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    figures = make_figures(out, summary, spec)
    atomic_write_text(out / "report.md", render_markdown(summary, figures, out))
    atomic_write_text(out / "report.html", render_html(summary, figures))
    return out / "report.html"


def _setup_lines(summary: dict[str, Any]) -> list[str]:
    s = summary["setup"]
    lines = [
        f"Model: d_model {s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads "
        f"({s['n_kv_heads']} KV), vocabulary {s['vocab_size']:,}, {s['params']:,} parameters (pre_norm).",
        f"Training: {s['max_steps']} steps × {s['tokens_per_step']:,} tokens = {s['tokens']:,} tokens per run, "
        f"lr {s['lr']:g}, corpus {s['corpus']}, seeds {', '.join(map(str, summary['seeds']))}.",
        "Controlled: every run of a seed sees the same batches in the same order and draws its "
        "weights from the same seed; only the normalization differs.",
    ]
    inits = {e["init"] for e in summary["strategies"].values()}
    if summary["same_init"]:
        lines.append(f"Init held fixed for all strategies: {summary['same_init']} (--same-init).")
    elif len(inits) > 1:
        own = [f"{label} ({e['init']})" for label, e in summary["strategies"].items() if e["init"] != "normal"]
        lines.append("Init follows each strategy's paper: " + ", ".join(own) + "; the rest normal. "
                     "Pass --same-init normal to hold it fixed.")
    lines.append(f"Final training loss: mean over the last {summary['final_train_loss_window']:.0%} of logged "
                 "steps; Δ is paired by seed, negative = better than the baseline.")
    if summary["unigram_loss"] is not None:
        margin = summary["stall_margin"]
        lines.append(f"Stalled: a finished run whose validation loss, over the last {LATE_PART:.0%} of training, "
                     f"never went {margin:.0%} below the corpus's unigram loss H = {summary['unigram_loss']:.4f} "
                     f"nats/token (a model that learned only token frequencies) and fell by less than {margin:.0%} "
                     "of H; strategies that stalled or diverged in some seed rank after the others.")
    return lines


def _unusual_runs(summary: dict[str, Any]) -> list[str]:
    """One line per run that did not finish normally (diverged, stalled, failed, ...)."""
    return [f"{label} seed {r['seed']}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
            for label, e in summary["strategies"].items() for r in e["runs"] if r["status"] != "finished"]


def _eval_line(summary: dict[str, Any]) -> str:
    e = summary["eval"]
    items = f"first {e['limit']} items of each task" if e["limit"] else "every item"
    return (f"normlab evaluate on each run's last checkpoint: {e['num_fewshot']}-shot, {items}; "
            "mean ± std over seeds, Δ paired by seed (acc: higher is better; bits per byte and "
            "perplexity: lower is better).")


def render_markdown(summary: dict[str, Any], figures: dict[str, Path], out: Path) -> str:
    lines = ["# normlab comparison", "", f"**{summary['headline']}**", ""]
    if summary["budget"]["message"]:
        lines += [f"> {summary['budget']['message']}", ""]
    lines += ["## Setup", ""]
    lines += [f"- {line}" for line in _setup_lines(summary)]
    lines += ["", "## Verdicts", ""]
    lines += [f"- **{label}**: {e['verdict']}" for label, e in summary["strategies"].items()]
    lines += ["", "## Results", "", "| " + " | ".join(TABLE_HEADER) + " |",
              "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    if depth_note(summary):
        header = depth_header(summary)
        lines += ["", "## Depth", "", depth_note(summary), "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in depth_rows(summary)]
    if summary.get("eval"):
        header = downstream_header(summary)
        lines += ["", "## Downstream", "", _eval_line(summary), "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(text for text, _ in row) + " |" for row in downstream_rows(summary)]
    if _unusual_runs(summary):
        lines += ["", "## Runs that did not finish normally", ""]
        lines += [f"- {line}" for line in _unusual_runs(summary)]
    lines += ["", "## Plots", ""]
    for caption, path in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(out)})", ""]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1080px;margin:2em auto;
padding:0 1em;color:#1d2330;background:#fff}h1{margin-bottom:.2em}.headline{font-size:1.15em;
background:#eef4ff;border-left:4px solid #3b6fd8;padding:.7em 1em;margin:1em 0}
table{border-collapse:collapse;width:100%;font-size:.9em;margin:1em 0}th,td{border-bottom:1px solid #dde;
padding:.4em .6em;text-align:right;white-space:nowrap}th:first-child,td:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
th{background:#f3f5f9;white-space:normal;vertical-align:bottom}.scroll{overflow-x:auto}tr.best td{background:#eafaea;font-weight:600}.better{color:#17803d}.worse{color:#b3261e}
ul{line-height:1.5}img{max-width:100%;border:1px solid #e4e7ee;border-radius:4px}figure{margin:1.5em 0}
figcaption{color:#556;font-size:.9em;margin-bottom:.3em}.muted{color:#667;font-size:.9em}
.warning{background:#fff6e5;border-left:4px solid #d98e04;padding:.5em 1em}
"""


def render_html(summary: dict[str, Any], figures: dict[str, Path]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
             "<title>normlab comparison</title>", f"<style>{CSS}</style></head><body>",
             "<h1>normlab comparison</h1>", f"<div class=headline>{esc(summary['headline'])}</div>",
             *([f"<p class=warning>{esc(summary['budget']['message'])}</p>"] if summary["budget"]["message"] else []),
             "<h2>Verdicts</h2><ul>"]
    for label, e in summary["strategies"].items():
        delta = e["delta_val_loss"]
        cls = ""
        if delta and delta["high"] is not None:
            cls = "better" if delta["high"] < 0 else "worse" if delta["low"] > 0 else ""
        parts.append(f"<li><b>{esc(label)}</b>: <span class='{cls}'>{esc(e['verdict'])}</span></li>")
    parts.append("</ul><h2>Results</h2><div class=scroll><table><tr>"
                 + "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER) + "</tr>")
    ranking = summary["ranking"]
    clean_best = bool(ranking) and not _unstable(summary["strategies"][ranking[0]])
    for i, row in enumerate(table_rows(summary)):
        parts.append(f"<tr class='{'best' if i == 0 and clean_best else ''}'>"
                     + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table></div>")
    if depth_note(summary):
        parts.append(f"<h2>Depth</h2><p class=muted>{esc(depth_note(summary))}</p><div class=scroll><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in depth_header(summary)) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                               for row in depth_rows(summary)) + "</table></div>")
    if _unusual_runs(summary):
        parts.append("<h2>Runs that did not finish normally</h2><ul>"
                     + "".join(f"<li>{esc(line)}</li>" for line in _unusual_runs(summary)) + "</ul>")
    if summary.get("eval"):
        parts.append(f"<h2>Downstream</h2><p class=muted>{esc(_eval_line(summary))}</p><div class=scroll><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in downstream_header(summary)) + "</tr>")
        for row in downstream_rows(summary):
            parts.append("<tr>" + "".join(f"<td class='{css}'>{esc(text)}</td>" for text, css in row) + "</tr>")
        parts.append("</table></div>")
    parts.append("<h2>Setup</h2><ul class=muted>")
    parts += [f"<li>{esc(line)}</li>" for line in _setup_lines(summary)]
    parts.append("</ul><h2>Plots</h2>")
    for caption, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<figure><figcaption>{esc(caption)}</figcaption>"
                     f"<img alt='{esc(caption)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("<p class=muted>Every number is in summary.json.</p></body></html>")
    return "\n".join(parts)
