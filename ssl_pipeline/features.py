"""Embeddings of a dataset split: backbone in eval mode, no augmentation, no gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """`(features (N, D) float32, labels (N,))` in loader order; restores the training mode."""
    was_training = backbone.training
    backbone.eval()  # BatchNorm uses its running statistics: features do not depend on the batch
    features, labels = [], []
    try:
        for images, targets in loader:
            features.append(backbone(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        backbone.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()
