"""Resumable sweeps: a list of named runs that share one base config and differ by overrides.
Each run's config is resolved once (``plan_runs``) and that object is what is checked against
an existing run directory and trained.

Re-running a sweep skips finished and diverged runs and resumes the others; a run that fails
with an unexpected error is marked failed and the sweep goes on. ``compare`` and ``stability``
both build on this.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.config import SECTIONS, RunConfig, apply_overrides, config_changes
from normlab.errors import CheckpointError, NormlabError
from normlab.train.checkpoint import atomic_write_text
from normlab.train.rundir import RunDir
from normlab.train.trainer import EXIT_DIVERGED, load_data, train
from normlab.workers import WorkerPool, log_tail

DONE = ("finished", "diverged")


@dataclass
class SweepRun:
    name: str  # directory under OUT/runs
    labels: dict[str, Any]  # what the run stands for, e.g. {"strategy": "mixln", "seed": 1}
    config: RunConfig  # resolved


def plan_runs(raw: dict[str, Any], specs: list[tuple[str, dict[str, Any], list[str]]],
              progress: bool = True) -> tuple[list[SweepRun], Path]:
    """(name, labels, overrides) per run -> (runs with resolved configs, the base config's shard
    directory): the corpus is tokenized once (before any worker starts) and every run's config
    resolved once, so a bad override stops the sweep before anything trains."""
    shard_dir, tokenizer = load_data(RunConfig.from_dict(raw, vocab_size=1).data, progress)
    runs = [SweepRun(name, labels, RunConfig.resolve(apply_overrides(raw, overrides, SECTIONS), tokenizer.vocab_size))
            for name, labels, overrides in specs]
    return runs, shard_dir


def run_dir(out: Path, run: SweepRun) -> RunDir:
    return RunDir(out / "runs" / run.name)


def check_existing(runs: list[SweepRun], out: Path) -> None:
    """Refuse to reuse a run directory trained with another config (e.g. the sweep was re-run
    into the same --out with different overrides): the report would describe the wrong runs."""
    for run in runs:
        directory = run_dir(out, run)
        if directory.exists():
            changes = config_changes(directory.read_config(), run.config.to_dict())
            if changes:
                raise CheckpointError(
                    f"'{directory.path}' was trained with another config ({'; '.join(changes[:3])}); "
                    "use another --out or the original config"
                )


def write_plan(runs: list[SweepRun], out: Path, name: str, plan: dict[str, Any]) -> None:
    """OUT/NAME, the sweep's plan as JSON (it marks OUT as this verb's), written before anything
    trains and after ``check_existing``: a refused re-run leaves the earlier plan in place."""
    check_existing(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, json.dumps(plan, indent=1) + "\n")


def run_sweep(runs: list[SweepRun], out: Path, progress: bool = True, jobs: int = 1) -> dict[str, str]:
    """Train every run that is not done (after ``check_existing``); returns name -> final status.

    ``jobs > 1`` trains that many runs at once in worker processes (``normlab train``), each
    with cpu_count // jobs threads. A NormlabError (bad config or data, a run directory that
    holds another config) stops the sweep: it would hit every run alike. Any other error fails
    only that run."""
    check_existing(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    statuses: dict[str, str] = {}
    width = len(str(len(runs)))
    todo = []
    for index, run in enumerate(runs, 1):
        head = f"[{index:>{width}}/{len(runs)}] " + " ".join(f"{k}={v}" for k, v in run.labels.items())
        status = run_dir(out, run).read_status()["status"]
        if status in DONE:
            statuses[run.name] = status
            _say(f"{head}: {status} (already done, skipped)", progress)
        else:
            todo.append((head, run))
    if jobs > 1 and len(todo) > 1:
        statuses.update(_run_parallel(todo, out, progress, jobs))
        return statuses
    for head, run in todo:
        directory = run_dir(out, run)
        _say(f"{head}: {'resuming' if directory.exists() else 'training'}", progress)
        started = time.perf_counter()
        try:
            result = train(run.config, directory.path, resume=True, progress=progress)
        except NormlabError:
            raise
        except Exception as err:  # the trainer has written status "failed" with the reason
            statuses[run.name] = "failed"
            _say(f"{head}: failed ({type(err).__name__}: {err}); continuing", True)
            continue
        statuses[run.name] = result.status
        _say(f"{head}: {result.describe()} in {time.perf_counter() - started:.0f} s", progress)
        if result.status == "interrupted":
            break
    return statuses


def _run_parallel(todo: list[tuple[str, SweepRun]], out: Path, progress: bool, jobs: int) -> dict[str, str]:
    """Train runs in ``jobs`` worker processes (``normlab train`` on each run's resolved config,
    written to OUT/sweep/NAME.yaml, its output to OUT/sweep/NAME.log); returns name -> status."""
    configs = out / "sweep"
    configs.mkdir(exist_ok=True)
    for _, run in todo:
        atomic_write_text(configs / f"{run.name}.yaml", run.config.to_yaml())
    user_errors: list[str] = []
    interrupted: list[str] = []

    def work(item: tuple[str, SweepRun]) -> tuple[str, str]:
        head, run = item
        if user_errors or interrupted:
            return run.name, "skipped"
        directory = run_dir(out, run)
        _say(f"{head}: {'resuming' if directory.exists() else 'training'}", progress)
        started = time.perf_counter()
        log = configs / f"{run.name}.log"
        code = workers.run(["train", "--config", str(configs / f"{run.name}.yaml"), "--out", str(directory.path),
                            "--resume", "--quiet"], log)
        last = log_tail(log, code)
        if code == 2:
            user_errors.append(last)
            return run.name, "failed"
        status = {0: "finished", EXIT_DIVERGED: "diverged", 130: "interrupted"}.get(code, "failed")
        if status == "interrupted":
            interrupted.append(run.name)  # Ctrl-C: start no further runs
        detail = last.split(": ", 1)[-1] if status != "failed" else f"{last}; continuing"
        _say(f"{head}: {detail} in {time.perf_counter() - started:.0f} s", progress or status == "failed")
        return run.name, status

    with WorkerPool(jobs) as workers, ThreadPoolExecutor(max_workers=jobs) as pool:
        statuses = dict(pool.map(work, todo))
    if user_errors:
        raise NormlabError(user_errors[0].removeprefix("normlab: error: "))
    return statuses


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
