"""Block-level fidelity of the supernet scores: do a block's weight-shared scores rank its candidates the way
stand-alone training does? (DNA, Li et al., CVPR 2020, Sec. 3.3 claims they do; its ranking figure compares
whole networks, this checks each block alone, where no retraining recipe adds noise.)

Per block, ``draw`` picks K candidates spread over the score table (one from each of K equal-count bins of the
score order, seeded). Each candidate x seed is a unit (``train_unit``): the candidate alone with fresh weights,
trained on the same cached input and target features with the supernet's own loop, loss, optimizer and target
standardisation (``train_block`` on the block narrowed to that one path), then rated by the score stage's own code
(``score_naive`` + ``score_rows``: BN recalibrated on the same fixed train batch, relative L1 on the same val
batches), so error and score share metric and units. A unit's result is reused only under the same fingerprint.
``block_metrics`` ranks the scores against the mean stand-alone error (Kendall tau, bootstrap interval) beside
the seed-to-seed tau of the errors (the noise ceiling: ranking-lessons 1-2) and the params proxy (lesson 3).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from pipeline import records, runtime
from pipeline.assembly import read_table
from pipeline.checkpoint import ArtifactError, atomic
from pipeline.config import ConfigError, Params, Supernet, as_dict, block_supernet
from pipeline.scoring import RatingData, load_rating_data, score_naive, score_rows
from pipeline.space import BlockSpec
from pipeline.supernet import (
    BlockCheckpoint,
    BlockData,
    Features,
    SupernetBlock,
    feature_keys,
    feature_moments,
    fingerprint,
    train_block,
)
from pipeline.validation import rank_quality

log = logging.getLogger(__name__)
RESULT, CHECKPOINT = "result.json", "checkpoint.pt"


# ---------------------------------------------------------------------------------------------------- drawing
def read_scores(path: Path, block: BlockSpec, rebuild: str) -> dict[str, float]:
    """The block's score table as {candidate: score}; missing, malformed or from another space: one line."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: build it with `{rebuild}`")
    table = read_table(path)
    if set(table.candidates) != set(block.candidates()):
        raise ArtifactError(f"{path} rates {len(table.candidates)} candidates, not the {block.num_candidates()} of "
                            f"block {block.name} in this space: rebuild it with `{rebuild}`")
    return dict(zip(table.candidates, table.score.tolist(), strict=True))


def draw(scores: Mapping[str, float], k: int, seed: int, block: BlockSpec) -> list[str]:
    """``k`` candidates, one drawn from each of ``k`` equal-count bins of the score order (best bin first), so the
    best and the worst bins are always represented. Seeded by (seed, block index)."""
    if not 2 <= k <= len(scores):
        raise ConfigError(f"params key 'fidelity.candidates' = {k} is invalid: block {block.name} has "
                          f"{len(scores)} candidates, choose 2..{len(scores)}")
    order = sorted(scores, key=lambda cid: (scores[cid], cid))
    rng = np.random.default_rng([seed, block.index])
    return [order[int(rng.choice(part))] for part in np.array_split(np.arange(len(order)), k)]


# ---------------------------------------------------------------------------------------------------- units
def single_path(block: BlockSpec, cid: str) -> BlockSpec:
    """``block`` narrowed to one cell with one op per layer: a ``SupernetBlock`` of it is the candidate alone
    (fresh weights, nothing shared), and ``train_block`` / ``score_naive`` treat it exactly like the supernet."""
    cell, ops = block.parse(cid)
    layers = tuple(replace(layer, choices=(op,)) for layer, op in zip(cell.layers, ops, strict=True))
    return replace(block, cells=(replace(cell, index=0, layers=layers),))


def unit_recipe(params: Params, block: str) -> Supernet:
    """The supernet's recipe (optimizer, decay, batch, loss, target_norm) with the check's lr, epochs and samples;
    one path, so one val path. The lr is the check's own (``fidelity.lr``) unless 0: a ground truth that moved
    with every supernet lr tried could not compare the tries."""
    f, own = params.fidelity, block_supernet(params, block)
    return replace(own, lr=f.lr or own.lr, epochs=f.epochs, train_samples=f.train_samples, val_paths=1)


