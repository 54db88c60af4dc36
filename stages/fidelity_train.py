"""Validation stage `fidelity_train@bN`: K candidates of block N, each trained stand-alone, rated like its score.

    dvc repro validate/dvc.yaml:fidelity_train@b1      # or: python stages/fidelity_train.py block=b1 fidelity.epochs=4

Reads the block's score table, the feature cache and blocks.json. Draws fidelity.candidates candidates over the
score range; each candidate x seed is a resumable unit in artifacts/fidelity/runs/<block>/<candidate>/seed<k>/
(per-epoch checkpoint while it trains, result.json when done), so an interrupted stage continues where it stopped
and a changed setting retrains only what it affects. Writes plots/fidelity/<block>.csv (one row per candidate:
supernet score, stand-alone error per seed and mean, params, last-epoch val improvement); MLflow gets the stage's
run and one child run per trained unit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

from pipeline import cli, fidelity, runtime, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.features import open_features
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

FEATURES, RUNS, TABLES = Path("artifacts/features"), Path("artifacts/fidelity/runs"), Path("plots/fidelity")
TEACHER, PREPARED = Path("artifacts/teacher"), Path("data/prepared")  # the online teacher's inputs (cache.mode)
log = logging.getLogger("stages.fidelity_train")


def run(params: Params, block: str) -> list[dict[str, Any]]:
    root, f = repo_root(), params.fidelity
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS)).block(block)
    scores = fidelity.read_scores(root / params.search.scores_dir / f"{block}.csv", spec, f"dvc repro score@{block}")
    drawn = fidelity.draw(scores, f.candidates, params.seed, spec)  # a bad K fails here, before any training
    device = runtime.select_device(params.runtime)
    features = open_features(root / FEATURES, teacher_dir=root / TEACHER, prepared_dir=root / PREPARED,
                             device=device, upto=block, channels_last=params.runtime.channels_last)
    setup = fidelity.setup_block(params, spec, features, device, root / RUNS / block,
                                 f"dvc repro validate/dvc.yaml:fidelity_train@{block}")
    units = [(cid, k) for cid in drawn for k in range(f.seeds)]
    results = {u: fidelity.finished(setup, *u) for u in units}
    pending = [u for u in units if results[u] is None]
    log.info("block %s: %d of %d units to train (%d already done)", block, len(pending), len(units),
             len(units) - len(pending))
    tracked = {"fidelity": as_dict(f), "supernet": as_dict(setup.cfg), "score": as_dict(params.score),
               "space": as_dict(params.space), "seed": params.seed}
    with tracking.stage_run("fidelity_train", tracked, root, params.tracking.experiment, block=block):
        for i, (cid, k) in enumerate(pending, 1):
            result = results[(cid, k)] = fidelity.train_unit(setup, cid, k)
            _log_unit(result, scores[cid])
            log.info("block %s %s seed %d: error %.4f (score %.4f), last-epoch gain %.2f%%, %.0f s (%d/%d)", block,
                     cid, k, result["error"], scores[cid], 100 * result["last_gain"], result["run/seconds"], i,
                     len(pending))
        rows = fidelity.block_rows(drawn, scores, results, f.seeds)
        fidelity.write_rows(root / TABLES / f"{block}.csv", rows)
        tracking.log_metrics({"units": len(units), "run/trained": len(pending),
                              "run/unit_seconds": sum(results[u].get("run/seconds", 0.0) for u in pending)})
    return rows


def _log_unit(result: dict[str, Any], score: float) -> None:
    """A child run per trained unit: candidate, seed, its supernet score, stand-alone error and val curve."""
    with mlflow.start_run(run_name=f"{result['candidate']}/seed{result['seed']}", nested=True):
        mlflow.log_params({"candidate": result["candidate"], "seed": result["seed"]})
        tracking.log_metrics({"score": score, "error": result["error"], "mse": result["mse"],
                              "params": result["params"], "last_gain": result["last_gain"],
                              "run/seconds": result["run/seconds"]})
        for row in result["history"]:
            tracking.log_metrics({"train/loss": row["train_loss"], "val/loss": row["val_loss"]}, step=row["epoch"])


if __name__ == "__main__":
    cli.main_block(run)
