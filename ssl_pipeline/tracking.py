"""Where metrics go: `metrics.jsonl` in the run directory always, W&B when the recipe asks,
and a one-line-per-epoch progress report on the terminal."""

from __future__ import annotations

import json
import os
import secrets
import socket
import string
import sys
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ssl_pipeline.atomic import write_text_atomic
from ssl_pipeline.jsonl import append_jsonl, read_jsonl
from ssl_pipeline.recipe import WandbConfig


class JSONLLogger(Logger):
    """A Lightning logger that appends every logged step to `metrics.jsonl`."""

    def __init__(self, path: Path, stage: str):
        super().__init__()
        self.path = Path(path)
        self.stage = stage

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved recipe.yaml is the record of the settings

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        append_jsonl(self.path, {"stage": self.stage, "step": step, "time": time.time(), **metrics})


# W&B's own environment variables win over the recipe (WANDB_TAGS is comma-separated).
_ENV_OVERRIDES = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY",
                  "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS", "name": "WANDB_NAME"}
IDS_FILE = "wandb_runs.json"


def wandb_settings(config: WandbConfig) -> dict[str, Any]:
    """The recipe's W&B block with W&B's environment variables applied on top."""
    settings = config.model_dump()
    for key, var in _ENV_OVERRIDES.items():
        if os.environ.get(var):
            value = os.environ[var]
            settings[key] = [t for t in value.split(",") if t] if key == "tags" else value
    return settings


