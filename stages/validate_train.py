"""Validation stage `validate_train`: every drawn architecture trained stand-alone with one short recipe.

    dvc repro validate/dvc.yaml          # or: python stages/validate_train.py validate.workers=1

Reads artifacts/validate/archs.json and the prepared data. Each architecture x seed is its own resumable unit
in artifacts/validate/runs/<name>/seed<k>/ (a per-epoch checkpoint while it trains, result.json when done), so an
interrupted stage continues where it stopped and a changed recipe retrains only what it affects.
validate.workers units train at once in separate processes, the CPU threads split between them; the
costliest start first. validate.shard=i/n trains only the units whose index % n == i (machine i of n; copy the
run folders together, then validate_report gathers them). Writes artifacts/validate/results.csv (every finished
unit found, whichever machine trained it); MLflow gets one child run per unit.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow

from pipeline import cli, runtime, student, tracking, validation
from pipeline.config import Params, as_dict, repo_root
from pipeline.data import load_meta
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

OUT = Path("artifacts/validate")
SAMPLE = "dvc repro validate/dvc.yaml:validate_sample"
COLUMNS = ("name", "kind", "seed", "val_acc", "val_loss")
log = logging.getLogger("stages.validate_train")


def run(params: Params) -> list[dict[str, Any]]:
    root, v = repo_root(), params.validate
    archs = validation.read_sampled(root / OUT / "archs.json")
    load_meta(root / "data/prepared")  # missing or stale inputs fail here, in one line, not in a worker
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS))
    for a in archs:
        student.choice_of({"candidates": list(a.candidates)}, spec, str(OUT / "archs.json"), SAMPLE)
    every = validation.jobs(archs, params, root)  # costliest first
    mine = validation.shard(every, v.shard)
    workers = max(1, min(v.workers, len(mine)))
    threads = params.runtime.threads or runtime.cpu_threads(workers)
    mine = [replace(job, threads=threads) for job in mine]
    tracked = {"validate": as_dict(v), "space": as_dict(params.space), "seed": params.seed}
    with tracking.stage_run("validate_train", tracked, root, params.tracking.experiment):
        done = [(job, validation.finished(job)) for job in mine]
        results = [result for _, result in done if result is not None]
        pending = [job for job, result in done if result is None]
        part = f" (shard {v.shard} of {len(every)} units)" if v.shard else ""
        log.info("%d of %d units to train (%d already done)%s, %d at a time with %d threads each", len(pending),
                 len(mine), len(results), part, workers, threads)
        for job, result in _train(pending, workers):
            _log_unit(job, result)
            results.append(result)
            log.info("%s seed %d: val acc %.4f in %.0f s (%d/%d)", job.arch.name, job.seed, result["val_acc"],
                     result["run/seconds"], len(results), len(mine))
        tracking.log_metrics({"units": len(results),
                              "run/unit_seconds": sum(r.get("run/seconds", 0.0) for r in results)})
    found = sorted((r for r in map(validation.finished, every) if r is not None), key=lambda r: (r["name"], r["seed"]))
    validation.write_rows(root / OUT / "results.csv", found, COLUMNS)
    return found


def _train(jobs: list[validation.Job], workers: int):
    """(job, result) as units finish; one process per worker (spawned: no forked torch state). On Ctrl-C the
    workers are stopped (``runtime.worker_pool``): finished units keep their results, running ones their last
    epoch's checkpoint."""
    if workers <= 1 or len(jobs) <= 1:
        yield from ((job, validation.train_unit(job)) for job in jobs)
        return
    unit = {(job.arch.name, job.seed): job for job in jobs}
    with runtime.worker_pool(workers, "spawn") as pool:
        for result in pool.imap_unordered(validation.train_unit, jobs):  # submitted in order: costliest first
            yield unit[result["name"], result["seed"]], result


def _log_unit(job: validation.Job, result: dict[str, Any]) -> None:
    """A child run per unit: its architecture, cost, predicted score and per-epoch curve."""
    with mlflow.start_run(run_name=f"{job.arch.name}/seed{job.seed}", nested=True):
        mlflow.log_params({"kind": job.arch.kind, "candidates": " ".join(job.arch.candidates), "seed": job.seed})
        tracking.log_metrics({"params": job.arch.params, "flops": job.arch.flops, "score": job.arch.score,
                              "val/acc": result["val_acc"], "val/loss": result["val_loss"],
                              "run/seconds": result["run/seconds"]})
        with contextlib.suppress(OSError), open(job.out_dir / validation.EPOCHS, newline="") as f:
            for row in csv.DictReader(f):
                tracking.log_metrics({k: float(x) for k, x in row.items() if k != "epoch"}, step=int(row["epoch"]))


if __name__ == "__main__":
    cli.main(run)
