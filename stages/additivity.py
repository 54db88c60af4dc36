"""DVC stage `additivity`: do the summed cost tables predict whole students? metrics/additivity.json.

    python stages/additivity.py [costs.additivity=50 ...]

Times ``costs.additivity`` random whole students (real timm models) in the same shuffled rounds as every module
of the space, the way the costs stage times its tables, and compares each student's measured latency with the
sum of its parts (``same_rounds``: the method's own error). The same measured students are also predicted from
the costs stage's tables (``stage_tables``: the error a search sees, which adds the machine's drift between two
runs). A measuring stage: its numbers move with the machine, like the report's latency.
"""

from __future__ import annotations

import logging

from pipeline import cli, costs, latency, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.records import write_metrics
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

OUT = "metrics/additivity.json"
log = logging.getLogger("stages.additivity")


def run(params: Params) -> dict:
    root, cfg = repo_root(), params.costs
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS))
    channels_last = params.runtime.channels_last
    fp = costs.fingerprint(cfg, channels_last)
    stage = {f"latency_b{b}": costs.read_costs(root / cfg.out_dir, spec, f"latency_b{b}", fp,
                                                cfg.accept_fingerprint, cfg.tolerance) for b in cfg.batch_sizes}
    result: dict = {"students": cfg.additivity, "targets": latency.ADDITIVITY_GOAL, "fingerprint": fp["id"]}
    if cfg.additivity:
        same, _, choices = latency.additivity(spec, cfg, channels_last, cfg.additivity, params.seed)
        for name, by_batch in (("same_rounds", same), ("stage_tables", _against(same, stage, choices))):
            result[name] = {f"latency_b{b}": a.summary() for b, a in by_batch.items()}
        result["met"] = all(s["median"] <= latency.ADDITIVITY_GOAL["median"] and s["p90"] <= latency.ADDITIVITY_GOAL["p90"]
                            for s in result["same_rounds"].values())
    write_metrics(root / OUT, result)
    with tracking.stage_run("additivity", {"costs": as_dict(cfg)}, root, params.tracking.experiment):
        tracking.log_metrics({k: v for k, v in tracking.flatten({"additivity": result}).items()
                              if isinstance(v, (int, float))})
    for name in ("same_rounds", "stage_tables"):
        for metric, s in result.get(name, {}).items():
            log.info("%s %s: median %.1f%%, p90 %.1f%% over %d students", name, metric, 100 * s["median"],
                     100 * s["p90"], s["students"])
    return result


def _against(same: dict[int, latency.Additivity], stage: dict[str, costs.BlockCosts],
             choices: list[dict[str, str]]) -> dict[int, latency.Additivity]:
    """The students measured in ``same``, predicted from the costs stage's tables instead."""
    return {b: latency.Additivity(b, [costs.predict(stage[f"latency_b{b}"], c) for c in choices], a.measured,
                                  stage[f"latency_b{b}"].calibration) for b, a in same.items()}


if __name__ == "__main__":
    cli.main(run)
