"""Benchmark of the feature reader's background prefetch (issue 13), measured in one run.

The pipeline's own supernet epoch (``pipeline.supernet._train_epoch``: one sampled path per step, Adam, MSE) runs
on every block of the default config, fed by ``BlockData.batches`` as the stage runs it (the next batch read and
converted on a background thread) and by the same reads inline (``prefetch`` replaced by a plain ``map``). Modes
alternate round by round on the same batches and paths, so load from other processes hits both alike. The cache
is written by the pipeline's writer from an untrained teacher of the default architecture (the timing depends on
shapes and dtype, not on the values), so no pipeline run is needed first. On CPU there is no pinning (CUDA only).

    .venv/bin/python benchmarks/bench_prefetch.py [--rounds 5 --samples 2048] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline import runtime, supernet
from pipeline.config import Params, Supernet, load_params, repo_root
from pipeline.data import Split
from pipeline.features import FeatureCache, write_features
from pipeline.space import build_space
from pipeline.supernet import BlockData, SupernetBlock, feature_keys
from pipeline.teacher import block_outputs, create_teacher, cut_blocks

MODES = ("prefetch", "inline")
IMAGE, CHANNELS, CLASSES = 28, 1, 10  # Fashion-MNIST, the default data


def build_cache(out: Path, params: Params, n_train: int, n_val: int) -> tuple[dict, FeatureCache]:
    """A cache of random images through an untrained default teacher; returns (teacher split, cache)."""
    torch.manual_seed(0)
    teacher = create_teacher(params.teacher, CHANNELS, CLASSES).eval()
    split = {"teacher": params.teacher.name, "image_size": IMAGE, "in_chans": CHANNELS, "num_classes": CLASSES,
             "blocks": cut_blocks(teacher, params.teacher.boundaries, CHANNELS, IMAGE)}
    rng = np.random.default_rng(0)
    sources = {s: Split(rng.integers(0, 256, (n, CHANNELS, IMAGE, IMAGE), dtype=np.uint8), rng.integers(0, 10, n))
               for s, n in (("train", n_train), ("val", n_val))}
    write_features(out, sources, lambda x: block_outputs(teacher, split, x), [b["name"] for b in split["blocks"]],
                   lambda u8: u8.float() / 128 - 1, dtype=params.cache.dtype, teacher_sha256="0" * 64,
                   show_progress=False)
    return split, FeatureCache(out, teacher_dir=out / "no-teacher")


def epoch_seconds(net: SupernetBlock, data: BlockData, cfg: Supernet, mode: str) -> float:
    """Wall seconds of one supernet epoch (same seed: same batches and paths in both modes)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loop = runtime.Loop(torch.device("cpu"), channels_last=True, progress=False)
    reader = supernet.prefetch
    if mode == "inline":
        supernet.prefetch = lambda load, items, depth=1: map(load, items)
    try:
        start = time.perf_counter()
        supernet._train_epoch(net, optimizer, runtime.Precision(loop.device, False), data, cfg, loop, epoch=0)
        return time.perf_counter() - start
    finally:
        supernet.prefetch = reader


def read_seconds(data: BlockData, cfg: Supernet, n_train: int) -> float:
    """The reads alone (inline): what prefetch can hide at most."""
    order = np.random.default_rng(0).permutation(n_train)[:cfg.train_samples]
    start = time.perf_counter()
    for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        data.batch("train", order[first:first + cfg.batch_size], torch.device("cpu"), channels_last=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2048, help="train samples per timed epoch")
    parser.add_argument("--out", default="benchmarks/results/prefetch.md")
    parser.add_argument("overrides", nargs="*", help="params.yaml key=value overrides")
    args = parser.parse_args()
    started, load_start = time.perf_counter(), "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    params = load_params(args.overrides)
    runtime.select_device(replace(params.runtime, device="cpu"))
    cfg = replace(params.supernet, train_samples=args.samples)
    scratch = Path(tempfile.mkdtemp(prefix="bench_prefetch_"))
    rows = []
    try:
        split, cache = build_cache(scratch / "features", params, n_train=4 * args.samples, n_val=256)
        spec = build_space(params.space, split)
        for block in spec.blocks:
            data = BlockData(cache, *feature_keys([b.name for b in spec.blocks], block.name))
            torch.manual_seed(0)
            net = SupernetBlock(block).to(memory_format=torch.channels_last)
            epoch_seconds(net, data, cfg, "inline")  # warm-up: page cache, allocator, one pass per op
            seconds = {m: [] for m in MODES}
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    seconds[mode].append(epoch_seconds(net, data, cfg, mode))
            ratio = float(np.median([i / p for i, p in zip(seconds["inline"], seconds["prefetch"], strict=True)]))
            reads = read_seconds(data, cfg, cache.num_samples("train"))
            rows.append((block.name, {m: float(np.median(s)) for m, s in seconds.items()}, ratio, reads))
            print(f"{block.name}: {rows[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    table = "\n".join(f"| {name} | {s['inline']:.2f} | {s['prefetch']:.2f} | **{ratio:.3f}x** | {reads:.2f} "
                      f"({reads / s['inline']:.0%}) |" for name, s, ratio, reads in rows)
    text = f"""# Feature reader prefetch benchmark (issue 13)

```
$ .venv/bin/python benchmarks/bench_prefetch.py {' '.join(sys.argv[1:])}
```

Machine: {len(os.sched_getaffinity(0))} cores (shared with other jobs), torch {torch.__version__}, \
{torch.get_num_threads()} torch thread(s); load average at start / end {load_start} / {load_end}; whole run \
{time.perf_counter() - started:.0f} s. Default params{' + ' + ' '.join(args.overrides) if args.overrides else ''}: \
{params.cache.dtype} cache, supernet batch {cfg.batch_size}, {args.samples} train samples per epoch, \
{args.rounds} rounds per block (modes alternating).

The pipeline's supernet epoch, fed by `BlockData.batches` (*prefetch*: a background thread reads and converts the
next batch) or by the same reads inline. Seconds are medians over rounds; the speed-up is the median of the
per-round inline / prefetch ratios (> 1: prefetch is faster). *reads*: the reads alone, inline, and their share of
the inline epoch: what prefetch can hide at most.

| block | inline s | prefetch s | speed-up | reads s (share) |
|---|---:|---:|---:|---:|
{table}
"""
    out = repo_root() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
