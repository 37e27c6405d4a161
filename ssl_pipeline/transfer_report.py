"""The transfer report: one row per target dataset, AUC and ACC per evaluation stage, the
random-init baseline beside each, and the published numbers as reference rows.

`ssl-pipeline transfer-report RUN_DIR... [--out DIR]` reads the results of transfer runs
(`ssl-pipeline evaluate recipes/transfer_*.yaml ...`, or any run with evaluation stages) and
writes `transfer.md`, `transfer.html` and `transfer.json`. Cells are "AUC / ACC" where the
stage reports an AUC (k-NN, linear probe, fine-tuning at the largest label fraction) and the
top-1 accuracy alone otherwise (few-shot at the most shots, VTAB-1k). AUC and ACC follow
MedMNIST's definitions (evals/metrics.py).

Reference rows, never computed here, only quoted:
- MedMNIST targets: MedMNIST v2's ResNet-18 at 28 px trained from scratch on all labels (Yang
  et al., Sci Data 2023, Table 3), in the fine-tuning column (the closest protocol: a whole
  network trained on all labels).
- EuroSAT RGB: k-NN (k=5) on ImageNet ResNet-50 features at 224 px with ImageNet normalization,
  91.9% (Corley et al. 2023), in the k-NN column.
Nothing is written into the run directories.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.compare import check_out_dir, read_run
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.report import CSS, fmt

COLUMNS = (("knn", "k-NN"), ("linear_probe", "linear probe"), ("finetune", "fine-tune"),
           ("few_shot", "few-shot"), ("vtab_1k", "VTAB-1k"))
# MedMNIST v2's ResNet-18 at 28 px trained from scratch on all labels: test (AUC, ACC)
# [Yang et al., Sci Data 2023, Table 3]: the reference rows of MedMNIST targets.
PUBLISHED_RESNET18_28 = {
    "pathmnist": (0.983, 0.907), "dermamnist": (0.917, 0.735), "chestmnist": (0.768, 0.947),
    "octmnist": (0.943, 0.743), "pneumoniamnist": (0.944, 0.854), "retinamnist": (0.717, 0.524),
    "breastmnist": (0.901, 0.863), "bloodmnist": (0.998, 0.958), "tissuemnist": (0.930, 0.676),
    "organamnist": (0.997, 0.935), "organcmnist": (0.992, 0.900), "organsmnist": (0.972, 0.782),
}
PUBLISHED_SOURCE = "MedMNIST v2 ResNet-18 (28 px) from scratch, Yang et al. 2023, Table 3"
EUROSAT_KNN = (0.919, ("k-NN (k=5) on ImageNet ResNet-50 features, 224 px, ImageNet "
                       "normalization (Corley et al. 2023)"))


def write_transfer_report(run_dirs: list[str | Path], out: str | Path | None = None) -> dict:
    """Read the runs, write the report; returns `{"md", "html", "json"}` paths."""
    if not run_dirs:
        raise SSLPipelineError("transfer-report needs at least one run directory")
    runs = [read_run(Path(d)) for d in run_dirs]
    out = Path(out) if out else Path("reports") / "transfer" / datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    check_out_dir(out, runs, "transfer-report")
    table = transfer_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "transfer.md", "html": out / "transfer.html", "json": out / "transfer.json"}
    write_text_atomic(paths["md"], render_md(table))
    write_text_atomic(paths["html"], render_html(table))
    write_text_atomic(paths["json"], json.dumps(table, indent=2) + "\n")
    return paths


def transfer_table(runs) -> dict:
    """`{"columns": [...], "rows": [{"target", "subject", "cells": {column: cell}, ...}]}`;
    a cell is `{"auc", "acc", "note"}` (values may be None)."""
    rows = []
    for run in runs:
        target = target_name(run.recipe)
        if run.status != "done" and not run.results:
            rows.append({"target": target, "subject": "(no results)", "kind": "run",
                         "run_dir": str(run.path), "cells": {},
                         "status": f"{run.status}: {run.error}"})
            continue
        subjects = [("backbone", run.results)] + [
            (name.replace("_", " "), stages)
            for name, stages in (run.results.get("baselines") or {}).items()
        ]
        for subject, results in subjects:
            cells = {key: cell for key, _ in COLUMNS if (cell := stage_cell(results, key))}
            if cells:
                rows.append({"target": target, "subject": subject, "kind": "run",
                             "run_dir": str(run.path), "cells": cells,
                             "status": run.status if run.status != "done" else ""})
        rows += reference_rows(run.recipe, target)
    return {"columns": [{"key": k, "label": label} for k, label in COLUMNS], "rows": rows}


def target_name(recipe: dict) -> str:
    data = {**(recipe.get("data") or {}), **((recipe.get("resolved") or {}).get("data") or {})}
    name = str(data.get("name") or "?")
    if name == "medmnist":
        m = (recipe.get("data") or {}).get("medmnist") or {}
        return f"{m.get('subset', 'medmnist')} ({m.get('size', 28)} px)"
    if name == "eurosat":
        chosen = ((recipe.get("data") or {}).get("eurosat") or {}).get("bands", "rgb")
        return "eurosat (RGB)" if chosen == "rgb" else f"eurosat ({len(data.get('bands') or [])} bands)"
    return name


def stage_cell(results: dict, key: str) -> dict | None:
    if key == "vtab_1k":
        res = (results.get("few_shot") or {}).get("vtab_1k")
        return None if not res else {"auc": None, "acc": res.get("top1"),
                                     "note": f"{res.get('train')} + {res.get('val')} examples"}
    res = results.get(key)
    if not isinstance(res, dict):
        return None
    if key == "few_shot":
        shots = res.get("by_shots") or {}
        if not shots:
            return None
        most = max(shots, key=float)
        return {"auc": None, "acc": shots[most].get("top1"), "note": f"{most}-shot"}
    auc = res.get("auc", (res.get("test_metrics") or {}).get("auc"))
    note = ""
    if key == "finetune" and res.get("by_fraction"):
        note = f"{float(max(res['by_fraction'], key=float)):.0%} labels"
    return {"auc": auc, "acc": res.get("top1"), "note": note}


def reference_rows(recipe: dict, target: str) -> list[dict]:
    data = recipe.get("data") or {}
    if data.get("name") == "medmnist":
        subset = (data.get("medmnist") or {}).get("subset", "pathmnist")
        if subset in PUBLISHED_RESNET18_28:
            auc, acc = PUBLISHED_RESNET18_28[subset]
            return [{"target": target, "subject": "published: " + PUBLISHED_SOURCE,
                     "kind": "reference", "cells": {"finetune": {
                         "auc": auc, "acc": acc, "note": "100% labels, from scratch"}}}]
    if data.get("name") == "eurosat" and target == "eurosat (RGB)":
        return [{"target": target, "subject": "published: " + EUROSAT_KNN[1], "kind": "reference",
                 "cells": {"knn": {"auc": None, "acc": EUROSAT_KNN[0], "note": "k=5"}}}]
    return []


def cell_text(cell: dict | None) -> str:
    if not cell:
        return ""
    value = fmt(cell["acc"]) if cell.get("auc") is None else \
        f"{fmt(cell['auc'])} / {fmt(cell['acc'])}"
    return value + (f" ({cell['note']})" if cell.get("note") else "")


def _header(table: dict) -> list[str]:
    return ["target", "evaluated"] + [c["label"] for c in table["columns"]]


def _cells(table: dict, row: dict) -> list[str]:
    subject = row["subject"] + (f" [{row['status']}]" if row.get("status") else "")
    return [row["target"], subject] + [cell_text(row["cells"].get(c["key"]))
                                       for c in table["columns"]]


LEGEND = ("Cells: AUC / ACC (MedMNIST's definitions: mean one-vs-rest AUC, argmax accuracy; "
          "multi-label: mean per-label AUC, per-label accuracy at p > 0.5) on the test split; "
          "top-1 accuracy alone where a stage has no AUC. Fine-tuning at the "
          "largest label fraction, few-shot at the most shots (logistic regression). Rows "
          "marked \"published\" are quoted from the papers, not run here.")


def render_md(table: dict) -> str:
    header = _header(table)
    lines = ["# Transfer report", "", LEGEND, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(table, row)) + " |"
              for row in table["rows"]]
    return "\n".join(lines) + "\n"


def render_html(table: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _header(table))
    body = "\n".join(
        f'<tr class="{row["kind"]}">'
        + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(table, row)) + "</tr>"
        for row in table["rows"]
    )
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Transfer '
            f"report</title><style>{CSS} tr.reference td {{font-style: italic}}</style></head>"
            f"<body><h1>Transfer report</h1><p>{html.escape(LEGEND)}</p>\n<table id=\"transfer\">"
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></body></html>\n")


def rows_for_report(recipe: dict) -> list[tuple[str, str]]:
    """The published reference for a single run's report (empty when there is none)."""
    target = target_name(recipe)
    return [(row["subject"], "; ".join(f"{key}: {cell_text(cell)}"
                                       for key, cell in row["cells"].items()))
            for row in reference_rows(recipe, target)]
