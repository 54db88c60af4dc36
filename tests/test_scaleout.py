"""Scaling out on loopback: the smoke slice logs to `make server`, a second workspace reuses its outputs through a
shared DVC remote (and a DVC experiment through a git remote), a killed stage does not stay RUNNING.

One server, one smoke run of the slice ``prepare .. score@b2`` (``supernet.epochs=1``) shared by every test; each
test that writes works in its own clone or copy, so the tests hold in any order.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import cli, smoke
from tests.fakes import REPO, copy_root, load_stage

pytestmark = [pytest.mark.slow, pytest.mark.scaleout]

SLICE = ("prepare", "teacher", "cache_features", "supernet@b2", "score@b2")  # `dvc repro score@b2`
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
                "GIT_COMMITTER_EMAIL": "ci@localhost"}
BIN = REPO / ".venv" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`make server` in a fresh store folder on a free port (one uvicorn worker); its URI and folder."""
    store = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{_free_port()}"
    log = (store / "server.log").open("w")
    proc = subprocess.Popen(["make", "-s", "-f", str(REPO / "Makefile"), "server", f"VENV={REPO / '.venv'}",
                             f"MLFLOW_PORT={uri.rsplit(':', 1)[1]}", "MLFLOW_ARGS=--workers 1"],
                            cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # about 7 s on an idle machine
        while True:
            assert proc.poll() is None, (store / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not answer /health"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield uri, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DNA_", "DVC_"))}
    return {**env, **GIT_IDENTITY, "MLFLOW_TRACKING_URI": uri, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}  # `python` in stage commands = the venv's


