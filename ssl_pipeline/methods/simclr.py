"""SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (https://arxiv.org/abs/2002.05709)."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from ssl_pipeline.methods.base import OptimSettings, PretrainMethod


class SimCLR(PretrainMethod):
    """Two views, a projection MLP and the NT-Xent loss.

    Defaults follow the paper: a 2-layer head (hidden 2048, output 128) and temperature 0.5
    (the paper's choice at batch 256-512; 0.1 with LARS at batch 4096, set it in the recipe).
    Negatives are gathered across processes under DDP, so the loss sees the global batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optim: OptimSettings,
        num_classes: int | None = None,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        temperature: float = 0.5,
        gather_distributed: bool = True,
    ):
        super().__init__(backbone, optim)
        self.projection_head = SimCLRProjectionHead(
            backbone.feature_dim, hidden_dim, output_dim, num_layers=num_layers
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))  # (B, output_dim)

    def training_loss(self, batch):
        (x0, x1), _ = batch  # two views, (B, C, H, W) each
        z0, z1 = self.forward(torch.cat([x0, x1])).chunk(2)  # (B, D) each
        return self.criterion(z0, z1), {}
