"""Teacher feature cache: the teacher runs once, every supernet and scoring step reads from disk.

DNA (Li et al., CVPR 2020, Sec. 3.2) trains block b of the student to map the teacher's feature map at
boundary b-1 to the one at boundary b, so the teacher's outputs are fixed targets. Recomputing them at
every step dominates supernet cost; here they are computed once and stored as one ``.npy`` file per split
and key (``input`` = the normalised images fed to block b0, ``b0``..``b{N-1}`` = block outputs), written
batch by batch with an fsync per chunk (so a killed run resumes at the last chunk) and read back
memory-mapped, so datasets larger than RAM work and random batches cost a page-cache lookup.

``manifest.json`` records shapes, dtypes, sample counts, the sha256 of the teacher weights and of every
file. SHA-256 because it runs at ~1.5 GB/s here (SHA-NI), is what ``sha256sum`` checks by hand, and a
full check of the default cache takes about a second; crc32 is twice as fast but only 32 bits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.checkpoint import ArtifactError, atomic, sha256_file
from pipeline.config import ConfigError
from pipeline.data import Split
from pipeline.runtime import progress as progress_bar
from pipeline.teacher import WEIGHTS, weights_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REBUILD = "dvc repro cache_features"
FORMAT = 1
SPLITS = ("train", "val")
INPUT = "input"
LABELS = "labels"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_PROGRESS = "progress.json"

ExtractFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]
AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Item, Loaded = TypeVar("Item"), TypeVar("Loaded")


def _sha256_many(paths: Sequence[Path]) -> list[str]:
    """hashlib releases the GIL on large buffers, so threads hash several files at once."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256_file, paths))


def _fail(path: Path | str, problem: str) -> ArtifactError:
    return ArtifactError(f"{path}: {problem}; rebuild the feature cache with `{REBUILD}`")


# ---------------------------------------------------------------------------------------------- writing


def write_features(
    out_dir: Path | str,
    sources: Mapping[str, Split],
    extract: ExtractFn,
    block_names: Sequence[str],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    augment: AugmentFn | None = None,
    views: int = 1,
    dtype: str = "float16",
    batch_size: int = 512,
    chunk_size: int = 4096,
    seed: int = 0,
    teacher_sha256: str = "",
    info: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> dict[str, float]:
    """Run ``extract`` (the teacher, once per batch) over every split and store inputs and block outputs.

    ``extract(x)`` returns the feature map at every block boundary for a normalised batch ``x``, in the
    order of ``block_names``. The train split gets ``views`` copies, view 0 plain and view v > 0 passed
    through ``augment`` with a generator seeded by (seed, view, batch start), so a resumed run writes the
    same bytes. Work goes to ``<out_dir>.partial`` and replaces ``out_dir`` only when complete.
    Returns sizes, wall time and throughput for tracking.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if views > 1 and augment is None:
        raise ValueError("views > 1 needs an augment function")
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    started = time.perf_counter()
    keys = [INPUT, *block_names]
    shapes = _probe_shapes(sources, extract, normalize, keys, device)
    samples = {s: len(src.images) * (views if s == "train" else 1) for s, src in sources.items()}
    fingerprint = {"format": FORMAT, "teacher_sha256": teacher_sha256, "dtype": dtype, "views": views, "seed": seed,
                   "batch_size": batch_size, "samples": samples, "shapes": {k: list(v) for k, v in shapes.items()}}
    done = _resume_state(work, fingerprint)
    writer = _SplitWriter(extract, normalize, augment, dtype, batch_size, chunk_size, seed, torch.device(device),
                          lambda: _save_progress(work, fingerprint, done), show_progress)
    for split, src in sources.items():
        paths = {k: work / split / f"{k}.npy" for k in keys}
        if split not in done:
            _allocate(paths, shapes, samples[split], dtype)
            done[split] = 0
            _save_progress(work, fingerprint, done)
        writer.write(split, src, views if split == "train" else 1, paths, done)
        labels = np.asarray(src.labels, dtype=np.int64)
        np.save(work / split / f"{LABELS}.npy", np.tile(labels, samples[split] // len(labels)))
    tick = time.perf_counter()
    manifest = _finish(work, out_dir, keys, shapes, samples, dtype, views, seed, teacher_sha256, info or {})
    wall, checksum_s = time.perf_counter() - started, time.perf_counter() - tick
    sizes = {s: sum(f["bytes"] for f in m["files"].values()) for s, m in manifest["splits"].items()}
    total = sum(sizes.values())
    return {"cache/bytes": total, **{f"cache/bytes_{s}": v for s, v in sizes.items()}, "cache/wall_s": wall,
            "cache/teacher_s": writer.teacher_s, "cache/write_s": writer.write_s, "cache/checksum_s": checksum_s,
            "cache/write_mb_s": total / 1e6 / max(writer.write_s, 1e-9),
            "cache/samples_per_s": sum(samples.values()) / wall}


def _probe_shapes(sources: Mapping[str, Split], extract: ExtractFn, normalize: Callable, keys: Sequence[str],
                  device: torch.device | str) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every key, from one forward pass on one image (before any file is created)."""
    first = next(iter(sources.values())).images[:1]
    x = normalize(torch.from_numpy(np.array(first)))
    with torch.inference_mode():
        outs = [x, *extract(x.to(device))]
    if len(outs) != len(keys):
        raise ArtifactError(f"the teacher returned {len(outs) - 1} block outputs for {len(keys) - 1} blocks "
                            f"({', '.join(keys[1:])}): rebuild it with `dvc repro teacher`")
    return {k: tuple(t.shape[1:]) for k, t in zip(keys, outs, strict=True)}


def _resume_state(work: Path, fingerprint: Mapping[str, Any]) -> dict[str, int]:
    """Samples already written per split by an interrupted run with the same settings, else a fresh start."""
    try:
        state = json.loads((work / _PROGRESS).read_text())
        if state["fingerprint"] == fingerprint:
            log.info("resuming the feature cache in %s at %s", work, state["done"])
            return {k: int(v) for k, v in state["done"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return {}


def _save_progress(work: Path, fingerprint: Mapping[str, Any], done: Mapping[str, int]) -> None:
    with atomic(work / _PROGRESS) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "done": dict(done)}))


