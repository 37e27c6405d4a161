"""The online monitor: k-NN top-1 on the validation split every N epochs during pretraining
(of the pretraining data, or of a separate labeled dataset: `pretrain.monitor_data`).

It is the same for every method (a supervised backbone is judged exactly like an SSL one) and
is what `export: best` and the `best` checkpoint select on. A method with a classification
head (the supervised baseline) also gets its head's validation accuracy, from the same features.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from ssl_pipeline.evals.knn import knn_top1
from ssl_pipeline.features import extract_features

MONITOR_KEY = "monitor/knn_top1"
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
    ):
        self.bank_loader = bank_loader
        self.val_loader = val_loader
        self.num_classes = num_classes
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        # a classifier head is scored on the monitor's val split only when that split has the
        # head's classes (not with pretrain.monitor_data)
        self.score_head = score_head
        self.by_epoch: dict[int, float] = {}  # epoch (1-based) -> top-1, only where measured
        self.val_accuracy_by_epoch: dict[int, float] = {}  # the same, for a classifier's head

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        backbone, device = pl_module.backbone, pl_module.device
        bank, bank_labels = extract_features(backbone, self.bank_loader, device)
        val, val_labels = extract_features(backbone, self.val_loader, device)
        top1 = knn_top1(bank, bank_labels, val, val_labels, self.num_classes, self.k, self.temperature)
        # BatchNorm running statistics can differ slightly between DDP processes (each updates
        # them on its own shard), so rank 0's value is the one every process uses: checkpoint
        # selection then agrees everywhere (the sync below is a mean of equal numbers).
        top1 = float(trainer.strategy.broadcast(top1, src=0))
        pl_module.log(MONITOR_KEY, top1, on_epoch=True, sync_dist=True)
        self.by_epoch[epoch] = top1
        if self.score_head and getattr(pl_module, "needs_labels", False) and hasattr(pl_module, "head"):
            with torch.no_grad():
                head = pl_module.head
                logits = head(torch.as_tensor(val, device=device, dtype=head.weight.dtype))
            correct = (logits.argmax(1).cpu() == torch.as_tensor(val_labels)).float().mean()
            accuracy = float(trainer.strategy.broadcast(float(correct), src=0))
            pl_module.log(VAL_ACCURACY_KEY, accuracy, on_epoch=True, sync_dist=True)
            self.val_accuracy_by_epoch[epoch] = accuracy
