"""Figures for ``normlab diagnose`` and ``normlab stability`` (matplotlib, Agg)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from normlab.compare.plots import STYLE  # noqa: E402


def gradient_norms(norms: dict[str, list[float]]) -> plt.Figure:
    """Per-layer gradient norm split into attention, FFN and norm parameters (log scale)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        layers = np.arange(len(norms["total"]))
        for group, marker in (("total", "o"), ("attn", "s"), ("ffn", "^"), ("norm", "v")):
            values = np.array(norms[group], float)
            if values.any():
                ax.plot(layers, np.where(values > 0, values, np.nan), marker=marker, ms=4, label=group)
        ax.set(title="Gradient norm per layer (validation batches)", xlabel="layer",
               ylabel="‖∂L/∂θ‖", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        fig.tight_layout()
    return fig


def residual(stats: dict[str, list[float]]) -> plt.Figure:
    """Residual-stream RMS, variance and max |x| entering each layer (last: leaving the last)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        for ax, key, title in zip(axes, ("rms", "variance", "max_abs"),
                                  ("RMS", "variance over channels", "max |x|"), strict=True):
            ax.plot(range(len(stats[key])), stats[key], marker="o", ms=4, color="tab:blue")
            ax.set(title=title, xlabel="residual position (layer input)", yscale="log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle("Activation growth with depth")
        fig.tight_layout()
    return fig


def angular(matrix: np.ndarray) -> plt.Figure:
    """Heat-map of the angular distance d(x_l, x_{l+n})."""
    with plt.rc_context({**STYLE, "axes.grid": False}):
        n_layers = matrix.shape[0]
        fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.45 * n_layers), max(3.4, 1.2 + 0.4 * n_layers)))
        vmax = max(0.05, float(np.nanmax(matrix)))
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis_r", vmin=0, vmax=vmax,
                          aspect="auto", origin="upper")
        if n_layers <= 12:
            for (layer, n), value in np.ndenumerate(matrix):
                if not np.isnan(value):
                    ax.text(n, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value > vmax / 2 else "black")
        ax.set_xticks(range(n_layers), [str(n + 1) for n in range(n_layers)])
        ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)])
        ax.set(xlabel="n (blocks apart)", ylabel="layer l",
               title="Angular distance d(l, l+n), last token")
        fig.colorbar(image, ax=ax, label="arccos(cos) / π")
        fig.tight_layout()
    return fig


def layer_drop(drop: dict) -> plt.Figure:
    """Change in validation loss when each block is replaced by the identity."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        deltas = [row["delta_loss"] for row in drop["layers"]]
        ax.bar(range(len(deltas)), deltas, color=["tab:red" if d > 0 else "tab:green" for d in deltas])
        ax.set(title=f"Layer drop (base val loss {drop['base_loss']:.3f})", xlabel="dropped layer",
               ylabel="Δ val loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
    return fig


def norm_io(entries: list[dict]) -> plt.Figure:
    """Norm input -> output scatter per layer and slot (DyT Fig. 1 style)."""
    slots = sorted({e["slot"] for e in entries})
    layers = sorted({e["layer"] for e in entries})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(slots), len(layers), figsize=(2.3 * len(layers), 2.2 * len(slots)),
                                 squeeze=False)
        for e in entries:
            ax = axes[slots.index(e["slot"])][layers.index(e["layer"])]
            ax.scatter(e["x"], e["y"], s=1.5, alpha=0.35, color="tab:purple", rasterized=True)
            title = f"layer {e['layer']}"
            if e["saturation"] is not None:
                title += f", sat {e['saturation']:.1%}"
            ax.set_title(title, fontsize=8)
        for row, slot in enumerate(slots):
            axes[row][0].set_ylabel(f"{slot}\noutput", fontsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("input", fontsize=7)
        fig.suptitle("Norm input → output (sat: share of |tanh argument| > 2)")
        fig.tight_layout()
    return fig


def bhyt_check(rows: list[dict]) -> plt.Figure:
    """BHyT's approximated FFN-site statistic against the exact one, per layer."""
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
        layers = [r["layer"] for r in rows]
        left.plot(layers, [r["mean_exact"] for r in rows], marker="o", label="exact ms(Y)")
        left.plot(layers, [r["mean_approx"] for r in rows], marker="s", label="approx s² + c_attn λ²/κ²")
        left.set(title="FFN-site statistic (mean over tokens)", xlabel="layer", yscale="log")
        left.legend()
        right.plot(layers, [r["ratio"] for r in rows], marker="o", label="ratio approx/exact")
        right.plot(layers, [r["pearson_r"] for r in rows], marker="s", label="Pearson r")
        right.axhline(1.0, color="grey", lw=0.8)
        right.set(title="Agreement", xlabel="layer")
        right.legend()
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
    return fig


def moe_routing(rows: list[dict]) -> plt.Figure:
    """Expert load per layer (heat-map) and router entropy per layer."""
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.6, 1]})
        loads = np.array([r["load"] for r in rows])
        image = left.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
        left.set(title="Expert load (share of routing assignments)", xlabel="expert", ylabel="MoE layer",
                 yticks=range(len(rows)), yticklabels=[str(r["layer"]) for r in rows])
        fig.colorbar(image, ax=left, fraction=0.046)
        layers = [r["layer"] for r in rows]
        right.plot(layers, [r["entropy_normalized"] for r in rows], marker="o", label="router entropy / ln E")
        if rows[0]["top1_changed"] is not None:
            right.plot(layers, [r["top1_changed"] for r in rows], marker="s", label="top-1 changed since reference")
        right.set(title="Routing", xlabel="layer", ylim=(0, 1.05))
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.legend()
        fig.tight_layout()
    return fig


