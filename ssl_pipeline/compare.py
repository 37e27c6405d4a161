"""Several runs side by side: comparison.md, comparison.html, comparison.json and plots.

One row per run and one column per stage and metric, as in the tables of the ImageNet
literature (k-NN top-1, linear probe top-1 ± std, fine-tuning at 1% / 10% / 100% labels,
few-shot accuracy, pretraining epochs and time), then the runs' baselines as reference rows.
Below it, the pretraining curves of the runs on common axes (`plots/curves.png` and one table
per curve): training loss per epoch, the online monitor's validation k-NN top-1 against
pretraining time, and a classifier head's validation accuracy per epoch where there is one.
Everything is read from the files the runs already wrote; nothing is rerun, and nothing is
written into the run directories. A run that failed or has not finished yet is a row saying so.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from ssl_pipeline.atomic import write_bytes_atomic

from .errors import SSLPipelineError
from .report import CSS, eval_stages, fmt, html_image, new_figure, read_json, read_yaml

_STAGE_LABELS = {"knn": "k-NN", "linear_probe": "linear probe", "finetune": "fine-tune",
                 "few_shot": "few-shot"}
_STAGE_ORDER = ("knn", "linear_probe", "finetune", "few_shot")
_PLOT_NAME = "comparison_top1.png"
_CURVES_NAME = "curves.png"
# pretraining curve key -> (title, y label); x is the epoch, or the minutes for the monitor
_CURVES = {
    "loss": ("Training loss per epoch", "training loss"),
    "knn_top1": ("Validation k-NN top-1 against pretraining time", "val k-NN top-1"),
    "knn_auc": ("Validation k-NN AUC (mean over labels) against pretraining time",
                "val k-NN AUC"),
    "val_accuracy": ("Validation accuracy per epoch (classifier head)", "val accuracy"),
}
_TIMED = ("knn_top1", "knn_auc")  # the online monitor's curves: against pretraining minutes


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str  # "top1" (plotted, best marked), "metric" (best marked) or "info"
    # results.json -> (value, std or None)
    get: Callable[[dict], tuple[Any, Any]] = field(compare=False, repr=False)


@dataclass
class Run:
    path: Path
    recipe: dict
    results: dict
    status: str  # "done", "failed" or "incomplete"
    error: str = ""
    label: str = ""


# ---------------------------------------------------------------- entry point


def write_comparison(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    failed: Mapping[str | Path, str] | None = None,
    title: str | None = None,
) -> dict:
    """Compare run directories in ``out_dir`` (default ``reports/compare/<timestamp>/``).

    Returns ``{"md": Path, "html": Path, "json": Path, "plots": [Path, ...]}``. Every run
    directory is checked before anything is written. ``labels`` name the rows (default: recipe
    name · method · backbone); ``failed`` maps run directories that failed to their error, and
    such a directory may be missing or hold no run yet (a suite's variant that failed early).
    """
    if not run_dirs:
        raise SSLPipelineError(
            "compare needs at least one run directory, e.g. reports/quickstart/<timestamp>"
        )
    errors = {Path(d): error for d, error in (failed or {}).items()}
    runs = _label_runs([_load_run(Path(d), errors.get(Path(d))) for d in run_dirs], labels)
    out = Path(out_dir) if out_dir is not None else _default_out_dir()
    check_out_dir(out, runs)
    table = comparison_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    table["curves"] = pretrain_curves(runs)
    plots = _write_plot(out, table) + _write_curves_plot(out, table["curves"])
    paths = {"md": out / "comparison.md", "html": out / "comparison.html",
             "json": out / "comparison.json"}
    table["title"] = title or f"Comparison of {_count_runs(table)}"
    write_bytes_atomic(paths["md"], _render_md(table, plots, out).encode())
    write_bytes_atomic(paths["html"], _render_html(table, plots).encode())
    write_bytes_atomic(paths["json"], (json.dumps(_table_json(table), indent=1) + "\n").encode())
    return {**paths, "plots": plots}


def _default_out_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]  # same stamp as a run directory
    return Path("reports") / "compare" / stamp


def check_out_dir(out: Path, runs: list[Run], command: str = "compare") -> None:
    """Refuses an output folder inside one of the run directories being read."""
    target = out.resolve()
    for run in runs:
        if target == run.path.resolve() or run.path.resolve() in target.parents:
            raise SSLPipelineError(
                f"--out {out} is inside the run directory {run.path}; {command} never writes "
                "into a run directory, pass a folder outside the run directories"
            )


# ---------------------------------------------------------------- reading the runs


def _load_run(path: Path, failure: str | None = None) -> Run:
    is_run = (path / "recipe.yaml").is_file() or (path / "results.json").is_file()
    if failure is not None and not is_run:
        return Run(path, {}, {}, "failed", failure)
    run = read_run(path)
    if failure is not None:
        run.status, run.error = "failed", failure
    return run


def read_run(path: Path) -> Run:
    hint = "pass run directories written by `ssl-pipeline run`, e.g. reports/quickstart/<timestamp>"
    if not path.is_dir():
        raise SSLPipelineError(f"run directory {str(path)!r} does not exist; {hint}")
    if not (path / "recipe.yaml").is_file() and not (path / "results.json").is_file():
        raise SSLPipelineError(
            f"{str(path)!r} is not a run directory (no recipe.yaml and no results.json); {hint}"
        )
    problems: list[str] = []
    recipe = _read_part(read_yaml, path / "recipe.yaml", problems)
    results = _read_part(read_json, path / "results.json", problems)
    state = _read_part(read_json, path / "run_state.json", problems)
    stages = _stage_states(state)
    failed = [f"stage {stage} failed: {info.get('error') or 'no error recorded'}"
              for stage, info in stages.items() if info.get("status") == "failed"]
    if failed or problems:
        return Run(path, recipe, results, "failed", "; ".join(failed + problems))
    missing = _unfinished(recipe, stages if "stages" in state else None, results)
    return Run(path, recipe, results, "incomplete" if missing else "done", missing)


def _read_part(read: Callable[[Path], dict], path: Path, problems: list[str]) -> dict:
    """A torn or unreadable file makes the run a failed row, not a failed comparison."""
    try:
        return read(path)
    except (SSLPipelineError, yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        problems.append(f"cannot read {path.name}: {err}")
        return {}


def _stage_states(state: dict) -> dict[str, dict]:
    stages = state.get("stages")
    stages = stages if isinstance(stages, dict) else {}
    return {str(name): info for name, info in stages.items() if isinstance(info, dict)}


def _unfinished(recipe: dict, stages: dict | None, results: dict) -> str:
    if not results:
        return "no results.json yet"
    if stages is None:
        return ""  # no run_state.json: take results.json as it is
    pending = [str(s) for s in recipe.get("stages") or []
               if (stages.get(str(s)) or {}).get("status") != "done"]
    return f"stages not finished: {', '.join(pending)}" if pending else ""


def _label_runs(runs: list[Run], labels: Sequence[str] | None = None) -> list[Run]:
    """Recipe name + method + backbone, or the given labels. Where runs share a label, the
    recipe settings they differ in are added (`trainer.devices=2`), then the run directory's
    name, then its path, while still shared."""
    for i, run in enumerate(runs):
        if labels is not None:
            run.label = str(labels[i])
            continue
        parts = (run.recipe.get("name"), (run.recipe.get("method") or {}).get("name"),
                 (run.recipe.get("backbone") or {}).get("name"))
        run.label = " · ".join(str(p) for p in parts if p) or run.path.name
    if labels is None:
        for group in _shared(runs):
            for run, settings in zip(group, differing_settings([r.recipe for r in group])):
                if settings:
                    run.label = f"{run.label} ({settings})"
    for suffix in (lambda run: run.path.name, lambda run: str(run.path)):
        for group in _shared(runs):
            for run in group:
                run.label = f"{run.label} ({suffix(run)})"
    return runs


def _shared(runs: list[Run]) -> list[list[Run]]:
    """The groups of runs that share a label."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return [group for group in groups.values() if len(group) > 1]


# Not what tells the experiments apart: what the pipeline resolved, where results and caches
# went, the name (in the label already), the stages (the table's columns show them) and how the
# exact k-NN search ran (the same neighbours either way).
_NOT_SETTINGS = ("resolved", "tracking", "name", "stages", "eval.cache_dir", "eval.knn.search")


def differing_settings(recipes: list[dict], most: int = 3) -> list[str]:
    """For each recipe, `key=value` of the dotted keys whose values are not the same in all
    of them (a key one recipe lacks counts as differing), at most `most` a recipe, then `+N`."""
    flat = [{k: v for k, v in _flatten(r).items()
             if not any(k == n or k.startswith(n + ".") for n in _NOT_SETTINGS)} for r in recipes]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    out = []
    for f in flat:
        shown = [f"{k}={_setting_text(f.get(k))}" for k in differ[:most]]
        out.append(", ".join(shown) + (f", +{len(differ) - most} more" if len(differ) > most else ""))
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _setting_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


# ---------------------------------------------------------------- the table


def comparison_table(runs: list[Run]) -> dict:
    """``{"columns": [Column], "rows": [row]}``: the runs, then their distinct baselines.

    A row is ``{"label", "kind" ("run" or "baseline"), "status", "error", "run_dirs",
    "cells": {column key: (value, std)}, "best": {column keys}}``; only the columns that some
    row has a value for are kept.
    """
    rows = [_row(run.label, "run", run.status, run.error, [run.path], run.results)
            for run in runs]
    rows += _baseline_rows(runs)
    columns = _columns([row["results"] for row in rows])
    for row in rows:
        results = row.pop("results")
        row["cells"] = {c.key: c.get(results) for c in columns}
    columns = [c for c in columns if any(row["cells"][c.key][0] is not None for row in rows)]
    _mark_best(columns, rows)
    return {"columns": columns, "rows": rows}


def _row(label, kind, status, error, run_dirs, results) -> dict:
    return {"label": label, "kind": kind, "status": status, "error": error,
            "run_dirs": run_dirs, "results": results}


def _baseline_rows(runs: list[Run]) -> list[dict]:
    """One row per (baseline, data, results): runs on the same data with identical baselines
    share one row, labelled with the runs it is the reference for."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        baselines = run.results.get("baselines")
        for name, stages in (baselines if isinstance(baselines, dict) else {}).items():
            if not isinstance(stages, dict) or not eval_stages(stages):
                continue
            key = (name, _data_key(run), json.dumps(_accuracies(stages), sort_keys=True))
            row = rows.setdefault(key, _row(f"{name} baseline", "baseline", "", "", [], stages))
            row["run_dirs"].append(run.path)
            row.setdefault("of", []).append(run.label)
    out = list(rows.values())
    labels = [row["label"] for row in out]
    for row in out:
        of = row.pop("of")
        of = "all runs" if len(of) == len(runs) > 2 else ", ".join(of)
        row["status"] = f"reference for {of}"
        if labels.count(row["label"]) > 1:  # the same baseline on other data or backbones
            row["label"] += f" ({of})"
    return out


def _accuracies(tree: Any) -> Any:
    """Only the accuracies of a results tree: two runs' baselines are the same reference when
    these agree, whatever their timings (fine-tuning records its seconds) say."""
    if isinstance(tree, dict):
        kept = {k: _accuracies(v) for k, v in tree.items()
                if isinstance(v, dict) or k in ("top1", "top5", "top1_std")}
        return {k: v for k, v in kept.items() if v != {}}
    return tree


def _data_key(run: Run) -> str:
    data = {**(run.recipe.get("data") or {}),
            **((run.recipe.get("resolved") or {}).get("data") or {})}
    splits = (run.results.get("provenance") or {}).get("split_hashes") or {}
    return json.dumps([data.get("name"), data.get("image_size"), splits], sort_keys=True,
                      default=str)


def _columns(all_results: list[dict]) -> list[Column]:
    """Every column any of these results could fill, in the literature's order."""
    stages = dict.fromkeys(stage for results in all_results for stage, _ in eval_stages(results))
    ordered = [s for s in _STAGE_ORDER if s in stages]
    ordered += [s for s in stages if s not in _STAGE_ORDER]
    columns = []
    for stage in ordered:
        name = _STAGE_LABELS.get(stage, stage)
        if stage == "finetune" and any(_sub(r, stage, "by_fraction") for r in all_results):
            fractions = {f for r in all_results for f in _sub(r, stage, "by_fraction")}
            columns += [Column(f"{stage}@{f}", f"{name} {float(f) * 100:g}%", "top1",
                               _getter(stage, "by_fraction", f))
                        for f in sorted(fractions, key=float)]
        elif any(_sub(r, stage, "by_shots") for r in all_results):
            shots = {n for r in all_results for n in _sub(r, stage, "by_shots")}
            columns += [Column(f"{stage}@{n}", f"{name} {n}-shot", "top1",
                               _getter(stage, "by_shots", n)) for n in sorted(shots, key=float)]
        else:
            columns += [
                Column(f"{stage}/top1", f"{name} top-1", "top1", _getter(stage, None, None)),
                Column(f"{stage}/top5", f"{name} top-5", "metric", _top5_getter(stage)),
            ]
    return columns + [
        Column("pretrain/epochs", "pretraining epochs", "info", _pretrain_getter("epochs")),
        Column("pretrain/seconds", "pretraining seconds", "info", _pretrain_getter("seconds")),
    ]


def _sub(results: dict, stage: str, key: str) -> dict:
    res = results.get(stage)
    return (res.get(key) or {}) if isinstance(res, dict) else {}


def _getter(stage: str, sub: str | None, key: str | None) -> Callable[[dict], tuple]:
    def get(results: dict) -> tuple:
        whole = results.get(stage) if isinstance(results.get(stage), dict) else {}
        res = whole if sub is None else ((whole.get(sub) or {}).get(key) or {})
        return res.get("top1"), _spread(res, res.get("seeds", whole.get("seeds")))
    return get


def _spread(res: dict, seeds: Any) -> float | None:
    # A std over one seed is 0 by construction, not a measured spread: show none.
    std = res.get("top1_std")
    return std if std is not None and (seeds is None or seeds > 1) else None


def _top5_getter(stage: str) -> Callable[[dict], tuple]:
    def get(results: dict) -> tuple:
        res = results.get(stage) if isinstance(results.get(stage), dict) else {}
        return {**(res.get("test_metrics") or {}), **res}.get("top5"), None
    return get


def _pretrain_getter(key: str) -> Callable[[dict], tuple]:
    return lambda results: ((results.get("pretrain") or {}).get(key), None)


def _mark_best(columns: list[Column], rows: list[dict]) -> None:
    """The highest value per accuracy column among the runs (not the baselines), ties included."""
    for row in rows:
        row["best"] = set()
    for column in (c for c in columns if c.kind != "info"):
        values = [(row["cells"][column.key][0], row) for row in rows
                  if row["kind"] == "run" and _is_number(row["cells"][column.key][0])]
        if len(values) < 2:
            continue  # a lone value is not "best" of anything
        top = max(value for value, _ in values)
        for value, row in values:
            if value == top:
                row["best"].add(column.key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- plot


def _write_plot(out: Path, table: dict) -> list[Path]:
    """Grouped bars: one group per top-1 column, one bar per row, error bars where seeds."""
    columns = [c for c in table["columns"] if c.kind == "top1"]
    rows = [r for r in table["rows"] if any(_is_number(r["cells"][c.key][0]) for c in columns)]
    if not rows:
        return []
    width = 0.8 / len(rows)
    fig = new_figure(min(16.0, 2.0 + len(columns) * (0.4 * len(rows) + 0.8)), 4.5)
    ax = fig.subplots()
    for i, row in enumerate(rows):
        points = [(j + (i - (len(rows) - 1) / 2) * width, *row["cells"][c.key])
                  for j, c in enumerate(columns) if _is_number(row["cells"][c.key][0])]
        x, top1, std = zip(*points)
        baseline = row["kind"] == "baseline"  # references: hatched and paler
        ax.bar(x, top1, width, label=row["label"], hatch="//" if baseline else None,
               alpha=0.55 if baseline else 1.0, edgecolor="white" if baseline else None)
        spread = [(xi, t, s) for xi, t, s in points if s is not None]
        if spread:
            ax.errorbar(*zip(*spread), fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([c.label for c in columns], rotation=30 if len(columns) > 4 else 0)
    ax.set(ylabel="test top-1", ylim=(0, 1.05), title="Top-1 per evaluation")
    fig.legend(loc="outside lower center", ncols=min(3, len(rows)), fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    (out / "plots").mkdir(exist_ok=True)
    write_bytes_atomic(out / "plots" / _PLOT_NAME, buffer.getvalue())
    return [out / "plots" / _PLOT_NAME]


def pretrain_curves(runs: list[Run]) -> dict[str, dict]:
    """Run label -> its pretraining curve (pretrain.py's `epoch_curve` columns), for the runs
    whose pretraining finished and recorded one."""
    curves = {}
    for run in runs:
        curve = (run.results.get("pretrain") or {}).get("curve")
        if isinstance(curve, dict) and curve.get("epoch"):
            curves[run.label] = curve
    return curves


def _curve_points(curve: dict, key: str, x: str) -> tuple[list, list]:
    points = [(xv, yv) for xv, yv in zip(curve.get(x, []), curve.get(key, [])) if yv is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _write_curves_plot(out: Path, curves: dict[str, dict]) -> list[Path]:
    """One panel per curve any run has; one line per run."""
    keys = [k for k in _CURVES if any(_curve_points(c, k, "epoch")[0] for c in curves.values())]
    if not keys:
        return []
    fig = new_figure(5.0 * len(keys) + 1.0, 4.2)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colors = {label: f"C{i % 10}" for i, label in enumerate(curves)}  # one color per run, every panel
    for ax, key in zip(axes, keys):
        title, ylabel = _CURVES[key]
        for label, curve in curves.items():
            if key in _TIMED:
                x, y = _curve_points(curve, key, "seconds")
                x = [v / 60 for v in x]
            else:
                x, y = _curve_points(curve, key, "epoch")
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=label, color=colors[label])
        ax.set(title=title, ylabel=ylabel, xlabel="pretraining minutes" if key in _TIMED else "epoch")
        ax.title.set_fontsize(9)
    handles, labels = [], []  # every run once, whichever panels it has lines in
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    (out / "plots").mkdir(exist_ok=True)
    write_bytes_atomic(out / "plots" / _CURVES_NAME, buffer.getvalue())
    return [out / "plots" / _CURVES_NAME]


def curve_tables(curves: dict[str, dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per curve key any run has: one row per run, one column per epoch;
    k-NN cells also give the pretraining minutes at which they were measured."""
    tables = []
    for key, (title, _) in _CURVES.items():
        rows = []
        for label, curve in curves.items():
            values = dict(zip(curve["epoch"], curve.get(key) or []))
            minutes = dict(zip(curve["epoch"], curve.get("seconds") or []))
            if any(v is not None for v in values.values()):
                rows.append((label, values, minutes))
        if not rows:
            continue
        epochs = sorted({e for _, values, _ in rows for e in values})
        header = ["run"] + [f"epoch {e}" for e in epochs]
        body = []
        for label, values, minutes in rows:
            cells = []
            for e in epochs:
                value = values.get(e)
                text = fmt(value)
                if key in _TIMED and value is not None and minutes.get(e) is not None:
                    text += f" ({minutes[e] / 60:.1f} min)"
                cells.append(text)
            body.append([label] + cells)
        tables.append((title, header, body))
    return tables


# ---------------------------------------------------------------- rendering


_CURVES_LEGEND = ("Measured during pretraining on the validation split (never test): the "
                  "online monitor's k-NN top-1, or its mean per-label AUC for multi-label data "
                  "(with the pretraining minutes it was reached at, monitor time included) and a "
                  "classifier head's accuracy, where the run has them.")
_LEGEND = ("Test accuracies as fractions; ± is the standard deviation over seeds. "
           "The best value per column among the runs is in bold; baseline rows are references "
           "and not ranked. — means the run has no such value.")


def _cell_text(cell: tuple) -> str:
    value, std = cell
    # std rounded first: the std of equal floats can come out as 1e-16 instead of 0
    return fmt(value) + ("" if std is None else f" ± {fmt(round(std, 6))}")


def _status_text(row: dict) -> str:
    return f"{row['status']}: {row['error']}" if row["error"] else row["status"]


def _header(table: dict) -> list[str]:
    return ["run", "status"] + [c.label for c in table["columns"]]


def _render_md(table: dict, plots: list[Path], out: Path) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {table['title']}", "", _LEGEND, "",
             "| " + " | ".join(_header(table)) + " |", "|" + "---|" * len(_header(table))]
    for row in table["rows"]:
        values = [f"**{_cell_text(row['cells'][c.key])}**" if c.key in row["best"]
                  else _cell_text(row["cells"][c.key]) for c in table["columns"]]
        lines.append("| " + " | ".join(cell(v) for v in [row["label"], _status_text(row), *values])
                     + " |")
    tables = curve_tables(table.get("curves") or {})
    if tables:
        lines += ["", "## Pretraining curves", "", _CURVES_LEGEND]
    for title, header, body in tables:
        lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    lines += ["", "## Run directories", ""]
    lines += [f"- {row['label']}: `{row['run_dirs'][0]}`" for row in _run_rows(table)]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def _render_html(table: dict, plots: list[Path]) -> str:
    title = html.escape(table["title"])
    head = "".join(f"<th>{html.escape(label)}</th>" for label in _header(table))
    body = "\n".join(_html_row(table, row) for row in table["rows"])
    dirs = "\n".join(f"<tr><th>{html.escape(row['label'])}</th>"
                     f"<td>{html.escape(str(row['run_dirs'][0]))}</td></tr>"
                     for row in _run_rows(table))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{title}</title><style>{CSS}</style></head><body>", f"<h1>{title}</h1>",
             f"<p>{html.escape(_LEGEND)}</p>",
             f'<table id="comparison">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
             "</tbody></table>",
             *_html_curve_tables(table.get("curves") or {}),
             f"<h2>Run directories</h2>\n<table>\n{dirs}\n</table>"]
    if plots:
        parts.append("<h2>Plots</h2>\n" + "\n".join(html_image(p) for p in plots))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_curve_tables(curves: dict[str, dict]) -> list[str]:
    tables = curve_tables(curves)
    if not tables:
        return []
    parts = ["<h2>Pretraining curves</h2>", f"<p>{html.escape(_CURVES_LEGEND)}</p>"]
    for title, header, body in tables:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                         for row in body)
        parts.append(f"<h3>{html.escape(title)}</h3>\n<table class=\"curve\">\n<thead><tr>{head}"
                     f"</tr></thead>\n<tbody>\n{rows}\n</tbody></table>")
    return parts


def _html_row(table: dict, row: dict) -> str:
    cells = [f"<td>{html.escape(row['label'])}</td>", f"<td>{html.escape(_status_text(row))}</td>"]
    for column in table["columns"]:
        text = html.escape(_cell_text(row["cells"][column.key]))
        cells.append(f"<td><strong>{text}</strong></td>" if column.key in row["best"]
                     else f"<td>{text}</td>")
    return '<tr class="result-row">' + "".join(cells) + "</tr>"


def _run_rows(table: dict) -> list[dict]:
    return [row for row in table["rows"] if row["kind"] == "run"]


def _count_runs(table: dict) -> str:
    n = len(_run_rows(table))
    return f"{n} run" if n == 1 else f"{n} runs"


def _table_json(table: dict) -> dict:
    columns = table["columns"]
    return {
        "columns": [{"key": c.key, "label": c.label} for c in columns],
        "rows": [{
            "label": row["label"], "kind": row["kind"], "status": row["status"],
            "error": row["error"], "run_dirs": [str(p) for p in row["run_dirs"]],
            "values": {c.key: row["cells"][c.key][0] for c in columns},
            "std": {c.key: row["cells"][c.key][1] for c in columns
                    if row["cells"][c.key][1] is not None},
            "best": [c.key for c in columns if c.key in row["best"]],
        } for row in table["rows"]],
        "curves": table.get("curves") or {},
    }
