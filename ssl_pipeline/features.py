"""Embeddings of a dataset split, extracted once and cached on disk (DINO's dump-and-load idea).

The backbone runs in eval mode (BatchNorm on its running statistics), with no augmentation and
no gradients. The cache key hashes everything the features depend on: the backbone weights,
the eval transform, the split's sample indices and the package version; a change to any of
them is a new key, a re-run with the same ones reads the file.

Under DDP (a process group of several processes, e.g. after Lightning's DDP pretraining),
process r extracts the samples r, r + W, r + 2W, ... of the split (W processes; no padding,
unlike DistributedSampler) and rank 0 gathers them back into dataset order: every sample
once, none missing, the same array a single process would have produced. Rank 0 decides
whether the cache holds the features and tells the others, so all take the same path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import ssl_pipeline
from ssl_pipeline.atomic import write_atomic
from ssl_pipeline.progress import progress_bar
from ssl_pipeline.provenance import code_fingerprint
from ssl_pipeline.recipe import EvalConfig


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()



def cache_key(weights_sha: str, transform: object, split_hash: str, precision: str = "fp32") -> str:
    """The cache entry of one split's features: the weights, the transform, the split's
    images, the precision they were computed in and the code that extracts them (an edited
    checkout extracts its own)."""
    text = f"{weights_sha}|{transform!r}|{split_hash}|{ssl_pipeline.__version__}|{code_fingerprint()}"
    if precision != "fp32":  # float32 entries keep the keys they had before the option
        text += f"|{precision}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


FEATURE_PRECISIONS = get_args(EvalConfig.model_fields["feature_precision"].annotation)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    progress: str | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """`(features (N, D) float32, labels (N,))` in loader order; restores the training mode.

    Batches stream through the backbone; `progress` names a progress bar shown on terminals.
    `precision` "bf16" runs the backbone under bf16 autocast (eval.feature_precision): faster
    where bf16 is native, features within bf16 rounding of the float32 ones.
    """
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
    was_training = backbone.training
    backbone.eval()  # BatchNorm uses its running statistics: features do not depend on the batch
    features, labels = [], []
    batches = progress_bar(loader, progress)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")
    try:
        with autocast:
            for images, targets in batches:
                features.append(backbone(images.to(device)).float().cpu())
                labels.append(torch.as_tensor(targets))
    finally:
        backbone.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def process_group() -> tuple[int, int]:
    """`(rank, world size)` of the initialized process group, `(0, 1)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cached_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    cache_dir: Path,
    key: str,
    device: torch.device | str = "cpu",
    progress: str | None = None,
    together: bool = False,
    precision: str = "fp32",
) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """Features from `cache_dir/<key>.npz` when present, else extracted and saved there.

    Returns `(features, labels, from_cache)`. The file is written to a temporary name and
    renamed, so an interrupted run never leaves a half-written cache entry. `together`: every
    process of the process group calls this at once and each extracts its shard; ranks other
    than 0 get `(None, None, ...)`. Otherwise this process works alone.
    """
    path = Path(cache_dir) / f"{key}.npz"
    rank, world = process_group() if together else (0, 1)
    cached = [path.exists()] if rank == 0 else [None]
    if world > 1:
        dist.broadcast_object_list(cached, src=0)
    if cached[0]:
        if rank != 0:
            return None, None, True
        with np.load(path) as saved:
            return saved["features"], saved["labels"], True
    if world > 1:
        features, labels = extract_sharded(backbone, loader, device, progress, precision)
        if rank != 0:
            return None, None, False
    else:
        features, labels = extract_features(backbone, loader, device, progress, precision)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(file, features=features, labels=labels)

    write_atomic(path, save)
    return features, labels, False


GATHER_ROWS = 16384  # rows of each process's shard gathered per call: bounds rank 0's buffers


def extract_sharded(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    progress: str | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`extract_features` over a process group: this process's strided shard of
    `loader.dataset`, gathered on rank 0 in dataset order (None elsewhere)."""
    rank, world = process_group()
    n = len(loader.dataset)
    mine = np.arange(rank, n, world)
    shard = torch.utils.data.DataLoader(
        torch.utils.data.Subset(loader.dataset, mine.tolist()), batch_size=loader.batch_size,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
    )
    if len(mine):
        x, y = extract_features(backbone, shard, device, progress if rank == 0 else None,
                                precision)
    else:  # fewer samples than processes
        x, y = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    comm = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dim = torch.tensor([x.shape[1]], device=comm)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    dim = int(dim.item())
    rows = -(-n // world)  # the longest shard: every process sends this many, padded
    x_pad = torch.zeros(rows, dim, dtype=torch.float32)
    if len(x):
        x_pad[: len(x)] = torch.from_numpy(x)
    y_pad = torch.zeros(rows, dtype=torch.int64)
    y_pad[: len(y)] = torch.from_numpy(np.asarray(y, np.int64))
    out_x = np.zeros((n, dim), np.float32) if rank == 0 else None
    out_y = np.zeros(n, np.int64) if rank == 0 else None
    for start in range(0, rows, GATHER_ROWS):
        stop = min(start + GATHER_ROWS, rows)
        for block, out in ((x_pad[start:stop], out_x), (y_pad[start:stop], out_y)):
            block = block.to(comm)
            received = [torch.empty_like(block) for _ in range(world)] if rank == 0 else None
            dist.gather(block, received, dst=0)
            if rank != 0:
                continue
            for r, part in enumerate(received):
                positions = np.arange(r, n, world)[start:stop]  # padding rows have none
                out[positions] = part[: len(positions)].cpu().numpy()
    return out_x, out_y
