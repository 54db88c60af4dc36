"""MLflow conventions: one run per stage execution, grouped under one parent run per pipeline execution.

The store defaults to ``sqlite:///<repo>/mlflow.db`` (absolute, so DVC queue clones and stages
started from elsewhere log to the same place) and ``MLFLOW_TRACKING_URI`` overrides it. A fresh
sqlite store is initialised once under a file lock: several processes migrating the same new
file at once corrupt it for good (seen with MLflow 3's SQLAlchemy migrations).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PARENT_ENV = "DNA_PARENT_RUN_ID"
log = logging.getLogger(__name__)


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the main repository: under ``dvc exp run --temp`` and queued
    experiments DVC sets ``DVC_ROOT`` to it while ``root`` is a temporary clone that is deleted afterwards."""
    main = Path(os.environ.get("DVC_ROOT") or root).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main / 'mlflow.db'}"


def init_store(uri: str) -> None:
    """Create the tracking schema exactly once, even when several stages start together."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # runs the migrations
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, the form MLflow params and DVC keys use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _parent_run_id(client: Any, experiment_id: str) -> str | None:
    parent = os.environ.get(PARENT_ENV) or None
    if parent is None:
        return _experiment_parent(client, experiment_id)
    try:
        client.get_run(parent)
    except Exception:  # noqa: BLE001 - any lookup failure means the id is unusable
        log.warning("%s=%s is not a run in this store; logging a top-level run", PARENT_ENV, parent)
        return None
    return parent


def _experiment_parent(client: Any, experiment_id: str) -> str | None:
    """The parent run of one DVC experiment (``dvc exp run`` runs no ``pipeline.repro``): named after it, found by
    its name and baseline commit, created by its first stage. None outside experiments."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return None
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    query = f"tags.`dvc.exp` = '{name}' and tags.`dvc.baseline` = '{baseline}' and tags.`dvc.stage` = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={"dvc.stage": "pipeline", "dvc.exp": name, "dvc.baseline": baseline})
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], root: Path, experiment: str = "dna",
              block: str | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage execution (one block for per-block stages).

    ``params`` are the groups this stage depends on, as plain dicts: logged flat and hashed into a tag.
    """
    import mlflow

    uri = tracking_uri(root)
    init_store(uri)
    experiment_id = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment).experiment_id
    # An inherited MLFLOW_RUN_ID would make start_run resume that run and ignore the parent.
    os.environ.pop("MLFLOW_RUN_ID", None)
    name = f"{stage}@{block}" if block is not None else stage
    tags = {
        "dvc.stage": os.environ.get("DVC_STAGE", name),
        "stage": stage,
        "block": block if block is not None else "",
        "git.commit": git_commit(root),
        "params.hash": params_hash(params),
        "dvc.exp": os.environ.get("DVC_EXP_NAME", ""),
    }
    client = mlflow.MlflowClient(uri)
    parent = _parent_run_id(client, experiment_id)
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags) as run:
            flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(params).items()}
            items = list(flat.items())
            for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[start:start + 100]))
            yield run
            status = "FINISHED"
    finally:
        if parent is not None and not os.environ.get(PARENT_ENV):
            client.set_terminated(parent, status)  # an experiment's parent ends with its latest stage


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log to the active run if there is one (library code also runs outside stages, e.g. in tests)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
