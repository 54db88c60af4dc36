"""DVC stage `assemble`: score tables -> the best architecture under the budget, the Pareto front, its figure.

Reads every ``block_*.csv`` of ``search.scores_dir`` and writes ``search.out_dir``/architecture.json,
pareto.csv and pareto.png (see pipeline.assembly). With ``search.fixed_cost: null`` the fixed parts'
costs, the candidate ids and the timm arch strings come from the search space (the teacher's
blocks.json); a number instead makes the stage work on any tables:

    python stages/assemble.py search.scores_dir=DIR search.out_dir=OUT search.metric=params \
        search.budget=N search.method=exact search.fixed_cost=0
"""

from __future__ import annotations

import logging
from dataclasses import replace

import mlflow

from pipeline import assembly, cli, tracking
from pipeline.config import Params, as_dict, repo_root

log = logging.getLogger("stages.assemble")


def run(params: Params) -> None:
    root, s = repo_root(), params.search
    tables, fixed, arch = assembly.link_space(params, assembly.read_tables(root / s.scores_dir), root)
    result = assembly.assemble(tables, s, fixed)  # checks the budget before anything is tracked or written
    tracked = {"search": as_dict(s), "seed": params.seed}
    if s.fixed_cost is None:
        tracked["space"] = as_dict(params.space)
    with tracking.stage_run("assemble", tracked, root, params.tracking.experiment):
        if s.method == "optuna":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise; MLflow has them
            storage = s.storage if not s.storage or "://" in s.storage else str(root / s.storage)
            logger = assembly.MlflowTrialLogger([t.name for t in tables], [t.candidates for t in tables])
            result = assembly.add_optuna(result, replace(s, storage=storage), params.seed, [logger])
        content = assembly.summary(result, arch)
        paths = assembly.write_outputs(root / s.out_dir, result, content)
        metrics = {"search/score": content["score"], "search/params": content["params"],
                   "search/flops": content["flops"], "search/front_points": len(result.front.cost),
                   "search/exact_seconds": result.exact_seconds}
        if result.optuna is not None:
            metrics.update({"search/exact_score": result.exact.score, "search/optuna_gap": content["optuna"]["gap"]})
        tracking.log_metrics(metrics)
        for path in paths:
            mlflow.log_artifact(str(path))
    log.info("chose %s: score %.6f, %s %g (budget %s)", content["candidates"], content["score"], s.metric,
             result.chosen.cost, s.budget or "none")


if __name__ == "__main__":
    cli.main(run)
