"""DVC stage `assemble`: score and cost tables -> the best architecture under the budget and limits, the Pareto
front, its figure.

Reads the score tables (``search.scores_dir``/<block>.csv) and, with ``search.fixed_cost: null``, every cost from
the ``costs`` stage (``costs.out_dir``: counted ones, and latencies measured on this machine) together with the
fixed parts' and the teacher's; writes ``search.out_dir``/architecture.json, pareto.csv and pareto.png (see
pipeline.assembly). A number for ``search.fixed_cost`` makes the stage work on any tables with their own cost
columns (``candidate,score,params,flops``):

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
    prob = assembly.problem(params, assembly.read_tables(root / s.scores_dir), root)
    result = assembly.assemble(prob, s)  # checks the budget and limits before anything is tracked or written
    tracked = {"search": as_dict(s), "seed": params.seed}
    if s.fixed_cost is None:
        tracked.update(space=as_dict(params.space), costs_fingerprint=prob.fingerprint)
    with tracking.stage_run("assemble", tracked, root, params.tracking.experiment):
        if s.method == "optuna":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise; MLflow has them
            storage = s.storage if not s.storage or "://" in s.storage else str(root / s.storage)
            logger = assembly.MlflowTrialLogger([t.name for t in prob.tables], [t.candidates for t in prob.tables])
            result = assembly.add_optuna(result, replace(s, storage=storage), params.seed, [logger])
        content = assembly.summary(result, s)
        paths = assembly.write_outputs(root / s.out_dir, result, content)
        metrics = {"search/score": content["score"], **{f"search/{m}": content[m] for m in prob.fixed},
                   "search/front_points": len(result.front.cost), "run/exact_seconds": result.exact_seconds}
        if result.optuna is not None:
            metrics.update({"search/exact_score": result.exact.score, "search/optuna_gap": content["optuna"]["gap"]})
        tracking.log_metrics(metrics)
        for path in paths:
            mlflow.log_artifact(str(path))
    log.info("chose %s: score %.6f, %s %g (budget %s, limits %s)", content["candidates"], content["score"], s.metric,
             result.chosen.cost, prob.budget or "none", prob.limits or "none")


if __name__ == "__main__":
    cli.main(run)
