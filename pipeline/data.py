"""Datasets, the seeded train/val/test split, and batched tensor loading.

Prepared splits are uint8 ``.npy`` arrays (N, C, H, W), read memory-mapped, so ImageNet-size data
never has to fit in RAM. Batches are gathered and augmented as whole tensors: for small models the
per-sample Python of a DataLoader + PIL transforms would dominate the step time. At image-folder scale the
gather is a page-in from disk: ``runtime.workers`` reader threads then gather the next batches while the step
runs (threads, not DataLoader processes: numpy's gathers release the GIL and a thread hands its batch over
without a copy through shared memory; benchmarks/results/loader.md). Normalising and augmenting stay in the
training loop, so the batches are the same with any number of readers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import random
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Augment, Data
from pipeline.errors import PipelineError
from pipeline.runtime import worker_pool

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
Item, Loaded = TypeVar("Item"), TypeVar("Loaded")
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


@dataclass
class _Source:
    """One split of a raw dataset: its labels up front, its images read on demand, in chunks."""

    labels: np.ndarray  # int64 (N,)
    images: np.ndarray | None = None  # uint8 (N, C, H, W), any H, W: datasets that fit in RAM as files do
    files: list[str] | None = None  # image files (image folders), decoded to RGB by PIL


def _fashion_mnist(cfg: Data) -> tuple[_Source, _Source, list[str]]:
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root)
    paths = [_find_idx(root, n) for n in _IDX_FILES]
    if not all(paths):
        if not cfg.download:
            missing = [n for n, p in zip(_IDX_FILES, paths, strict=True) if p is None]
            raise _missing(cfg, f"Fashion-MNIST idx files {missing} not found")
        sets = [FashionMNIST(str(root), train=t, download=True) for t in (True, False)]
        pool, test = (_Source(s.targets.numpy().astype(np.int64), s.data.numpy()[:, None]) for s in sets)
        return pool, test, list(FashionMNIST.classes)
    try:
        arrays = [_read_idx(p) for p in paths]
    except (OSError, ValueError, IndexError) as err:
        raise DataError(f"cannot read the Fashion-MNIST idx files under {root}: {err}; reinstall them") from None
    pool = _Source(arrays[1].astype(np.int64), arrays[0][:, None])
    test = _Source(arrays[3].astype(np.int64), arrays[2][:, None])
    return pool, test, list(FashionMNIST.classes)


def _cifar(cfg: Data) -> tuple[_Source, _Source, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    try:
        sets = [cls(cfg.root, train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as err:
        raise _missing(cfg, f"{cfg.name} ({err})") from None
    pool, test = (_Source(np.asarray(s.targets, np.int64), s.data.transpose(0, 3, 1, 2)) for s in sets)
    return pool, test, list(sets[0].classes)


def _image_folder(cfg: Data) -> tuple[_Source, _Source, list[str]]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``): torchvision's listing, nothing decoded yet."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(cfg.root)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing(cfg, "ImageFolder layout root/train/<class>/ and root/test/<class>/ (or val/) not found")
    try:
        classes, class_to_idx = find_classes(str(root / "train"))
        if (test_classes := find_classes(str(test_dir))[0]) != classes:
            raise DataError(f"{test_dir} has the classes {test_classes}, {root / 'train'} has {classes}: "
                            "give both the same class folders")
        samples = [make_dataset(str(d), class_to_idx, IMG_EXTENSIONS) for d in (root / "train", test_dir)]
    except FileNotFoundError as err:
        raise DataError(f"{err} (data.root={cfg.root!r})") from None
    pool, test = (_Source(np.array([t for _, t in s], np.int64), files=[f for f, _ in s]) for s in samples)
    return pool, test, classes


_READERS = {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _image_folder}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.from_numpy(np.array(images)).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------- arrays on disk, a chunk at a time

_CHUNK_BYTES = 16 << 20  # images held in RAM at once per process (decoding, copying, statistics)


@dataclass
class _RowFile:
    """A uint8 (N, C, H, W) ``.npy`` read and written a chunk of rows at a time by positioned file I/O.

    Not a whole-file memmap: mapping it would take address space for the whole dataset, which a job under an
    address-space limit (``ulimit -v``, RLIMIT_AS) does not have. The file is an ordinary ``.npy``.
    """

    path: Path
    shape: tuple[int, ...]
    offset: int  # header bytes

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...]) -> _RowFile:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            offset = f.tell()
            f.truncate(offset + math.prod(shape))  # sparse until written
        return cls(path, shape, offset)

    @classmethod
    def open(cls, path: Path) -> _RowFile:
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            shape = np.lib.format.read_array_header_1_0(f)[0]
            return cls(path, shape, f.tell())

    @property
    def chunk_rows(self) -> int:
        return max(1, _CHUNK_BYTES // math.prod(self.shape[1:]))

    def write(self, start: int, rows: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.offset + start * math.prod(self.shape[1:]))
            f.write(np.ascontiguousarray(rows, np.uint8).data)

    def read(self, start: int, stop: int) -> np.ndarray:
        row = math.prod(self.shape[1:])
        stop = min(stop, self.shape[0])
        return np.fromfile(self.path, np.uint8, count=(stop - start) * row,
                           offset=self.offset + start * row).reshape(stop - start, *self.shape[1:])


def _decode_files(out: _RowFile, start: int, files: list[str], size: int) -> list[tuple[int, str]]:
    """Decode image files to RGB size x size into rows ``start``.. of ``out`` (one worker's task); returns the
    unreadable ones as (row, reason), their rows left zero."""
    from PIL import Image

    chunk, bad = np.zeros((len(files), 3, size, size), np.uint8), []
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            chunk[i] = np.asarray(rgb).transpose(2, 0, 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
            bad.append((start + i, f"{type(err).__name__}: {' '.join(str(err).split())}"))
    out.write(start, chunk)
    return bad


def _decode(source: _Source, rows: np.ndarray, path: Path, size: int,
            workers: int) -> tuple[_RowFile, list[tuple[int, str]]]:
    """The ``rows`` of ``source`` at size x size into a new array file; returns it and the unreadable rows."""
    chans = 3 if source.files is not None else source.images.shape[1]
    out = _RowFile.create(path, (len(rows), chans, size, size))
    starts = range(0, len(rows), out.chunk_rows)
    if source.files is None:
        for s in starts:
            out.write(s, _resize(source.images[rows[s:s + out.chunk_rows]], size))
        return out, []
    tasks = [(out, s, [source.files[i] for i in rows[s:s + out.chunk_rows]], size) for s in starts]
    log.info("decoding %d images %s", len(rows), f"in {workers} worker processes" if workers else "in process")
    if not workers:
        return out, [b for task in tasks for b in _decode_files(*task)]
    with worker_pool(workers) as pool:  # stops on Ctrl-C instead of waiting for a killed worker
        return out, [b for bad in pool.starmap(_decode_files, tasks) for b in bad]


def _move_rows(src: _RowFile, targets: dict[Path, np.ndarray]) -> None:
    """Copy the sorted rows ``targets[path]`` of ``src`` into a new array file per path, one window of ``src`` at a
    time, then delete ``src`` (renamed instead when one target takes every row)."""
    if len(targets) == 1 and len(idx := next(iter(targets.values()))) == src.shape[0]:
        src.path.rename(next(iter(targets)))
        return
    outs = {p: (_RowFile.create(p, (len(idx), *src.shape[1:])), idx) for p, idx in targets.items()}
    done = dict.fromkeys(targets, 0)
    for start in range(0, src.shape[0], src.chunk_rows):
        window = src.read(start, start + src.chunk_rows)
        for p, (out, idx) in outs.items():
            lo, hi = np.searchsorted(idx, [start, start + src.chunk_rows])
            out.write(done[p], window[idx[lo:hi] - start])
            done[p] += hi - lo
    src.path.unlink()


def _channel_stats(images: _RowFile) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1], from exact integer sums (a chunk at a time, no float copy of the split)."""
    chans = images.shape[1]
    s1, s2 = [0] * chans, [0] * chans
    for start in range(0, images.shape[0], images.chunk_rows):
        chunk = images.read(start, start + images.chunk_rows)
        for c in range(chans):
            s1[c] += int(chunk[:, c].sum(dtype=np.uint64))
            s2[c] += int(np.square(chunk[:, c], dtype=np.uint16).sum(dtype=np.uint64))  # 255^2 fits in uint16
    n = images.shape[0] * images.shape[2] * images.shape[3]
    return [a / n / 255 for a in s1], [math.sqrt((n * b - a * a) / (n * n)) / 255 for a, b in zip(s1, s2, strict=True)]


# ---------------------------------------------------------------- prepare stage


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of the train pool: the same seed gives the same split on every machine."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples (0 = all), every class in proportion to its size (largest remainders) and,
    when ``n`` is at least the number of classes, every class at least once; seeded.

    Datasets listed class by class (ImageFolder) would keep only their first classes with a plain ``[:n]``.
    """
    if not n or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    if n >= len(classes):
        for k in np.flatnonzero(take == 0):
            take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1  # from the most over-served class
            take[k] = 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), t, replace=False)
                                   for c, t in zip(classes, take, strict=True)]))


def _check_unreadable(cfg: Data, skipped: list[dict]) -> None:
    if not skipped:
        return
    first = f"the first {skipped[0]['file']} ({skipped[0]['error']})"
    if cfg.bad_images == "fail":
        s = "s" if len(skipped) > 1 else ""
        raise DataError(f"{len(skipped)} unreadable image{s} under data.root={cfg.root!r}, {first}: fix or delete "
                        "them, or set data.bad_images=skip to leave them out")
    log.warning("skipped %d unreadable images (listed in meta.json), %s", len(skipped), first)


def _write_splits(cfg: Data, seed: int, workers: int, sources: dict[str, _Source], classes: list[str],
                  out: Path) -> dict:
    """Decode each source's limited rows into ``out``, drop unreadable ones, split the pool; returns meta."""
    rows, decoded, kept, skipped = {}, {}, {}, []
    for name, limit in (("pool", cfg.limit), ("test", cfg.test_limit)):
        source = sources[name]
        rows[name] = stratified_subset(source.labels, limit, seed)  # indices into the source
        decoded[name], bad = _decode(source, rows[name], out / f"{name}.npy", cfg.image_size, workers)
        kept[name] = np.setdiff1d(np.arange(len(rows[name])), [r for r, _ in bad])  # readable rows of decoded
        skipped += [{"file": os.path.relpath(source.files[rows[name][r]], cfg.root), "error": e} for r, e in bad]
    _check_unreadable(cfg, skipped)
    if len(kept["pool"]) < 2:
        raise DataError(f"data.root={cfg.root!r} has {len(kept['pool'])} readable train images: need at least 2")
    train, val = (kept["pool"][i] for i in split_indices(len(kept["pool"]), cfg.val_fraction, seed))
    positions = {"train": ("pool", train), "val": ("pool", val), "test": ("test", kept["test"])}
    for name in ("pool", "test"):
        _move_rows(decoded[name], {out / f"{s}_images.npy": p for s, (src, p) in positions.items() if src == name})
    for s, (src, p) in positions.items():
        np.save(out / f"{s}_labels.npy", sources[src].labels[rows[src][p]])
    train_images = _RowFile.open(out / "train_images.npy")
    mean, std = _channel_stats(train_images)
    (out / "splits.json").write_text(json.dumps({"seed": seed, "val_fraction": cfg.val_fraction,
                                                 "train": rows["pool"][train].tolist(),
                                                 "val": rows["pool"][val].tolist()}))
    return {"name": cfg.name, "num_classes": len(classes), "in_chans": int(train_images.shape[1]),
            "image_size": cfg.image_size, "mean": mean, "std": std, "classes": classes,
            "sizes": {s: int(len(p)) for s, (_, p) in positions.items()}, "skipped": skipped}


def prepare(cfg: Data, seed: int, out_dir: Path, workers: int = 0) -> dict:
    """Read the raw dataset, draw the limited subsets, split, write uint8 arrays + meta.json + splits.json.

    Images reach disk a chunk at a time (image folders decoded by ``workers`` processes, 0 = in this one), so RAM
    stays bounded whatever the dataset's size. Everything is written next to ``out_dir`` first: a failure leaves
    an existing ``out_dir`` as it was. Returns meta.
    """
    pool, test, classes = _READERS[cfg.name](cfg)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_splits(cfg, seed, workers, {"pool": pool, "test": test}, classes, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def prefetch(load: Callable[[Item], Loaded], items: Iterable[Item], workers: int = 1) -> Iterator[Loaded]:
    """``load(item)`` of every item, in order, run up to ``workers`` items ahead on as many background threads.

    numpy's gathers (page-ins of memory-mapped rows included) and casts and torch's copies release the GIL, so
    the next batches are read while the caller's step runs; the values and their order are exactly those of
    calling ``load`` in the loop, and an item's exception is raised where that item would have been yielded.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        pending: deque[Future[Loaded]] = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_batches(split: Split, index: Iterable[np.ndarray], device: torch.device,
                 workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The uint8 images and labels of each row-index array, in order, on the host: gathered in the loop, or by
    ``workers`` reader threads ahead of it (pinned for CUDA, so the copy to the GPU is asynchronous)."""
    pin = workers > 0 and device.type == "cuda"

    def read(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.asarray(split.images[idx]))
        return images.pin_memory() if pin else images, torch.from_numpy(split.labels[idx])

    return prefetch(read, index, workers) if workers else map(read, index)


def batches(split: Split, meta: dict, batch_size: int, device: torch.device, *, shuffle: bool = False,
            seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1, augment_cfg: Augment | None = None,
            channels_last: bool = False, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and optionally augmented) batches; under DDP each rank takes its own shard. ``workers`` reader
    threads gather the images ahead of the caller (0 = in the loop); the batches do not depend on it."""
    n = len(split.labels)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).numpy() if shuffle else np.arange(n)
    order = order[rank::world]
    index = (order[s:s + batch_size] if shuffle else np.sort(order[s:s + batch_size])
             for s in range(0, len(order), batch_size))
    for images, labels in read_batches(split, index, device, workers):
        x = normalize(images.to(device, non_blocking=True), meta)
        if augment_cfg is not None:
            x = augment(x, augment_cfg, g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels.to(device, non_blocking=True)


def prepared_identity(prepared_dir: Path | str) -> str:
    """What a model trained on the prepared data depends on: meta (sizes, classes, statistics), the split indices
    and every label array. A changed seed, limit, fraction or dataset changes it; reading it costs milliseconds."""
    base, digest = Path(prepared_dir), hashlib.sha256()
    for name in ("meta.json", "splits.json", *(f"{s}_labels.npy" for s in SPLITS)):
        try:
            digest.update(name.encode() + (base / name).read_bytes())
        except OSError as err:
            raise DataError(f"{base / name} is unreadable ({type(err).__name__}): run `dvc repro prepare`") from None
    return digest.hexdigest()[:16]
