"""The fixtures every test module shares (helpers behind them: ``tests/fakes.py``).

Raw datasets in their on-disk formats, the params tree in a scratch root, one torch thread for every test, and
two pristine workspaces built once per session (block side: supernet/score; student side: retrain/report) that a
test copies before it writes (``copy_root``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features import FeatureCache
from tests.fakes import REPO, make_block_root, make_student_root, write_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # stage processes too (runtime.cpu_threads): one per test worker


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the Fashion-MNIST format), gzipped like Debian's package."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(tmp_path: Path) -> Path:
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


def make_repo_copy(tmp_path: Path) -> Path:
    """The repository's params.yaml and configs in a scratch root (stages write under it)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "configs", root / "configs")
    return root


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_dir(tmp_path)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return make_repo_copy(tmp_path)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on this shared 2-core machine two threads spin against other jobs (5-25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> FeatureCache:
    """The stand-in teacher's feature cache: 512 train and 64 val samples (read-only: tests do not write it)."""
    return write_cache(tmp_path_factory.mktemp("cache") / "features", n_train=512, n_val=64)


@pytest.fixture(scope="session")
def block_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine workspace for the supernet and score stages; copy it (``copy_root``) before writing."""
    return make_block_root(tmp_path_factory.mktemp("block") / "root", n_train=512, n_val=64)


@pytest.fixture(scope="session")
def student_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine workspace for the retrain and report stages; copy it (``copy_root``) before writing."""
    return make_student_root(tmp_path_factory.mktemp("student") / "root")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end files first: with one file per xdist worker (`--dist loadfile`) the longest file then
    starts at once instead of after a worker's share of short ones, and bounds the suite's time."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
