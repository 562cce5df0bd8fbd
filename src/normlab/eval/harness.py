"""The evaluation harness: ``evaluate`` scores tasks on a model and summarises them as metrics
with standard errors, the way lm-evaluation-harness reports them; ``evaluate_run`` does it for
a run directory and writes the results JSON."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.data import Tokenizer
from normlab.errors import ConfigError, DataError, check_creatable
from normlab.eval.scoring import Request, Score, encode_pair, rolling_windows, score
from normlab.eval.tasks import Task, load_task
from normlab.nn.model import NormLM
from normlab.train.checkpoint import atomic_write_text
from normlab.train.saved import load_run
from normlab.version import __version__

StrPath = str | os.PathLike[str]


def evaluate(model: NormLM, tokenizer: Tokenizer, tasks: Sequence[StrPath], *,
             data_dir: StrPath | None = None, num_fewshot: int = 0, limit: int | None = None,
             batch_size: int = 32, seed: int = 1234, progress: bool = True) -> dict[str, Any]:
    """Score ``tasks`` (paths or names under ``data_dir``, see ``load_task``) on ``model``.

    Every task is read, validated and tokenized before anything is scored. ``limit`` keeps the
    first N items of each task; ``num_fewshot`` solved examples (drawn with ``seed``) precede
    each item. Returns ``{"normlab_version", "checkpoint_step" (None here), "tokenizer",
    "max_seq_len", "seed", "limit", "batch_size", "num_fewshot", "elapsed_s", "tasks": {name:
    {"name", "path", "format", "items", "requests", "num_fewshot", "truncated" (inputs cut on
    the left), "truncated_continuations" (longer than max_seq_len: not lm-eval comparable),
    "elapsed_s", "metrics": {metric: {"value", "stderr"}}}}}``."""
    if isinstance(tasks, str | os.PathLike):
        tasks = [tasks]
    _check_options(tasks, num_fewshot, limit, batch_size)
    loaded = [load_task(spec, data_dir) for spec in tasks]
    names = [task.name for task in loaded]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"tasks: '{repeated[0]}' is given twice")
    max_seq_len = model.config.max_seq_len
    prepared = [(task, _requests(task, tokenizer, max_seq_len, num_fewshot, limit, seed))
                for task in loaded]

    began = time.perf_counter()
    results = {}
    for task, items in prepared:
        task_began = time.perf_counter()
        scores = score(model, items, batch_size, progress, desc=task.name)
        requests = [request for item in items for request in item]
        results[task.name] = {
            "name": task.name,
            "path": str(task.path),
            "format": task.format,
            "items": len(items),
            "requests": len(requests),
            "num_fewshot": 0 if task.format == "text" else num_fewshot,
            "truncated": sum(r.start(max_seq_len) > 0 for r in requests),
            "truncated_continuations": sum(len(r.continuation) > max_seq_len for r in requests),
            "elapsed_s": time.perf_counter() - task_began,
            "metrics": _metrics(task, items, scores),
        }
    return {
        "normlab_version": __version__,
        "checkpoint_step": None,
        "tokenizer": tokenizer.name,
        "max_seq_len": max_seq_len,
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": num_fewshot,
        "elapsed_s": time.perf_counter() - began,
        "tasks": results,
    }


def evaluate_run(run_dir: StrPath, tasks: Sequence[StrPath], *, step: int | None = None,
                 out: StrPath | None = None, device: str = "auto", **options: Any) -> dict[str, Any]:
    """``evaluate`` the run's model at checkpoint ``step`` (default: the newest) on ``device``
    with its tokenizer, and write the results (plus ``run_dir`` and ``checkpoint_step``)
    atomically to ``out`` (default ``default_results_path``). ``options`` are those of
    ``evaluate``. ``out`` is checked before anything is scored (``check_results_path``). When
    ``out`` holds results of the same checkpoint scored with the same options, their other tasks
    are kept beside the new ones (scoring piqa after arc_easy keeps arc_easy's numbers)."""
    saved = load_run(run_dir, step, device)
    path = check_results_path(out if out is not None else default_results_path(saved.path, saved.step),
                              saved.path)
    tokenizer = saved.tokenizer(options.get("progress", True))
    results = evaluate(saved.model, tokenizer, tasks, **options)
    results = {"run_dir": str(saved.path), **results, "checkpoint_step": saved.step}
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))  # check_results_path: results JSON
        same_run = Path(str(earlier.get("run_dir"))).resolve() == Path(results["run_dir"]).resolve()
        if same_run and all(earlier.get(key) == results[key] for key in MERGE_KEYS):
            results["tasks"] = {**earlier["tasks"], **results["tasks"]}
    _write_results(path, json.dumps(results, indent=2) + "\n")
    return results


#: results of one run that agree on these were scored alike, and their tasks may share one file
MERGE_KEYS = ("checkpoint_step", "tokenizer", "max_seq_len", "seed", "limit", "num_fewshot")


def default_results_path(run_dir: StrPath, step: int) -> Path:
    """``RUN_DIR/eval/step_NNNNNN.json``, named like the checkpoint it scores."""
    return Path(run_dir) / "eval" / f"step_{step:06d}.json"


RESULTS_KEYS = frozenset({"normlab_version", "checkpoint_step", "tasks"})
"""Keys every results JSON holds (``evaluate``'s and ``evaluate_run``'s)."""
_MAX_RESULTS_BYTES = 64 << 20


