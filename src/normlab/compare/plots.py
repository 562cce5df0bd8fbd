"""Report figures (matplotlib, Agg). Each function takes per-strategy run data and returns a
Figure; ``save`` writes it as PNG. Seeds are drawn as a band (min-max) around their mean."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8}


def colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _band(ax, curves: list[tuple[np.ndarray, np.ndarray]], color, label: str, smooth: int = 1) -> None:
    """Mean line and min-max band of curves sampled at (possibly) different x."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return
    longest = max(curves, key=lambda c: len(c[0]))[0]
    ys = np.full((len(curves), len(longest)), np.nan)
    for i, (_, y) in enumerate(curves):
        ys[i, : len(y)] = _smooth(y, smooth)
    with warnings.catch_warnings():  # all-NaN columns where every seed stopped early
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
    ax.plot(longest, mean, color=color, label=label, lw=1.4)
    if len(curves) > 1:
        ax.fill_between(longest, low, high, color=color, alpha=0.18, lw=0)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (the first points average what exists)."""
    if window <= 1 or len(y) < 2:
        return y
    csum = np.cumsum(np.insert(y, 0, 0.0))
    ends = np.arange(1, len(y) + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def loss_curves(data: dict[str, list[list[dict]]], palette: dict, unigram_loss: float | None = None) -> plt.Figure:
    """Validation loss and (smoothed) training loss against tokens, with the corpus's unigram
    loss (where a run that learned only token frequencies sits) as a dashed line."""
    with plt.rc_context(STYLE):
        fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, runs in data.items():
            val = [_xy(r, "tokens", "val_loss") for r in runs]
            tr = [_xy(r, "tokens", "loss") for r in runs]
            window = max(1, len(tr[0][0]) // 10) if tr and len(tr[0][0]) else 1
            _band(val_ax, val, palette[name], name)
            _band(train_ax, tr, palette[name], name, smooth=window)
        if unigram_loss is not None:
            for ax in (val_ax, train_ax):
                ax.axhline(unigram_loss, color="grey", ls="--", lw=1, label="unigram loss")
        val_ax.set(title="Validation loss", xlabel="tokens", ylabel="loss (nats/token)")
        train_ax.set(title="Training loss (smoothed)", xlabel="tokens", ylabel="loss (nats/token)")
        _zoom(val_ax)
        _zoom(train_ax)
        val_ax.legend(loc="upper right")
        fig.tight_layout()
    return fig


def grad_norm_curves(data: dict[str, list[list[dict]]], palette: dict) -> plt.Figure:
    """Global gradient norm (before clipping) against step, log scale."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, runs in data.items():
            curves = [_xy(r, "step", "grad_norm") for r in runs]
            window = max(1, len(curves[0][0]) // 10) if curves and len(curves[0][0]) else 1
            _band(ax, curves, palette[name], name, smooth=window)
        ax.set(title="Global gradient norm", xlabel="step", ylabel="‖g‖ (before clipping)", yscale="log")
        ax.legend(loc="upper right")
        fig.tight_layout()
    return fig


def layer_grad_norms(stats: dict[str, list[dict]], palette: dict, steps: list[int]) -> plt.Figure:
    """Gradient norm of each block's parameters at a few recorded steps (first seed)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(steps), figsize=(3.4 * len(steps), 3.4), squeeze=False)
        for ax, step in zip(axes[0], steps, strict=True):
            for name, records in stats.items():
                record = next((r for r in records if r["step"] == step), None)
                if record is not None:
                    values = record["grad_norm"]["total"]
                    ax.plot(range(len(values)), values, marker="o", ms=3, color=palette[name], label=name)
            ax.set(title=f"step {step}", xlabel="layer", yscale="log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0][0].set_ylabel("‖∂L/∂θ_layer‖")
        _legend(fig, palette)
        fig.suptitle("Gradient norm per layer (attention + FFN + norm parameters)")
        fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig


def residual_rms(stats: dict[str, list[dict]], palette: dict) -> plt.Figure:
    """RMS of the residual stream entering each layer (and leaving the last) at the last record."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, records in stats.items():
            if records:
                values = records[-1]["residual_rms"]
                ax.plot(range(len(values)), values, marker="o", ms=3, color=palette[name], label=name)
        ax.set(title="Residual-stream RMS by depth (end of training)",
               xlabel="layer (last point: output of the last block)", ylabel="RMS", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(fig, palette)
        fig.tight_layout(rect=(0, 0, 0.76, 1))
    return fig


def _legend(fig: plt.Figure, palette: dict) -> None:
    """One legend for every strategy, also those with nothing to draw at some step."""
    handles = [Line2D([], [], color=color, marker="o", ms=3, label=name) for name, color in palette.items()]
    fig.legend(handles=handles, loc="center right", frameon=False)


def _xy(records: list[dict], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[y]) for r in records if r.get(y) is not None]
    return (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float))


def _zoom(ax) -> None:
    """Clip the y range to the lower part of the curves so the endgame is readable."""
    ys = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.array([])])
    ys = ys[np.isfinite(ys)]
    if ys.size:
        low, high = ys.min(), np.percentile(ys, 90)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))


def save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
