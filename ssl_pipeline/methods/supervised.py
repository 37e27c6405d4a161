"""The supervised baseline: the same backbone and training engine, trained with labels."""

from __future__ import annotations

import torch
from torch import nn

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.methods.base import OptimSettings, PretrainMethod


class Supervised(PretrainMethod):
    """Cross-entropy on a linear head over the backbone's features: the reference every SSL
    result is compared with. One view per image, with the standard crop-and-flip augmentation.
    """

    needs_labels = True
    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        optim: OptimSettings,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(backbone, optim)
        if not num_classes:
            raise SSLPipelineError(
                "method supervised needs labeled data; this dataset has no labels. "
                "Use method.name=simclr or simsiam, or a labeled dataset"
            )
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, num_classes)

    def training_loss(self, batch):
        x, y = batch
        logits = self.forward(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        return self.criterion(logits, y), {"accuracy": accuracy}
