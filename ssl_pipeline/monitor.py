"""The online monitor: k-NN top-1 on the validation split every N epochs during pretraining
(of the pretraining data, or of a separate labeled dataset: `pretrain.monitor_data`).

It is the same for every method (a supervised backbone is judged exactly like an SSL one) and
is what `export: best` and the `best` checkpoint select on. A method with a classification
head (the supervised baseline) also gets its head's validation accuracy, from the same features.

Multi-label data (ChestMNIST, multi-label CSVs) has no top-1: there the monitor scores each
label by its neighbours' weighted votes and reports the mean per-label ROC AUC (MedMNIST's
AUC, as the k-NN stage does), under its own name `knn_auc` (key `monitor/knn_auc`).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from ssl_pipeline.evals.knn import knn_classify, knn_top1
from ssl_pipeline.evals.metrics import multi_label_metrics
from ssl_pipeline.features import extract_features

VAL_ACCURACY_KEY = "monitor/val_accuracy"


class OnlineKNNMonitor(pl.Callback):
    def __init__(
        self,
        bank_loader: torch.utils.data.DataLoader,
        val_loader: torch.utils.data.DataLoader,
        num_classes: int,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        score_head: bool = True,
        multi_label: bool = False,
        search: str = "auto",
    ):
        self.metric = "knn_auc" if multi_label else "knn_top1"
        self.key = f"monitor/{self.metric}"  # what is logged, and what `best` selects on
        self.bank_loader = bank_loader
        self.val_loader = val_loader
        self.num_classes = num_classes
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.search = search  # how the exact k-NN search runs (eval.knn.search)
        # a classifier head is scored on the monitor's val split only when that split has the
        # head's classes (not with pretrain.monitor_data)
        self.score_head = score_head
        # epoch (1-based) -> the metric, only where measured (None: no label had both classes)
        self.by_epoch: dict[int, float | None] = {}
        self.val_accuracy_by_epoch: dict[int, float] = {}  # the same, for a classifier's head

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        backbone, device = pl_module.backbone, pl_module.device
        bank, bank_labels = extract_features(backbone, self.bank_loader, device)
        val, val_labels = extract_features(backbone, self.val_loader, device)
        value = self.score(bank, bank_labels, val, val_labels)
        # BatchNorm running statistics can differ slightly between DDP processes (each updates
        # them on its own shard), so rank 0's value is the one every process uses: checkpoint
        # selection then agrees everywhere (the sync below is a mean of equal numbers). NaN
        # (no AUC) is logged as such: Lightning's checkpointing never selects it.
        value = float(trainer.strategy.broadcast(value, src=0))
        pl_module.log(self.key, value, on_epoch=True, sync_dist=True)
        self.by_epoch[epoch] = None if math.isnan(value) else value
        if self.score_head and getattr(pl_module, "needs_labels", False) and hasattr(pl_module, "head"):
            with torch.no_grad():
                head = pl_module.head
                logits = head(torch.as_tensor(val, device=device, dtype=head.weight.dtype))
            correct = (logits.argmax(1).cpu() == torch.as_tensor(val_labels)).float().mean()
            accuracy = float(trainer.strategy.broadcast(float(correct), src=0))
            pl_module.log(VAL_ACCURACY_KEY, accuracy, on_epoch=True, sync_dist=True)
            self.val_accuracy_by_epoch[epoch] = accuracy

    def score(self, bank, bank_labels, val, val_labels) -> float:
        """The monitored value from the two splits' features: k-NN top-1, or for multi-label
        data the mean per-label AUC of the k-NN label scores (NaN when no val label has both
        classes, so none has an AUC)."""
        if self.metric == "knn_top1":
            return knn_top1(bank, bank_labels, val, val_labels, self.num_classes, self.k,
                            self.temperature, self.search)
        scores = knn_classify(bank, bank_labels, val, self.num_classes, (self.k,),
                              self.temperature, search=self.search)[self.k]
        auc = multi_label_metrics(scores, val_labels, kind="probabilities")["auc"]
        return float("nan") if auc is None else auc