class WandbTracker:
    """The W&B side of one pipeline run: one W&B run per stage, all in one group.

    Each stage's W&B run id is kept in `run_dir/wandb_runs.json`, so a resumed stage continues
    its own W&B run. In online mode with the W&B server out of reach (a compute node without
    internet), the runs are written offline under `run_dir/wandb/` instead, for `wandb sync`
    later, with a warning. If W&B cannot start at all, this warns once and stays off for the
    rest of the pipeline run: metrics.jsonl still has everything.

    wandb itself prints nothing (about 25 lines of headers, history and summary per stage
    would bury the run's own output); instead, unless quiet, the terminal gets one line: where
    offline runs are saved and how to upload them, or each online stage's run address.
    """

    def __init__(self, config: WandbConfig, run_dir: Path, run_name: str, recipe: dict,
                 quiet: bool = False, active: bool = True):
        self.settings = wandb_settings(config)
        self.active = active  # False in the non-zero ranks of a DDP run: rank 0 reports
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.recipe = recipe
        self.quiet = quiet
        self.failed = False
        self.reach_checked = False
        self.offline_announced = False

    @property
    def enabled(self) -> bool:
        if not (self.active and self.settings["mode"] != "disabled" and not self.failed):
            return False
        if self.settings["mode"] == "online" and not self.reach_checked:
            self._offline_if_unreachable()
        return True

    def _offline_if_unreachable(self) -> None:
        """Online mode: can the W&B server be reached at all? One TCP connect (3 s) instead of
        wandb's own retries (about 90 s against an address nothing listens on); out of reach,
        the runs are written in offline mode from then on. Skipped, and taken as reachable,
        when a proxy is configured: wandb goes through it."""
        self.reach_checked = True
        if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                           "http_proxy", "ALL_PROXY", "all_proxy")):
            return
        url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=3).close()
        except OSError as err:
            self.settings["mode"] = "offline"
            self.offline_announced = True  # the warning below says where the runs go
            warnings.warn(
                f"W&B: cannot reach {url.hostname}:{port} ({err}); logging offline under "
                f"{self.run_dir / 'wandb'} instead. Upload later from a machine online: "
                f"wandb sync {self.run_dir / 'wandb'}/offline-run-*", stacklevel=3)

    def init_kwargs(self, stage: str) -> dict[str, Any]:
        """Arguments of `wandb.init` for the W&B run of one stage."""
        s = self.settings
        return dict(
            project=s["project"], entity=s["entity"], group=s["group"] or self.run_name,
            tags=s["tags"], name=f"{s['name'] or self.run_name}/{stage}", job_type=stage,
            mode=s["mode"], config=self.recipe, id=self._run_id(stage), resume="allow",
            dir=str(self.run_dir),
        )

    def lightning_logger(self, stage: str) -> Logger | None:
        """A Lightning WandbLogger for a stage that trains (pretraining)."""
        if not self.enabled:
            return None
        kwargs = self.init_kwargs(stage)
        try:
            import wandb

            logger = WandbLogger(save_dir=kwargs.pop("dir"), settings=wandb.Settings(silent=True),
                                 **kwargs)
            # Lightning passes anonymous=None, for which wandb >= 0.19 prints a deprecation
            # warning on every run; leaving it out means the same to wandb
            init = getattr(logger, "_wandb_init", {})
            if init.get("anonymous", "unset") is None:
                del init["anonymous"]
            self._announce(stage, logger.experiment)  # starts the run now: failures surface here
            return logger
        except Exception as err:  # W&B failing must never cost the run
            self._give_up(err)
            return None

    def start(self, stage: str):
        """A plain W&B run for a stage that does not train through Lightning, or None."""
        if not self.enabled:
            return None
        try:
            import wandb

            run = wandb.init(**self.init_kwargs(stage), settings=wandb.Settings(
                silent=True, init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 60))))
            self._announce(stage, run)
            return run
        except Exception as err:
            self._give_up(err)
            return None

    def log_stage(self, stage: str, result: dict[str, Any], baselines: dict[str, Any],
                  history: list[dict[str, Any]]) -> None:
        """An evaluation stage's curves (from metrics.jsonl), results and per-class table."""
        run = self.start(stage)
        if run is None:
            return
        try:
            for row in history:
                values = {f"{row['stage']}/{k}": v for k, v in row.items()
                          if k not in ("stage", "step", "time") and isinstance(v, (int, float))}
                if values:
                    run.log(values)
            run.summary.update(stage_metrics(stage, result, baselines))
            table = per_class_table(stage, result, baselines)
            if table:
                import wandb

                run.log({f"{stage}/per_class": wandb.Table(columns=list(table[0]),
                                                            data=[list(r.values()) for r in table])})
        except Exception as err:
            self._give_up(err)
        finally:
            run.finish()

    def log_report(self, plots: list[Path], rows: list[dict[str, str]]) -> None:
        """The report's plots and results table, in a W&B run of their own in the group."""
        run = self.start("report")
        if run is None:
            return
        try:
            import wandb

            run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
            if rows:
                run.log({"results": wandb.Table(columns=list(rows[0]),
                                                data=[list(r.values()) for r in rows])})
        except Exception as err:
            self._give_up(err)
        finally:
            run.finish()

    def log_backbone(self, run, metadata: dict[str, Any]) -> None:
        """The exported backbone (safetensors + backbone.json) as a W&B model artifact."""
        if run is None or not hasattr(run, "log_artifact"):
            return
        try:
            import wandb

            name = "backbone-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in self.run_name)
            artifact = wandb.Artifact(name, type="model", metadata=_jsonable_tree(metadata))
            for file in ("backbone.safetensors", "backbone.json"):
                if (self.run_dir / file).exists():
                    artifact.add_file(str(self.run_dir / file))
            run.log_artifact(artifact)
        except Exception as err:
            self._give_up(err)

    def _run_id(self, stage: str) -> str:
        """The stage's W&B run id: the stored one when resuming, else a new one, stored."""
        path = self.run_dir / IDS_FILE
        ids = json.loads(path.read_text()) if path.exists() else {}
        if stage not in ids:
            alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
            ids[stage] = "".join(secrets.choice(alphabet) for _ in range(8))
            write_text_atomic(path, json.dumps(ids, indent=2))
        return ids[stage]

    def _announce(self, stage: str, run) -> None:
        """The one line on the terminal for W&B (wandb's own output is silenced)."""
        if self.quiet:
            return
        if self.settings["mode"] == "offline":
            if not self.offline_announced:
                wandb_dir = self.run_dir / "wandb"
                print(f"  W&B offline: runs saved under {wandb_dir}; upload them later with: "
                      f"wandb sync {wandb_dir}/offline-run-*", flush=True)
            self.offline_announced = True
        elif getattr(run, "url", None):
            print(f"  W&B {stage}: {run.url}", flush=True)

    def _give_up(self, err: Exception) -> None:
        if not self.failed:
            warnings.warn(f"W&B could not start or log ({type(err).__name__}: {err}); "
                          "continuing with metrics.jsonl only", stacklevel=2)
        self.failed = True