@dataclass(frozen=True)
class BlockSetup:
    """What every unit of a block shares: the data, the rating set, the recipe and where units live."""

    block: BlockSpec
    data: BlockData
    rating: RatingData
    cfg: Supernet
    loop: runtime.Loop  # its seed is the check's base seed; unit k trains with base + k
    target_stats: tuple[torch.Tensor, torch.Tensor] | None  # per-channel (mean, std) when supernet.target_norm
    training_ids: tuple[str, ...]  # per seed index: supernet.fingerprint of the unit recipe and that seed
    rating_id: str  # what the rating depends on: score params and the seed that draws the BN batch
    out_dir: Path
    rebuild: str

    def unit_dir(self, cid: str, k: int) -> Path:
        return self.out_dir / cid.replace(":", ".") / f"seed{k}"

    def unit_fingerprint(self, cid: str, k: int) -> str:
        """Everything a unit's result depends on: params, code and features of training, candidate, seed, rating."""
        identity = {"training": self.training_ids[k], "candidate": cid, "rating": self.rating_id}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def setup_block(params: Params, block: BlockSpec, cache: Features, device: torch.device, out_dir: Path,
                rebuild: str) -> BlockSetup:
    """Read the block's rating set and target statistics once for all its units."""
    in_key, target_key = feature_keys(list(params.space.blocks), block.name)
    data = BlockData(cache, in_key, target_key)
    cfg = unit_recipe(params, block.name)
    moments = feature_moments(cache, "train", target_key) if cfg.target_norm else None
    rating = load_rating_data(data, params.score, params.seed, device, params.runtime.channels_last)
    ids = tuple(fingerprint(replace(params, seed=params.seed + k, supernet=cfg), block.name, cache)
                for k in range(params.fidelity.seeds))
    rating_id = json.dumps({"score": as_dict(params.score), "seed": params.seed}, sort_keys=True)
    return BlockSetup(block, data, rating, cfg, runtime.loop_for(params.runtime, device, params.seed, progress=False),
                      None if moments is None else (moments["channel_mean"], moments["channel_std"]), ids,
                      rating_id, out_dir, rebuild)


