"""Validation stage `validate_report`: how well the block scores rank stand-alone accuracy, beside the SPOS baseline,
the NASWOT zero-cost proxy and the size proxies, and the searched network against random ones of the same budget.

    dvc repro validate/dvc.yaml          # or: python stages/validate_report.py validate.bootstrap=5000

Reads artifacts/validate/archs.json, every unit's result under artifacts/validate/runs/ (wherever it was trained:
a unit missing there fails in one line naming it), artifacts/validate/spos/ and artifacts/validate/proxy.csv.
Writes metrics/validate.json (for `dvc metrics show`) and artifacts/validate/report/ (report.md + scatter.png,
readable offline); both are logged to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from pipeline import checkpoint, cli, tracking, validation
from pipeline.config import Params, as_dict, repo_root

OUT, METRICS = Path("artifacts/validate"), Path("metrics/validate.json")
REPORT = OUT / "report"
TRAIN = "dvc repro validate/dvc.yaml:validate_train"
SPOS, PROXY = "dvc repro validate/dvc.yaml:validate_spos", "dvc repro validate/dvc.yaml:validate_proxy"
log = logging.getLogger("stages.validate_report")


def run(params: Params) -> dict[str, float]:
    root, v = repo_root(), params.validate
    archs = validation.read_sampled(root / OUT / "archs.json")
    by_seed = validation.gather(validation.jobs(archs, params, root), v.shard, TRAIN)
    rated = {"spos": validation.read_rated(root / OUT / "spos/ratings.csv", archs, "acc", SPOS),
             "naswot": validation.read_rated(root / OUT / "proxy.csv", archs, "naswot", PROXY)}
    compute = checkpoint.read_json(root / OUT / "spos/summary.json", SPOS)
    metrics, rows = validation.report_metrics(archs, by_seed, v.seeds, v.bootstrap, params.seed, rated)
    metrics.update({"spos/compute_ratio": float(compute["compute_ratio"]), "spos/images": float(compute["images"])})
    (root / REPORT).mkdir(parents=True, exist_ok=True)
    validation.plot(root / REPORT / "scatter.png", rows, params.search.metric)
    (root / REPORT / "report.md").write_text(validation.report_markdown(metrics, rows, v, params.search.metric))
    validation.write_json(root / METRICS, metrics)
    with tracking.stage_run("validate_report", {"validate": as_dict(v), "seed": params.seed}, root,
                            params.tracking.experiment):
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(root / REPORT), "validate")
    log.info("tau: DNA %.3f, SPOS %.3f, NASWOT %.3f, params %.3f; searched %.4f vs random %.4f +- %.4f",
             metrics["all/dna_score/tau"], metrics["all/spos/tau"], metrics["all/naswot/tau"],
             metrics["all/params/tau"], metrics["budget/searched/acc"], metrics["budget/random/mean"],
             metrics["budget/random/std"])
    return metrics


if __name__ == "__main__":
    cli.main(run)
