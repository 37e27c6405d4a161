"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The Debian package's Fashion-MNIST folder.

    Skips when the package is not installed, except in CI (CI=true), which must have it: there a
    missing package fails instead of silently skipping the tests on real data.
    """
    from ssl_pipeline.data.fashion_mnist import DEBIAN_DIR, find_files

    if find_files(DEBIAN_DIR) is None:
        message = (
            f"Fashion-MNIST IDX files not found in {DEBIAN_DIR}; "
            "install the Debian package: apt-get install dataset-fashion-mnist"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DEBIAN_DIR
