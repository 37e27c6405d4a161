"""SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021
(https://arxiv.org/abs/2011.10566)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.utils.debug import std_of_l2_normalized
from torch import nn

from ssl_pipeline.methods.base import OptimSettings, PretrainMethod


class SimSiam(PretrainMethod):
    """Projector, predictor, stop-gradient and the symmetric negative cosine loss.

    Paper defaults: a 3-layer projector of width 2048, a predictor with a 512-wide bottleneck,
    and the predictor trained at a fixed learning rate (no cosine decay), which the paper found
    to work better. SimSiam can collapse while its loss still falls, so the standard deviation
    of the L2-normalized projections is logged every epoch as `train/collapse_std`: about
    1/sqrt(projection_dim) when healthy, about 0 when collapsed; an epoch whose value falls
    below `collapse_warn_below` x 1/sqrt(projection_dim) is warned about in the log, the results
    and the report.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optim: OptimSettings,
        num_classes: int | None = None,
        projection_dim: int = 2048,
        prediction_hidden_dim: int = 512,
        fixed_predictor_lr: bool = True,
        collapse_warn_below: float = 0.1,
    ):
        super().__init__(backbone, optim)
        self.projection_head = SimSiamProjectionHead(
            backbone.feature_dim, projection_dim, projection_dim
        )
        self.prediction_head = SimSiamPredictionHead(
            projection_dim, prediction_hidden_dim, projection_dim
        )
        self.criterion = NegativeCosineSimilarity()
        self.fixed_predictor_lr = fixed_predictor_lr
        self.projection_dim = projection_dim
        self.collapse_warn_below = collapse_warn_below
        self.collapsed_epochs: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x))  # (B, projection_dim)
        p = self.prediction_head(z)
        return z.detach(), p  # stop-gradient on the target branch

    def training_loss(self, batch):
        (x0, x1), _ = batch
        z, p = self.forward(torch.cat([x0, x1]))
        z0, z1 = z.chunk(2)
        p0, p1 = p.chunk(2)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return loss, {"collapse_std": std_of_l2_normalized(z0)}

    def on_train_epoch_end(self) -> None:
        std = self.trainer.callback_metrics.get("train/collapse_std")
        if std is None:
            return
        std, healthy = float(std), 1 / math.sqrt(self.projection_dim)
        if std >= self.collapse_warn_below * healthy:
            return
        epoch = self.trainer.current_epoch + 1
        self.collapsed_epochs[epoch] = std
        first = min(self.collapsed_epochs)
        message = (
            f"SimSiam may have collapsed: collapse_std {std:.3g} at epoch {epoch}, below "
            f"{self.collapse_warn_below} x 1/sqrt({self.projection_dim}) = "
            f"{self.collapse_warn_below * healthy:.3g} (healthy: about {healthy:.3g}); "
            f"{len(self.collapsed_epochs)} epoch(s) so far, first at epoch {first}. Check the "
            "k-NN monitor; try a lower pretrain.lr, more weight decay or the paper's predictor"
        )
        if self.trainer.is_global_zero:
            warnings.warn(message, stacklevel=1)
        self.warnings[:] = [message]  # one line in the report, however many epochs

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.fixed_predictor_lr:
            return super().param_groups()
        predictor = set(map(id, self.prediction_head.parameters()))
        groups = []
        for group in super().param_groups():
            rest = [p for p in group["params"] if id(p) not in predictor]
            mine = [p for p in group["params"] if id(p) in predictor]
            groups.append({**group, "params": rest})
            groups.append({**group, "name": group["name"] + "_predictor", "params": mine, "fixed_lr": True})
        return groups