def finished(setup: BlockSetup, cid: str, k: int) -> dict[str, Any] | None:
    """The unit's result if it was made under the same fingerprint (a changed setting retrains it)."""
    try:
        result = json.loads((setup.unit_dir(cid, k) / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("fingerprint") == setup.unit_fingerprint(cid, k) else None


def train_unit(setup: BlockSetup, cid: str, k: int) -> dict[str, Any]:
    """Train candidate ``cid`` alone with seed base + ``k`` (resuming its per-epoch checkpoint), rate it like the
    score stage, write result.json atomically and drop the checkpoint. A finished unit is returned as is."""
    done = finished(setup, cid, k)
    if done is not None:
        return done
    out, unit = setup.unit_dir(cid, k), setup.unit_fingerprint(cid, k)
    seed = setup.loop.seed + k
    start = time.perf_counter()
    runtime.seed_everything(seed)  # the fresh weights
    spec = single_path(setup.block, cid)
    net = SupernetBlock(spec)
    if setup.target_stats is not None:
        net.set_target_stats(*setup.target_stats)
    history = train_block(net, setup.data, setup.cfg, replace(setup.loop, seed=seed),
                          BlockCheckpoint(out / CHECKPOINT, unit, setup.rebuild))
    rated = score_rows(spec, score_naive(net, setup.rating, [cid]))[0]
    val = [float(h["val_loss"]) for h in history]
    result = {"block": setup.block.name, "candidate": cid, "seed": seed, "fingerprint": unit,
              "error": float(rated["score"]), "mse": float(rated["mse"]),
              "params": float(sum(p.numel() for p in net.parameters())), "epochs": len(history),
              "last_gain": (val[-2] - val[-1]) / val[-2] if len(val) > 1 else math.nan,
              "history": [{"epoch": int(h["epoch"]), "train_loss": float(h["train_loss"]), "val_loss": v}
                          for h, v in zip(history, val, strict=True)],
              "run/seconds": time.perf_counter() - start}
    with atomic(out / RESULT) as tmp:
        tmp.write_text(json.dumps(records.results(result), indent=2) + "\n")
    (out / CHECKPOINT).unlink(missing_ok=True)  # the result is what the report needs
    return result


# ---------------------------------------------------------------------------------------------------- tables
def block_rows(drawn: Sequence[str], scores: Mapping[str, float], results: Mapping[tuple[str, int], Mapping],
               seeds: int) -> list[dict[str, Any]]:
    """One row per drawn candidate: supernet score, mean stand-alone error (and per seed), size, convergence."""
    rows = []
    for cid in drawn:
        units = [results[(cid, k)] for k in range(seeds)]
        rows.append({"candidate": cid, "score": float(scores[cid]), "error": float(np.mean([u["error"] for u in units])),
                     "mse": float(np.mean([u["mse"] for u in units])), "params": units[0]["params"],
                     "epochs": min(u["epochs"] for u in units), "last_gain": max(u["last_gain"] for u in units),
                     **{f"error_seed{k}": u["error"] for k, u in enumerate(units)}})
    return rows


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path, seeds: int, rebuild: str) -> list[dict[str, Any]]:
    """A block's table as written by ``write_rows``, with ``seeds`` per-seed errors in every row."""
    needed = ["candidate", "score", "error", "params", "epochs", "last_gain", *(f"error_seed{k}" for k in range(seeds))]
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        out = [{"candidate": r["candidate"], **{c: float(r[c]) for c in needed[1:]}} for r in rows]
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: build it with `{rebuild}`") from None
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path} is unreadable or lacks a column of {', '.join(needed)} ({type(err).__name__}: "
                            f"{err}; fidelity.seeds={seeds}): rebuild it with `{rebuild}`") from None
    if len(out) < 2:
        raise ArtifactError(f"{path} holds {len(out)} candidate(s), a ranking needs 2: rebuild it with `{rebuild}`")
    return out


# ---------------------------------------------------------------------------------------------------- statistics
def seed_tau(errors: np.ndarray) -> float:
    """Mean Kendall tau between the stand-alone errors of every pair of seeds (columns): the ground truth's
    agreement with itself, the ceiling for any predictor's tau."""
    taus = [stats.kendalltau(errors[:, a], errors[:, b]).statistic
            for a, b in itertools.combinations(range(errors.shape[1]), 2)]
    return float(np.nan_to_num(np.mean(taus))) if taus else math.nan


def block_metrics(rows: Sequence[Mapping[str, Any]], seeds: int, resamples: int, seed: int) -> dict[str, float]:
    """Kendall tau of the supernet score against the mean stand-alone error (both lower = better), its p-value,
    bootstrap 95% interval and Spearman rho; the params proxy and the score-minus-params interval; the seed-to-seed
    tau; K, epochs and the largest / median last-epoch relative val improvement (near 0 = converged)."""
    score, error, params = (np.array([float(r[c]) for r in rows]) for c in ("score", "error", "params"))
    q = rank_quality(-error, {"score": -score, "params": params}, resamples, seed)
    gains = np.array([float(r["last_gain"]) for r in rows])
    out = {"k": float(len(rows)), "tau": q["score/tau"], "tau_lo": q["score/tau_lo"], "tau_hi": q["score/tau_hi"],
           "tau_p": q["score/tau_p"], "rho": q["score/rho"], "params_tau": q["params/tau"],
           "score_minus_params_lo": q["score/minus_params_lo"], "score_minus_params_hi": q["score/minus_params_hi"],
           "epochs": float(min(float(r["epochs"]) for r in rows)), "last_gain_max": float(gains.max()),
           "last_gain_median": float(np.median(gains)), "score_mean": float(score.mean()),
           "error_mean": float(error.mean())}
    if seeds >= 2:
        out["seed_tau"] = seed_tau(np.array([[float(r[f"error_seed{k}"]) for k in range(seeds)] for r in rows]))
    return {k: float(np.nan_to_num(v)) for k, v in out.items()}
