"""Rate every candidate of a block (DNA, Li et al., CVPR 2020, Sec. 3.3).

A candidate's score is DNA's relative L1 error, mean|student - teacher| / std(teacher), computed per rating
batch of the val split's cached features and averaged over batches; its MSE is kept beside it. Before rating,
every BN layer on the candidate's path is recalibrated on one fixed train batch: statistics accumulated while
the supernet trained belong to no single path (changlin31/DNA#18).

Candidates that share their first l layers share everything those layers compute, the recalibration pass
included: with batch statistics in train mode, a layer's recalibration depends only on the layers before it.
``score_prefix`` walks the prefix tree and computes each distinct prefix once; ``score_naive`` rates one
candidate at a time and is the reference both are tested against.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn

from pipeline import checkpoint
from pipeline.config import Score
from pipeline.space import BlockSpec, CellSpec, candidate_cost, candidate_id
from pipeline.supernet import BlockData, SupernetBlock, recalibrate_bn

log = logging.getLogger(__name__)
Errors = dict[str, np.ndarray]  # candidate id -> [2, batches]: relative L1 and MSE of every rating batch


@dataclass
class RatingData:
    """The fixed data every candidate of a block is rated on."""

    inputs: list[torch.Tensor]  # rating batches of block inputs (val split)
    targets: list[torch.Tensor]  # the teacher's block outputs for them
    bn_input: torch.Tensor  # the fixed train batch that recalibrates BN
    units: str = "teacher"  # score.units: errors in the teacher's units or the supernet's training (target) units

    @property
    def num_batches(self) -> int:
        return len(self.inputs)


def load_rating_data(data: BlockData, cfg: Score, seed: int, device: torch.device,
                     channels_last: bool = False) -> RatingData:
    """The first ``batches x batch_size`` val samples and a seeded train batch of ``bn_batch_size``."""
    n_val, n_train = data.cache.num_samples("val"), data.cache.num_samples("train")
    wanted = cfg.batches * cfg.batch_size
    if wanted > n_val:
        log.warning("score.batches x score.batch_size = %d > %d val samples: rating on all of them", wanted, n_val)
    pairs = list(data.batches("val", (np.arange(start, min(start + cfg.batch_size, n_val))
                                      for start in range(0, min(wanted, n_val), cfg.batch_size)), device, channels_last))
    bn_index = np.random.default_rng([seed, 3]).permutation(n_train)[:cfg.bn_batch_size]
    bn_input, _ = data.batch("train", bn_index, device, channels_last)
    return RatingData(inputs=[x for x, _ in pairs], targets=[t for _, t in pairs], bn_input=bn_input, units=cfg.units)


def batch_errors(prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """DNA's relative L1 (std over the whole batch tensor) and the MSE of one batch."""
    diff = prediction.float() - target
    return float(diff.abs().mean() / target.std()), float((diff * diff).mean())


def _errors(net: SupernetBlock, outputs: Iterable[torch.Tensor], rating: RatingData) -> np.ndarray:
    """Per-batch errors in ``rating.units``: "target" weighs every channel as the training loss did (per-channel
    standardised when supernet.target_norm), "teacher" as the next block sees them (large channels count more)."""
    if rating.units == "target":
        pairs = [batch_errors(y, net.to_target_units(t)) for y, t in zip(outputs, rating.targets, strict=True)]
    else:
        pairs = [batch_errors(net.to_teacher_units(y), t) for y, t in zip(outputs, rating.targets, strict=True)]
    return np.array(pairs, dtype=np.float64).T


@torch.inference_mode()
def score_naive(net: SupernetBlock, rating: RatingData, candidates: Iterable[str]) -> Errors:
    """One candidate at a time: recalibrate its whole path, then run every rating batch through it."""
    out: Errors = {}
    for cid in candidates:
        path = net.path(cid)
        recalibrate_bn(path, rating.bn_input)
        out[cid] = _errors(net, (path(x) for x in rating.inputs), rating)
    return out


@torch.inference_mode()
def score_prefix(net: SupernetBlock, rating: RatingData, done: Mapping[str, np.ndarray] | None = None,
                 on_group: Callable[[Errors], None] | None = None) -> Errors:
    """Every candidate, each distinct prefix computed once; groups (cell, first op) in ``done`` are skipped.

    ``on_group`` receives each finished group's errors (the unit of checkpointing).
    """
    done = dict(done or {})
    out: Errors = dict(done)
    bn_x = recalibrate_bn(net.stem, rating.bn_input)
    xs = [net.stem(x) for x in rating.inputs]
    for cell, layers in zip(net.block.cells, net.cells, strict=True):
        choices = [layer.choices for layer in cell.layers]
        for first in choices[0]:
            group: Errors = {}
            members = [candidate_id(cell, (first, *rest)) for rest in itertools.product(*choices[1:])]
            if all(cid in done for cid in members):
                continue
            _walk(net, rating, cell, layers, choices, 0, [first], bn_x, xs, (), group)
            out.update(group)
            if on_group is not None:
                on_group(group)
    return out


def _walk(net: SupernetBlock, rating: RatingData, cell: CellSpec, layers: nn.ModuleList,
          choices: Sequence[Sequence[str]], depth: int, ops: Sequence[str], bn_x: torch.Tensor,
          xs: list[torch.Tensor], prefix: tuple[str, ...], out: Errors) -> None:
    """Depth-first over the prefix tree: recalibrate and run each op once for all candidates below it."""
    for op in ops:
        module = layers[depth][op]
        bn_y = recalibrate_bn(module, bn_x)
        ys = [module(x) for x in xs]
        path = (*prefix, op)
        if depth + 1 == len(choices):
            out[candidate_id(cell, path)] = _errors(net, ys, rating)
        else:
            _walk(net, rating, cell, layers, choices, depth + 1, choices[depth + 1], bn_y, ys, path, out)