def _allocate(paths: Mapping[str, Path], shapes: Mapping[str, tuple[int, ...]], n: int, dtype: str) -> None:
    """Create each .npy with its header and full (sparse) length, so batches are written in place."""
    for key, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, *shapes[key]))
        del arr


def _row_position(path: Path, row: int) -> int:
    """Byte position of sample ``row`` in a .npy file (after its header)."""
    arr = np.load(path, mmap_mode="r")
    return arr.offset + row * arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))


def _batch_seed(seed: int, view: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, view, start]).generate_state(1)[0])


@contextlib.contextmanager
def _global_rngs(seed: int) -> Iterator[torch.Generator]:
    """A seeded generator, with Python's and torch's global RNGs seeded too and restored after.

    Augmentations often draw from the global RNGs (timm's RandomErasing uses ``random``); seeding them
    per batch keeps every view reproducible, so a resumed cache is byte-identical to an uninterrupted one.
    """
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


@dataclass
class _SplitWriter:
    """Appends teacher batches to a split's files; flush, fsync and a progress record every ``chunk_size``."""

    extract: ExtractFn
    normalize: Callable[[torch.Tensor], torch.Tensor]
    augment: AugmentFn | None
    dtype: str
    batch_size: int
    chunk_size: int
    seed: int
    device: torch.device
    save_progress: Callable[[], None]
    show_progress: bool
    teacher_s: float = 0.0  # teacher forward and cast to the storage dtype
    write_s: float = 0.0  # file writes and fsyncs

    def write(self, split: str, src: Split, views: int, paths: Mapping[str, Path], done: dict[str, int]) -> None:
        """Write samples ``done[split]`` onwards (view-major: sample v * N + i is view v of image i)."""
        n, bs = len(src.images), self.batch_size
        starts = [(v, s) for v in range(views) for s in range(0, n, bs) if v * n + s >= done[split]]
        if not starts:
            return
        files = {k: open(p, "r+b") for k, p in paths.items()}
        try:
            for key, f in files.items():
                f.seek(_row_position(paths[key], done[split]))
            since_sync = 0
            for view, start in progress_bar(starts, enabled=self.show_progress, desc=f"cache {split}"):
                tick = time.perf_counter()
                arrays = self._batch(split, src.images[start:start + bs], view, start, list(files))
                tock = time.perf_counter()
                for f, arr in zip(files.values(), arrays, strict=True):
                    f.write(memoryview(arr).cast("B"))
                done[split] += len(arrays[0])
                since_sync += len(arrays[0])
                if since_sync >= self.chunk_size or done[split] == n * views:
                    _sync(files.values())
                    self.save_progress()
                    since_sync = 0
                self.teacher_s += tock - tick
                self.write_s += time.perf_counter() - tock
        finally:
            for f in files.values():
                f.close()

    def _batch(self, split: str, images: np.ndarray, view: int, start: int, keys: Sequence[str]) -> list[np.ndarray]:
        x = self.normalize(torch.from_numpy(np.array(images)).to(self.device))
        if view > 0:
            with _global_rngs(_batch_seed(self.seed, view, start)) as generator:
                x = self.augment(x, generator)
        with torch.inference_mode():
            outs = [x, *self.extract(x)]
            return [_to_storage(t, self.dtype, key, split) for t, key in zip(outs, keys, strict=True)]