def stability_maps(grid: dict, strategies: list[str], depths: list[int], lrs: list[float]) -> plt.Figure:
    """One heat-map per strategy: final validation loss over (depth, lr); diverged cells hatched
    in red and marked with a cross, stalled cells (``normlab.compare.report.stalled``) hatched in
    purple and marked with ≈."""
    finite = [c["val_loss"] for s in strategies for c in grid[s].values() if c["val_loss"] is not None]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    cols = min(3, len(strategies))
    rows = math.ceil(len(strategies) / cols)
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 + 1.2 * len(lrs) * cols, 1.4 + 0.6 * len(depths) * rows),
                                 squeeze=False, layout="constrained")
        image = None
        for ax, strategy in zip(axes.flat, strategies, strict=False):
            values = np.full((len(depths), len(lrs)), np.nan)
            for i, depth in enumerate(depths):
                for j, lr in enumerate(lrs):
                    cell = grid[strategy][f"{depth}|{lr!r}"]
                    if cell["val_loss"] is not None:
                        values[i, j] = cell["val_loss"]
                        ax.text(j, i, f"{cell['val_loss']:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if cell["val_loss"] > (vmin + vmax) / 2 else "white")
                    if cell["diverged"]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx",
                                                   edgecolor="tab:red", lw=0))
                        ax.text(j, i, "✕" if cell["val_loss"] is None else f"\n\n{cell['diverged']}✕",
                                ha="center", va="center", color="tab:red", fontsize=11, fontweight="bold")
                    if cell["stalled"]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                                   edgecolor="purple", lw=0))
                        ax.text(j, i, f"{cell['stalled']}≈\n\n", ha="center", va="center", color="purple",
                                fontsize=11, fontweight="bold")
            image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
            ax.set_yticks(range(len(depths)), [str(d) for d in depths])
            ax.set(title=strategy, xlabel="learning rate", ylabel="layers")
        for ax in list(axes.flat)[len(strategies):]:
            ax.axis("off")
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), label="final val loss", shrink=0.9)
        fig.legend(handles=[Patch(facecolor="white", edgecolor="tab:red", hatch="xx", label="✕ diverged"),
                            Patch(facecolor="white", edgecolor="purple", hatch="//",
                                  label="≈ stalled at or above the unigram loss")],
                   loc="outside lower center", ncols=2, frameon=False)
        fig.suptitle("Stability map (✕ = diverged, ≈ = stalled)")
    return fig
