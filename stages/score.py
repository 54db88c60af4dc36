"""DVC stage `score@bN`: rate every candidate of block N (DNA Sec. 3.3) on the val split's teacher features (cached,
or computed by the teacher as they are read when the cache stage chose cache.mode=online).

    python stages/score.py block=b1 [key=value ...]

Writes ``search.scores_dir``/<block>.csv (candidate, score, mse: the table the assembly reads; costs come from the
``costs`` stage) and metrics/score/<block>.json. Finished groups of candidates are kept in <block>.resume.pt beside it
while the stage runs, so a killed run does not rate them again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import cli, runtime, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.features import open_features
from pipeline.records import write_metrics
from pipeline.scoring import (
    constant_errors,
    load_rating_data,
    partial_key,
    plot_scores,
    score_block,
    score_rows,
    split_half_tau,
    summary,
    write_table,
)
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks
from pipeline.supernet import (
    BlockData,
    SupernetBlock,
    checkpoint_path,
    feature_keys,
    feature_moments,
    fingerprint,
    load_trained,
)

FEATURES, TEACHER, PREPARED = Path("artifacts/features"), Path("artifacts/teacher"), Path("data/prepared")
METRICS_DIR = Path("metrics/score")
log = logging.getLogger("stages.score")


def run(params: Params, block: str) -> dict[str, float]:
    root = repo_root()
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS)).block(block)
    device = runtime.select_device(params.runtime)
    in_key, target_key = feature_keys(list(params.space.blocks), block)
    cache = open_features(root / FEATURES, teacher_dir=root / TEACHER, prepared_dir=root / PREPARED, device=device,
                          upto=target_key, channels_last=params.runtime.channels_last)
    weights = checkpoint_path(root, block)
    net = SupernetBlock(spec)
    load_trained(weights, net, fingerprint(params, block, cache), rebuild=f"dvc repro supernet@{block}")
    net = runtime.to_device_model(net, device, params.runtime.channels_last)
    rating = load_rating_data(BlockData(cache, in_key, target_key), params.score, params.seed, device,
                              params.runtime.channels_last)
    # DNA ranking lesson: a block must beat a predictor that ignores its input (the per-element train mean)
    trivial = constant_errors(feature_moments(cache, "train", target_key)["element_mean"].to(device), rating, net)
    table = root / params.search.scores_dir / f"{block}.csv"
    partial = table.with_name(f"{table.stem}.resume.pt")
    key = partial_key(weights, as_dict(params.score), params.seed)
    tracked = {"space": as_dict(params.space), "score": as_dict(params.score), "seed": params.seed}
    with tracking.stage_run("score", tracked, root, params.tracking.experiment, block=block):
        errors, rated, seconds = score_block(net, rating, partial, key)
        rows = score_rows(spec, errors)
        stats = summary(rows, trivial, split_half_tau(errors), rated, seconds)
        write_table(table, rows)
        tracking.log_metrics({f"score/{k}": v for k, v in stats.items()})
        _log_figure(plot_scores(spec, rows, stats["score_trivial"]), f"scores_{block}.png")
    write_metrics(root / METRICS_DIR / f"{block}.json", stats)
    partial.unlink(missing_ok=True)
    log.info("block %s: %d candidates, score best %.4f median %.4f worst %.4f (input-blind %.4f), "
             "split-half tau %.3f, %.1f candidates/s", block, len(rows), stats["score_best"], stats["score_median"],
             stats["score_worst"], stats["score_trivial"], stats["tau_halves"], stats["run/candidates_per_s"])
    return stats


def _log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_figure(fig, name)
    plt.close(fig)


if __name__ == "__main__":
    cli.main_block(run)