def _to_storage(t: torch.Tensor, dtype: str, key: str, split: str) -> np.ndarray:
    """Cast on the device (halves the transfer for float16); fail on values the dtype cannot hold.

    The range check runs on the float32 extremes: ``isfinite`` over the float16 copy costs 10x more on CPU.
    """
    lo, hi = (float(v) for v in t.detach().aminmax())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ArtifactError(f"teacher output '{key}' on the {split} split is NaN or infinite: "
                            "retrain the teacher with `dvc repro teacher`")
    if max(-lo, hi) > torch.finfo(DTYPES[dtype]).max:
        raise ConfigError(f"cache.dtype={dtype}: teacher output '{key}' on the {split} split reaches {max(-lo, hi):.3g}, "
                          "beyond its range; use cache.dtype=float32")
    return t.detach().contiguous().to(DTYPES[dtype]).cpu().numpy()


def _sync(files: Any) -> None:
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def _finish(work: Path, out_dir: Path, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
            samples: Mapping[str, int], dtype: str, views: int, seed: int, teacher_sha256: str,
            info: Mapping[str, Any]) -> dict[str, Any]:
    """Checksum what is on disk, write the manifest last, then swap the finished cache into place."""
    names = {s: [*keys, LABELS] for s in samples}
    paths = [work / s / f"{k}.npy" for s in samples for k in names[s]]
    sums = iter(_sha256_many(paths))
    splits = {}
    for split, n in samples.items():
        files = {}
        for key in names[split]:
            rel = f"{split}/{key}.npy"
            arr = np.load(work / rel, mmap_mode="r")
            files[key] = {"path": rel, "shape": list(arr.shape), "dtype": str(arr.dtype),
                          "bytes": (work / rel).stat().st_size, "sha256": next(sums)}
        splits[split] = {"samples": n, "views": views if split == "train" else 1, "files": files}
    manifest = {"format": FORMAT, "rebuild": REBUILD, "checksum": "sha256", "dtype": dtype, "views": views,
                "seed": seed, "teacher": {**info, "sha256": teacher_sha256},
                "keys": {k: {"shape": list(shapes[k]), "dtype": dtype} for k in keys}, "splits": splits}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (work / _PROGRESS).unlink()
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log.info("feature cache written to %s", out_dir)
    return manifest


# ---------------------------------------------------------------------------------------------- reading


