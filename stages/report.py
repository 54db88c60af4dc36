"""DVC stage `report`: teacher vs searched student, the search, the supernet curves; metrics/summary.json + reports/.

    python stages/report.py [report.latency_repeats=50 costs.threads=2 ...]

Reads the teacher and student artifacts and metrics, ``search.out_dir`` (architecture.json, pareto.csv) and the
per-epoch CSVs under plots/. Writes metrics/summary.json (results: accuracy, params, FLOPs), metrics/latency.json
(measured in this run: teacher and student latency, and the cost tables' prediction beside it) and reports/
(report.md with PNG figures beside it, readable offline); all are logged to MLflow.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlflow

from pipeline import cli, costs, report, student, tracking
from pipeline import latency as timing
from pipeline.checkpoint import ArtifactError, read_json
from pipeline.config import Params, as_dict, repo_root
from pipeline.records import write_metrics
from pipeline.space import module_cost
from pipeline.teacher import load_teacher

TEACHER, STUDENT = Path("artifacts/teacher"), Path("artifacts/student")
METRICS, PLOTS = Path("metrics"), Path("plots")
SUMMARY, LATENCY, OUT = Path("metrics/summary.json"), Path("metrics/latency.json"), Path("reports")
ADDITIVITY = Path("metrics/additivity.json")
log = logging.getLogger("stages.report")


def run(params: Params) -> dict:
    root, cfg = repo_root(), params.report
    scores = {name: _read_json(root / METRICS / f"{name}.json", f"dvc repro {stage}")
              for name, stage in (("teacher", "teacher"), ("student", "retrain"))}
    architecture = student.read_architecture(root / STUDENT / student.ARCHITECTURE)
    front = report.read_front(root / params.search.out_dir / "pareto.csv")
    additivity = read_json(root / ADDITIVITY, "dvc repro additivity")
    if not isinstance(additivity, dict) or "students" not in additivity:
        raise ArtifactError(f"{root / ADDITIVITY} is not the additivity stage's output: run `dvc repro additivity`")
    models = {"teacher": load_teacher(root / TEACHER)[0], "student": student.load(root / STUDENT)}
    shape = tuple(models["student"].pretrained_cfg["input_size"])
    rows = {}
    for name, model in models.items():
        cost = module_cost(model, shape)
        rows[name] = {"test_acc": scores[name]["test/acc"], "val_acc": scores[name]["val/acc"], "params": cost.params,
                      "flops": cost.flops}
    # timed as the costs stage times its tables (backend, device, threads, clock, batch sizes), in shared rounds
    target = costs.target(params.costs, params.runtime.channels_last)
    items = {name: timing.Item(model, shape) for name, model in models.items()}
    latency = timing.time_items(items, target, params.costs.batch_sizes, params.costs.warmup, cfg.latency_repeats)
    summary = report.summarize(rows["teacher"], rows["student"], architecture, len(front.cost))
    measured = report.latency_summary(latency, architecture, params.costs.tolerance)
    if not measured.get("predicted", {}).get("within_tolerance", True):
        log.warning("the student's measured latency is off the cost tables' prediction by more than %.0f%%: %s",
                    100 * params.costs.tolerance, measured["predicted"]["relative_error"])
    supernet = {p.stem: report.read_rows(p) for p in sorted((root / PLOTS / "supernet").glob("*.csv"))}
    training = {n: report.read_rows(root / PLOTS / f"{n}.csv") for n in ("teacher", "student")}
    tmp = root / (str(OUT) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    figures = {"pareto": len(front.cost) > 0, "supernet": any(supernet.values()), "training": any(training.values())}
    draw = {"pareto": lambda p: report.plot_pareto(p, front, architecture),
            "supernet": lambda p: report.plot_supernet(p, {b: r for b, r in supernet.items() if r}),
            "training": lambda p: report.plot_training(p, training)}
    for key, file in report.FIGURES.items():
        if figures[key]:
            draw[key](tmp / file)
    names = {"teacher": models["teacher"].default_cfg.get("architecture", "teacher"), "student": student.MODEL_NAME}
    (tmp / "report.md").write_text(report.markdown(summary, measured, architecture, names, figures, additivity))
    shutil.rmtree(root / OUT, ignore_errors=True)
    os.replace(tmp, root / OUT)
    write_metrics(root / SUMMARY, summary)
    write_metrics(root / LATENCY, measured)
    with tracking.stage_run("report", {"report": as_dict(cfg)}, root, params.tracking.experiment):
        tracking.log_metrics({k: v for k, v in tracking.flatten({**summary, "latency": measured}).items()
                              if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(root / OUT), artifact_path="report")
        mlflow.log_artifact(str(root / SUMMARY))
        mlflow.log_artifact(str(root / LATENCY))
    log.info("report: student test %.4f vs teacher %.4f, %.3fx the params -> %s", rows["student"]["test_acc"],
             rows["teacher"]["test_acc"], summary["student_vs_teacher"]["params"], root / OUT / "report.md")
    return summary


def _read_json(path: Path, rebuild: str) -> dict:
    """A stage's metrics file with the accuracies the report compares."""
    content = read_json(path, rebuild)
    if not isinstance(content, dict) or not {"val/acc", "test/acc"} <= set(content):
        raise ArtifactError(f"{path} lacks val/acc and test/acc: run `{rebuild}`")
    return content


if __name__ == "__main__":
    cli.main(run)
