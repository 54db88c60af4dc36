"""Shared fixtures: tiny synthetic datasets in the real on-disk formats, and a tiny params tree."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the Fashion-MNIST format), gzipped like Debian's package."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """Fashion-MNIST-shaped random data: 200 train and 50 test images of 28x28, 10 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 256, (n, 28, 28)) // 4 + labels[:, None, None] * 20  # learnable by class
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The repository's params.yaml and configs in a scratch root (stages write under it)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "configs", root / "configs")
    return root
