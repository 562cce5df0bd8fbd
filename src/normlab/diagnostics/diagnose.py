"""``normlab diagnose RUN_DIR``: every layer diagnostic of one checkpoint, written as
``diagnostics.json`` (every number), PNG plots and ``summary.md``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from normlab.compare.plots import save
from normlab.data import TokenShards, eval_batches, prepare_or_load
from normlab.diagnostics import figures, measures
from normlab.errors import check_output_dir
from normlab.train.checkpoint import atomic_write_text, list_checkpoints
from normlab.train.rundir import RunDir
from normlab.train.saved import load_run
from normlab.train.trainer import cache_root, load_data


def diagnose(run_dir: str | Path, out: str | Path, data: str | None = None, step: int | None = None,
             batches: int = 4, progress: bool = True, reference_step: int | None = None) -> dict[str, Any]:
    """Compute every diagnostic on ``batches`` validation batches and write the outputs. MoE
    routing changes are measured against checkpoint ``reference_step`` (default: the one
    before ``step``, when the run kept one)."""
    out = check_output_dir(out, "--out", ("diagnostics.json", "gradient_norms.png"))  # its last file, its first
    saved = load_run(run_dir, step)
    cfg, model, step = saved.config, saved.model, saved.step
    shard_dir, _ = load_data(cfg.data, progress)
    if data is not None:  # another corpus, tokenized with the run's own tokenizer
        shard_dir = prepare_or_load(data, shard_dir / "tokenizer", cache_root(cfg.data),
                                    val_fraction=cfg.data.val_fraction, progress=progress)
    val = list(eval_batches(TokenShards(shard_dir, "val"), cfg.train.batch_size, cfg.train.seq_len, batches))
    torch.manual_seed(0)

    steps = tqdm(total=6, desc="diagnose", disable=not (progress and sys.stderr.isatty()))

    def advance(name: str) -> None:
        steps.set_postfix_str(name)
        steps.update(1)

    states = [measures.residual_states(model, x) for x, _ in val]
    result: dict[str, Any] = {
        "run": str(run_dir), "step": step, "strategy": cfg.model.strategy, "norm": cfg.model.norm,
        "placement": cfg.model.placement, "n_layers": cfg.model.n_layers,
        "batches": len(val), "tokens": sum(y.numel() for _, y in val),
        "data": data or cfg.data.corpus,
    }
    result["gradient_norms"] = measures.gradient_norms(model, val)
    advance("gradients")
    result["residual"] = measures.residual_statistics(states)
    advance("activations")
    matrix = measures.angular_distance_matrix(states)
    result["angular_distance"] = [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]
    advance("angular distance")
    result["layer_drop"] = measures.layer_drop(model, val)
    advance("layer drop")
    norm_io = measures.norm_io(model, val)
    result["norm_saturation"] = [{k: e[k] for k in ("layer", "slot", "saturation")} for e in norm_io]
    advance("norm curves")
    result["bhyt_statistic"] = measures.bhyt_statistic_check(model, val)
    advance("bhyt")
    steps.close()
    if cfg.model.moe_experts:
        reference = _reference_checkpoint(run_dir, step, reference_step)
        result["moe_reference_step"] = reference.step if reference is not None else None
        result["moe_routing"] = measures.moe_routing(model, val, reference.model if reference else None)

    plots = {
        "gradient_norms.png": figures.gradient_norms(result["gradient_norms"]),
        "residual.png": figures.residual(result["residual"]),
        "angular_distance.png": figures.angular(matrix),
        "layer_drop.png": figures.layer_drop(result["layer_drop"]),
        "norm_io.png": figures.norm_io(norm_io),
    }
    if result["bhyt_statistic"]:
        plots["bhyt_statistic.png"] = figures.bhyt_check(result["bhyt_statistic"])
    if result.get("moe_routing"):
        plots["moe_routing.png"] = figures.moe_routing(result["moe_routing"])
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [save(fig, out / name).name for name, fig in plots.items()]
    atomic_write_text(out / "diagnostics.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(result))
    return result


def _reference_checkpoint(run_dir, step: int, reference_step: int | None):
    """The run at ``reference_step``, or at its newest checkpoint before ``step``; None if none."""
    if reference_step is None:
        earlier = [c.step for c in list_checkpoints(RunDir(run_dir).checkpoints) if c.step < step]
        if not earlier:
            return None
        reference_step = earlier[-1]
    return load_run(run_dir, reference_step)


def summary_markdown(r: dict[str, Any]) -> str:
    """A short readable summary; every number is in diagnostics.json."""
    lines = [f"# Diagnostics: {r['run']} at step {r['step']}", "",
             f"{r['strategy'] or r['placement']} ({r['norm']}, {r['n_layers']} layers) on {r['batches']} "
             f"validation batches ({r['tokens']:,} tokens) of {r['data']}.", "",
             "| layer | grad attn | grad ffn | grad norm | residual RMS in | Δ loss if dropped | d(l, l+1) |",
             "|---|---|---|---|---|---|---|"]
    g, res, drop = r["gradient_norms"], r["residual"], r["layer_drop"]["layers"]
    for layer in range(r["n_layers"]):
        lines.append(f"| {layer} | {g['attn'][layer]:.3g} | {g['ffn'][layer]:.3g} | {g['norm'][layer]:.3g} | "
                     f"{res['rms'][layer]:.3g} | {drop[layer]['delta_loss']:+.4f} | "
                     f"{r['angular_distance'][layer][0]:.3f} |")
    lines += ["", f"Residual RMS leaving the last block: {res['rms'][-1]:.3g} "
              f"(growth ×{res['rms'][-1] / res['rms'][0]:.1f} over the stack); base val loss "
              f"{r['layer_drop']['base_loss']:.4f}."]
    saturated = [e for e in r["norm_saturation"] if e["saturation"] is not None]
    if saturated:
        lines += ["", "Tanh saturation (share of |argument| > 2): " + ", ".join(
            f"L{e['layer']} {e['slot']} {e['saturation']:.2%}" for e in saturated)]
    if r["bhyt_statistic"]:
        lines += ["", "| layer | c_attn | approx / exact | Pearson r |", "|---|---|---|---|"]
        lines += [f"| {b['layer']} | {b['c_attn']:.3g} | {b['ratio']:.3f} | {b['pearson_r']:.3f} |"
                  for b in r["bhyt_statistic"]]
    if r.get("moe_routing"):
        since = r["moe_reference_step"]
        lines += ["", "| MoE layer | busiest expert | idlest expert | router entropy / ln E | "
                  f"top-1 changed since step {'—' if since is None else since} |", "|---|---|---|---|---|"]
        for m in r["moe_routing"]:
            changed = "—" if m["top1_changed"] is None else f"{m['top1_changed']:.1%}"
            lines.append(f"| {m['layer']} | {max(m['load']):.1%} | {min(m['load']):.1%} | "
                         f"{m['entropy_normalized']:.3f} | {changed} |")
    lines += ["", *[f"![{name}]({name})" for name in r["plots"]]]
    return "\n".join(lines) + "\n"