class FeatureCache:
    """Read-only, memory-mapped view of ``artifacts/features``; the one reader of the cache.

    Opening checks the manifest, every file's size and header, the teacher-weights hash (when the
    teacher's weights are present) and, with ``verify=True``, every file's sha256, so a stale or
    damaged cache fails here with one line naming the file, never later as a wrong number.
    """

    def __init__(self, root: Path | str = "artifacts/features", verify: bool = True,
                 teacher_dir: Path | str | None = None) -> None:
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        _check_teacher(self.root, self.manifest, Path(teacher_dir) if teacher_dir else self.root.parent / "teacher")
        entries = [(s, k, e) for s, m in self.manifest["splits"].items() for k, e in m["files"].items()]
        self._arrays = {(s, k): _open_checked(self.root, e) for s, k, e in entries}
        if verify:
            paths = [self.root / e["path"] for _, _, e in entries]
            for path, (_, _, e), digest in zip(paths, entries, _sha256_many(paths), strict=True):
                if digest != e["sha256"]:
                    raise _fail(path, "checksum mismatch (modified or corrupt)")

    @property
    def keys(self) -> list[str]:
        """``input`` then the block names, in block order."""
        return list(self.manifest["keys"])

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def views(self, split: str) -> int:
        """Stored views of each image; samples are view-major (index v * N + i is view v of image i)."""
        return int(self._split(split)["views"])

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-sample shape (C, H, W) of ``key``."""
        if key not in self.manifest["keys"]:
            raise KeyError(f"feature key {key!r} is not in the cache; keys are {', '.join(self.keys)}")
        return tuple(self.manifest["keys"][key]["shape"])

    def get(self, split: str, key: str, index: np.ndarray | slice, pin_memory: bool = False) -> torch.Tensor:
        """A float32 batch; ``index`` is a slice or an int array (any order: shuffled batches).

        ``pin_memory`` (CUDA only) writes it into page-locked memory, so the copy to the GPU can be asynchronous.
        """
        self.shape(key)
        self._split(split)
        mapped = self._arrays[(split, key)]
        batch = np.asarray(mapped[index])
        if pin_memory:
            pinned = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
            pinned.numpy()[...] = batch
            return pinned
        # Fancy indexing has copied already; a slice is a view of the read-only map and must not escape.
        return torch.from_numpy(batch.astype(np.float32, copy=np.may_share_memory(batch, mapped)))

    def labels(self, split: str) -> np.ndarray:
        self._split(split)
        return np.asarray(self._arrays[(split, LABELS)])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} is not in the cache; splits are {', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]


def prefetch(load: Callable[[Item], Loaded], items: Iterable[Item], depth: int = 1) -> Iterator[Loaded]:
    """``load(item)`` of every item, in order, run ``depth`` items ahead on one background thread.

    numpy's gathers and casts and torch's copies release the GIL, so the next batch is read while the caller's
    step runs; the values and their order are exactly those of calling ``load`` in the loop.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending: deque[Future[Loaded]] = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(path, "missing (the cache was never built, or its writing was interrupted)")
    try:
        manifest = json.loads(path.read_text())
        splits = manifest["splits"].values()
        ok = (manifest["format"] == FORMAT and isinstance(manifest["teacher"]["sha256"], str) and manifest["keys"]
              and all({"samples", "views", "files"} <= set(s) for s in splits)
              and all({"path", "shape", "dtype", "bytes", "sha256"} <= set(e) for s in splits
                      for e in s["files"].values())
              and all({*manifest["keys"], LABELS} <= set(s["files"]) for s in splits))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise _fail(path, f"unreadable or not a format-{FORMAT} feature manifest")
    return manifest


def _check_teacher(root: Path, manifest: Mapping[str, Any], teacher_dir: Path) -> None:
    """A cache from other teacher weights is stale, even when every file is intact."""
    weights = teacher_dir / WEIGHTS
    if not weights.is_file():
        log.info("no teacher weights at %s: skipping the teacher-hash check", weights)
        return
    if weights_hash(teacher_dir) != manifest["teacher"]["sha256"]:
        raise _fail(root / MANIFEST, f"built from other teacher weights than {weights} (teacher sha256 differs)")


def _open_checked(root: Path, entry: Mapping[str, Any]) -> np.ndarray:
    """Size and header against the manifest before mapping: truncation never reaches numpy's mmap error."""
    path = root / entry["path"]
    if not path.is_file():
        raise _fail(path, "missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise _fail(path, f"has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise _fail(path, f"unreadable .npy header ({type(err).__name__})") from None
    if list(arr.shape) != list(entry["shape"]) or str(arr.dtype) != entry["dtype"]:
        raise _fail(path, f"holds {arr.dtype}{list(arr.shape)}, the manifest says {entry['dtype']}{entry['shape']}")
    return arr
