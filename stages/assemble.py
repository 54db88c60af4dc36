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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow

from pipeline import assembly, cli, tracking
from pipeline.config import Params, as_dict, repo_root

log = logging.getLogger("stages.assemble")


def link_space(params: Params, tables: list[assembly.BlockTable], root: Path) -> tuple[
        list[assembly.BlockTable], dict[str, float], Callable[[dict[str, str]], Any] | None]:
    """(tables, fixed parts' cost per metric, arch-string builder or None) for the configured fixed cost.

    An explicit ``search.fixed_cost`` is the searched metric's; the other metric's total then counts the
    blocks only (raw tables carry no fixed parts).
    """
    s = params.search
    if s.fixed_cost is not None:
        return tables, {m: s.fixed_cost if m == s.metric else 0.0 for m in assembly.METRICS}, None
    from pipeline import space  # torch and timm: only when the space is needed

    spec = space.build_space(params.space, space.load_teacher_split(root / space.TEACHER_SPLIT))
    cost = space.fixed_parts_cost(spec)
    return (assembly.match_space(tables, spec), {"params": float(cost.params), "flops": float(cost.flops)},
            lambda choice: space.arch_def(spec, choice))


def run(params: Params) -> None:
    root, s = repo_root(), params.search
    tables, fixed, arch = link_space(params, assembly.read_tables(root / s.scores_dir), root)
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
