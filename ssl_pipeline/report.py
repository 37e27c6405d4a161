"""The human-readable report of one finished run: report.md, report.html and plots/*.png.

Everything is read from the files the run already wrote (recipe.yaml, metrics.jsonl,
results.json, run_state.json); nothing is rerun. Any of them may be missing or partial (a run
that stopped after pretraining, a recipe without fine-tuning), so every section is built from
what exists and is left out otherwise.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssl_pipeline.atomic import write_bytes_atomic
from ssl_pipeline.embedding_map import read_embedding_map
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.jsonl import read_jsonl
from ssl_pipeline.names import MONITOR_METRICS

# Keys of results.json that are not evaluation stages; everything else holding a top-1 is one.
_NOT_STAGES = ("pretrain", "baselines", "provenance", "schema_version")
# Stages whose confusion matrix may be plotted, where they keep their test metrics.
_CONFUSION_STAGES = {"knn": None, "linear_probe": "test_metrics"}
CSS = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``run_dir``.

    Returns ``{"md": Path, "html": Path, "plots": [Path, ...]}``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise SSLPipelineError(
            f"run directory {str(run)!r} does not exist; pass the --out directory of a finished "
            "`ssl-pipeline run`"
        )
    recipe = read_yaml(run / "recipe.yaml")
    results = read_json(run / "results.json")
    state = read_json(run / "run_state.json")
    plots = _write_plots(run, read_jsonl(run / "metrics.jsonl"), results, recipe)
    sections = _sections(recipe, results, state)
    md_path, html_path = run / "report.md", run / "report.html"
    write_bytes_atomic(md_path, _render_md(recipe, sections, plots, run).encode())
    write_bytes_atomic(html_path, _render_html(recipe, sections, plots).encode())
    return {"md": md_path, "html": html_path, "plots": plots}


# ---------------------------------------------------------------- reading the run's files


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SSLPipelineError(f"{path} is not valid JSON ({err}); was the run interrupted?")
    return data if isinstance(data, dict) else {}


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}




# ---------------------------------------------------------------- what the report says


def _sections(recipe: dict, results: dict, state: dict) -> dict[str, list]:
    """Section title -> rows; the results rows are dicts, the others (label, value) pairs."""
    from ssl_pipeline.transfer_report import (
        rows_for_report,  # (it reads reports like this one)
    )

    return {
        "Recipe": _recipe_summary(recipe),
        "Results": result_rows(results),
        "Published reference": rows_for_report(recipe),
        "Timings": _timings(results, state),
        "Skipped images": _skipped_images(recipe),
        "Hardware": _flat_pairs(results.get("provenance", {}).get("hardware", {})),
        "Packages": _flat_pairs(results.get("provenance", {}).get("packages", {})),
        "Provenance": _provenance(results.get("provenance", {})),
    }


def _recipe_summary(recipe: dict) -> list[tuple[str, str]]:
    resolved = recipe.get("resolved") or {}
    pretrain = recipe.get("pretrain") or {}
    world = resolved.get("world_size")
    per_device = resolved.get("per_device_batch_size")
    # The global batch is what the learning rate was scaled against, so show that, not per device.
    batch = per_device * world if per_device and world else pretrain.get("batch_size")
    pairs = [
        ("name", recipe.get("name")),
        ("data", _data_summary(recipe)),
        ("backbone", (recipe.get("backbone") or {}).get("name")),
        ("method", (recipe.get("method") or {}).get("name")),
        ("stages", ", ".join(map(str, recipe.get("stages") or [])) or None),
        ("pretraining epochs", pretrain.get("epochs")),
        ("global batch", batch),
        ("optimizer", pretrain.get("optimizer")),
        ("effective lr", resolved.get("effective_lr", pretrain.get("lr"))),
        ("world size", world),
        ("seed", recipe.get("seed")),
    ]
    return [(label, fmt(value)) for label, value in pairs if value is not None]


def _data_summary(recipe: dict) -> str | None:
    data = {**(recipe.get("data") or {}), **((recipe.get("resolved") or {}).get("data") or {})}
    if not data.get("name"):
        return None
    parts = [str(data["name"])]
    if data.get("num_classes"):
        parts.append(f"{data['num_classes']} labels (multi-label)" if data.get("multi_label")
                     else f"{data['num_classes']} classes")
    if data.get("bands"):
        parts.append("bands " + ", ".join(data["bands"]))
    if data.get("image_size"):
        parts.append(f"{data['image_size']} px")
    sizes = data.get("sizes") or {}
    if sizes:
        parts.append(" / ".join(f"{split} {n}" for split, n in sizes.items()))
    skipped = (data.get("skipped_images") or {}).get("count")
    if skipped:
        parts.append(f"{skipped} unreadable image file(s) skipped")
    return ", ".join(parts)


def _skipped_images(recipe: dict) -> list[tuple[str, str]]:
    """The files data.on_bad_image=skip left out, each with the reason."""
    skipped = ((recipe.get("resolved") or {}).get("data") or {}).get("skipped_images") or {}
    rows = [(item["path"], item["reason"]) for item in skipped.get("files") or []]
    if skipped.get("count", 0) > len(rows):
        rows.append(("…", f"and {skipped['count'] - len(rows)} more"))
    return rows


def result_rows(results: dict) -> list[dict[str, str]]:
    """One row per evaluation stage of the backbone, then one per (baseline, stage)."""
    rows = [_row("backbone", stage, res) for stage, res in eval_stages(results)]
    for baseline, stages in (results.get("baselines") or {}).items():
        rows += [_row(baseline, stage, res) for stage, res in eval_stages(stages)]
    return rows


def eval_stages(results: dict) -> list[tuple[str, dict]]:
    return [
        (key, value)
        for key, value in results.items()
        if key not in _NOT_STAGES
        and isinstance(value, dict)
        and ("top1" in value or "by_shots" in value)
    ]


def _row(subject: str, stage: str, res: dict) -> dict[str, str]:
    top1, details = res.get("top1"), _details(res)
    shots = res.get("by_shots") or {}
    if top1 is None and shots:
        # Few-shot has no single top-1: the row shows the most shots, the details all of them.
        most = max(shots, key=float)
        top1 = shots[most].get("top1")
        details.insert(0, f"top-1 at {most} shots")
    std = res.get("top1_std")
    return {
        "subject": subject,
        "stage": stage,
        "top1": fmt(top1),
        "std": "" if std is None else f"± {fmt(round(std, 6))}",
        "details": "; ".join(details),
    }


def _details(res: dict) -> list[str]:
    metrics = {**(res.get("test_metrics") or {}), **res}
    out = ["multi-label: top-1 is MedMNIST's ACC (p > 0.5 per label)"] \
        if metrics.get("multi_label") else []
    out += [f"{key} {fmt(metrics[key])}" for key in ("auc", "top5", "balanced_accuracy", "macro_f1")
            if metrics.get(key) is not None]
    if "k" in res:
        out.append(f"k {res['k']}")
    if res.get("by_k"):
        by_k = (f"{k}: {fmt(v.get('top1'))}" for k, v in res["by_k"].items())
        out.append("by k: " + ", ".join(by_k))
    if res.get("seeds") is not None:
        out.append(f"{res['seeds']} seeds")
    if res.get("chosen"):
        out.append("chosen " + ", ".join(f"{k}={fmt(v)}" for k, v in res["chosen"].items()))
    out += _fraction_details(res.get("by_fraction") or {})
    out += _shot_details(res.get("by_shots") or {})
    vtab = res.get("vtab_1k")
    if vtab:
        ci = vtab.get("ci95")
        size = "" if (vtab.get("train"), vtab.get("val")) == (800, 200) else \
            f" ({vtab.get('train')} train + {vtab.get('val')} val)"
        out.append(f"VTAB-1k{size}: {fmt(vtab.get('top1'))}"
                   + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""))
    return out


def _fraction_details(by_fraction: dict) -> list[str]:
    """`1% labels (class-balanced, seeded; 60 epochs, best of 20 validated): 0.62 ± 0.03`: how
    each subset was drawn, how long it trained and how many epochs it chose from, shown."""
    out = []
    for frac, v in by_fraction.items():
        how = [v["subset"]] if v.get("subset") not in (None, "all") else []
        epochs = v.get("epochs")
        if epochs is not None:
            validated = v.get("validated_epochs", epochs)  # older results: every epoch
            how.append(f"{epochs} epoch{'s' * (epochs != 1)}"
                       + (f", best of {validated} validated" if validated < epochs else ""))
        out.append(f"{float(frac):.0%} labels" + (f" ({'; '.join(how)})" if how else "")
                   + f": {fmt(v.get('top1'))}"
                   + (f" ± {fmt(round(v['top1_std'], 6))}" if v.get("top1_std") is not None else ""))
    return out


def _shot_details(by_shots: dict) -> list[str]:
    out = []
    for shots, v in sorted(by_shots.items(), key=lambda item: float(item[0])):
        ci = v.get("ci95")
        ci_text = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and len(ci) == 2 else ""
        out.append(f"{shots}-shot: {fmt(v.get('top1'))}{ci_text}")
    return out


def _timings(results: dict, state: dict) -> list[tuple[str, str]]:
    pretrain = results.get("pretrain") or {}
    pairs = [
        (f"pretraining {label}", fmt(pretrain[key]))
        for key, label in (("seconds", "seconds"), ("images_per_second", "images / s"),
                           ("steps", "steps"), ("epochs", "epochs"),
                           ("resumed_from_step", "resumed from step"),
                           ("skipped_nonfinite_steps", "steps skipped (non-finite loss)"))
        if pretrain.get(key) is not None
    ]
    pairs += [("pretraining warning", text) for text in pretrain.get("warnings") or []]
    for stage, info in (state.get("stages") or {}).items():
        info = info if isinstance(info, dict) else {}
        seconds = "" if info.get("seconds") is None else f"{fmt(info['seconds'])} s"
        speed = info.get("images_per_second")
        speed = "" if speed is None else f"({fmt(speed)} images / s)"
        pairs.append((f"stage {stage}", " ".join(filter(None, [info.get("status"), seconds, speed]))))
    return pairs


def _provenance(provenance: dict) -> list[tuple[str, str]]:
    pairs = [("git commit", provenance["git_commit"])] if provenance.get("git_commit") else []
    return pairs + [(f"split {k}", v) for k, v in (provenance.get("split_hashes") or {}).items()]


def _flat_pairs(mapping: dict) -> list[tuple[str, str]]:
    return [(str(key), fmt(value)) for key, value in mapping.items()]


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "none"
    return str(value)


# ---------------------------------------------------------------- plots


def _write_plots(run: Path, metrics: list[dict], results: dict, recipe: dict) -> list[Path]:
    figures = {
        "pretrain_loss_lr.png": _loss_lr_figure(metrics),
        "monitor.png": _monitor_figure(metrics, results),
        "confusion.png": _confusion_figure(results, recipe),
        "embedding_map.png": _embedding_figure(read_embedding_map(run), results, recipe),
    }
    paths = []
    for name, fig in figures.items():
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        (run / "plots").mkdir(exist_ok=True)
        write_bytes_atomic(run / "plots" / name, buffer.getvalue())
        paths.append(run / "plots" / name)
    return paths


def new_figure(width: float, height: float) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(metrics: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    points = [(row[x], row[key]) for row in metrics
              if row.get("stage") == "pretrain" and row.get(key) is not None and x in row]
    return [p[0] for p in points], [p[1] for p in points]


def _loss_lr_figure(metrics: list[dict]) -> Figure | None:
    loss, lr = _series(metrics, "train/loss_step"), _series(metrics, "train/lr")
    if not loss[0] and not lr[0]:
        return None
    fig = new_figure(7, 5)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(*loss, marker="." if len(loss[0]) < 50 else None)
    ax_loss.set(ylabel="pretraining loss", title="Pretraining")
    ax_lr.plot(*lr, color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate")
    return fig


def _monitor_by_epoch(metrics: list[dict], key: str) -> dict[int, float]:
    """Last value per epoch, numbered from 1 like results.json (metrics.jsonl counts from 0)."""
    epochs, values = _series(metrics, key, x="epoch")
    return {int(epoch) + 1: value for epoch, value in zip(epochs, values)}


def _monitor_figure(metrics: list[dict], results: dict) -> Figure | None:
    pre = results.get("pretrain") or {}
    metric = pre.get("monitor_metric") or "knn_top1"  # (older results: top-1 only)
    label = MONITOR_METRICS[metric]
    knn = _monitor_by_epoch(metrics, f"monitor/{metric}")
    if not knn:
        by_epoch = pre.get(f"monitor_{metric}_by_epoch") or {}
        knn = {int(epoch): value for epoch, value in by_epoch.items()}
    knn = {epoch: value for epoch, value in knn.items()
           if value is not None and math.isfinite(value)}  # (an AUC no label could give)
    collapse = _monitor_by_epoch(metrics, "train/collapse_std")
    if not knn and not collapse:
        return None
    fig = new_figure(7, 3.5)
    ax = fig.subplots()
    if knn:
        ax.plot(list(knn), list(knn.values()), marker="o", label=label)
        ax.set(ylabel=label)
    if collapse:
        # SimSiam's collapse metric lives on another scale (0 .. 1/sqrt(D)), so its own axis.
        ax_std = ax.twinx() if knn else ax
        ax_std.plot(list(collapse), list(collapse.values()), marker="s", color="tab:red",
                    label="collapse std")
        ax_std.set(ylabel="collapse std")
    ax.set(xlabel="epoch", title="Online monitor during pretraining")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def _best_confusion(results: dict) -> tuple[str, dict] | None:
    """The backbone stage with the highest top-1 among those that kept a confusion matrix."""
    candidates = []
    for stage, sub in _CONFUSION_STAGES.items():
        res = results.get(stage) or {}
        metrics = res.get(sub) or {} if sub else res
        if metrics.get("confusion_matrix"):
            top1 = res.get("top1", metrics.get("top1"))
            candidates.append((top1 if top1 is not None else -1.0, stage, metrics))
    if not candidates:
        return None
    _, stage, metrics = max(candidates, key=lambda c: c[0])
    return stage, metrics


def _confusion_figure(results: dict, recipe: dict) -> Figure | None:
    best = _best_confusion(results)
    if best is None:
        return None
    stage, metrics = best
    matrix = metrics["confusion_matrix"]  # (C, C), rows are true classes
    per_class = metrics.get("per_class_accuracy") or [
        row[i] / sum(row) if sum(row) else 0.0 for i, row in enumerate(matrix)
    ]
    names = _class_names(metrics, results, recipe, len(matrix))
    fig = new_figure(10, max(3.5, 0.3 * len(names) + 1.5))
    ax_cm, ax_acc = fig.subplots(1, 2, width_ratios=[1.2, 1])
    image = ax_cm.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax_cm, shrink=0.8)
    ticks = range(len(names)) if len(names) <= 30 else []  # unreadable beyond that
    ax_cm.set(xticks=list(ticks), yticks=list(ticks), xlabel="predicted", ylabel="true",
              title=f"Confusion matrix ({stage}, test)")
    if ticks:
        ax_cm.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=7)
        ax_cm.set_yticklabels([names[i] for i in ticks], fontsize=7)
    ax_acc.barh(range(len(per_class)), per_class)
    ax_acc.set(xlim=(0, 1), xlabel="accuracy", title="Per-class accuracy", yticks=list(ticks))
    if ticks:
        ax_acc.set_yticklabels([names[i] for i in ticks], fontsize=7)
    ax_acc.invert_yaxis()  # same top-to-bottom order as the matrix rows
    return fig


def _embedding_figure(saved, results: dict, recipe: dict) -> Figure | None:
    if saved is None:
        return None
    coords, labels, method = saved
    if labels.ndim == 2:
        return _multi_label_embedding_figure(coords, labels, method, results, recipe)
    classes = sorted(set(labels.tolist()))
    names = _class_names({}, results, recipe, max(classes) + 1 if classes else 0)
    fig = new_figure(7, 6)
    ax = fig.subplots()
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for i, c in enumerate(classes):
        points = coords[labels == c]
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7, label=names[c],
                   color=_qualitative_color(cmap, i))
    ax.set(title=f"Test embeddings of the backbone ({method}, {len(labels)} images)",
           xticks=[], yticks=[])
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=7, loc="best", ncols=2 if len(classes) > 10 else 1)
    return fig


MAX_LABEL_PANELS = 16


def _multi_label_embedding_figure(coords: np.ndarray, labels: np.ndarray, method: str,
                                  results: dict, recipe: dict) -> Figure:
    """Multi-label data: one small panel per label (the most frequent `MAX_LABEL_PANELS`),
    every image in grey and the images that have the label in colour: a point has several
    labels or none, so one colour per point cannot show them."""
    names = _class_names({}, results, recipe, labels.shape[1])
    positives = labels.sum(0)
    shown = sorted(np.argsort(-positives, kind="stable")[:MAX_LABEL_PANELS].tolist())
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig = new_figure(2.6 * cols, 2.4 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, j in zip(axes, shown):
        has = labels[:, j] > 0
        ax.scatter(coords[~has, 0], coords[~has, 1], s=3, alpha=0.3, color="0.75")
        ax.scatter(coords[has, 0], coords[has, 1], s=6, alpha=0.9, color="C0")
        ax.set_title(f"{names[j]} ({int(positives[j])})", fontsize=8)
        ax.set(xticks=[], yticks=[])
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    which = "" if len(shown) == labels.shape[1] else \
        f"; the {len(shown)} most frequent of {labels.shape[1]} labels"
    fig.suptitle(f"Test embeddings of the backbone ({method}, {len(labels)} images), in colour the "
                 f"images with each label{which}", fontsize=9)
    return fig


def _qualitative_color(cmap: str, i: int):
    """The i-th colour of a qualitative colormap (cycling past its size)."""
    from matplotlib import colormaps

    colors = colormaps[cmap].colors
    return colors[i % len(colors)]


def _class_names(metrics: dict, results: dict, recipe: dict, n: int) -> list[str]:
    resolved = ((recipe.get("resolved") or {}).get("data") or {}).get("class_names")
    for names in (metrics.get("class_names"), (results.get("knn") or {}).get("class_names"),
                  resolved):
        if names and len(names) == n:
            return [str(name) for name in names]
    return [str(i) for i in range(n)]


# ---------------------------------------------------------------- rendering


_NO_RESULTS = "No evaluation results in results.json yet."
_RESULT_COLUMNS = (("subject", "subject"), ("stage", "stage"), ("top1", "top-1"),
                   ("std", "± std"), ("details", "details"))


def _render_md(recipe: dict, sections: dict, plots: list[Path], run: Path) -> str:
    lines = [f"# Run report: {recipe.get('name') or run.name}", ""]
    for title, rows in sections.items():
        if rows:
            lines += [f"## {title}", "", *_md_table(title, rows), ""]
        elif title == "Results":
            lines += [f"## {title}", "", _NO_RESULTS, ""]
        if title == "Results" and plots:
            lines += ["## Plots", ""]
            lines += [f"![{p.stem}]({p.relative_to(run).as_posix()})" for p in plots] + [""]
    return "\n".join(lines)


def _md_table(title: str, rows: list) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    if title == "Results":
        header = [label for _, label in _RESULT_COLUMNS]
        body = [[row[key] for key, _ in _RESULT_COLUMNS] for row in rows]
    else:
        header, body = ["", ""], [list(pair) for pair in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in body]


def _render_html(recipe: dict, sections: dict, plots: list[Path]) -> str:
    title = html.escape(f"Run report: {recipe.get('name') or 'run'}")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{title}</title><style>{CSS}</style></head><body>", f"<h1>{title}</h1>"]
    for name, rows in sections.items():
        if rows:
            table = _html_results(rows) if name == "Results" else _html_pairs(rows)
            parts.append(f"<h2>{html.escape(name)}</h2>\n{table}")
        elif name == "Results":
            parts.append(f"<h2>Results</h2>\n<p>{html.escape(_NO_RESULTS)}</p>")
        if name == "Results" and plots:
            parts.append("<h2>Plots</h2>\n" + "\n".join(html_image(p) for p in plots))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_results(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in _RESULT_COLUMNS)
    body = "\n".join(
        '<tr class="result-row">'
        + "".join(f"<td>{html.escape(row[key])}</td>" for key, _ in _RESULT_COLUMNS)
        + "</tr>"
        for row in rows
    )
    return (f'<table id="results">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody></table>")


def _html_pairs(pairs: list[tuple[str, str]]) -> str:
    body = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs
    )
    return f"<table>\n{body}\n</table>"


def html_image(path: Path) -> str:
    # Embedded so the report is one self-contained file that can be mailed or attached.
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"></figure>'
