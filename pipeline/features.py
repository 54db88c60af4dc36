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

Data too big to cache (``cache.mode``; a float16 cache of EfficientNet-B7's blocks on ImageNet is ~870 GB):
``resolve_mode`` weighs the estimated size against ``cache.max_gb`` and the free disk, and in online mode the
folder holds only a manifest; ``OnlineFeatures`` then runs the frozen teacher on the prepared images at read time
and returns the samples, values (rounded to ``cache.dtype``) and order the cache would have held.
``open_features`` opens whichever the manifest names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import ArtifactError, atomic, sha256_file
from pipeline.config import Augment, Cache, ConfigError, as_dict
from pipeline.data import (
    Split,
    augment,
    load_meta,
    load_split,
    normalize,
    prefetch,  # noqa: F401  pipeline.supernet's import: its text is in the supernet fingerprint
    prepared_identity,
)
from pipeline.runtime import progress as progress_bar
from pipeline.runtime import to_device_model
from pipeline.teacher import WEIGHTS, block_outputs, load_teacher, weights_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REBUILD = "dvc repro cache_features"
FORMAT = 1
SPLITS = ("train", "val")
INPUT = "input"
LABELS = "labels"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
DISK_MARGIN = 0.1  # a cache is written only when its estimate plus this fraction fits the free disk
_PROGRESS = "progress.json"

ExtractFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]
AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


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
    decision: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> dict[str, float]:
    """Run ``extract`` (the teacher, once per batch) over every split and store inputs and block outputs.

    ``extract(x)`` returns the feature map at every block boundary for a normalised batch ``x``, in the
    order of ``block_names``. The train split gets ``views`` copies, view 0 plain and view v > 0 of image i
    passed through ``augment`` with a generator seeded by (seed, v, i) (``augment_views``), so a resumed run
    writes the same bytes and ``OnlineFeatures`` draws the same views. Work goes to ``<out_dir>.partial`` and
    replaces ``out_dir`` only when complete; ``decision`` (``resolve_mode``'s record) goes into the manifest.
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
    samples = sample_counts(sources, views)
    fingerprint = {"format": FORMAT, "teacher_sha256": teacher_sha256, "dtype": dtype, "views": views, "seed": seed,
                   "view_seeds": "per image", "batch_size": batch_size, "samples": samples,
                   "shapes": {k: list(v) for k, v in shapes.items()}}
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
    manifest = _finish(work, out_dir, keys, shapes, samples, dtype, views, seed, teacher_sha256, info or {},
                       decision or {})
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


def _sample_seed(seed: int, view: int, image: int) -> int:
    return int(np.random.SeedSequence([seed, view, image]).generate_state(1)[0])


def augment_views(x: torch.Tensor, augment_fn: AugmentFn | None, seed: int, views: np.ndarray,
                  images: np.ndarray) -> torch.Tensor:
    """Row j of ``x`` (normalised image ``images[j]``) as its view ``views[j]``: view 0 plain, view v > 0
    ``augment_fn`` of that image alone, seeded by (seed, v, image).

    Per image, not per batch: a sample's value depends on nothing else, so the cache writer (batches in file
    order) and ``OnlineFeatures`` (random training batches) produce the same one.
    """
    todo = np.flatnonzero(np.asarray(views) > 0)
    if len(todo) == 0:
        return x
    out = x.clone()
    for j in todo:
        with _global_rngs(_sample_seed(seed, int(views[j]), int(images[j]))) as generator:
            out[j:j + 1] = augment_fn(x[j:j + 1], generator)
    return out


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
        x = augment_views(x, self.augment, self.seed, np.full(len(x), view), np.arange(start, start + len(x)))
        with torch.inference_mode():
            outs = [x, *self.extract(x)]
            return [_to_storage(t, self.dtype, key, split) for t, key in zip(outs, keys, strict=True)]


def _to_storage(t: torch.Tensor, dtype: str, key: str, split: str) -> np.ndarray:
    """Cast on the device (halves the transfer for float16); fail on values the dtype cannot hold."""
    _check_range(t, dtype, key, split)
    return t.detach().contiguous().to(DTYPES[dtype]).cpu().numpy()


def _as_stored(t: torch.Tensor, dtype: str, key: str, split: str) -> torch.Tensor:
    """What the cache would return for ``t``: rounded to the storage dtype, as float32, on ``t``'s device."""
    _check_range(t, dtype, key, split)
    return t.detach().to(DTYPES[dtype]).float().contiguous()