def layer_evaluations(block: BlockSpec) -> tuple[int, int]:
    """(naive, prefix-shared) module evaluations for all candidates: the speed-up's theoretical limit.

    The stem (block 0) counts as one more shared layer.
    """
    stem = 1 if block.stem is not None else 0
    naive, prefix = 0, stem
    for cell in block.cells:
        sizes = [len(layer.choices) for layer in cell.layers]
        count = math.prod(sizes)
        naive += count * (len(sizes) + stem)
        prefix += sum(math.prod(sizes[:i + 1]) for i in range(len(sizes)))
    return naive, prefix


@torch.inference_mode()
def constant_errors(prediction: torch.Tensor, rating: RatingData, net: SupernetBlock | None = None) -> np.ndarray:
    """Errors of an input-blind predictor (e.g. the per-element train mean): what a block must beat. In "target"
    units, ``net``'s target statistics map prediction and targets there, as ``_errors`` does."""
    units = net.to_target_units if rating.units == "target" and net is not None else (lambda t: t)
    return np.array([batch_errors(units(prediction.expand_as(t)), units(t)) for t in rating.targets],
                    dtype=np.float64).T


def split_half_tau(errors: Errors) -> float:
    """Kendall tau between the score rankings of the first and the second half of the rating batches."""
    matrix = np.stack([e[0] for e in errors.values()])
    half = matrix.shape[1] // 2
    if half == 0 or len(errors) < 2:
        return float("nan")
    return float(kendalltau(matrix[:, :half].mean(1), matrix[:, half:2 * half].mean(1)).statistic)


def score_rows(block: BlockSpec, errors: Errors) -> list[dict[str, float | str]]:
    """The table contract: candidate, score (relative L1), mse, params, flops; in candidate order."""
    rows = []
    for cid in block.candidates():
        e = errors[cid]
        rows.append({"candidate": cid, "score": float(e[0].mean()), "mse": float(e[1].mean())})
    return rows


def summary(rows: Sequence[Mapping[str, float | str]], trivial: np.ndarray, tau: float, rated: int,
            seconds: float) -> dict[str, float]:
    scores = np.array([float(r["score"]) for r in rows])
    return {"candidates": len(rows), "score_best": float(scores.min()), "score_median": float(np.median(scores)),
            "score_worst": float(scores.max()), "score_trivial": float(trivial[0].mean()),
            "mse_trivial": float(trivial[1].mean()), "beat_trivial": float((scores < trivial[0].mean()).mean()),
            "tau_halves": tau, "run/rated": rated, "run/seconds": seconds,
            "run/candidates_per_s": rated / seconds if seconds > 0 else float("nan")}


def plot_scores(block: BlockSpec, rows: Sequence[Mapping[str, float | str]], trivial: float):
    """Histogram of scores and score vs params (counted from the space), with the input-blind baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([float(r["score"]) for r in rows])
    params = np.array([float(candidate_cost(block, str(r["candidate"])).params) for r in rows])
    fig, (hist, scatter) = plt.subplots(1, 2, figsize=(10, 4))
    hist.hist(scores, bins=min(50, max(5, len(scores) // 5)))
    hist.set(xlabel="relative L1 score", ylabel="candidates", title=f"block {block.name}: {len(scores)} candidates")
    scatter.scatter(params / 1e3, scores, s=6)
    scatter.set(xlabel="params (K, student widths)", ylabel="relative L1 score", title="score vs params")
    for ax in (hist, scatter):
        (ax.axvline if ax is hist else ax.axhline)(trivial, color="red", ls="--", label="input-blind mean")
    hist.legend()
    fig.tight_layout()
    return fig


def score_block(net: SupernetBlock, rating: RatingData, partial: Path, key: str) -> tuple[Errors, int, float]:
    """``score_prefix`` with every finished group saved to ``partial`` (resume after a kill).

    ``key`` identifies the supernet weights and rating settings; a partial file with another key is ignored.
    Returns the errors of all candidates, how many were rated in this call, and the seconds it took.
    """
    done: Errors = {}
    if partial.exists():
        state = checkpoint.load(partial, rebuild=f"rm {partial}")
        if state.get("key") == key:
            done = {cid: e.numpy() for cid, e in state["errors"].items()}
            log.info("block %s: resuming from %s, %d/%d candidates already rated", net.block.name, partial,
                     len(done), net.block.num_candidates())
        else:
            log.info("block %s: %s is from other weights or settings; rating from scratch", net.block.name, partial)
    finished = dict(done)

    def save(group: Errors) -> None:
        finished.update(group)
        checkpoint.save(partial, {"key": key, "errors": {c: torch.from_numpy(e) for c, e in finished.items()}})

    start = time.perf_counter()
    errors = score_prefix(net, rating, done=done, on_group=save)
    return errors, len(errors) - len(done), time.perf_counter() - start


def partial_key(weights: Path, score: Mapping[str, Any], seed: int) -> str:
    """Partial results are valid only for the same supernet weights and rating settings."""
    digest = hashlib.sha256(weights.read_bytes())
    digest.update(json.dumps({"score": dict(score), "seed": seed}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The score table the assembly reads, written whole or not at all."""
    with checkpoint.atomic(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