def _sh(cwd: Path, env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def _dvc(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _sh(cwd, env, str(BIN / "dvc"), *args)


@pytest.fixture(scope="module")
def shared(server, tmp_path_factory):
    """Workspace A: the smoke slice run against the server, committed and pushed (git to a bare repository, outputs
    to a local DVC remote), as a team member would after `dvc repro`."""
    uri, _ = server
    base = tmp_path_factory.mktemp("scaleout")
    env = _env(uri)
    a, origin, remote = base / "a", base / "origin.git", base / "dvc-remote"
    smoke.make_workspace(REPO, a, ["supernet.epochs=1"])
    _sh(base, env, "git", "init", "-q", "--bare", str(origin))
    _dvc(a, env, "remote", "add", "-d", "shared", str(remote))
    _sh(a, env, "git", "add", "-A")
    _sh(a, env, "git", "commit", "-qm", "smoke slice")
    _sh(a, env, sys.executable, "-m", "pipeline.repro", "score@b2", timeout=900)
    _sh(a, env, "git", "add", "-A")
    _sh(a, env, "git", "commit", "-qm", "smoke slice: results")
    _sh(a, env, "git", "remote", "add", "origin", str(origin))
    _sh(a, env, "git", "push", "-q", "origin", "HEAD")
    _dvc(a, env, "push")
    return {"a": a, "origin": origin, "env": env, "uri": uri, "base": base}


def _clone(shared, name: str) -> Path:
    dest = shared["base"] / name
    _sh(shared["base"], shared["env"], "git", "clone", "-q", str(shared["origin"]), str(dest))
    return dest


def _lock_md5(root: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in lock["outs"]}


def _runs(uri: str, experiment: str = "dna", query: str = "") -> list:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string=query) if found else []


def test_the_smoke_slice_logs_runs_metrics_and_artifacts_to_the_server(shared, server):
    uri, store = server
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("dna")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts must go through the server"
    (parent,) = _runs(uri, query="tags.`dvc.args` = 'score@b2'")
    assert parent.info.status == "FINISHED" and parent.data.tags["dvc.exit_code"] == "0"
    assert any(k.startswith("teacher/") for k in parent.data.metrics), "dvc metrics belong on the parent"
    children = {r.data.tags["dvc.stage"]: r for r in _runs(uri, query=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == set(SLICE)
    assert all(r.info.status == "FINISHED" and r.data.tags["host"] == socket.gethostname() for r in children.values())
    assert "val/acc" in children["teacher"].data.metrics
    assert len(client.get_metric_history(children["supernet@b2"].info.run_id, "val/loss")) == 1  # one epoch
    figures = [a.path for a in client.list_artifacts(children["score@b2"].info.run_id)]
    assert figures == ["scores_b2.png"]
    assert list(store.glob(f"mlartifacts/*/{children['score@b2'].info.run_id}/artifacts/scores_b2.png"))
    assert not (shared["a"] / "mlflow.db").exists() and not (shared["a"] / "mlruns").exists()


def test_the_retrain_stage_registers_its_model_on_the_server(server, student_root, tmp_path, monkeypatch):
    uri, store = server
    root = copy_root(student_root, tmp_path / "root")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DNA_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "registry")
    monkeypatch.chdir(root)
    before = mlflow.get_tracking_uri()
    try:
        cli.main(load_stage("retrain").run, ["retrain.registry_name=dna-student", "retrain.train.epochs=1"])
        client = mlflow.MlflowClient(uri)
        (version,) = client.search_model_versions("name = 'dna-student'")
        assert client.get_run(version.run_id).data.tags["stage"] == "retrain"
        files = Path(mlflow.artifacts.download_artifacts(f"models:/dna-student/{version.version}",
                                                         dst_path=str(tmp_path / "download")))
    finally:
        mlflow.set_tracking_uri(before)  # the server stops with this module; later tests must not reach for it
    assert (files / "MLmodel").is_file()
    assert list(store.glob("mlartifacts/*/models/*/artifacts/MLmodel")), "the model's files are in the server's store"


def _wait_for_run(uri: str, experiment: str, pid: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 300
    while not (found := _runs(uri, experiment, f"tags.pid = '{pid}' and attributes.status = 'RUNNING'")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the stage never opened its MLflow run"
        time.sleep(0.5)
    return found[0].info.run_id


def test_a_killed_stage_does_not_stay_running(shared, tmp_path):
    """SIGTERM: the stage ends its own run KILLED. SIGKILL leaves it RUNNING until the next stage started on this
    host sees its process is gone."""
    root = tmp_path / "k"
    shutil.copytree(shared["a"], root, ignore=shutil.ignore_patterns(".git", ".dvc"))
    env = {**shared["env"], "MLFLOW_EXPERIMENT_NAME": "kills"}
    cmd = [sys.executable, "stages/supernet.py", "block=b2", "supernet.epochs=1000"]
    status = {}
    first = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    killed = _wait_for_run(shared["uri"], "kills", first.pid, first)
    first.kill()
    first.communicate()
    client = mlflow.MlflowClient(shared["uri"])
    status["after SIGKILL"] = client.get_run(killed).info.status
    second = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    terminated = _wait_for_run(shared["uri"], "kills", second.pid, second)
    status["after the next start"] = client.get_run(killed).info.status
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM, err[-3000:]
    status["terminated"] = client.get_run(terminated).info.status
    assert status == {"after SIGKILL": "RUNNING", "after the next start": "KILLED", "terminated": "KILLED"}


def test_a_second_workspace_pulls_the_outputs_instead_of_retraining(shared):
    b, env = _clone(shared, "b"), shared["env"]
    _dvc(b, env, "pull", "--with-deps", "score@b2")  # the slice A ran (a plain `dvc pull` wants every stage's outputs)
    outs = _lock_md5(b, "supernet@b2")
    assert outs == _lock_md5(shared["a"], "supernet@b2")
    files = [b / path for stage in SLICE for path in _lock_md5(b, stage)]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    runs = len(_runs(shared["uri"], query="tags.`dvc.stage` = 'supernet@b2'"))
    status = _dvc(b, env, "status", "score@b2")
    assert "up to date" in status.stdout, status.stdout
    repro = _dvc(b, env, "repro", "score@b2")
    assert "Running stage" not in repro.stdout and "didn't change, skipping" in repro.stdout, repro.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert len(_runs(shared["uri"], query="tags.`dvc.stage` = 'supernet@b2'")) == runs, "a stage ran in B"


def test_an_experiment_travels_between_workspaces_through_the_remotes(shared):
    a, env = shared["a"], shared["env"]
    _dvc(a, env, "exp", "run", "--temp", "-n", "one-batch", "score@b2", "-S", "score.batches=1")
    _dvc(a, env, "exp", "push", "origin", "one-batch")  # the git ref to origin, its outputs to the DVC remote
    b = _clone(shared, "b-exp")
    _dvc(b, env, "exp", "pull", "origin", "one-batch")
    assert "one-batch" in _dvc(b, env, "exp", "list").stdout
    _dvc(b, env, "exp", "branch", "one-batch", "one-batch")  # `exp apply` would check out stages A never ran
    _sh(b, env, "git", "checkout", "-q", "one-batch")
    _dvc(b, env, "checkout", "--with-deps", "score@b2")  # from B's cache: what `exp pull` brought, no `dvc pull`
    assert yaml.safe_load((b / "params.yaml").read_text())["score"]["batches"] == 1
    scores = _lock_md5(b, "score@b2")
    assert scores != _lock_md5(a, "score@b2"), "the experiment's score table differs from the baseline's"
    status = _dvc(b, env, "status", "score@b2")
    assert "up to date" in status.stdout, status.stdout  # every output arrived: nothing to recompute
