"""MLflow conventions: one run per stage execution, grouped under one parent run per pipeline execution.

The store defaults to ``sqlite:///<repo>/mlflow.db`` (absolute, so DVC queue clones and stages
started from elsewhere log to the same place) and ``MLFLOW_TRACKING_URI`` overrides it, e.g. with a
shared ``make server``. A fresh sqlite store is initialised once under a file lock: several processes
migrating the same new file at once corrupt it for good (seen with MLflow 3's SQLAlchemy migrations).
A server that does not answer fails in one line before any compute (MLflow's client would retry each
request for minutes). A run ends KILLED on SIGINT/SIGTERM; one whose process died without a word
(SIGKILL, a lost machine) is ended KILLED by the next run started on the same host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

PARENT_ENV = "DNA_PARENT_RUN_ID"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (mlflow/server/js: ExperimentKind).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SERVER_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """Raised by the SIGTERM handler of an open run, so that the run unwinds and ends KILLED."""


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the main repository: under ``dvc exp run --temp`` and queued
    experiments DVC sets ``DVC_ROOT`` to it while ``root`` is a temporary clone that is deleted afterwards."""
    main = Path(os.environ.get("DVC_ROOT") or root).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main / 'mlflow.db'}"


def check_server(uri: str) -> None:
    """One line naming the fix when ``uri`` is an MLflow server that does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            return
    except (OSError, ValueError) as err:  # refused, timed out, an HTTP error status, a malformed URI
        reason = getattr(err, "reason", None) or err
        raise PipelineError(f"MLflow tracking server {uri} does not answer ({reason}): start it (make server) or "
                            "unset MLFLOW_TRACKING_URI to log to the local mlflow.db") from None


def init_store(uri: str) -> None:
    """Check a server is up, or create a sqlite store's schema exactly once, even when several stages start
    together."""
    import mlflow

    check_server(uri)
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


def open_experiment(name: str) -> str:
    """Make ``MLFLOW_EXPERIMENT_NAME`` (else ``name``) the active experiment, created with its kind set; its id."""
    import mlflow

    experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or name)
    if experiment.tags.get("mlflow.experimentKind") is None:  # also experiments made before the tag was set
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _process_alive(pid: int, since_ms: int) -> bool:
    """Whether process ``pid`` exists and is the one that started at or before ``since_ms`` (not a reused pid)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() * 1000 <= since_ms + 1000
    except psutil.Error:  # no such process, or a zombie
        return False


def end_stale_runs(client: Any, experiment_id: str) -> list[str]:
    """End KILLED the RUNNING runs that processes of this host left behind when they died; their ids."""
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`host` = '{host}'"
    stale = [run for run in client.search_runs([experiment_id], filter_string=query)
             if run.data.tags.get("pid", "").isdigit()
             and not _process_alive(int(run.data.tags["pid"]), run.info.start_time)]
    for run in stale:
        log.warning("MLflow run %s (%s, pid %s) was left RUNNING by a process that is gone: marking it KILLED",
                    run.info.run_id, run.info.run_name, run.data.tags["pid"])
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in stale]


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def open_run(client: Any, experiment_id: str, name: str, tags: Mapping[str, str],
             parent: str | None = None) -> Iterator[Any]:
    """``mlflow.start_run`` that ends KILLED on SIGINT or SIGTERM (FAILED on an error, FINISHED otherwise).

    The run is tagged with this process's host and pid, so that a later start can tell a run whose process was
    SIGKILLed from one still running (the stale ones of this host are ended first).
    """
    import mlflow

    end_stale_runs(client, experiment_id)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent,
                              tags={**tags, "host": socket.gethostname(), "pid": str(os.getpid())}) as run:
            try:
                yield run
            except (KeyboardInterrupt, Terminated):
                mlflow.end_run("KILLED")
                raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


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
    experiment_id = open_experiment(experiment)
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
    run = None
    try:
        with open_run(client, experiment_id, name, tags, parent) as run:
            flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(params).items()}
            items = list(flat.items())
            for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[start:start + 100]))
            yield run
    finally:
        if parent is not None and not os.environ.get(PARENT_ENV):  # an experiment's parent ends as its latest stage
            client.set_terminated(parent, client.get_run(run.info.run_id).info.status if run else "FAILED")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log to the active run if there is one (library code also runs outside stages, e.g. in tests)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
