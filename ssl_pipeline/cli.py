"""The `ssl-pipeline` command: parses arguments and calls the public API, nothing more."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from ssl_pipeline.errors import SSLPipelineError

EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-pipeline", description="Pretrain image backbones without labels and evaluate them."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages into a run directory, or a suite's variants")
    run.add_argument("recipe", nargs="?",
                     help="recipe or suite YAML file, e.g. recipes/quickstart.yaml")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a run from its own recipe.yaml, or a suite directory")
    run.add_argument("--out", metavar="DIR", help="run directory (default reports/<name>/<timestamp>/)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    _add_set(run)

    validate = sub.add_parser("validate", help="check a recipe, or every variant of a suite")
    validate.add_argument("recipe")
    _add_set(validate)

    evaluate = sub.add_parser("evaluate", help="evaluate an exported backbone without pretraining")
    evaluate.add_argument("recipe", help="recipe giving the data and the evaluation stages")
    evaluate.add_argument("--backbone", required=True, metavar="PATH",
                          help="our export (run dir or .safetensors) or a timm/torchvision weights file")
    evaluate.add_argument("--out", metavar="DIR")
    evaluate.add_argument("--quiet", action="store_true")
    _add_set(evaluate)

    estimate = sub.add_parser(
        "estimate", help="time a few training steps here and project the duration of pretraining, "
                         "feature extraction and fine-tuning (a suite: each variant and the sum)")
    estimate.add_argument("recipe")
    estimate.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    estimate.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    estimate.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    _add_set(estimate)

    embed = sub.add_parser("embed", help="embeddings of a folder of images, with their paths")
    embed.add_argument("--backbone", required=True, metavar="PATH")
    embed.add_argument("--data", required=True, metavar="FOLDER")
    embed.add_argument("--out", required=True, metavar="FILE", help=".npz with features and paths")
    embed.add_argument("--name", help="architecture of a third-party weights file, e.g. timm:resnet50")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--quiet", action="store_true")

    transfer = sub.add_parser(
        "transfer-report",
        help="transfer runs side by side: AUC / ACC per stage and target, random-init and "
             "published reference rows")
    transfer.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    transfer.add_argument("--out", metavar="DIR", help="default reports/transfer/<timestamp>/")
    compare = sub.add_parser("compare", help="runs side by side: one table and one plot")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    compare.add_argument("--out", metavar="DIR", help="default reports/compare/<timestamp>/")

    lister = sub.add_parser("list", help="what is registered")
    lister.add_argument("what", choices=["methods", "backbones", "datasets", "stages"])
    return parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key by its dotted path; VALUE is YAML (e.g. trainer.devices=2)",
    )


def user_message(err: SSLPipelineError) -> str:
    """The error's own message. One re-raised from a DataLoader worker carries the worker's
    traceback before it ("Caught X in DataLoader worker process 0. Original Traceback ...");
    its last line is `module.X: <message>`."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SSLPipelineError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `ssl-pipeline ... | head` stopped reading: no traceback
        # the interpreter's final flush of stdout would fail again; point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1  # not a stage failure: the status Python gives an interrupted write


def cmd_run(args: argparse.Namespace) -> int:
    from ssl_pipeline.pipeline import StageFailed, run, summary

    if args.resume and args.recipe:
        raise SSLPipelineError("give either a recipe or --resume RUN_DIR, not both")
    if args.resume and args.overrides:
        raise SSLPipelineError(
            "--resume continues a run with the recipe.yaml in its run directory, so --set is "
            "not allowed with it (one run, one recipe). To change a setting, start a new run: "
            "ssl-pipeline run RECIPE --set KEY=VALUE --out NEW_RUN_DIR")
    if _is_suite(args.recipe, args.resume):
        return cmd_run_suite(args)
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


def cmd_run_suite(args: argparse.Namespace) -> int:
    from ssl_pipeline.suite import run_suite, suite_summary

    result = run_suite(args.recipe, overrides=args.overrides, out_dir=args.out, quiet=args.quiet,
                       resume=args.resume)
    print(suite_summary(result))
    return EXIT_STAGE_FAILED if result.failed else EXIT_OK


def _is_suite(recipe: str | None, resume: str | None) -> bool:
    from ssl_pipeline.suite import SUITE_FILE, is_suite_file

    if resume:
        return (Path(resume) / SUITE_FILE).is_file()
    return isinstance(recipe, str) and is_suite_file(recipe)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ssl_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = [s for s in recipe.stages if s != "pretrain"] or ["knn", "linear_probe"]
    recipe = recipe.model_copy(update={"stages": stages, "eval": recipe.eval.model_copy(
        update={"backbone": args.backbone})})
    args.recipe, args.overrides, args.resume = recipe, [], None
    return cmd_run(args)


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from ssl_pipeline.atomic import write_text_atomic
    from ssl_pipeline.estimate import describe, describe_suite, estimate, estimate_suite
    from ssl_pipeline.stages import is_global_zero
    from ssl_pipeline.suite import is_suite_file

    suite = is_suite_file(args.recipe)
    figures = (estimate_suite if suite else estimate)(
        args.recipe, args.overrides, steps=args.steps, warmup=args.warmup, quiet=not is_global_zero())
    if is_global_zero():  # under DDP every process runs the command; rank 0 reports
        print((describe_suite if suite else describe)(figures))
        if args.json:
            write_text_atomic(Path(args.json), json.dumps(figures, indent=2))
    if suite and figures["failed"]:  # the others were estimated and printed
        print(f"error: variant(s) {', '.join(figures['failed'])} cannot be estimated (above)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    from ssl_pipeline.embed import embed_folder

    out = embed_folder(args.backbone, args.data, args.out, name=args.name,
                       batch_size=args.batch_size, quiet=args.quiet)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from ssl_pipeline.recipe import load_recipe
    from ssl_pipeline.suite import is_suite_file, load_suite, variant_recipes

    if is_suite_file(args.recipe):
        recipes = variant_recipes(load_suite(args.recipe, args.overrides), source=args.recipe)
        print(f"{args.recipe}: valid suite, {len(recipes)} variants")
        for name, recipe in recipes.items():
            print(f"  {name}: {_describe(recipe)}")
        return EXIT_OK
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid ({_describe(recipe)})")
    return EXIT_OK


def _describe(recipe) -> str:
    return (f"method {recipe.method.name}, data {recipe.data.name}, backbone {recipe.backbone.name}, "
            f"seed {recipe.seed}, stages {', '.join(recipe.stages)}")


def cmd_compare(args: argparse.Namespace) -> int:
    from ssl_pipeline.compare import write_comparison

    written = write_comparison(args.run_dirs, args.out)
    for path in [written["md"], written["html"], written["json"], *written["plots"]]:
        print(f"wrote {path}")
    return EXIT_OK


def cmd_transfer_report(args: argparse.Namespace) -> int:
    from ssl_pipeline.transfer_report import write_transfer_report

    for path in write_transfer_report(args.run_dirs, args.out).values():
        print(f"wrote {path}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import ssl_pipeline

    entries = getattr(ssl_pipeline, f"list_{args.what}")()
    width = max(len(name) for name, _ in entries)
    for name, description in entries:
        print(f"{name:<{width}}  {description}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "evaluate": cmd_evaluate, "estimate": cmd_estimate, "embed": cmd_embed,
            "validate": cmd_validate, "compare": cmd_compare, "list": cmd_list,
            "transfer-report": cmd_transfer_report}

if __name__ == "__main__":
    sys.exit(main())