def _check_range(t: torch.Tensor, dtype: str, key: str, split: str) -> None:
    """Fail on NaN, infinity or values beyond the storage dtype's range.

    The check runs on the float32 extremes: ``isfinite`` over the float16 copy costs 10x more on CPU.
    """
    lo, hi = (float(v) for v in t.detach().aminmax())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ArtifactError(f"teacher output '{key}' on the {split} split is NaN or infinite: "
                            "retrain the teacher with `dvc repro teacher`")
    if max(-lo, hi) > torch.finfo(DTYPES[dtype]).max:
        raise ConfigError(f"cache.dtype={dtype}: teacher output '{key}' on the {split} split reaches {max(-lo, hi):.3g}, "
                          "beyond its range; use cache.dtype=float32")


def _sync(files: Any) -> None:
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def _finish(work: Path, out_dir: Path, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
            samples: Mapping[str, int], dtype: str, views: int, seed: int, teacher_sha256: str,
            info: Mapping[str, Any], decision: Mapping[str, Any]) -> dict[str, Any]:
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
    manifest = {"format": FORMAT, "mode": "cache", "rebuild": REBUILD, "checksum": "sha256", "dtype": dtype,
                "views": views, "seed": seed, "teacher": {**info, "sha256": teacher_sha256},
                "keys": {k: {"shape": list(shapes[k]), "dtype": dtype} for k in keys}, "splits": splits,
                "decision": dict(decision)}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (work / _PROGRESS).unlink()
    _swap_into_place(work, out_dir)
    return manifest


