"""Benchmark of the loader workers (``runtime.workers``) reading image batches from disk, measured in one run.

At paper scale the prepared train split is a ~190 GB uint8 array on disk, far beyond the page cache, so every
training batch (teacher, retrained student, ranking units, SPOS) is a page-in of random rows. This measures what
the training loops' reader (``pipeline.data.read_batches``, the part of ``data.batches`` before the batch reaches
the device) delivers from a cold file, with 0 (inline), 2 and 4 reader threads (and, for comparison, a torch DataLoader with
2 worker processes over the same batches), while a simulated accelerator
step holds each batch for ``batch / gpu_images_per_s`` seconds (the host idles while a GPU step runs; normalising
and augmenting happen on the device after the copy, so they are left out). Modes alternate round by round and the
file is evicted from the page cache (fsync + POSIX_FADV_DONTNEED) before every pass, so each pass reads from disk.

    .venv/bin/python benchmarks/bench_loader.py [--images 3000 --size 224 --batch 128 --rounds 3
                                                 --gpu-images-per-s 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data import Split, read_batches

REPO = Path(__file__).resolve().parents[1]
MODES = ("0", "2", "4", "DataLoader, 2 processes")  # runtime.workers, and the process-based alternative


class _BatchRows(torch.utils.data.Dataset):
    """Item i: the rows of the i-th index array, for the DataLoader comparison (what a worker process reads)."""

    def __init__(self, split: Split, index: list[np.ndarray]):
        self.split, self.index = split, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.asarray(self.split.images[self.index[i]])),
                torch.from_numpy(self.split.labels[self.index[i]]))


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache: the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_pass(path: Path, batch: int, mode: str, step_s: float, seed: int) -> float:
    """Images per second of one shuffled pass, cold, each batch held ``step_s`` by the simulated step."""
    evict(path)  # before mapping: pages a process has mapped stay resident
    images = np.load(path, mmap_mode="r")
    split = Split(images, np.zeros(len(images), np.int64))
    order = np.random.default_rng(seed).permutation(len(split.labels))
    index = [order[s:s + batch] for s in range(0, len(order), batch)]
    start, seen = time.perf_counter(), 0
    reader = (read_batches(split, index, torch.device("cpu"), int(mode)) if mode.isdigit() else
              torch.utils.data.DataLoader(_BatchRows(split, index), batch_size=None, num_workers=2))
    for images, _ in reader:
        seen += len(images)
        time.sleep(step_s)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-images-per-s", type=float, default=2000.0,
                        help="the simulated accelerator's training throughput (0 = no step: the reads alone)")
    parser.add_argument("--out", default="benchmarks/results/loader.md")
    args = parser.parse_args()
    started, load_start = time.perf_counter(), "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    step_s = args.batch / args.gpu_images_per_s if args.gpu_images_per_s else 0.0
    rates: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=REPO) as scratch:  # on the repo's disk, not tmpfs
        path = Path(scratch) / "train_images.npy"
        images = np.lib.format.open_memmap(path, "w+", np.uint8, (args.images, 3, args.size, args.size))
        rng = np.random.default_rng(0)
        for s in range(0, args.images, 256):  # incompressible rows, written a chunk at a time
            images[s:s + 256] = rng.integers(0, 256, images[s:s + 256].shape, dtype=np.uint8)
        images.flush()
        del images
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                for step in (0.0, step_s) if step_s else (0.0,):
                    rates.setdefault((mode, step), []).append(one_pass(path, args.batch, mode, step, r))
                    print(f"round {r} {mode} step {step * 1e3:.0f} ms: {rates[mode, step][-1]:.0f} images/s",
                          file=sys.stderr)
    mb = 3 * args.size * args.size / 1e6
    rows = []
    for mode in MODES:
        cold = statistics.median(rates[mode, 0.0])
        row = f"| {mode} | {cold:.0f} ({cold * mb:.0f} MB/s) |"
        if step_s:
            held = statistics.median(rates[mode, step_s])
            row += f" {held:.0f} | {held / args.gpu_images_per_s:.0%} |"
        rows.append(row)
    step_cols = (f" with a {step_s * 1e3:.0f} ms step, images/s | share of the step's {args.gpu_images_per_s:.0f}/s |"
                 if step_s else "")
    rule = "---:|---:|" if step_s else ""
    reading = ""
    if step_s:
        held = {mode: statistics.median(rates[mode, step_s]) for mode in MODES}
        best = max(held, key=held.get)
        reading = f"""
Reading. Alone, the reads run at {statistics.median(rates[MODES[0], 0.0]) / args.gpu_images_per_s:.1f}x the step's rate \
inline, so a step that waited for nothing would never starve; held beside the step, inline reading reaches \
{held[MODES[0]] / args.gpu_images_per_s:.0%} of it because each gather waits for the page-ins in the step's place. \
Reader threads overlap them with the step ({best}: {held[best] / args.gpu_images_per_s:.0%}); DataLoader processes \
pay a copy of every batch through shared memory and read at {statistics.median(rates[MODES[-1], 0.0]):.0f} images/s \
alone. Threads need no pickling of the memory-mapped arrays (spawned processes on macOS would), hence \
`runtime.workers` = reader threads.
"""
    load_end = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    text = f"""# Loader workers reading image batches from disk (issue 17)

```
$ .venv/bin/python benchmarks/bench_loader.py {' '.join(sys.argv[1:])}
```

Machine: {len(os.sched_getaffinity(0))} cores (shared with other jobs), torch {torch.__version__}; load average at \
start / end {load_start} / {load_end}; whole run {time.perf_counter() - started:.0f} s. A {args.images}-image \
uint8 array of 3x{args.size}x{args.size} rows ({args.images * mb / 1e3:.1f} GB), read in shuffled batches of \
{args.batch} from a cold page cache, {args.rounds} rounds, modes alternating; medians over rounds.

| runtime.workers | reads alone, images/s |{step_cols}
|---:|---:|{rule}
{chr(10).join(rows)}
{reading}"""
    out = REPO / args.out
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
