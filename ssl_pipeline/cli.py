"""The `ssl-pipeline` command: parses arguments and calls the public API, nothing more."""

from __future__ import annotations

import argparse
import sys
import traceback

from ssl_pipeline.errors import SSLPipelineError

EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-pipeline", description="Pretrain image backbones without labels and evaluate them."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages into a run directory")
    run.add_argument("recipe", nargs="?", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its own recipe.yaml")
    run.add_argument("--out", metavar="DIR", help="run directory (default reports/<name>/<timestamp>/)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    _add_set(run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    _add_set(validate)

    lister = sub.add_parser("list", help="what is registered")
    lister.add_argument("what", choices=["methods", "backbones", "datasets", "stages"])
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key by its dotted path; VALUE is YAML (e.g. trainer.devices=2)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SSLPipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_run(args: argparse.Namespace) -> int:
    from ssl_pipeline.pipeline import StageFailed, run, summary

    if args.resume and args.recipe:
        raise SSLPipelineError("give either a recipe or --resume RUN_DIR, not both")
    if args.resume and args.overrides:
        raise SSLPipelineError("--resume continues a run with its own recipe.yaml; --set is not allowed")
    try:
        result = run(args.recipe, overrides=args.overrides, out_dir=args.out, quiet=args.quiet,
                     resume=args.resume)
    except StageFailed as err:
        traceback.print_exception(err.error, file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    from ssl_pipeline.stages import is_global_zero

    if is_global_zero():
        print(summary(result))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from ssl_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid (method {recipe.method.name}, data {recipe.data.name}, "
          f"backbone {recipe.backbone.name}, stages {', '.join(recipe.stages)})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import ssl_pipeline

    entries = getattr(ssl_pipeline, f"list_{args.what}")()
    width = max(len(name) for name, _ in entries)
    for name, description in entries:
        print(f"{name:<{width}}  {description}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list}

if __name__ == "__main__":
    sys.exit(main())
