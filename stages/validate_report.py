"""Validation stage `validate_report`: how well the block scores rank stand-alone accuracy, and the searched network
against random ones of the same budget.

    dvc repro validate/dvc.yaml          # or: python stages/validate_report.py validate.bootstrap=5000

Reads artifacts/validate/archs.json and results.csv. Writes metrics/validate.json (for `dvc metrics show`) and
artifacts/validate/report/ (report.md + scatter.png, readable offline); both are logged to MLflow.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from scipy import stats

from pipeline import cli, tracking, validation
from pipeline.checkpoint import ArtifactError
from pipeline.config import Params, as_dict, repo_root

OUT, METRICS = Path("artifacts/validate"), Path("metrics/validate.json")
REPORT = OUT / "report"
TRAIN = "dvc repro validate/dvc.yaml:validate_train"
log = logging.getLogger("stages.validate_report")


def run(params: Params) -> dict[str, float]:
    root, v = repo_root(), params.validate
    archs = validation.read_sampled(root / OUT / "archs.json")
    by_seed = _read_results(root / OUT / "results.csv", archs, v.seeds)
    rows = [{**a.as_json(), "val_acc": float(np.mean(by_seed[a.name]["val_acc"])),
             "val_loss": float(np.mean(by_seed[a.name]["val_loss"]))} for a in archs]
    truth = np.array([r["val_acc"] for r in rows])
    predictors = {"dna_score": -np.array([a.score for a in archs]),  # lower error = better
                  "params": np.array([a.params for a in archs]), "flops": np.array([a.flops for a in archs])}
    metrics = {f"all/{k}": x for k, x in validation.rank_quality(truth, predictors, v.bootstrap, params.seed).items()}
    loss_truth = -np.array([r["val_loss"] for r in rows])  # a smoother ground truth than accuracy (lower = better)
    metrics.update({f"loss/{name}/tau": float(stats.kendalltau(p, loss_truth).statistic)
                    for name, p in predictors.items()})
    block_scores = -np.array([a.block_scores for a in archs])  # which block's score carries the ranking
    metrics.update({f"block/{i}/dna_score/tau": float(stats.kendalltau(column, truth).statistic)
                    for i, column in enumerate(block_scores.T)})
    subsets = {"stratified": ("stratified",), "at_budget": ("random", "searched")}
    for subset, kinds in subsets.items():
        keep = np.array([a.kind in kinds for a in archs])
        for name, p in predictors.items():
            metrics[f"{subset}/{name}/tau"] = float(stats.kendalltau(p[keep], truth[keep]).statistic)
    if v.seeds >= 2:  # the noise ceiling: a ranking cannot agree with the ground truth better than it agrees with itself
        first, second = (np.array([by_seed[a.name]["val_acc"][k] for a in archs]) for k in (0, 1))
        metrics["noise/seed_tau"] = float(stats.kendalltau(first, second).statistic)
        metrics["noise/mean_abs_diff"] = float(np.abs(first - second).mean())
    metrics.update({f"budget/{k}": x for k, x in validation.at_budget(
        {r["name"]: r["val_acc"] for r in rows}, {a.name: a.kind for a in archs}).items()})
    metrics = {k: float(np.nan_to_num(x)) for k, x in metrics.items()}
    (root / REPORT).mkdir(parents=True, exist_ok=True)
    validation.plot(root / REPORT / "scatter.png", rows, params.search.metric)
    (root / REPORT / "report.md").write_text(_markdown(metrics, rows, params))
    validation.write_json(root / METRICS, metrics)
    with tracking.stage_run("validate_report", {"validate": as_dict(v), "seed": params.seed}, root,
                            params.tracking.experiment):
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(root / REPORT), "validate")
    log.info("tau %.3f (params %.3f), searched %.4f vs random %.4f +- %.4f", metrics["all/dna_score/tau"],
             metrics["all/params/tau"], metrics["budget/searched/acc"], metrics["budget/random/mean"],
             metrics["budget/random/std"])
    return metrics


def _read_results(path: Path, archs: list[validation.Sampled], seeds: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"val_acc": [per seed], "val_loss": [per seed]}}; every drawn architecture needs ``seeds`` results."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        by_seed: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"val_acc": [], "val_loss": []})
        for row in sorted(rows, key=lambda r: int(r["seed"])):
            for key in ("val_acc", "val_loss"):
                by_seed[row["name"]][key].append(float(row[key]))
    except (OSError, KeyError, ValueError) as err:
        raise ArtifactError(f"{path} is missing or unreadable ({err}): rebuild it with `{TRAIN}`") from None
    short = [a.name for a in archs if len(by_seed[a.name]["val_acc"]) < seeds]
    if short:
        raise ArtifactError(f"{path} lacks results for {', '.join(short)} ({seeds} seed(s) each): run `{TRAIN}`")
    return {a.name: {k: x[:seeds] for k, x in by_seed[a.name].items()} for a in archs}


def _markdown(m: dict[str, float], rows: list[dict[str, Any]], params: Params) -> str:
    v, metric = params.validate, params.search.metric
    r = v.train
    lines = [
        "# Does the search work? Block scores vs stand-alone accuracy", "",
        f"{len(rows)} architectures from the searched space ({v.stratified} spread over the {metric} range, "
        f"{v.random} random within {v.window:.0%} below the budget, the searched one), each trained stand-alone "
        f"{v.seeds} time(s) for {r.epochs} epoch(s) ({r.opt}, lr {r.lr}, {v.train_limit or 'all'} train images); "
        "ground truth = best-epoch val accuracy (mean over seeds).", "",
        "## Ranking quality (all architectures)", "",
        "| predictor | Kendall tau | 95% bootstrap | p | Spearman rho |", "|---|---:|---:|---:|---:|"]
    for name in ("dna_score", "params", "flops"):
        lines.append(f"| {name} | {m[f'all/{name}/tau']:.3f} | [{m[f'all/{name}/tau_lo']:.2f}, "
                     f"{m[f'all/{name}/tau_hi']:.2f}] | {m[f'all/{name}/tau_p']:.3g} | {m[f'all/{name}/rho']:.3f} |")
    lines += ["", f"Against val loss instead of accuracy (smoother): tau {m['loss/dna_score/tau']:.3f} (params "
              f"{m['loss/params/tau']:.3f}, FLOPs {m['loss/flops/tau']:.3f})."]
    blocks = sorted(int(k.split("/")[1]) for k in m if k.startswith("block/"))
    lines += ["", "Each block's score alone against accuracy (block index: tau): "
              + ", ".join(f"{i}: {m[f'block/{i}/dna_score/tau']:.2f}" for i in blocks) + "."]
    lines += ["", f"DNA score minus params tau, 95% paired bootstrap: [{m['all/dna_score/minus_params_lo']:.2f}, "
              f"{m['all/dna_score/minus_params_hi']:.2f}] (an interval above 0 = the score ranks better than size).",
              "", f"Within the stratified set: tau {m['stratified/dna_score/tau']:.3f} (params "
              f"{m['stratified/params/tau']:.3f}); at the budget (random + searched, size held ~fixed): tau "
              f"{m['at_budget/dna_score/tau']:.3f} (params {m['at_budget/params/tau']:.3f})."]
    if "noise/seed_tau" in m:
        lines += ["", f"Noise ceiling: two training seeds agree at tau {m['noise/seed_tau']:.3f} (mean |difference| "
                  f"{100 * m['noise/mean_abs_diff']:.2f} points)."]
    lines += ["", "## Searched network vs random ones at the same budget", "",
              f"searched {100 * m['budget/searched/acc']:.2f}% vs random {100 * m['budget/random/mean']:.2f} "
              f"+- {100 * m['budget/random/std']:.2f}% (best {100 * m['budget/random/max']:.2f}%); the searched "
              f"network ranks {m['budget/searched/rank']:.0f} of {m['budget/random/n'] + 1:.0f}.", "",
              "![score and size vs accuracy](scatter.png)", "", "## Architectures", "",
              "| name | kind | params | FLOPs | score | val acc | candidates |", "|---|---|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda x: x["score"]):
        lines.append(f"| {row['name']} | {row['kind']} | {row['params']:,.0f} | {row['flops']:,.0f} | "
                     f"{row['score']:.4f} | {100 * row['val_acc']:.2f} | {' '.join(row['candidates'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.main(run)
