"""Candidates per second: prefix-shared scorer vs the naive per-candidate scorer, on one block of the default config.

    .venv/bin/python benchmarks/bench_scoring.py [--block b1] [--rounds 3] [--naive-sample 54]

Uses the trained supernet and the cached features when they exist (after `dvc repro supernet@b1`), otherwise a
randomly initialised supernet on random data of the same shapes (speed does not depend on the weights).
Both scorers run alternately in one process, so machine load hits both; the naive scorer rates a random sample of
the candidates (its time per candidate does not depend on which). Writes benchmarks/results/scoring.md.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from pipeline import scoring
from pipeline.config import load_params
from pipeline.space import BlockSpec, build_layer, build_space, build_stem, load_teacher_blocks, module_cost
from pipeline.supernet import BlockData, SupernetBlock, checkpoint_path, feature_keys, load_trained

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/scoring.md"
log = logging.getLogger("bench_scoring")


def _default_split() -> dict:
    """The default teacher's split (narrow resnet18 at 28 px) when the teacher stage has not run."""
    chans, sizes = [1, 32, 64, 128, 256], [28, 14, 7, 4, 2]
    return {"teacher": "resnet18", "image_size": 28, "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": f"b{i}", "in_channels": chans[i], "out_channels": chans[i + 1], "stride": 2,
                        "in_size": [sizes[i]] * 2, "out_size": [sizes[i + 1]] * 2} for i in range(4)]}


def _setup(block_name: str) -> tuple[SupernetBlock, scoring.RatingData, str]:
    params = load_params(root=REPO)
    split_path = REPO / "artifacts/teacher/blocks.json"
    split = load_teacher_blocks(split_path) if split_path.exists() else _default_split()
    block = build_space(params.space, split).block(block_name)
    net = SupernetBlock(block)
    try:
        from pipeline.features import FeatureCache
        from pipeline.supernet import fingerprint

        cache = FeatureCache(REPO / "artifacts/features")
        load_trained(checkpoint_path(REPO, block_name), net, fingerprint(params, block_name, cache), "")
        data = BlockData(cache, *feature_keys(list(params.space.blocks), block_name))
        rating = scoring.load_rating_data(data, params.score, params.seed, torch.device("cpu"), True)
        source = "trained supernet, cached val features"
    except Exception as err:  # noqa: BLE001 - any missing artifact: fall back to random data of the same shapes
        log.info("no trained supernet or feature cache (%s): random weights and data", type(err).__name__)
        gen = torch.Generator().manual_seed(0)
        first = block.cells[0].layers[0]
        shape = (block.stem.in_chs, *block.stem.in_size) if block.stem else (first.in_chs, *first.in_size)
        out = (block.out_chs, *block.out_size)
        batches, bs = params.score.batches, params.score.batch_size
        rating = scoring.RatingData(inputs=[torch.randn(bs, *shape, generator=gen) for _ in range(batches)],
                                    targets=[torch.rand(bs, *out, generator=gen) for _ in range(batches)],
                                    bn_input=torch.randn(params.score.bn_batch_size, *shape, generator=gen))
        source = "random weights, random data of the cached shapes"
    net = net.to(memory_format=torch.channels_last).eval()
    to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    rating = scoring.RatingData([to_cl(x) for x in rating.inputs], rating.targets, to_cl(rating.bn_input))
    return net, rating, source


def flop_weighted_limit(block: BlockSpec) -> float:
    """The same limit with every layer evaluation weighted by its FLOPs at search widths (stem included)."""
    stem = module_cost(build_stem(block.stem, block.act), (block.stem.in_chs, *block.stem.in_size)).flops \
        if block.stem else 0
    naive, shared = 0, stem
    for cell in block.cells:
        flops = [{op: module_cost(build_layer(block, la, op), (la.in_chs, *la.in_size)).flops for op in la.choices}
                 for la in cell.layers]
        for ops in itertools.product(*(la.choices for la in cell.layers)):
            naive += stem + sum(f[op] for f, op in zip(flops, ops, strict=True))
        for depth in range(len(flops)):
            prefixes = math.prod(len(la.choices) for la in cell.layers[:depth])
            shared += prefixes * sum(flops[depth].values())
    return naive / shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="b1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-sample", type=int, default=54, help="candidates the naive scorer rates per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 thrash on a shared 2-core box)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    net, rating, source = _setup(args.block)
    ids = list(net.block.candidates())
    naive_evals, prefix_evals = scoring.layer_evaluations(net.block)
    limit = naive_evals / prefix_evals
    weighted = flop_weighted_limit(net.block)
    rng = random.Random(0)
    rows = []
    for r in range(args.rounds):
        sample = rng.sample(ids, min(args.naive_sample, len(ids)))
        start = time.perf_counter()
        scoring.score_naive(net, rating, sample)
        naive_rate = len(sample) / (time.perf_counter() - start)
        start = time.perf_counter()
        scoring.score_prefix(net, rating)
        prefix_rate = len(ids) / (time.perf_counter() - start)
        rows.append((naive_rate, prefix_rate, prefix_rate / naive_rate))
        log.info("round %d: naive %.2f cand/s, prefix %.2f cand/s, ratio %.2f (limit %.2f)", r + 1, naive_rate,
                 prefix_rate, prefix_rate / naive_rate, limit)
    ratio = statistics.median(r[2] for r in rows)
    samples = sum(len(x) for x in rating.inputs)
    lines = [
        "# Scoring: prefix-shared vs naive candidates/s",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scoring.py --block {args.block} --rounds {args.rounds} "
        f"--naive-sample {args.naive_sample} --threads {args.threads}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), torch "
        f"{torch.__version__}, {args.threads} torch thread(s); load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        f"Block {args.block} of the default config: {len(ids)} candidates "
        f"({' x '.join(str(len(la.choices)) for la in net.block.cells[0].layers)} ops), {source}; "
        f"{samples} rating samples in {rating.num_batches} batches, BN recalibration batch "
        f"{len(rating.bn_input)}.",
        "",
        "| round | naive cand/s | prefix cand/s | ratio |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {a:.2f} | {b:.2f} | {c:.2f} |" for i, (a, b, c) in enumerate(rows)),
        "",
        f"Theoretical limit (naive layer evaluations / distinct-prefix layer evaluations): "
        f"{naive_evals} / {prefix_evals} = **{limit:.2f}x**.",
        f"Median measured ratio: **{ratio:.2f}x** = **{100 * ratio / limit:.0f}%** of the limit.",
        "",
        "Above 100% is possible: that limit counts every layer evaluation alike, while the first layer (shared most)",
        "is the most expensive one here (it reads the teacher's channels at the larger input resolution).",
        f"Weighting each layer evaluation by its FLOPs gives a limit of **{weighted:.2f}x** (measured: "
        f"**{100 * ratio / weighted:.0f}%** of it). FLOPs leave out memory-bound work (BN, activations, SE scaling),",
        "which is largest where activations are largest: the first layer's expansion at the block's input resolution.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    log.info("median ratio %.2f = %.0f%% of the limit %.2f (%.0f%% of the FLOP-weighted limit %.2f); written to %s",
             ratio, 100 * ratio / limit, limit, 100 * ratio / weighted, weighted, RESULTS)


if __name__ == "__main__":
    main()
