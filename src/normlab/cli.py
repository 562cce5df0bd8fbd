"""``normlab <verb>``: the command-line interface.

Errors a user can cause (``NormlabError``) print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import warnings

from normlab.device import keep_freed_host_memory
from normlab.errors import NormlabError
from normlab.plugins import load_plugins

EXIT_USER_ERROR = 2


def _cmd_strategies(args: argparse.Namespace) -> int:
    from normlab.strategies import STRATEGIES

    width = max(map(len, STRATEGIES))
    for s in STRATEGIES.values():
        print(f"{s.name:<{width}}  {s.formula}")
        if args.verbose:
            fields = ", ".join(f"{k}={v}" for k, v in s.fields.items())
            print(f"{'':<{width}}  [{s.source}] {fields}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from normlab.config import ModelConfig
    from normlab.nn.model import meta_model
    from normlab.presets import PRESETS

    header = ("preset", "d", "layers", "heads/KV", "FFN", "experts", "params", "paper", "tokens", "source")
    rows = []
    for preset in PRESETS.values():
        cfg = ModelConfig.from_preset(preset.name)
        model = meta_model(cfg)
        experts = f"{cfg.moe_top_k} of {cfg.moe_experts} x {cfg.moe_ffn_hidden}" if cfg.moe_experts else "—"
        params = _count(model.num_params())
        paper = _count(preset.paper_params) if preset.paper_params else "(name only)"
        if cfg.moe_experts:
            params += f" ({_count(model.num_active_params())} active)"
            paper += f" ({_count(preset.paper_active_params)} active)"
        rows.append((preset.name, str(cfg.d_model), str(cfg.n_layers), f"{cfg.n_heads}/{cfg.n_kv_heads}",
                     str(cfg.ffn_hidden if not cfg.moe_experts else "—"), experts, params, paper,
                     _count(preset.paper_tokens), preset.source))
    _print_table(header, rows)
    if args.verbose:
        for preset in PRESETS.values():
            print(f"{preset.name}: strategy {preset.strategy}; configs/{preset.name}.yaml"
                  + (f"; {preset.note}" if preset.note else ""))
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _count(n: float) -> str:
    """1e12 -> '1.00T', 1.3e9 -> '1.30B', 7.1e7 -> '71.0M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n / 1e6:.1f}M"


