"""Datasets, the seeded train/val/test split, and batched tensor loading.

Prepared splits are uint8 ``.npy`` arrays (N, C, H, W), read memory-mapped, so ImageNet-size data
never has to fit in RAM. Batches are gathered and augmented as whole tensors: for small models the
per-sample Python of a DataLoader + PIL transforms would dominate the step time.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Augment, Data
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(PipelineError):
    """Data that is missing or unusable; the message says how to get it."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), usually a memmap
    labels: np.ndarray  # int64 (N,)


# ---------------------------------------------------------------- raw datasets -> arrays


def _missing(cfg: Data, what: str) -> DataError:
    return DataError(
        f"{what} under data.root={cfg.root!r}. Get the data one of three ways: "
        "(1) `apt-get install dataset-fashion-mnist` (Debian; puts the idx files in /usr/share/datasets/fashion-mnist), "
        "(2) point data.root at a folder holding the dataset files, "
        "(3) set data.download=true (torchvision download, needs internet)")


def _read_idx(path: Path) -> np.ndarray:
    """IDX files as Debian ships them (.gz) or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def _find_idx(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz", root / "FashionMNIST" / "raw" / name):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(cfg: Data) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root)
    paths = [_find_idx(root, n) for n in _IDX_FILES]
    if not all(paths):
        if not cfg.download:
            missing = [n for n, p in zip(_IDX_FILES, paths, strict=True) if p is None]
            raise _missing(cfg, f"Fashion-MNIST idx files {missing} not found")
        sets = [FashionMNIST(str(root), train=t, download=True) for t in (True, False)]
        pool, test = (Split(s.data.numpy()[:, None], s.targets.numpy().astype(np.int64)) for s in sets)
        return pool, test, list(FashionMNIST.classes)
    try:
        arrays = [_read_idx(p) for p in paths]
    except (OSError, ValueError, IndexError) as err:
        raise DataError(f"cannot read the Fashion-MNIST idx files under {root}: {err}; reinstall them") from None
    pool = Split(arrays[0][:, None], arrays[1].astype(np.int64))
    test = Split(arrays[2][:, None], arrays[3].astype(np.int64))
    return pool, test, list(FashionMNIST.classes)


def _cifar(cfg: Data) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    try:
        sets = [cls(cfg.root, train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as err:
        raise _missing(cfg, f"{cfg.name} ({err})") from None
    pool, test = (Split(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2)), np.asarray(s.targets, np.int64))
                  for s in sets)
    return pool, test, list(sets[0].classes)


def _image_folder(cfg: Data) -> tuple[Split, Split, list[str]]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``), resized to image_size."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing(cfg, "ImageFolder layout root/train/<class>/ and root/test/<class>/ (or val/) not found")
    tf = transforms.Compose([transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()])
    sets = [ImageFolder(str(d), transform=tf) for d in (root / "train", test_dir)]
    out = []
    for ds in sets:
        images = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        out.append(Split(images, np.asarray(ds.targets, np.int64)))
    return out[0], out[1], list(sets[0].classes)


_READERS = {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _image_folder}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.from_numpy(np.array(images)).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------- prepare stage


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of the train pool: the same seed gives the same split on every machine."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prepare(cfg: Data, seed: int, out_dir: Path) -> dict:
    """Read the raw dataset, split it, write uint8 arrays + meta.json + splits.json; returns meta."""
    pool, test, classes = _READERS[cfg.name](cfg)
    if cfg.limit:
        pool = Split(pool.images[: cfg.limit], pool.labels[: cfg.limit])
    if cfg.test_limit:
        test = Split(test.images[: cfg.test_limit], test.labels[: cfg.test_limit])
    train_idx, val_idx = split_indices(len(pool.labels), cfg.val_fraction, seed)
    splits = {
        "train": Split(_resize(pool.images[train_idx], cfg.image_size), pool.labels[train_idx]),
        "val": Split(_resize(pool.images[val_idx], cfg.image_size), pool.labels[val_idx]),
        "test": Split(_resize(test.images, cfg.image_size), test.labels),
    }
    train = splits["train"].images
    mean = [float(train[:, c].mean() / 255) for c in range(train.shape[1])]
    std = [float(train[:, c].std() / 255) for c in range(train.shape[1])]
    meta = {"name": cfg.name, "num_classes": len(classes), "in_chans": int(train.shape[1]),
            "image_size": cfg.image_size, "mean": mean, "std": std, "classes": classes,
            "sizes": {k: int(len(v.labels)) for k, v in splits.items()}}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, split in splits.items():
        np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(split.images))
        np.save(tmp / f"{name}_labels.npy", split.labels)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "splits.json").write_text(json.dumps(
        {"seed": seed, "val_fraction": cfg.val_fraction, "train": train_idx.tolist(), "val": val_idx.tolist()}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return meta


# ---------------------------------------------------------------- reading prepared data


def load_meta(prepared_dir: Path | str) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: run `dvc repro prepare`")
    return json.loads(path.read_text())


def load_split(prepared_dir: Path | str, split: str) -> Split:
    base = Path(prepared_dir)
    try:
        images = np.load(base / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(base / f"{split}_labels.npy")
    except (OSError, ValueError) as err:
        raise DataError(f"prepared split '{split}' in {base} is missing or corrupt ({err}): "
                        "run `dvc repro prepare`") from None
    if images.ndim != 4 or len(images) != len(labels):
        raise DataError(f"prepared split '{split}' in {base} is inconsistent: run `dvc repro prepare`")
    return Split(images, labels)


def normalize(x: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 images -> float32 standardised with the train split's mean/std."""
    mean = torch.tensor(meta["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, cfg: Augment, generator: torch.Generator) -> torch.Tensor:
    """Batched random translation (zero padding), horizontal flip and timm's RandomErasing."""
    n, _, h, w = x.shape
    if cfg.pad_crop:
        p = cfg.pad_crop
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(x.shape[1], device=x.device)
                   .view(1, -1, 1, 1), rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if cfg.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if cfg.erase_prob > 0:
        from timm.data.random_erasing import RandomErasing

        # timm draws from the global torch and Python RNGs: seed both from ours so runs repeat.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)
        x = RandomErasing(probability=cfg.erase_prob, mode="pixel", device=str(x.device))(x.clone())  # erases in place
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
    return x


def batches(split: Split, meta: dict, batch_size: int, device: torch.device, *, shuffle: bool = False,
            seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1, augment_cfg: Augment | None = None,
            channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and optionally augmented) batches; under DDP each rank takes its own shard."""
    n = len(split.labels)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).numpy() if shuffle else np.arange(n)
    order = order[rank::world]
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start:start + batch_size]) if not shuffle else order[start:start + batch_size]
        x = normalize(torch.from_numpy(np.asarray(split.images[idx])).to(device, non_blocking=True), meta)
        if augment_cfg is not None:
            x = augment(x, augment_cfg, g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, torch.from_numpy(split.labels[idx]).to(device, non_blocking=True)
