"""``python -m pipeline.repro [dvc repro args]``: one pipeline execution = one MLflow parent run.

Stages started by DVC find the parent through ``DNA_PARENT_RUN_ID`` and nest their runs under it,
so two executions can be compared side by side in the MLflow UI. The store is initialised here,
once, before any stage starts (an MLflow server that does not answer fails here, in one line).
SIGINT or SIGTERM stops DVC as Ctrl-C does and ends the parent run KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import tracking
from pipeline.config import load_params
from pipeline.errors import PipelineError

_DVC = str(Path(sys.executable).parent / "dvc")  # the dvc installed beside this interpreter


def _dvc_metrics(root: Path) -> dict[str, float]:
    out = subprocess.run([_DVC, "metrics", "show", "--json"], cwd=root, capture_output=True, text=True)
    try:
        shown = json.loads(out.stdout or "{}")
    except ValueError:
        return {}
    flat: dict[str, float] = {}
    for rev in shown.values():
        for path, content in (rev.get("data") or {}).items():
            for key, value in tracking.flatten(content.get("data") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{Path(path).stem}/{key}"] = value
    return flat


def repro(args: Sequence[str], root: Path) -> int:
    import mlflow

    uri = tracking.tracking_uri(root)
    tracking.check_server(uri)
    params = load_params(root=root)  # a bad params.yaml fails here, before DVC starts anything
    tracking.init_store(uri)
    experiment_id = tracking.open_experiment(params.tracking.experiment)
    os.environ.pop("MLFLOW_RUN_ID", None)
    tags = {"dvc.stage": "pipeline", "git.commit": tracking.git_commit(root), "dvc.args": " ".join(args)}
    with tracking.open_run(mlflow.MlflowClient(uri), experiment_id, "pipeline", tags) as parent:
        # Stage commands say `python`: make it this interpreter's, whether or not a venv is active.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, PATH=path, MLFLOW_TRACKING_URI=uri, **{tracking.PARENT_ENV: parent.info.run_id})
        code = _run_dvc(["repro", *args], root, env)
        mlflow.set_tag("dvc.exit_code", code)
        metrics = _dvc_metrics(root)
        if metrics:
            mlflow.log_metrics(metrics)
        if code:
            mlflow.end_run(status="FAILED")
    return code


def _run_dvc(args: Sequence[str], root: Path, env: dict[str, str]) -> int:
    """DVC in its own process group, so that a signal to this process reaches it once, as Ctrl-C: DVC lets the
    running stage end its run KILLED and exits without recording the stage. DVC gets SIGINT's default action even
    where this process was started ignoring it (``nohup ... &`` from a script), else that SIGINT would be lost."""
    proc = subprocess.Popen([_DVC, *args], cwd=root, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return proc.wait()
    except (KeyboardInterrupt, tracking.Terminated):
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise


def main(args: Sequence[str]) -> int:
    try:
        return repro(args, Path.cwd())
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
