"""Validation stage `validate_report`: how well the block scores rank stand-alone accuracy, and the searched network
against random ones of the same budget.

    dvc repro validate/dvc.yaml          # or: python stages/validate_report.py validate.bootstrap=5000

Reads artifacts/validate/archs.json and results.csv. Writes metrics/validate.json (for `dvc metrics show`) and
artifacts/validate/report/ (report.md + scatter.png, readable offline); both are logged to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from pipeline import cli, tracking, validation
from pipeline.config import Params, as_dict, repo_root

OUT, METRICS = Path("artifacts/validate"), Path("metrics/validate.json")
REPORT = OUT / "report"
TRAIN = "dvc repro validate/dvc.yaml:validate_train"
log = logging.getLogger("stages.validate_report")


def run(params: Params) -> dict[str, float]:
    root, v = repo_root(), params.validate
    archs = validation.read_sampled(root / OUT / "archs.json")
    by_seed = validation.read_results(root / OUT / "results.csv", archs, v.seeds, TRAIN)
    metrics, rows = validation.report_metrics(archs, by_seed, v.seeds, v.bootstrap, params.seed)
    (root / REPORT).mkdir(parents=True, exist_ok=True)
    validation.plot(root / REPORT / "scatter.png", rows, params.search.metric)
    (root / REPORT / "report.md").write_text(validation.report_markdown(metrics, rows, v, params.search.metric))
    validation.write_json(root / METRICS, metrics)
    with tracking.stage_run("validate_report", {"validate": as_dict(v), "seed": params.seed}, root,
                            params.tracking.experiment):
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(root / REPORT), "validate")
    log.info("tau %.3f (params %.3f), searched %.4f vs random %.4f +- %.4f", metrics["all/dna_score/tau"],
             metrics["all/params/tau"], metrics["budget/searched/acc"], metrics["budget/random/mean"],
             metrics["budget/random/std"])
    return metrics


if __name__ == "__main__":
    cli.main(run)
