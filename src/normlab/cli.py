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
