"""`embed`: embeddings of a user's own folder of images, with their paths, for their own tools."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssl_pipeline.backbones import load_backbone
from ssl_pipeline.compute import channels_last
from ssl_pipeline.data import TransformedDataset
from ssl_pipeline.data.base import convert_channels
from ssl_pipeline.data.image_folder import ImageFiles, list_images
from ssl_pipeline.data.transforms import eval_transform
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.features import extract_features


def embed_folder(backbone_path: str | Path, folder: str | Path, out: str | Path,
                 name: str | None = None, batch_size: int = 256, quiet: bool = False) -> Path:
    """Write `out` (.npz): `features` (N, D) float32 and `paths` (N,), relative to `folder`."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise SSLPipelineError(f"--data {folder}: not a folder; pass a folder of images")
    paths = list_images(folder)
    if not paths:
        raise SSLPipelineError(f"--data {folder}: no images found (looked for jpg, png, tif, ...)")
    backbone = channels_last(load_backbone(backbone_path, name=name))  # faster, same values
    p = backbone.preprocessing
    transform = _with_channels(eval_transform(p.input_size, p.mean, p.std), p.in_chans)
    dataset = TransformedDataset(ImageFiles(paths, np.zeros(len(paths))), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    features, _ = extract_features(backbone, loader, progress=None if quiet else "embed")
    out.parent.mkdir(parents=True, exist_ok=True)
    relative = np.array([str(path.relative_to(folder)) for path in paths])
    np.savez(out, features=features, paths=relative)
    return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


def _with_channels(transform, channels: int):
    def apply(image):
        return transform(convert_channels(image, channels))

    return apply
