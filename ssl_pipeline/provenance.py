"""What produced a result: code version, package versions, hardware."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from functools import cache, lru_cache
from pathlib import Path

import torch

PACKAGES = ("ssl_pipeline", "torch", "torchvision", "lightly", "timm", "pytorch-lightning",
            "faiss-cpu", "scikit-learn", "numpy", "wandb")


@cache
def code_fingerprint(root: Path = Path(__file__).parent) -> str:
    """A hash of the package's own source files under `root`: cached features and baselines
    that other code computed (an earlier commit, a patched checkout) are not reused, even at
    the same version."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """The commit of the ssl_pipeline checkout, when it is one (None for an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, object]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "gpus": gpus}


@lru_cache(maxsize=1)
def provenance() -> dict[str, object]:
    return {"git_commit": git_commit(), "packages": package_versions(), "hardware": hardware()}
