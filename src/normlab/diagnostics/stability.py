"""``normlab stability``: a grid of short runs over (strategy, depth, learning rate, seed) and a
heat-map per strategy of the final validation loss, diverged and stalled cells marked. Resumable: it is a
sweep (``normlab.compare.sweep``) like ``compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from normlab.compare.plots import save
from normlab.compare.report import LATE_PART, STALL_MARGIN, run_summary
from normlab.compare.stats import mean_std
from normlab.compare.sweep import plan_runs, run_dir, run_sweep, write_plan
from normlab.data import unigram_loss
from normlab.diagnostics.figures import stability_maps
from normlab.errors import ConfigError, check_choice, check_output_dir
from normlab.strategies import STRATEGIES
from normlab.train.checkpoint import atomic_write_text

#: the grid a stability sweep trains, written before training: it marks OUT as this verb's
PLAN_FILE = "stability-plan.json"


def stability(raw: dict[str, Any], strategies: list[str], lrs: list[float], depths: list[int],
              seeds: list[int], out: str | Path, progress: bool = True,
              jobs: int = 1) -> tuple[Path | None, dict[str, str]]:
    """Train the grid (skipping finished cells) and write stability.{json,md} and the map.
    Returns the PNG path (None when a run was interrupted: no map from a part of the grid) and
    each run's status."""
    out = check_output_dir(out, "--out", (PLAN_FILE, "stability.json"))
    for name in strategies:
        check_choice("--strategies", name, tuple(STRATEGIES))
    for label, values in (("--strategies", strategies), ("--lrs", lrs), ("--depths", depths), ("--seeds", seeds)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"{label}: give one or more distinct values")
    if any(lr <= 0 for lr in lrs) or any(d <= 0 for d in depths):
        raise ConfigError("--lrs and --depths must be positive")
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {jobs}")
    runs, shard_dir = plan_runs(raw, [(f"{s}-L{d}-lr{lr!r}-s{seed}", {"strategy": s, "layers": d, "lr": repr(lr), "seed": seed},
                                       [f"model.strategy={s}", f"model.n_layers={d}", f"train.lr={lr!r}",
                                        f"train.seed={seed}"])
                                      for s in strategies for d in depths for lr in lrs for seed in seeds], progress)
    write_plan(runs, out, PLAN_FILE, {"strategies": strategies, "depths": depths, "lrs": lrs, "seeds": seeds,
                                      "runs": [run.name for run in runs]})
    statuses = run_sweep(runs, out, progress, jobs)
    if "interrupted" in statuses.values():
        return None, statuses
    unigram = unigram_loss(shard_dir)
    grid: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for run in runs:
        summary = run_summary(run_dir(out, run), run.labels["seed"], unigram_loss=unigram)
        cell = grid[run.labels["strategy"]].setdefault(f"{run.labels['layers']}|{run.labels['lr']}", {"runs": []})
        cell["runs"].append(summary)
    for cells in grid.values():
        for cell in cells.values():
            finished = [r["final_val_loss"] for r in cell["runs"] if r["final_val_loss"] is not None]
            cell["val_loss"] = mean_std(finished)["mean"]
            cell["diverged"] = sum(r["status"] == "diverged" for r in cell["runs"])
            cell["stalled"] = sum(r["status"] == "stalled" for r in cell["runs"])
            cell["n"] = len(cell["runs"])
    result = {"strategies": strategies, "depths": depths, "lrs": lrs, "seeds": seeds, "unigram_loss": unigram,
              "stall_margin": STALL_MARGIN, "grid": grid}
    atomic_write_text(out / "stability.json", json.dumps(result, indent=1) + "\n")
    path = save(stability_maps(grid, strategies, depths, lrs), out / "stability.png")
    atomic_write_text(out / "stability.md", markdown(result))
    return path, statuses


def markdown(result: dict[str, Any]) -> str:
    lrs = result["lrs"]
    lines = ["# Stability map", "",
             f"Final validation loss (mean over seeds {', '.join(map(str, result['seeds']))}); "
             f"✕k = k runs diverged; ≈k = k runs stalled at or above the unigram loss {result['unigram_loss']:.4f} "
             f"(over the last {LATE_PART:.0%} of training never {result['stall_margin']:.0%} below it, and "
             "not falling; their loss is in the mean).", ""]
    for strategy in result["strategies"]:
        lines += [f"## {strategy}", "", "| layers \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for depth in result["depths"]:
            cells = []
            for lr in lrs:
                cell = result["grid"][strategy][f"{depth}|{lr!r}"]
                text = "—" if cell["val_loss"] is None else f"{cell['val_loss']:.3f}"
                cells.append(text + (f" ✕{cell['diverged']}" if cell["diverged"] else "")
                             + (f" ≈{cell['stalled']}" if cell["stalled"] else ""))
            lines.append(f"| {depth} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("![stability map](stability.png)")
    return "\n".join(lines) + "\n"
