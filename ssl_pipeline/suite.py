"""Suites: variants of one base recipe through the same stages, compared in one report.

A suite file is a YAML mapping with one top-level `suite:` block:

```yaml
suite:
  name: fashion_mnist_suite      # default: the file's stem
  base: fashion_mnist.yaml       # a recipe file (relative to the suite file) or an inline recipe
  variants:                      # name -> what differs from base: dotted keys or nested blocks
    simclr:  {method.name: simclr}
    simsiam: {method: {name: simsiam}}
    no_blur: {views.blur_prob: 0.0}
  seeds: [0, 1]                  # optional: each variant once per seed (`<variant>-seed<s>`)
  overrides: [pretrain.epochs=5] # optional: KEY=VALUE set on every variant, after its own keys
  title: Views ablation          # optional: the comparison's title
```

Each variant is the base with its keys merged in (nested blocks merge, lists and values
replace), validated as a full `Recipe`, so an ablation is only a list of variants. A suite run
writes `OUT/<variant>/` (a normal run directory) for every variant in turn, then `OUT/`'s
`comparison.md`/`.html`/`.json` and plot (compare.py), `suite.yaml` (the suite as run, base
inline) and `suite_results.json`: per variant its status, seed, wall time and per stage the
headline numbers (means and stds over seeds, no per-class tables), small enough to commit.
A variant that fails is recorded (traceback in `OUT/<variant>/error.log`) and the others run;
`--resume OUT` skips finished variants and resumes the others stage by stage.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.recipe import (
    Recipe,
    Strict,
    apply_overrides,
    expand_names,
    read_yaml,
    recipe_from_dict,
)
from ssl_pipeline.registry import nearest

SUITE_FILE, RESULTS_FILE, ERROR_LOG = "suite.yaml", "suite_results.json", "error.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a variant names its run directory


class Suite(Strict):
    name: str | None = None  # default: the suite file's stem
    base: str | dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | None]
    seeds: list[int] | None = None
    overrides: list[str] = Field(default_factory=list)
    title: str | None = None

    @field_validator("variants")
    @classmethod
    def _named_variants(cls, variants: dict[str, Any]) -> dict[str, Any]:
        if not variants:
            raise ValueError("list at least one variant, e.g. {simclr: {method.name: simclr}}")
        for name in variants:
            if not _NAME.match(str(name)):
                raise ValueError(f"variant name {name!r} must be letters, digits, '_', '-' or '.'"
                                 " (it names the variant's run directory)")
        return variants


@dataclass
class SuiteResult:
    out_dir: Path
    variants: dict[str, dict[str, Any]]  # suite_results.json's "variants"
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [name for name, v in self.variants.items() if v["status"] != "done"]


# ---------------------------------------------------------------- loading


def is_suite_file(path: str | os.PathLike) -> bool:
    """True for a YAML file whose top level has a `suite:` block."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    return "suite" in read_yaml(path)


