"""DVC stage `costs`: every candidate's params, FLOPs and latency on the target, from the search space alone.

    python stages/costs.py [costs.backend=onnxruntime costs.threads=2 ...]

Needs no supernet: the space's geometry comes from the teacher's blocks.json. Writes ``costs.out_dir``
(default artifacts/costs): <block>.csv (candidate, params, flops, latency_b<N> per batch size: one row per
candidate), fixed.json (stem, head, classifier), teacher.json and fingerprint.json (the machine and libraries the
latencies were measured with; pipeline.costs.read_costs refuses them on another). See pipeline.costs (the tables)
and pipeline.latency (how they are measured).
"""

from __future__ import annotations

import logging

import mlflow

from pipeline import cli, costs, latency, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

log = logging.getLogger("stages.costs")


def run(params: Params) -> costs.CostTables:
    root, cfg = repo_root(), params.costs
    split = load_teacher_blocks(root / TEACHER_BLOCKS)
    spec = build_space(params.space, split)
    channels_last = params.runtime.channels_last
    fingerprint = costs.fingerprint(cfg, channels_last)  # fails before any timing on a missing device or backend
    teacher = {k: v for k, v in as_dict(params.teacher).items() if k != "train"}
    tracked = {"costs": as_dict(cfg), "space": as_dict(params.space), "teacher": teacher,
               "runtime": {"channels_last": channels_last}, "fingerprint": fingerprint}
    with tracking.stage_run("costs", tracked, root, params.tracking.experiment):
        tables, _ = latency.measure_space(spec, cfg, channels_last, teacher=latency.teacher_item(params.teacher, split))
        paths = costs.write_costs(root / cfg.out_dir, spec, tables)
        metrics = {f"costs/fixed/{k}": v for k, v in tables.fixed.items()}
        metrics.update({f"costs/teacher/{k}": v for k, v in tables.teacher.items()})
        metrics["costs/seconds"] = tables.seconds
        tracking.log_metrics(metrics)
        if mlflow.active_run() is not None:
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path="costs")
    rows = sum(len(b) for b in tables.blocks.values())
    teacher_ms = {k: round(v, 3) for k, v in tables.teacher.items() if k.startswith("latency_")}
    log.info("costs: %d candidates in %d blocks measured in %.1f s on <%s> (id %s); teacher %s ms -> %s", rows,
             len(spec.blocks), tables.seconds, costs.describe(fingerprint), fingerprint["id"], teacher_ms,
             root / cfg.out_dir)
    return tables


if __name__ == "__main__":
    cli.main(run)