def _cmd_model(args: argparse.Namespace) -> int:
    from normlab.config import ConfigError, ModelConfig, RunConfig, apply_overrides
    from normlab.nn.model import meta_model
    from normlab.strategies import describe_plan

    if args.config and args.preset:
        raise ConfigError("give --config or --preset, not both: the config's model sizes would override the "
                          "preset's; write 'preset: NAME' in the config's model section instead")
    data: dict = {}
    if args.config:
        data = RunConfig.load(args.config, plugins=args.plugin)
        data = data.get("model", {key: v for key, v in data.items() if key != "plugins"})
    if args.preset:
        data = {**data, "preset": args.preset}
    if args.strategy:
        data = {**data, "strategy": args.strategy}
    data = apply_overrides({"model": data}, args.overrides, sections=("model",))["model"]
    cfg = ModelConfig.from_dict(data)
    print(cfg.to_yaml(), end="")
    print("# plan")
    for line in describe_plan(cfg).splitlines():
        print(f"#   {line}")
    model = meta_model(cfg)  # counts without allocating or initialising
    print(f"# parameters: {model.num_params():,} ({model.num_params(exclude_embeddings=True):,} "
          "without embeddings)")
    if cfg.moe_experts:
        print(f"# active parameters per token: {model.num_active_params():,} "
              f"({cfg.moe_top_k} of {cfg.moe_experts} experts)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from normlab.config import RunConfig
    from normlab.train.trainer import run_config, train

    cfg = run_config(RunConfig.load(args.config, args.overrides, args.plugin), args.out, progress=not args.quiet)
    result = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(f"{args.out}: {result.describe()}", file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from normlab.config import RunConfig
    from normlab.data import read_meta
    from normlab.errors import check_output_dir
    from normlab.train.trainer import load_data

    raw = RunConfig.load(args.config, args.overrides, args.plugin)
    if args.out is not None:  # a cache: any directory of shards, but not a file
        raw.setdefault("data", {})["cache_dir"] = str(check_output_dir(args.out, "--out"))
    shard_dir, _ = load_data(RunConfig.from_dict(raw, vocab_size=1).data)
    meta = read_meta(shard_dir)
    print(f"{shard_dir}: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} validation "
          f"tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from normlab.compare import compare, parse_variants
    from normlab.compare.compare import EvalSpec
    from normlab.config import ConfigError, RunConfig

    seeds = _parse_list(args.seeds, int, "--seeds")
    _refuse_overrides_of_flags(args.overrides, {"model.strategy": "--strategies", "train.seed": "--seeds"})
    raw = RunConfig.load(args.config, args.overrides, args.plugin)
    evaluation = None
    if not args.eval_tasks and (args.eval_data_dir or args.eval_fewshot or args.eval_limit is not None):
        raise ConfigError("--eval-data-dir, --eval-fewshot and --eval-limit apply to --eval-tasks, which is not given")
    if args.eval_tasks:
        if args.eval_fewshot < 0 or (args.eval_limit is not None and args.eval_limit < 1):
            raise ConfigError("--eval-fewshot must be >= 0 and --eval-limit >= 1")
        evaluation = EvalSpec(_parse_list(args.eval_tasks, str, "--eval-tasks"), args.eval_data_dir,
                              args.eval_fewshot, args.eval_limit)
    report, statuses = compare(raw, parse_variants(args.strategies), seeds, args.out,
                               baseline=args.baseline, same_init=args.same_init, progress=not args.quiet,
                               jobs=args.jobs, evaluation=evaluation)
    summary = json.loads((report.parent / "summary.json").read_text())
    code = _sweep_exit_status(statuses, stalled=sum(entry["stalled"] for entry in summary["strategies"].values()))
    print(f"report: {report}")
    return code


def _refuse_overrides_of_flags(overrides: list[str], flags: dict[str, str]) -> None:
    """A ConfigError for a ``section.key=value`` override of a field that a flag of the verb sets
    (``flags``: field -> flag); the flag would silently win."""
    from normlab.config import ConfigError

    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in flags:
            raise ConfigError(f"{override}: {flags[key]} sets {key} for every run; drop the override")


def _sweep_exit_status(statuses: dict[str, str], stalled: int = 0) -> int:
    """Print how a sweep's runs ended (stderr) and return the verb's exit status: 130 when a run
    was interrupted, 1 when one failed or was skipped, else 0 (a diverged run is a result)."""
    counts = {s: list(statuses.values()).count(s) for s in dict.fromkeys(statuses.values())}
    print(f"runs: {', '.join(f'{n} {s}' for s, n in counts.items())}"
          + (f" ({stalled} of them stalled at the unigram loss)" if stalled else ""), file=sys.stderr)
    if "interrupted" in counts:
        print("normlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if set(counts) - {"finished", "diverged"} else 0


def _parse_list(text: str, kind: type, option: str) -> list:
    """'0,1,2' -> [0, 1, 2]; every item must be of ``kind`` (an int is a float too, 1.5 no int)."""
    from normlab.config import ConfigError, parse_value

    values = [parse_value(item.strip()) for item in text.split(",") if item.strip()]
    allowed = (int, float) if kind is float else (kind,)
    if not values or any(isinstance(v, bool) or not isinstance(v, allowed) for v in values):
        raise ConfigError(f"{option}: '{text}' is not a comma-separated list of {kind.__name__}s")
    return [kind(v) for v in values]


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from normlab.diagnostics import diagnose

    if args.batches < 1:
        from normlab.config import ConfigError

        raise ConfigError(f"--batches: expected a positive integer, got {args.batches}")
    diagnose(args.run, args.out, data=args.data, step=args.checkpoint, batches=args.batches,
             progress=not args.quiet, reference_step=args.reference)
    print(f"diagnostics: {args.out}/summary.md (numbers in diagnostics.json)")
    return 0


def _cmd_stability(args: argparse.Namespace) -> int:
    from normlab.config import RunConfig
    from normlab.diagnostics.stability import stability

    _refuse_overrides_of_flags(args.overrides, {"model.strategy": "--strategies", "model.n_layers": "--depths",
                                                "train.lr": "--lrs", "train.seed": "--seeds"})
    path, statuses = stability(RunConfig.load(args.config, args.overrides, args.plugin),
                               _parse_list(args.strategies, str, "--strategies"), _parse_list(args.lrs, float, "--lrs"),
                               _parse_list(args.depths, int, "--depths"), _parse_list(args.seeds, int, "--seeds"),
                               args.out, progress=not args.quiet, jobs=args.jobs)
    code = _sweep_exit_status(statuses)
    if path is not None:
        print(f"stability map: {path} (table in {args.out}/stability.md)")
    return code


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from normlab.errors import check_choice
    from normlab.reproduce import BUDGETS, reproduce, select_claims

    claims = select_claims(args.claims)
    check_choice("--budget", args.budget, tuple(BUDGETS))
    seeds = _parse_list(args.seeds, int, "--seeds") if args.seeds else None
    path, statuses = reproduce(claims, BUDGETS[args.budget], args.out, seeds=seeds, jobs=args.jobs,
                               progress=not args.quiet)
    code = _sweep_exit_status(statuses)
    if path is not None:
        print(f"reproduce report: {path} (verdicts in {args.out}/claims.json)")
    return code


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from normlab.config import check_seed
    from normlab.eval import default_results_path, evaluate_run

    check_seed("--seed", args.seed)
    results = evaluate_run(args.run, _parse_list(args.tasks, str, "--tasks"), step=args.checkpoint,
                           out=args.out, device=args.device, data_dir=args.data_dir, num_fewshot=args.num_fewshot,
                           limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                           progress=not args.quiet)
    rows = [(name, f"{task['items']}", metric, f"{m['value']:.4f}",
             "" if m["stderr"] is None else f"± {m['stderr']:.4f}")
            for name, task in results["tasks"].items() for metric, m in task["metrics"].items()]
    header = ("task", "items", "metric", "value", "stderr")
    _print_table(header, rows)
    truncated = {name: t["truncated"] for name, t in results["tasks"].items() if t["truncated"]}
    sys.stdout.flush()  # the note comes after the table
    if truncated:
        print(f"normlab: note: inputs cut to the last max_seq_len={results['max_seq_len']} tokens: "
              + ", ".join(f"{name} {count}" for name, count in truncated.items()), file=sys.stderr)
    path = args.out or default_results_path(results["run_dir"], results["checkpoint_step"])
    print(f"results: {path} (step {results['checkpoint_step']}, {results['elapsed_s']:.1f}s)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from normlab.config import MAX_SEED, ConfigError, check_seed
    from normlab.train.saved import load_run

    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer")
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or (
            args.top_p is not None and not 0 < args.top_p <= 1) or (args.top_k is not None and args.top_k < 1):
        raise ConfigError("--temperature must be a finite number >= 0, --top-k >= 1 and --top-p in (0, 1]")
    check_seed("--seed", args.seed)
    if args.seed + args.num_samples - 1 > MAX_SEED:  # sample i draws with seed + i
        raise ConfigError(f"--seed: {args.seed} + {args.num_samples} samples goes past {MAX_SEED}")
    saved = load_run(args.run, args.checkpoint, args.device)
    tokenizer = saved.tokenizer()
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eos_id]  # an empty prompt starts a document
    limit = saved.model.config.max_seq_len
    if len(prompt) >= limit:
        raise ConfigError(f"--prompt: {len(prompt)} tokens leave no room below max_seq_len={limit}")
    new_tokens = min(args.max_new_tokens, limit - len(prompt))
    if new_tokens < args.max_new_tokens:
        print(f"normlab: note: generating {new_tokens} tokens, the room left below max_seq_len={limit}",
              file=sys.stderr)
    ids = torch.tensor([prompt], device=saved.model.lm_head.weight.device)
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {sample + 1}", file=sys.stderr)
        print(args.prompt, end="", flush=True)
        new: list[int] = []
        shown = 0
        for token in saved.model.stream(ids, new_tokens, args.temperature, args.top_k, args.top_p,
                                        tokenizer.eos_id, args.seed + sample):
            new.append(int(token[0]))
            text = tokenizer.decode(new)
            end = len(text.rstrip("\ufffd"))  # hold back a character whose bytes are not all out yet
            print(text[shown:end], end="", flush=True)
            shown = max(shown, end)
        print(tokenizer.decode(new)[shown:])
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from normlab.hf import export_run

    used = export_run(args.run, args.out_dir, args.format, step=args.checkpoint)
    hint = "; load it with trust_remote_code=True" if used == "custom" else ""
    print(f"{args.out_dir}: {used} Hugging Face model{hint}")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from normlab.hf import import_run

    run = import_run(args.hf_dir, args.out_run)
    print(f"{run}: normlab run at step 0 (evaluate, generate, diagnose and export-hf read it)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from normlab.bench import SECTIONS, Sizes, run_bench
    from normlab.config import ConfigError

    for name in ("d_model", "layers", "heads", "seq_len", "batch", "vocab", "rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer")
    strategies = _parse_list(args.strategies, str, "--strategies") if args.strategies else None
    sections = _parse_list(args.sections, str, "--sections") if args.sections else SECTIONS
    sizes = Sizes(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, seq_len=args.seq_len,
                  batch=args.batch, vocab=args.vocab)
    run_bench(sizes, args.rounds, args.device, strategies, sections, args.out, compiled=args.compile)
    return 0


def _add_config_args(p: argparse.ArgumentParser, sections: str = "SECTION") -> None:
    p.add_argument("--config", help="YAML file with sections model, data, train")
    p.add_argument("overrides", nargs="*", metavar=f"{sections}.KEY=VALUE",
                   help="dotted overrides, e.g. model.n_layers=8 train.lr=1e-3")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the sweeps (compare, stability, reproduce)."""
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once in worker processes, each with cpu_count/jobs threads "
                   "(default: %(default)s; 2 is ~1.5x faster for tiny models on 2 cores)")
    p.add_argument("--out", required=True, help="output directory (runs/ and the report)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _plugin_parser() -> argparse.ArgumentParser:
    """``--plugin``, which every verb takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="import this file or module first; it may register norm types, "
                        "placements and strategies (repeatable; run YAMLs may list them under "
                        "'plugins:'; installed 'normlab.plugins' entry points load by themselves)")
    return parent


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (not the usage block first), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normlab",
        description="Transformer normalization research: build, train, compare and diagnose "
        "models that differ only in how they normalize. Every verb takes --plugin FILE_OR_MODULE "
        "to add norm types, placements and strategies (docs/extending.md).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    plugin = _plugin_parser()
    add_verb = functools.partial(verbs.add_parser, parents=[plugin])

    p = add_verb("strategies", help="list the named normalization strategies and formulas (with --plugin: "
             "plugins' too)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show sources and config fields")
    p.set_defaults(func=_cmd_strategies)

    p = add_verb(
        "model", help="print a resolved model config, its per-layer norm plan and parameter count"
    )
    p.add_argument("--config", help="YAML file (a run config with a 'model' section, or a model config)")
    p.add_argument("--preset", help="a paper's model size (normlab presets), e.g. hybridnorm-550m")
    p.add_argument("--strategy", help="named strategy, e.g. hybridnorm_star (default: the preset's paper's, "
                   "else the config's)")
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="field overrides")
    p.set_defaults(func=_cmd_model)

    p = add_verb("presets", help="the papers' model sizes by name, with parameter counts",
                 description="Every preset's sizes and its parameter count (counted on the meta "
                 "device) beside the paper's. A preset names a model size; the strategy stays "
                 "separate: normlab train --config configs/NAME.yaml model.strategy=pre_norm.")
    p.add_argument("-v", "--verbose", action="store_true", help="also show strategies, config files and notes")
    p.set_defaults(func=_cmd_presets)

    p = add_verb("train", help="train one model; --resume continues a killed or stopped run",
                         description="Train one model into a run directory (config.yaml, "
                         "metrics.jsonl, status.json, checkpoints/). Several processes: "
                         "torchrun --nproc_per_node N -m normlab train ... (DDP; train.batch_size "
                         "is the global batch). Exit status: 0 finished, 2 bad input, 3 diverged, "
                         "130 interrupted.")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last good checkpoint (starts it if absent)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)

    p = add_verb(
        "compare", help="controlled comparison of strategies over seeds, with a report",
        description="Train every strategy x seed on the same batches from the same init seed "
        "(only the normalization differs), then write report.html, report.md, summary.json and "
        "plots/ into --out. Re-running skips finished runs and resumes interrupted ones; a "
        "diverged run is reported as such. Exit status: 0 all runs finished or diverged, 1 some "
        "failed, 2 bad input, 130 interrupted.")
    _add_config_args(p)
    p.add_argument("--strategies", default="pre_norm,post_norm,mixln,hybridnorm,hybridnorm_star,dyt,bhyt",
                   help="comma-separated strategies; NAME[section.key=value ...] adds overrides to one "
                   "(default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--baseline", default="pre_norm", help="strategy the others are measured against")
    p.add_argument("--same-init", metavar="SCHEME",
                   help="force one init scheme (normal, megatron, depth_scaled, deepnorm) for all")
    p.add_argument("--eval-tasks", metavar="T1,T2",
                   help="also score these tasks (normlab evaluate) on every finished run; the report "
                   "gains per-task columns with the paired difference to the baseline")
    p.add_argument("--eval-data-dir", metavar="DIR", help="where task names are looked up "
                   "(default: $NORMLAB_DATA)")
    p.add_argument("--eval-fewshot", type=int, default=0, metavar="K", help="(default: %(default)s)")
    p.add_argument("--eval-limit", type=int, metavar="N", help="first N items of each task (default: all)")
    _add_sweep_args(p)
    p.set_defaults(func=_cmd_compare)

    p = add_verb(
        "diagnose", help="layer diagnostics of a trained run (gradients, activations, angular distance, ...)",
        description="Gradient norm per layer (attention / FFN / norm), residual-stream RMS and "
        "variance entering each layer, angular distance d(l, l+n), layer drop, norm input/output "
        "curves with tanh saturation, for BHyT the approximated vs exact FFN-site statistic, and for MoE "
        "models expert load, router entropy and top-1 changes since an earlier checkpoint. "
        "Writes diagnostics.json, PNG plots and summary.md into --out.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory written by normlab train or compare")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", help="corpus to measure on (default: the run's validation split), "
                   "tokenized with the run's tokenizer")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint step (default: newest)")
    p.add_argument("--batches", type=int, default=4, help="validation batches (default: %(default)s)")
    p.add_argument("--reference", type=int, metavar="STEP", help="MoE: checkpoint the routing is compared "
                   "with (default: the one before --checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_diagnose)

    p = add_verb(
        "stability", help="grid of short runs over learning rate and depth; heat-map per strategy",
        description="Train every strategy x depth x lr x seed (resumable, like compare) and draw "
        "a heat-map of the final validation loss per strategy with diverged cells marked.")
    _add_config_args(p)
    p.add_argument("--strategies", default="pre_norm,post_norm,hybridnorm", help="(default: %(default)s)")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="(default: %(default)s)")
    p.add_argument("--depths", default="4,8,16", help="(default: %(default)s)")
    p.add_argument("--seeds", default="0", help="(default: %(default)s)")
    _add_sweep_args(p)
    p.set_defaults(func=_cmd_stability)

    p = add_verb(
        "reproduce", help="the papers' claims as experiments with verdicts (reproduced / not / inconclusive)",
        description="Train the runs the chosen claims (numbered as in docs/reproduce.md) need at one budget, "
        "once each and resumably, diagnose their last checkpoints and write reproduce.html, "
        "reproduce.md and claims.json into --out: a verdict per claim with the effect's 95% CI "
        "over seeds beside the paper's number. Budgets: smoke (machinery only, ~1 min), cpu "
        "(~2¼ h on 2 idle cores with --jobs 2), gpu.")
    p.add_argument("claims", metavar="CLAIM,...|all", help="claim ids, e.g. 1,15, or all")
    p.add_argument("--budget", default="smoke", help="smoke, cpu or gpu (default: %(default)s)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the budget's)")
    _add_sweep_args(p)
    p.set_defaults(func=_cmd_reproduce)

    p = add_verb(
        "evaluate", help="zero- and few-shot accuracy / perplexity of a run on evaluation tasks",
        description="Score tasks with lm-evaluation-harness's log-likelihood convention: multiple "
        "choice (query/choices/gold: acc, acc_norm), partial scoring (context_options/"
        "continuation/gold: acc), continuation (context/continuation: greedy acc, perplexity) and "
        "plain text (.txt or text records: perplexity, bits per byte, word perplexity). Prints a "
        "table and writes the results JSON (default RUN_DIR/eval/step_NNNNNN.json). Every task "
        "is validated before anything is scored; bad input writes nothing and exits 2.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (normlab train, compare or import-hf)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names (folders NAME/*.jsonl under --data-dir) or "
                   ".jsonl/.txt paths, e.g. arc_easy,piqa,copa,lambada")
    p.add_argument("--data-dir", help="folder of task folders (default: $NORMLAB_DATA)")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K",
                   help="solved examples from the same file before each item (default: %(default)s)")
    p.add_argument("--limit", type=int, metavar="N", help="score the first N items of each task")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default: %(default)s)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint step (default: newest)")
    p.add_argument("--out", metavar="FILE", help="results JSON path (default: RUN_DIR/eval/step_NNNNNN.json)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N] or mps "
                   "(default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_evaluate)

    p = add_verb(
        "generate", help="generate text from a trained run (KV cache; streams to the terminal)",
        description="Continue --prompt with the run's model and tokenizer, printing tokens as they "
        "come. Temperature 0 is greedy decoding; otherwise sampling with optional top-k and "
        "nucleus (top-p) filtering, seeded.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (normlab train, compare or import-hf)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass, e.g. 0.95 (default: off)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N] or mps "
                   "(default: %(default)s)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint step (default: newest)")
    p.set_defaults(func=_cmd_generate)

    p = add_verb(
        "export-hf", help="write a run's model as a Hugging Face model directory",
        description="Write model.safetensors, config.json, generation_config.json, tokenizer.json "
        "and tokenizer_config.json into OUT_DIR. auto: a stock transformers class (Llama, Qwen3, "
        "OLMo-2, OLMoE) when it computes exactly the same function, else custom code "
        "(modeling_normlab.py: load with trust_remote_code=True). OUT_DIR must be new, empty or a "
        "previous export, which is replaced.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory written by normlab train or import-hf")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    p.add_argument("--format", choices=("auto", "stock", "custom"), default="auto",
                   help="stock fails when no stock class is exact (default: %(default)s)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint step (default: newest)")
    p.set_defaults(func=_cmd_export_hf)

    p = add_verb(
        "import-hf", help="make a normlab run of a Hugging Face Llama, Qwen3, OLMo-2 or OLMoE model",
        description="Read a Hugging Face model directory (config.json, weights, tokenizer.json) and "
        "write a normlab run directory with the same logits: llama -> pre_norm, qwen3 -> qk_norm, "
        "olmo2 -> output_norm, olmoe -> qk_norm (full width) with experts. Features normlab cannot represent (RoPE scaling, biases, sliding "
        "windows) are refused. Needs transformers (pip install 'normlab[hf]').")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
    p.add_argument("out_run", metavar="OUT_RUN", help="new run directory")
    p.set_defaults(func=_cmd_import_hf)

    p = add_verb(
        "bench", help="speed ratios measured side by side (normlab vs transformers, strategies, norms)",
        description="Times candidates in interleaved rounds and prints ratios (the median over rounds "
        "of the candidate's time / the reference's in that round) with their interquartile range. Sections: transformers (normlab pre_norm vs LlamaForCausalLM with the same "
        "weights on the two target configs: train step, forward, share of the step outside matmul and "
        "attention), generation, scoring (vs lm-eval), moe (vs dense), strategies (train step vs "
        "pre_norm, bhyt vs bhyt_star), memory (peak per strategy), norms (forward+backward as a "
        "fraction of copy bandwidth, eager and compiled). The sizes below apply to all but "
        "transformers and norms.")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--strategies", help="comma-separated subset (default: all)")
    p.add_argument("--sections", help="comma-separated subset of transformers, generation, scoring, moe, "
                   "strategies, memory, norms (default: all)")
    p.add_argument("--compile", action="store_true", help="transformers section: also normlab's train step "
                   "with train.compile=true, against eager and against transformers (compiling takes 20-50 s "
                   "per config on 2 CPU cores, less from torch's compile cache)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/bench.json (every figure, its IQR, median "
                   "times, sizes and the machine) and DIR/bench.md (a Markdown table)")
    p.set_defaults(func=_cmd_bench)

    data = verbs.add_parser("data", help="corpus and tokenizer tools")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)
    p = data_verbs.add_parser("prepare", parents=[plugin], help="tokenize a corpus into memory-mapped token shards",
                              description="Tokenize data.corpus with data.tokenizer into train/val "
                              "uint16/uint32 memory-mapped shards (streaming, flat memory). normlab "
                              "train reuses shards whose corpus and tokenizer match.")
    _add_config_args(p, "data")
    p.add_argument("--out", help="cache directory for shards and trained tokenizers (default: "
                   "$NORMLAB_CACHE or ~/.cache/normlab); train reads it with data.cache_dir=DIR")
    p.set_defaults(func=_cmd_data_prepare)
    return parser


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says an allocation failed: MemoryError, torch.OutOfMemoryError (CUDA), or
    the CPU allocator's RuntimeError."""
    import torch

    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+
    return isinstance(err, (MemoryError, cuda_oom)) or "can't allocate memory" in str(err)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as 'normlab: warning: MESSAGE' (the CLI's; --debug keeps Python's format)."""
    return f"normlab: warning: {str(message).removeprefix('normlab: ')}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_host_memory()
    python_format = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    try:
        load_plugins(args.plugin)
        return args.func(args)
    except NormlabError as err:
        if args.debug:
            raise
        print(f"normlab: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as err:  # one line, but a failed run (1), not bad input (2)
        if args.debug or not _out_of_memory(err):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"normlab: error: out of memory ({first_line}); use smaller sizes or batches", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `normlab presets | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = python_format


if __name__ == "__main__":
    sys.exit(main())
