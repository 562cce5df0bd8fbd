"""``normlab <verb>``: the command-line interface.

Errors a user can cause (``NormlabError``) print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from normlab.errors import NormlabError

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


def _cmd_model(args: argparse.Namespace) -> int:
    from normlab.config import ModelConfig, apply_overrides, load_yaml
    from normlab.nn.model import build_model
    from normlab.strategies import describe_plan

    data: dict = {}
    if args.config:
        data = load_yaml(args.config)
        data = data.get("model", data)
    if args.strategy:
        data = {**data, "strategy": args.strategy}
    data = apply_overrides({"model": data}, args.overrides, sections=("model",))["model"]
    cfg = ModelConfig.from_dict(data)
    print(cfg.to_yaml(), end="")
    print("# plan")
    for line in describe_plan(cfg).splitlines():
        print(f"#   {line}")
    model = build_model(cfg)
    print(f"# parameters: {model.num_params():,} ({model.num_params(exclude_embeddings=True):,} "
          "without embeddings)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from normlab.config import RunConfig
    from normlab.train.trainer import train

    raw = RunConfig.load(args.config, args.overrides)
    result = train(raw, args.out, resume=args.resume, progress=not args.quiet)
    message = f"{result.status} at step {result.step}" + (f": {result.reason}" if result.reason else "")
    print(f"{args.out}: {message}", file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from normlab.config import RunConfig
    from normlab.data import read_meta
    from normlab.train.trainer import load_data

    raw = RunConfig.load(args.config, args.overrides)
    if args.out:
        raw.setdefault("data", {})["cache_dir"] = args.out
    shard_dir, _ = load_data(RunConfig.from_dict(raw, vocab_size=1).data)
    meta = read_meta(shard_dir)
    print(f"{shard_dir}: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} validation "
          f"tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,})")
    return 0


def _add_config_args(p: argparse.ArgumentParser, sections: str = "SECTION") -> None:
    p.add_argument("--config", help="YAML file with sections model, data, train")
    p.add_argument("overrides", nargs="*", metavar=f"{sections}.KEY=VALUE",
                   help="dotted overrides, e.g. model.n_layers=8 train.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Transformer normalization research: build, train, compare and diagnose "
        "models that differ only in how they normalize.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("strategies", help="list the named normalization strategies and formulas")
    p.add_argument("-v", "--verbose", action="store_true", help="also show sources and config fields")
    p.set_defaults(func=_cmd_strategies)

    p = verbs.add_parser(
        "model", help="print a resolved model config, its per-layer norm plan and parameter count"
    )
    p.add_argument("--config", help="YAML file (a run config with a 'model' section, or a model config)")
    p.add_argument("--strategy", help="named strategy preset, e.g. hybridnorm_star")
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="field overrides")
    p.set_defaults(func=_cmd_model)

    p = verbs.add_parser("train", help="train one model; --resume continues a killed or stopped run",
                         description="Train one model into a run directory (config.yaml, "
                         "metrics.jsonl, status.json, checkpoints/). Exit status: 0 finished, "
                         "2 bad input, 3 diverged, 130 interrupted.")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last good checkpoint (starts it if absent)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)

    data = verbs.add_parser("data", help="corpus and tokenizer tools")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)
    p = data_verbs.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards",
                              description="Tokenize data.corpus with data.tokenizer into train/val "
                              "uint16/uint32 memory-mapped shards (streaming, flat memory). normlab "
                              "train reuses shards whose corpus and tokenizer match.")
    _add_config_args(p, "data")
    p.add_argument("--out", help="cache directory for shards and trained tokenizers (default: "
                   "$NORMLAB_CACHE or ~/.cache/normlab); train reads it with data.cache_dir=DIR")
    p.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NormlabError as err:
        if args.debug:
            raise
        print(f"normlab: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