def stage_metrics(stage: str, result: dict[str, Any], baselines: dict[str, Any]) -> dict[str, float]:
    """Every number of a stage's result, flattened: `knn/top1`, `knn/by_k/200/top1`,
    `baselines/random_init/knn/top1`. Lists (confusion matrices, per-class values) are left out."""
    flat = _flatten(result, stage)
    for name, stages in (baselines or {}).items():
        flat |= _flatten(stages.get(stage) or {}, f"baselines/{name}/{stage}")
    return flat


def per_class_table(stage: str, result: dict[str, Any], baselines: dict[str, Any]) -> list[dict]:
    """Rows (subject, class, accuracy) from the per-class accuracies a stage kept."""
    rows = []
    subjects = [("backbone", result)] + [(n, s.get(stage) or {}) for n, s in (baselines or {}).items()]
    for subject, res in subjects:
        metrics = _first_with(res, "per_class_accuracy") or {}
        accuracies = metrics.get("per_class_accuracy") or []
        names = metrics.get("class_names") or [str(i) for i in range(len(accuracies))]
        rows += [{"subject": subject, "class": str(n), "accuracy": float(a)}
                 for n, a in zip(names, accuracies)]
    return rows


def _first_with(tree: Any, key: str) -> dict | None:
    """The first dict holding `key`, depth first: a probe keeps its metrics under
    test_metrics, fine-tuning under by_fraction/<fraction>/by_seed/<i>."""
    if isinstance(tree, dict):
        if key in tree:
            return tree
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _first_with(child, key)
        if found is not None:
            return found
    return None


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out |= _flatten(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _jsonable_tree(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def record_stage(path: Path, stage: str, result: dict[str, Any], baselines: dict[str, Any],
                 seconds: float) -> None:
    """One metrics.jsonl line with a finished stage's numbers, so the file holds every
    evaluation and not only the training steps."""
    append_jsonl(path, {"stage": stage, "event": "stage_result", "time": time.time(),
                        "seconds": round(seconds, 2), **stage_metrics(stage, result, baselines)})


def stage_history(path: Path, stage: str) -> list[dict[str, Any]]:
    """The metrics.jsonl rows logged inside one stage (e.g. fine-tuning's epochs)."""
    return [row for row in read_jsonl(path) if str(row.get("stage", "")).startswith(stage + "/")]


class EpochProgress(pl.Callback):
    """One line per epoch (loss, online monitor, time), readable in CI logs and terminals,
    and the per-epoch history the stage summary and the report use."""

    SHOWN = [("train/loss_epoch", "loss"), ("train/collapse_std", "collapse_std"),
             ("train/accuracy", "train_accuracy")]

    def __init__(self, quiet: bool = False, monitor=None, stream=None):
        self.monitor = monitor  # OnlineKNNMonitor or None; it runs before this callback
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.history: list[dict[str, float]] = []
        self.start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()  # an epoch resumed part-way has no on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        record = {"epoch": trainer.current_epoch + 1, "seconds": time.time() - self.start}
        record |= {name: metrics[key].item() for key, name in self.SHOWN if key in metrics}
        if self.monitor is not None and record["epoch"] in self.monitor.by_epoch:
            record[self.monitor.metric] = self.monitor.by_epoch[record["epoch"]]  # None: no AUC
        if self.monitor is not None and record["epoch"] in self.monitor.val_accuracy_by_epoch:
            record["val_accuracy"] = self.monitor.val_accuracy_by_epoch[record["epoch"]]
        self.history.append(record)
        if trainer.is_global_zero and not self.quiet:
            parts = [f"epoch {record['epoch']}/{trainer.max_epochs}"]
            parts += [f"{name} {'n/a' if value is None else f'{value:.4f}'}"
                      for name, value in record.items() if name not in ("epoch", "seconds")]
            parts.append(f"{record['seconds']:.1f} s")
            print("  " + " | ".join(parts), file=self.stream, flush=True)