def is_results_file(path: StrPath) -> bool:
    """Whether ``path`` is a regular file holding an earlier results JSON (a JSON object with
    every key of RESULTS_KEYS, ``tasks`` an object)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size > _MAX_RESULTS_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and RESULTS_KEYS <= data.keys() and isinstance(data["tasks"], dict)


def check_results_path(out: StrPath, run_dir: StrPath) -> Path:
    """The resolved file that results of the run in ``run_dir`` may be written to, or a
    ConfigError: ``out`` must be non-empty; a new file or an earlier results file
    (``is_results_file``), never anything else; outside the run directory or in its ``eval/``
    folder; in a folder that exists or can be made, and is writable."""
    text = os.fspath(out)
    if not text.strip():
        raise ConfigError("the results path (--out) is empty; name a .json file")
    path = Path(text).expanduser().resolve()
    where = f"results file '{text}'"
    run = Path(run_dir).resolve()
    if path.is_relative_to(run) and not path.is_relative_to(run / "eval"):
        raise ConfigError(f"{where} is inside the run directory '{run}', which holds the run's own "
                          f"files; write it under '{run / 'eval'}' or outside the run")
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"{where} is a directory; name a .json file")
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{where} is not a regular file; name a .json file")
        if not is_results_file(path):
            raise ConfigError(f"{where} holds something other than earlier normlab evaluate results; "
                              "choose another path (it is left as it is)")
    check_creatable(path)  # an earlier file is replaced through a temporary file beside it
    return path


def _write_results(path: Path, text: str) -> None:
    """``atomic_write_text`` into ``path``, making its folder; a failure is a one-line ConfigError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as err:
        raise ConfigError(f"cannot write results file '{path}': {err.strerror or err}") from None


def _check_options(tasks: Sequence[StrPath], num_fewshot: int, limit: int | None,
                   batch_size: int) -> None:
    if not tasks:
        raise ConfigError("tasks: no task given")
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot: expected an integer >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: expected a positive integer, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size}")


def _requests(task: Task, tokenizer: Tokenizer, max_seq_len: int, num_fewshot: int,
              limit: int | None, seed: int) -> list[list[Request]]:
    """The requests of the first ``limit`` items: one per choice, or the rolling windows of a
    document. Raises DataError (file:line) for a pair that cannot be scored."""
    items = []
    for index in range(min(limit or len(task.records), len(task.records))):
        if task.format == "text":
            ids = tokenizer.encode(task.records[index]["text"])
            items.append(rolling_windows(ids, tokenizer.eos_id, max_seq_len))
            continue
        prefix = task.fewshot_prefix(index, num_fewshot, seed)
        requests = [encode_pair(tokenizer, context, continuation)
                    for context, continuation in task.pairs(index, prefix)]
        for request in requests:
            if not request.context:
                raise DataError(f"{task.where(index)}: a context is only whitespace")
            if not request.continuation:
                raise DataError(f"{task.where(index)}: a continuation encodes to no tokens")
        items.append(requests)
    return items


def _metrics(task: Task, items: list[list[Request]],
             scores: list[list[Score]]) -> dict[str, dict[str, float | None]]:
    """lm-eval's metrics. Choices: ``acc`` = mean[argmax_c loglik_c == gold], ``acc_norm`` the
    same with loglik_c / len(choice_c in characters). Continuation: ``acc`` = mean[every token
    greedy], ``perplexity`` = exp(-mean loglik). Text: ``perplexity`` = exp(NLL / tokens),
    ``bits_per_byte`` = NLL / (UTF-8 bytes * ln 2), ``word_perplexity`` = exp(NLL / words)."""
    records = task.records[:len(scores)]
    if task.format in ("multiple_choice", "partial_scoring"):
        golds = [r["gold"] for r in records]
        logliks = [[s.loglik for s in item] for item in scores]
        metrics = {"acc": _choice_accuracy(logliks, golds)}
        if task.format == "multiple_choice":
            per_char = [[ll / len(choice) for ll, choice in zip(lls, r["choices"], strict=True)]
                        for lls, r in zip(logliks, records, strict=True)]
            metrics["acc_norm"] = _choice_accuracy(per_char, golds)
        return metrics
    if task.format == "continuation":
        logliks = [item[0].loglik for item in scores]
        return {"acc": _mean_with_stderr([item[0].greedy for item in scores]),
                "perplexity": {"value": _exp(-statistics.fmean(logliks)), "stderr": None}}
    nll = -sum(s.loglik for item in scores for s in item)
    tokens = sum(len(r.continuation) for item in items for r in item)
    documents = [r["text"] for r in records]
    utf8_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)  # lm-eval's word count
    return {"perplexity": {"value": _exp(nll / tokens), "stderr": None},
            "bits_per_byte": {"value": nll / (utf8_bytes * math.log(2)), "stderr": None},
            "word_perplexity": {"value": _exp(nll / words), "stderr": None}}


def _exp(x: float) -> float:
    """exp(x), inf where it overflows (a diverged model's perplexity)."""
    return math.exp(x) if x < 709.0 else math.inf


def _choice_accuracy(values: list[list[float]], golds: list[int]) -> dict[str, float | None]:
    """mean[argmax_c values_c == gold] with its standard error; the first index wins ties (as
    numpy's argmax in lm-eval)."""
    hits = [max(range(len(v)), key=v.__getitem__) == gold
            for v, gold in zip(values, golds, strict=True)]
    return _mean_with_stderr(hits)


def _mean_with_stderr(hits: list[bool]) -> dict[str, float | None]:
    """mean and its standard error s / sqrt(n), s the sample standard deviation (ddof 1)."""
    values = [float(hit) for hit in hits]
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"value": statistics.fmean(values), "stderr": stderr}
