"""The reproduction report: ``claims.json`` (every number), ``reproduce.md``, ``reproduce.html``
(self-contained, plots embedded) and ``plots/claim-ID.png``: a claims × verdicts table first,
then one section per claim."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from normlab.compare import plots
from normlab.compare.report import COMPLETED, CSS, LATE_PART, STALL_MARGIN
from normlab.train.checkpoint import atomic_write_text

SMOKE_DISCLAIMER = ("SMOKE BUDGET: these verdicts mean nothing; the smoke budget only checks that "
                    "the machinery runs (tiny models, a few steps).")
#: the claims table wraps its long text cells (compare's tables hold short numbers)
CLAIMS_CSS = "table.claims th,table.claims td{text-align:left;white-space:normal;vertical-align:top}"
VERDICT_CSS = {"reproduced": "better", "not reproduced": "worse", "inconclusive": ""}


def effect_text(effect: dict[str, Any]) -> str:
    """'+0.1234 [+0.0100, +0.2368] (3 seeds)', or the mean alone without a CI."""
    if effect["mean"] is None:
        return "— (no finished run)"
    if effect["half_width"] is None:
        return f"{effect['mean']:+.4g} ({effect['n']} seed: no CI)"
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}] ({effect['n']} seeds)"


def claim_figure(result: dict[str, Any]) -> plt.Figure:
    """Left: the claim's profile of each variant (mean over the seeds whose run finished or stalled);
    right: each effect's mean and 95% CI, positive = as the paper claims."""
    claim, by_seed = result["claim"], result["by_seed"]
    labels = list(dict.fromkeys(label for runs in by_seed.values() for label in runs))
    palette = plots.colors(labels)
    with plt.rc_context(plots.STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
        for label in labels:
            curves = [claim.profile(runs[label]) for runs in by_seed.values()
                      if label in runs and runs[label].summary["status"] in COMPLETED]
            curves = [c for c in curves if c]
            if curves:
                width = min(map(len, curves))
                mean = np.mean([c[:width] for c in curves], axis=0)
                left.plot(range(width), mean, marker="o", ms=3, color=palette[label], label=label)
        left.set(title=f"Claim {claim.id}: {claim.profile_label}", xlabel=claim.profile_axis,
                 ylabel=claim.profile_label)
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        if left.get_lines():
            left.legend()
        names = list(result["effects"])
        for row, name in enumerate(names):
            e = result["effects"][name]
            if e["mean"] is not None:
                err = [[e["mean"] - e["low"]], [e["high"] - e["mean"]]] if e["half_width"] is not None else None
                right.errorbar([e["mean"]], [row], xerr=err, fmt="o", color="tab:blue", capsize=4)
        right.axvline(0, color="black", lw=0.8)
        right.set_yticks(range(len(names)), names)
        right.set(title="effect (> 0: as claimed), 95% CI", ylim=(-0.7, len(names) - 0.3))
        fig.tight_layout()
    return fig


def write_report(out: Path, budget, seeds: list[int], results: list[dict[str, Any]],
                 unigram_loss: float | None = None) -> Path:
    """Write claims.json, the plots, reproduce.md and reproduce.html; returns the HTML path.
    ``unigram_loss``: the corpus's, against which runs were judged stalled (None: not judged)."""
    figures = {r["claim"].id: plots.save(claim_figure(r), out / "plots" / f"claim-{r['claim'].id}.png")
               for r in results}
    record = {"budget": budget.name, "budget_note": budget.note, "overrides": list(budget.overrides),
              "short_schedule": list(budget.short),
              "seeds": seeds, "smoke": budget.name == "smoke", "unigram_loss": unigram_loss,
              "claims": [claim_record(r) for r in results]}
    atomic_write_text(out / "claims.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out / "reproduce.md", render_markdown(record, out, figures))
    atomic_write_text(out / "reproduce.html", render_html(record, figures))
    return out / "reproduce.html"


def claim_record(result: dict[str, Any]) -> dict[str, Any]:
    claim = result["claim"]
    return {"id": claim.id, "paper": claim.paper, "statement": claim.statement, "paper_number": claim.paper_number,
            "variants": claim.variants, "short_schedule": claim.short_schedule, "effect": claim.effect,
            "verdict": result["verdict"],
            "effects": result["effects"], "statistic": (claim.statistic.__doc__ or "").strip(),
            "runs": {str(seed): {label: runs[label].summary["status"] for label in sorted(runs)}
                     for seed, runs in result["by_seed"].items()}}


def run_statuses(claim: dict[str, Any]) -> str:
    """The claim's runs that did not simply finish, e.g. 'dyt seed 1: stalled', or 'all finished'."""
    odd = [f"{label} seed {seed}: {status}" for seed, runs in claim["runs"].items()
           for label, status in runs.items() if status != "finished"]
    return "; ".join(odd) if odd else "all finished"


def _schedule(record: dict[str, Any], claim: dict[str, Any]) -> str:
    """', on the shorter schedule (...)' for a stability claim's runs when the budget has one."""
    if claim["short_schedule"] and record["short_schedule"]:
        return f", on the shorter schedule ({' '.join(record['short_schedule'])})"
    return ""


def _intro(record: dict[str, Any]) -> list[str]:
    lines = [SMOKE_DISCLAIMER] if record["smoke"] else []
    lines.append(f"Budget {record['budget']}: {record['budget_note']}; seeds {', '.join(map(str, record['seeds']))}. "
                 "Each effect is signed so that > 0 is what the paper claims; reproduced = its 95% CI over "
                 "seeds lies above 0 for every effect, not reproduced = some effect's CI lies below 0, "
                 "otherwise inconclusive (fewer than 2 seeds is always inconclusive).")
    if record["unigram_loss"] is not None:
        lines.append(f"A run is stalled when, over the last {LATE_PART:.0%} of training, its validation loss never "
                     f"went {STALL_MARGIN:.0%} below the corpus's unigram loss ({record['unigram_loss']:.4f} nats/token) "
                     "and fell by less than that; a stalled run is data: its losses and diagnostics enter the effects.")
    return lines


def render_markdown(record: dict[str, Any], out: Path, figures: dict[str, Path]) -> str:
    intro = _intro(record)
    lines = [intro[0], "", "# normlab reproduce", "", *intro[1:], "",
             "| claim | paper | verdict | paper's number | ours (effect, 95% CI) |", "|---|---|---|---|---|"]
    for c in record["claims"]:
        ours = "; ".join(f"{name}: {effect_text(e)}" for name, e in c["effects"].items())
        cells = [c["id"], c["paper"], f"**{c['verdict']}**", c["paper_number"], ours]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for c in record["claims"]:
        lines += ["", f"## Claim {c['id']}: {c['verdict']}", "", c["statement"], "",
                  f"- Paper ({c['paper']}): {c['paper_number']}",
                  f"- Runs: {c['variants']}{_schedule(record, c)} ({run_statuses(c)})",
                  f"- Statistic: {c['statistic']}", f"- Effect unit: {c['effect']}"]
        lines += [f"- {name}: {effect_text(e)} → {e['verdict']}" for name, e in c["effects"].items()]
        lines += ["", f"![claim {c['id']}]({figures[c['id']].relative_to(out)})"]
    return "\n".join(lines) + "\n"


def render_html(record: dict[str, Any], figures: dict[str, Path]) -> str:
    esc = html.escape
    intro = _intro(record)
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>normlab reproduce</title>",
             f"<style>{CSS}{CLAIMS_CSS}</style></head><body>"]
    if record["smoke"]:
        parts.append(f"<div class='headline worse'>{esc(intro.pop(0))}</div>")
    parts += ["<h1>normlab reproduce</h1>", *[f"<p class=muted>{esc(line)}</p>" for line in intro],
              "<div class=scroll><table class=claims><tr><th>claim</th><th>paper</th><th>verdict</th>"
              "<th>paper's number</th><th>ours (effect, 95% CI)</th></tr>"]
    for c in record["claims"]:
        ours = "<br>".join(f"{esc(name)}: {esc(effect_text(e))}" for name, e in c["effects"].items())
        parts.append(f"<tr><td>{esc(c['id'])}</td><td>{esc(c['paper'])}</td>"
                     f"<td class='{VERDICT_CSS[c['verdict']]}'><b>{esc(c['verdict'])}</b></td>"
                     f"<td>{esc(c['paper_number'])}</td><td>{ours}</td></tr>")
    parts.append("</table></div>")
    for c in record["claims"]:
        data = base64.b64encode(figures[c["id"]].read_bytes()).decode()
        parts += [f"<h2>Claim {esc(c['id'])}: <span class='{VERDICT_CSS[c['verdict']]}'>{esc(c['verdict'])}</span></h2>",
                  f"<p>{esc(c['statement'])}</p><ul>",
                  f"<li>Paper ({esc(c['paper'])}): {esc(c['paper_number'])}</li>",
                  f"<li>Runs: {esc(c['variants'] + _schedule(record, c))} ({esc(run_statuses(c))})</li>"
                  f"<li>Statistic: {esc(c['statistic'])}</li>",
                  *[f"<li>{esc(name)}: {esc(effect_text(e))} → {esc(e['verdict'])}</li>"
                    for name, e in c["effects"].items()],
                  f"</ul><figure><img alt='claim {esc(c['id'])}' src='data:image/png;base64,{data}'></figure>"]
    parts.append("<p class=muted>Every number is in claims.json.</p></body></html>")
    return "\n".join(parts)