def _swap_into_place(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished ``work`` folder (the old one is removed only after the move)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log.info("features written to %s", out_dir)


# ---------------------------------------------------------------------------------------------- sizing, mode


def sample_counts(sources: Mapping[str, Split], views: int) -> dict[str, int]:
    """Samples per split: ``views`` of every train image, one of every other."""
    return {s: len(src.images) * (views if s == "train" else 1) for s, src in sources.items()}


def boundary_shapes(blocks_json: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every key, from the teacher's ``blocks.json``: the images, then each block's output."""
    blocks = blocks_json["blocks"]
    shapes = {INPUT: (int(blocks[0]["in_channels"]), *blocks[0]["in_size"])}
    shapes.update({b["name"]: (int(b["out_channels"]), *b["out_size"]) for b in blocks})
    return shapes


def estimate_bytes(shapes: Mapping[str, Sequence[int]], samples: Mapping[str, int], dtype: str) -> int:
    """Bytes a cache of these keys and samples takes (``.npy`` headers aside): the maps and an int64 label each."""
    per_sample = sum(math.prod(shape) for shape in shapes.values()) * np.dtype(dtype).itemsize + 8
    return per_sample * sum(samples.values())


@dataclass(frozen=True)
class Decision:
    """``resolve_mode``'s answer: where the supernet and score stages get their features, and why."""

    mode: str  # cache | online
    reason: str
    estimate_bytes: int
    free_bytes: int  # a fact of this run: logged, never written to the manifest (DVC tracks it)

    def record(self, cfg: Cache) -> dict[str, Any]:
        """What the manifest keeps: the same inputs give the same bytes."""
        return {"requested": cfg.mode, "mode": self.mode, "reason": self.reason,
                "estimate_bytes": self.estimate_bytes, "max_gb": cfg.max_gb}


def resolve_mode(cfg: Cache, estimate: int, out_dir: Path | str) -> Decision:
    """``cache.mode`` against the estimated size, ``cache.max_gb`` and the free disk under ``out_dir``.

    auto caches when the estimate is within the cap and, with ``DISK_MARGIN`` to spare, the free disk; else it
    goes online. cache that does not fit is one ConfigError naming the size, the free space and the settings that
    shrink it, raised before anything is written.
    """
    free = _free_bytes(Path(out_dir))
    fits = estimate * (1 + DISK_MARGIN) <= free
    size = f"estimated {estimate / 1e9:.3g} GB"
    if cfg.mode == "online":
        return Decision("online", "cache.mode=online", estimate, free)
    if cfg.mode == "cache":
        if not fits:
            raise ConfigError(_disk_full(cfg, estimate, free, Path(out_dir)))
        return Decision("cache", "cache.mode=cache", estimate, free)
    if cfg.max_gb and estimate > cfg.max_gb * 1e9:
        return Decision("online", f"{size} > cache.max_gb={cfg.max_gb:g}", estimate, free)
    if not fits:
        return Decision("online", f"{size} (+{DISK_MARGIN:.0%}) exceeds the free disk", estimate, free)
    return Decision("cache", f"{size} fits cache.max_gb and the free disk", estimate, free)


def _free_bytes(out_dir: Path) -> int:
    """Free bytes on ``out_dir``'s file system, plus what an interrupted build already holds (reused or freed)."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    partial = out_dir.with_name(out_dir.name + ".partial")
    held = sum(f.stat().st_blocks * 512 for f in partial.rglob("*") if f.is_file()) if partial.is_dir() else 0
    return int(shutil.disk_usage(existing).free) + held


def _disk_full(cfg: Cache, estimate: int, free: int, out_dir: Path) -> str:
    fixes = ["cache.mode=online (the supernet and score stages run the teacher; nothing cached)"]
    if cfg.dtype == "float32":
        fixes.append("cache.dtype=float16 (half the size)")
    if cfg.views > 1:
        fixes.append(f"fewer cache.views (now {cfg.views})")
    fixes.append("a smaller data.limit")
    return (f"the feature cache needs ~{estimate / 1e9:.3g} GB ({cfg.dtype}, {cfg.views} train view(s); "
            f"+{DISK_MARGIN:.0%} margin) but {out_dir.parent} has {free / 1e9:.3g} GB free: set "
            f"{', '.join(fixes[:-1])} or {fixes[-1]}, or free disk space")


def write_online_manifest(out_dir: Path | str, *, shapes: Mapping[str, Sequence[int]], samples: Mapping[str, int],
                          dtype: str, views: int, seed: int, batch_size: int, augment_cfg: Augment,
                          teacher_sha256: str, prepared: str, info: Mapping[str, Any],
                          decision: Mapping[str, Any]) -> dict[str, Any]:
    """The cache stage's output in online mode: a folder holding only ``manifest.json``.

    It records everything ``OnlineFeatures`` needs to produce what the cache would have held (dtype, views, seed,
    their augmentation) and the identity of its inputs (teacher weights, prepared data), so DVC reruns the supernet
    and score stages exactly when those change, and a reader with other inputs fails in one line.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = {"format": FORMAT, "mode": "online", "rebuild": REBUILD, "dtype": dtype, "views": views, "seed": seed,
                "batch_size": batch_size, "augment": as_dict(augment_cfg) if views > 1 else None,
                "teacher": {**info, "sha256": teacher_sha256}, "prepared": prepared,
                "keys": {k: {"shape": list(v), "dtype": dtype} for k, v in shapes.items()},
                "splits": {s: {"samples": n, "views": views if s == "train" else 1} for s, n in samples.items()},
                "decision": dict(decision)}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _swap_into_place(work, out_dir)
    return manifest


# ---------------------------------------------------------------------------------------------- reading


class _Manifested:
    """Keys, shapes and sample counts as a manifest states them: what the cache and the online reader share."""

    manifest: dict[str, Any]

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

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} is not in the cache; splits are {', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]


class FeatureCache(_Manifested):
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

    def identity(self, keys: Iterable[str]) -> dict[str, Any]:
        """What a result computed from ``keys`` depends on: their files' sha256s, per split."""
        keys = set(keys)
        return {s: {k: f["sha256"] for k, f in m["files"].items() if k in keys}
                for s, m in self.manifest["splits"].items()}

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


class OnlineFeatures(_Manifested):
    """``FeatureCache``'s reading interface with the teacher run at read time, for data too big to cache.

    Sample v * N + i is view v of prepared image i (``augment_views``, the writer's seeds) and every map is rounded
    to the manifest's dtype, so a batch holds the values the cache would have stored for the same indices. The
    frozen teacher runs in eval mode up to ``upto``'s boundary (all blocks by default), ``batch_size`` images per
    forward, and keeps the maps of the last indices read: a block's input and target cost one forward. Batches
    are float32 on ``device`` (``pin_memory`` is moot: they are produced there).
    """

    def __init__(self, root: Path | str, teacher_dir: Path | str, prepared_dir: Path | str,
                 device: torch.device | str = "cpu", upto: str | None = None, channels_last: bool = False) -> None:
        self.root = Path(root)
        self.manifest = _read_manifest(self.root, mode="online")
        with torch.random.fork_rng(devices=[]):  # building the model draws init weights: keep the seeded run's draws
            model, blocks = load_teacher(teacher_dir, device)
        if weights_hash(teacher_dir) != self.manifest["teacher"]["sha256"]:
            raise _fail(self.root / MANIFEST, f"written for other teacher weights than {Path(teacher_dir) / WEIGHTS}")
        if prepared_identity(prepared_dir) != self.manifest["prepared"]:
            raise _fail(self.root / MANIFEST, f"written for other prepared data than {prepared_dir}")
        self._meta = load_meta(prepared_dir)
        self._splits = {s: load_split(prepared_dir, s) for s in self.manifest["splits"]}
        for split, src in self._splits.items():
            if tuple(src.images.shape[1:]) != self.shape(INPUT) or len(src.images) * self.views(split) != \
                    self.num_samples(split):
                raise _fail(self.root / MANIFEST, f"does not match the prepared {split} split in {prepared_dir}")
        upto = upto or self.keys[-1]
        self.shape(upto)
        self._blocks = {"blocks": blocks["blocks"][:self.keys.index(upto)]}
        self._model = to_device_model(model.requires_grad_(False), torch.device(device), channels_last).eval()
        self._layout = torch.channels_last if channels_last else torch.contiguous_format
        self._device = torch.device(device)
        aug = self.manifest["augment"]
        self._augment = (lambda x, g: augment(x, Augment(**aug), g)) if aug else None
        self._lock = threading.Lock()  # one forward at a time: the boundary hooks are per call
        self._last: tuple[tuple[str, bytes], dict[str, torch.Tensor]] | None = None

    def identity(self, keys: Iterable[str]) -> dict[str, Any]:
        """What a result computed from ``keys`` depends on: the teacher, the prepared data, how views are drawn."""
        m = self.manifest
        return {"online": {"teacher": m["teacher"]["sha256"], "prepared": m["prepared"], "dtype": m["dtype"],
                           "views": m["views"], "seed": m["seed"], "augment": m["augment"], "keys": sorted(set(keys))}}

    def labels(self, split: str) -> np.ndarray:
        return np.tile(np.asarray(self._splits[split].labels, dtype=np.int64), self.views(split))

    def get(self, split: str, key: str, index: np.ndarray | slice, pin_memory: bool = False) -> torch.Tensor:
        """A float32 batch on the reader's device; ``index`` is a slice or an int array (any order)."""
        self.shape(key)
        rows = np.arange(self.num_samples(split))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        tag = (split, rows.tobytes())
        with self._lock:
            if self._last is None or self._last[0] != tag:
                self._last = (tag, self._compute(split, rows))
            maps = self._last[1]
        if key not in maps:
            raise KeyError(f"feature key {key!r} lies past this reader's last boundary ({self.keys[len(maps) - 1]})")
        return maps[key]

    def _compute(self, split: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        step = int(self.manifest["batch_size"])
        chunks = [self._forward(split, rows[i:i + step]) for i in range(0, len(rows), step)]
        keys = self.keys[:len(self._blocks["blocks"]) + 1]
        if not chunks:
            return {k: torch.empty((0, *self.shape(k)), device=self._device) for k in keys}
        return {k: torch.cat([c[k] for c in chunks]) for k in keys}

    def _forward(self, split: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        src = self._splits[split]
        images, views = rows % len(src.images), rows // len(src.images)
        x = normalize(torch.from_numpy(np.asarray(src.images[images])).to(self._device), self._meta)
        x = augment_views(x, self._augment, int(self.manifest["seed"]), views, images)
        outs: list[torch.Tensor] = []
        if self._blocks["blocks"]:
            with torch.no_grad():  # not inference_mode: the block input enters the student's autograd graph
                outs = block_outputs(self._model, self._blocks, x.contiguous(memory_format=self._layout))
        dtype = self.manifest["dtype"]
        return {k: _as_stored(t, dtype, k, split) for k, t in zip(self.keys, [x, *outs], strict=False)}


def open_features(root: Path | str, *, teacher_dir: Path | str, prepared_dir: Path | str,
                  device: torch.device | str = "cpu", upto: str | None = None, verify: bool = True,
                  channels_last: bool = False) -> FeatureCache | OnlineFeatures:
    """The cache at ``root``, or the online teacher when the cache stage resolved ``cache.mode`` to online."""
    if _manifest_mode(Path(root)) == "online":
        return OnlineFeatures(root, teacher_dir, prepared_dir, device, upto, channels_last)
    return FeatureCache(root, verify=verify, teacher_dir=teacher_dir)


def _manifest_mode(root: Path) -> str:
    """``online`` for a manifest-only folder; anything else (a cache, a missing or broken manifest) is the cache's
    to open and report on."""
    try:
        return str(json.loads((root / MANIFEST).read_text()).get("mode", "cache"))
    except (OSError, ValueError, AttributeError):
        return "cache"


def _read_manifest(root: Path, mode: str = "cache") -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(path, "missing (the cache was never built, or its writing was interrupted)")
    try:
        manifest = json.loads(path.read_text())
        found = manifest.get("mode", "cache")
    except (ValueError, AttributeError):
        raise _fail(path, f"unreadable or not a format-{FORMAT} feature manifest") from None
    if found != mode:
        raise _fail(path, f"is a cache.mode={found} manifest where cache.mode={mode} was expected "
                          "(open it with pipeline.features.open_features)")
    try:
        splits = manifest["splits"].values()
        ok = (manifest["format"] == FORMAT
              and isinstance(manifest["teacher"]["sha256"], str) and manifest["keys"]
              and all({"samples", "views"} <= set(s) for s in splits))
        if mode == "cache":
            ok = ok and all({"path", "shape", "dtype", "bytes", "sha256"} <= set(e) for s in splits
                            for e in s["files"].values()) and all({*manifest["keys"], LABELS} <= set(s["files"])
                                                                  for s in splits)
        else:
            ok = ok and manifest["dtype"] in DTYPES and {"prepared", "seed", "batch_size", "augment"} <= set(manifest)
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
