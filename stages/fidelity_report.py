"""Validation stage `fidelity_report`: per block, how well the supernet scores rank stand-alone trained candidates.

    dvc repro validate/dvc.yaml          # or: python stages/fidelity_report.py fidelity.bootstrap=5000

Reads plots/fidelity/<block>.csv of every block. Writes metrics/fidelity.json (for `dvc metrics show`): per block
Kendall tau of score vs mean stand-alone error with its bootstrap 95% interval, p and Spearman rho, the seed-to-seed
tau, the params proxy's tau, K, epochs and the last-epoch val improvement (convergence); logged to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import cli, fidelity, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.records import write_metrics

TABLES, METRICS = Path("plots/fidelity"), Path("metrics/fidelity.json")
log = logging.getLogger("stages.fidelity_report")


def run(params: Params) -> dict[str, float]:
    root, f = repo_root(), params.fidelity
    per_block = {b: fidelity.block_metrics(fidelity.read_rows(root / TABLES / f"{b}.csv", f.seeds,
                                                              f"dvc repro validate/dvc.yaml:fidelity_train@{b}"),
                                           f.seeds, f.bootstrap, params.seed)
                 for b in params.space.blocks}
    metrics = {f"{b}/{k}": v for b, m in per_block.items() for k, v in m.items()}
    write_metrics(root / METRICS, metrics)
    with tracking.stage_run("fidelity_report", {"fidelity": as_dict(f), "seed": params.seed}, root,
                            params.tracking.experiment):
        tracking.log_metrics(metrics)
    for b, m in per_block.items():
        log.info("block %s: tau %.3f [%.2f, %.2f] (seed-to-seed %.3f, params %.3f) over K=%d, %d epochs, "
                 "last-epoch gain <= %.2f%%", b, m["tau"], m["tau_lo"], m["tau_hi"], m.get("seed_tau", float("nan")),
                 m["params_tau"], m["k"], m["epochs"], 100 * m["last_gain_max"])
    return metrics


if __name__ == "__main__":
    cli.main(run)