def load_suite(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Read and check a suite file; the base recipe is read in and inlined. `overrides`
    (`--set KEY=VALUE`) are added to the suite's own and apply to every variant."""
    path = Path(path)
    raw = read_yaml(path)
    block, extra = raw.get("suite"), sorted(set(raw) - {"suite"})
    if not isinstance(block, dict) or extra:
        raise SSLPipelineError(
            f"{path}: a suite file holds one mapping under 'suite:' and nothing else"
            + (f" (found {', '.join(map(repr, extra))} beside it)" if extra else "")
        )
    suite = suite_from_dict(block, source=str(path))
    base = suite.base
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        base = read_yaml(base_path)
        if "suite" in base:
            raise SSLPipelineError(f"{path}: suite.base {base_path} is itself a suite; give a recipe")
    return suite.model_copy(update={"name": suite.name or path.stem, "base": base,
                                    "overrides": [*suite.overrides, *overrides]})


def suite_from_dict(block: dict[str, Any], source: str = "suite") -> Suite:
    try:
        return Suite.model_validate(block)
    except ValidationError as err:
        raise SSLPipelineError("\n".join(_explain(e, source) for e in err.errors()[:5])) from None


def _explain(error: dict[str, Any], source: str) -> str:
    key = ".".join(["suite", *map(str, error["loc"])])
    if error["type"] == "extra_forbidden":
        hint = nearest(str(error["loc"][-1]), list(Suite.model_fields))
        return f"{source}: unknown key '{key}'" + (f"; did you mean 'suite.{hint}'?" if hint else "")
    return f"{source}: {key}: {error['msg'].removeprefix('Value error, ')}"


def variant_recipes(suite: Suite, source: str = "suite") -> dict[str, Recipe]:
    """Every variant as a validated Recipe (seeds expanded); all variants are checked and every
    error is reported, each naming its variant."""
    if not isinstance(suite.base, dict):
        raise SSLPipelineError(f"{source}: load the suite with load_suite() to read its base recipe")
    recipes, errors = {}, []
    for name, raw in variant_dicts(suite).items():
        where = f"{source}: variant '{name}'"
        try:
            recipes[name] = recipe_from_dict(raw, source=where)
        except SSLPipelineError as err:  # some validators raise ours directly, without `where`
            errors.append(str(err) if where in str(err) else f"{where}: {err}")
    if errors:
        raise SSLPipelineError("\n".join(errors))
    return recipes


def variant_dicts(suite: Suite) -> dict[str, dict[str, Any]]:
    """name -> raw recipe: base, then the variant's keys, the seed, then `overrides`."""
    out = {}
    for name, keys in suite.variants.items():
        # `method: simsiam` in a variant sets the base's method.name and keeps its blocks
        raw = _merge(expand_names(copy.deepcopy(suite.base)), expand_names(_nested(keys or {})))
        raw["name"] = (keys or {}).get("name", name)
        for seed in suite.seeds or [None]:
            seeded = raw if seed is None else {**copy.deepcopy(raw), "seed": seed}
            key = name if seed is None else f"{name}-seed{seed}"
            out[key] = apply_overrides(seeded, suite.overrides)
    return out


def _nested(keys: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": 1, "c": {"d": 2}}` -> `{"a": {"b": 1}, "c": {"d": 2}}`."""
    out: dict[str, Any] = {}
    for key, value in keys.items():
        update: Any = _nested(value) if isinstance(value, dict) else value
        for part in reversed(str(key).split(".")):
            update = {part: update}
        _merge(out, update)
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` merged into `base` in place: mappings merge, everything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# ---------------------------------------------------------------- running


def run_suite(
    suite: str | os.PathLike | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    resume: str | os.PathLike | None = None,
) -> SuiteResult:
    """Run every variant into `OUT/<variant>/`, one after the other, then write the comparison
    and suite_results.json into `OUT/`. A failing variant is recorded and the others still run;
    `resume` continues a suite directory: finished variants are skipped, the others resume."""
    start = time.time()
    suite, out, source = _suite_and_dir(suite, overrides, out_dir, resume)
    recipes = variant_recipes(suite, source)  # every variant checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if resume is None:
        write_text_atomic(out / SUITE_FILE, yaml.safe_dump(
            {"suite": suite.model_dump(mode="json", exclude_none=True)}, sort_keys=False))
    outcomes: dict[str, dict[str, Any]] = {}
    for i, (name, recipe) in enumerate(recipes.items(), 1):
        _say(quiet, f"variant {name} ({i}/{len(recipes)}): ", end="")
        outcomes[name] = run_variant(recipe, out / name, quiet)
        write_suite_results(out, suite, recipes, outcomes)  # progress survives an interruption
    summary = write_suite_results(out, suite, recipes, outcomes)
    _write_comparison(out, suite, recipes, outcomes)
    return SuiteResult(out, summary["variants"], time.time() - start)


def run_variant(recipe: Recipe, run_dir: Path, quiet: bool) -> dict[str, Any]:
    """One variant's run (new, resumed, or skipped when every stage is done); never raises
    for the variant's own failure: returns `{"status", "error"}` instead."""
    from ssl_pipeline.pipeline import run

    if _stages_done(run_dir, recipe.stages):
        _say(quiet, "already done, skipped")
        return {"status": "done", "skipped": True}
    started = (run_dir / "recipe.yaml").is_file()
    _say(quiet, "resuming" if started else "running")
    try:
        if started:
            run(resume=run_dir, quiet=quiet)
        else:
            run(recipe, out_dir=run_dir, quiet=quiet)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # the variant failed; the suite goes on
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / ERROR_LOG, traceback.format_exc())
        error = str(err) if type(err).__name__ == "StageFailed" else f"{type(err).__name__}: {err}"
        _say(quiet, f"variant {recipe.name}: failed: {error} (traceback: {run_dir / ERROR_LOG})")
        return {"status": "failed", "error": error}
    (run_dir / ERROR_LOG).unlink(missing_ok=True)  # an earlier attempt's error is history now
    return {"status": "done"}


def _suite_and_dir(suite, overrides, out_dir, resume) -> tuple[Suite, Path, str]:
    if resume is not None:
        out = Path(resume)
        if not (out / SUITE_FILE).is_file():
            raise SSLPipelineError(f"--resume {out}: no {SUITE_FILE} there; pass a directory "
                                   "written by `ssl-pipeline run SUITE.yaml`")
        if overrides:
            raise SSLPipelineError("--resume continues a suite as it was written; --set is not allowed")
        return load_suite(out / SUITE_FILE), out, str(out / SUITE_FILE)
    if suite is None:
        raise SSLPipelineError("give a suite file (e.g. recipes/fashion_mnist_suite.yaml) or --resume DIR")
    source = "suite" if isinstance(suite, Suite) else str(suite)
    if not isinstance(suite, Suite):
        suite = load_suite(suite, overrides)
    elif overrides:
        raise SSLPipelineError("overrides apply to suite files; add them to Suite.overrides instead")
    if out_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
        return suite, Path("reports") / (suite.name or "suite") / stamp, source
    out = Path(out_dir)
    if (out / SUITE_FILE).exists():
        raise SSLPipelineError(f"--out {out} already holds a suite; continue it with "
                               f"`ssl-pipeline run --resume {out}`, or choose a new --out directory")
    return suite, out, source


def _stages_done(run_dir: Path, stages: list[str]) -> bool:
    stages_state = read_json(run_dir / "run_state.json").get("stages", {})
    return all((stages_state.get(s) or {}).get("status") == "done" for s in stages)


# ---------------------------------------------------------------- results


# Parts of a stage's results that are per class, per epoch or per seed: in the run directory's
# results.json, not in the suite's summary.
_DETAIL = {"by_seed", "per_class_accuracy", "confusion_matrix", "class_names", "grid",
           "test_metrics", "val_top1_by_epoch", "monitor_knn_top1_by_epoch",
           "monitor_knn_auc_by_epoch", "loss_by_epoch", "backbone", "curve"}


def headline(tree: Any) -> Any:
    """A stage result without its per-class, per-epoch and per-seed detail: numbers, flags and
    short number lists (a 95% interval) at every level (`by_fraction`, `by_shots`, `by_k`)."""
    if isinstance(tree, dict):
        kept = {str(k): headline(v) for k, v in tree.items() if k not in _DETAIL}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(tree, list):
        short = len(tree) <= 4 and all(isinstance(v, (int, float)) for v in tree)
        return [round(v, 5) if isinstance(v, float) else v for v in tree] if short else _DROP
    return round(tree, 5) if isinstance(tree, float) else tree


_DROP = object()


def variant_summary(recipe: Recipe, run_dir: Path, outcome: dict[str, Any] | None) -> dict[str, Any]:
    """One variant in suite_results.json, from its run directory and how this invocation went."""
    state = read_json(run_dir / "run_state.json").get("stages", {})
    results = read_json(run_dir / "results.json")
    outcome = outcome or {}
    status = outcome.get("status") or ("done" if _stages_done(run_dir, recipe.stages) else "not run")
    stages = {}
    for stage in recipe.stages:
        info = state.get(stage) or {}
        entry = {"status": info.get("status", "not run"), "seconds": info.get("seconds")}
        if info.get("error"):
            entry["error"] = info["error"]
        if info.get("status") == "done" and isinstance(results.get(stage), dict):
            entry.update(headline(results[stage]))
        stages[stage] = entry
    baselines = {name: {stage: headline(res) for stage, res in per_stage.items()}
                 for name, per_stage in (results.get("baselines") or {}).items()}
    summary = {
        "status": status,
        "run_dir": run_dir.name,
        "seed": recipe.seed,
        "method": recipe.method.name,
        "backbone": recipe.backbone.name,
        "data": recipe.data.name,
        "seconds": round(sum(s["seconds"] or 0 for s in stages.values()), 2),
        "stages": stages,
    }
    curve = (results.get("pretrain") or {}).get("curve")
    if curve and state.get("pretrain", {}).get("status") == "done":
        summary["curve"] = curve  # per epoch: a few numbers each, what ablation plots need
    if outcome.get("error"):
        summary["error"] = outcome["error"]
    return {**summary, "baselines": baselines} if baselines else summary


def write_suite_results(out: Path, suite: Suite, recipes: dict[str, Recipe],
                        outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    variants = {name: variant_summary(recipe, out / name, outcomes.get(name))
                for name, recipe in recipes.items()}
    summary = {
        "schema_version": 1,
        "suite": suite.name,
        "title": suite.title,
        "finished": all(v["status"] == "done" for v in variants.values()),
        "variants": variants,
    }
    write_text_atomic(out / RESULTS_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def _write_comparison(out: Path, suite: Suite, recipes: dict[str, Recipe],
                      outcomes: dict[str, dict[str, Any]]) -> None:
    from ssl_pipeline.compare import write_comparison

    failed = {out / name: o["error"] for name, o in outcomes.items() if o.get("error")}
    title = suite.title or f"Suite {suite.name}: {len(recipes)} variants"
    write_comparison([out / name for name in recipes], out, labels=list(recipes),
                     failed=failed, title=title)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _say(quiet: bool, message: str, end: str = "\n") -> None:
    if not quiet:
        print(message, end=end, flush=True)


def suite_summary(result: SuiteResult) -> str:
    """The lines the CLI prints at the end of a suite."""
    lines = [f"suite done in {result.seconds:.1f} s; directory: {result.out_dir}"]
    for name, v in result.variants.items():
        top = {s: e.get("top1") for s, e in v["stages"].items() if e.get("top1") is not None}
        numbers = ", ".join(f"{s} {t:.4f}" for s, t in top.items())
        error = f": {v['error']}" if v.get("error") else ""
        lines.append(f"  {name}: {v['status']}{error}" + (f" ({numbers})" if numbers else ""))
    lines.append(f"  comparison: {result.out_dir / 'comparison.html'} (and comparison.md, "
                 f"{RESULTS_FILE})")
    return "\n".join(lines)
