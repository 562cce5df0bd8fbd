"""Run every (strategy, seed) with one base config, then write the report.

A variant is a strategy name, optionally with overrides in brackets:
``pre_norm,hybridnorm,hybridnorm[model.init=normal],post_norm[train.lr=1e-3]``.
"""

from __future__ import annotations

import copy
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.compare.report import eval_results, write_report
from normlab.compare.sweep import plan_runs, run_sweep, write_plan
from normlab.config import INIT_SCHEMES, SECTIONS, RunConfig, apply_overrides
from normlab.data import unigram_loss
from normlab.errors import ConfigError, check_choice, check_output_dir
from normlab.eval import default_results_path, load_task
from normlab.nn.model import build_model
from normlab.strategies import STRATEGIES
from normlab.train.checkpoint import list_checkpoints
from normlab.train.rundir import RunDir
from normlab.workers import WorkerPool, log_tail


@dataclass
class Variant:
    label: str
    strategy: str
    overrides: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label).strip("_")


def parse_variants(text: str) -> list[Variant]:
    """Split on commas outside brackets; ``name[a.b=1 c.d=2]`` carries overrides."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"--strategies: unbalanced ']' in '{text}'")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    if depth:
        raise ConfigError(f"--strategies: unbalanced '[' in '{text}'")
    variants = []
    for item in filter(None, items):
        match = re.fullmatch(r"([A-Za-z0-9_]+)(?:\[(.*)\])?", item)
        if not match:
            raise ConfigError(f"--strategies: cannot read '{item}'; expected NAME or NAME[section.key=value ...]")
        name, extra = match.group(1), match.group(2)
        check_choice("--strategies", name, tuple(STRATEGIES))
        for override in re.split(r"[\s;]+", extra or ""):
            if override.partition("=")[0] in ("model.strategy", "train.seed"):
                raise ConfigError(f"--strategies: '{item}' sets {override.partition('=')[0]}, which the "
                                  "strategy's name and --seeds decide")
        variants.append(Variant(item, name, re.split(r"[\s;]+", extra.strip()) if extra and extra.strip() else []))
    labels = [v.label for v in variants]
    if not variants or len(set(labels)) != len(labels):
        raise ConfigError("--strategies: give one or more distinct strategies, e.g. pre_norm,post_norm")
    return variants


@dataclass
class EvalSpec:
    """Downstream tasks scored on every finished run (``normlab.eval``), with their options."""

    tasks: list[str]
    data_dir: str | None = None
    num_fewshot: int = 0
    limit: int | None = None

    def options(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "num_fewshot": self.num_fewshot, "limit": self.limit}


def compare(raw: dict[str, Any], variants: list[Variant], seeds: list[int], out: str | Path,
            baseline: str = "pre_norm", same_init: str | None = None, progress: bool = True,
            jobs: int = 1, evaluation: EvalSpec | None = None) -> tuple[Path, dict]:
    """Train every (variant, seed) not yet done into OUT/runs, score ``evaluation``'s tasks on
    every finished run, and write the report into OUT. Returns (report.html path, name -> status)."""
    out = check_output_dir(out, "--out", ("compare.json",))
    if baseline not in [v.label for v in variants]:
        raise ConfigError(f"--baseline: '{baseline}' is not among --strategies ({', '.join(v.label for v in variants)}); "
                          "pass --baseline with one of them, written as in --strategies")
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {jobs}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds: give one or more distinct integers, e.g. 0,1,2")
    if same_init is not None:
        check_choice("--same-init", same_init, INIT_SCHEMES)
    task_names = None
    if evaluation is not None:  # every task file is read and checked before anything trains
        task_names = [load_task(task, evaluation.data_dir).name for task in evaluation.tasks]
    raw = copy.deepcopy(raw)
    raw["train"] = dict(raw.get("train") or {})
    checked = RunConfig.from_dict(raw, vocab_size=1)  # every section checked before tokenizing
    if "record_every" not in raw["train"]:  # the report's per-layer plots need a few records
        raw["train"]["record_every"] = max(1, checked.train.max_steps // 10)

    # Every run's config resolved (and the corpus tokenized) once, before any training starts.
    overrides = {v.label: [f"model.strategy={v.strategy}", *v.overrides,
                           *([f"model.init={same_init}"] if same_init is not None else [])] for v in variants}
    runs, shard_dir = plan_runs(raw, [(f"{v.slug}-s{seed}", {"strategy": v.label, "seed": seed},
                                       [*overrides[v.label], f"train.seed={seed}"])
                                      for v in variants for seed in seeds], progress)
    spec_variants = []
    for variant in variants:
        mine = [run for run in runs if run.labels["strategy"] == variant.label]
        spec_variants.append({"label": variant.label, "strategy": variant.strategy, "init": mine[0].config.model.init,
                              "overrides": overrides[variant.label], "runs": [run.name for run in mine]})
    base = RunConfig.resolve(apply_overrides(raw, ["model.strategy=pre_norm"], SECTIONS),
                             runs[0].config.model.vocab_size)
    spec = {
        "baseline": baseline, "seeds": seeds, "same_init": same_init, "variants": spec_variants,
        "setup": {
            "d_model": base.model.d_model, "n_layers": base.model.n_layers, "n_heads": base.model.n_heads,
            "n_kv_heads": base.model.n_kv_heads, "vocab_size": base.model.vocab_size,
            "params": build_model(base.model).num_params(), "max_steps": base.train.max_steps,
            "tokens_per_step": base.train.batch_size * base.train.seq_len * base.train.grad_accum,
            "tokens": base.train.max_steps * base.train.batch_size * base.train.seq_len * base.train.grad_accum,
            "lr": base.train.lr, "corpus": base.data.corpus, "tokenizer": base.data.tokenizer,
            "unigram_loss": unigram_loss(shard_dir),
        },
        "eval": None if evaluation is None else {"tasks": evaluation.tasks, "names": task_names, **evaluation.options()},
    }
    write_plan(runs, out, "compare.json", spec)
    statuses = run_sweep(runs, out, progress, jobs)
    if evaluation is not None:
        finished = [r.name for r in runs if statuses[r.name] == "finished"]
        evaluate_runs(out, finished, evaluation, spec["eval"], progress, jobs)
    return write_report(out, spec), statuses


def evaluate_runs(out: Path, names: list[str], evaluation: EvalSpec, recorded: dict[str, Any],
                  progress: bool, jobs: int = 1) -> None:
    """Score the tasks on each finished run's last checkpoint into ``RUN/eval/step_N.json``,
    ``jobs`` runs at a time (worker processes, like training; output in OUT/sweep/NAME.eval.log),
    skipping runs already scored with the same tasks and options (``recorded``: the spec's
    ``eval`` entry). A run whose scoring fails is reported and the others go on; its report
    cells stay empty."""
    todo = [name for name in names if eval_results(RunDir(out / "runs" / name), recorded) is None]
    logs = out / "sweep"
    logs.mkdir(parents=True, exist_ok=True)
    options = ["--tasks", ",".join(evaluation.tasks), "--num-fewshot", str(evaluation.num_fewshot), "-q"]
    options += ["--data-dir", evaluation.data_dir] if evaluation.data_dir else []
    options += ["--limit", str(evaluation.limit)] if evaluation.limit else []

    def work(item: tuple[int, str]) -> None:
        index, name = item
        run = RunDir(out / "runs" / name)
        head = f"[{index}/{len(todo)}] {name}"
        started = time.perf_counter()
        target = default_results_path(run.path, list_checkpoints(run.checkpoints)[-1].step)
        log = logs / f"{name}.eval.log"
        code = workers.run(["evaluate", str(run.path), *options, "--out", str(target)], log)
        if code:
            print(f"{head}: evaluation failed ({log_tail(log, code)}); continuing", file=sys.stderr, flush=True)
        elif progress:
            print(f"{head}: evaluated in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    with WorkerPool(jobs) as workers, ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, enumerate(todo, 1)))
