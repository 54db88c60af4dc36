import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import mlflow
import psutil
import pytest

from pipeline import cli, repro, tracking
from tests.fakes import REPO


def test_fresh_store_survives_concurrent_starts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from pipeline.tracking import init_store; init_store({uri!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert mlflow.MlflowClient(uri).search_experiments()  # the store is usable afterwards


def test_stage_runs_nest_under_parent_with_tags(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.init_store(uri)
    mlflow.set_experiment("dna")
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", "stale-id-from-a-parent-shell")
    with tracking.stage_run("supernet", {"supernet": {"epochs": 3, "ops": ["k3e3"]}}, tmp_path, block="b1") as run:
        for epoch in range(3):
            tracking.log_metrics({"val/loss": 1.0 / (epoch + 1)}, step=epoch)
    client = mlflow.MlflowClient(uri)
    got = client.get_run(run.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["stage"] == "supernet" and got.data.tags["block"] == "b1"
    assert len(got.data.tags["params.hash"]) == 12 and "git.commit" in got.data.tags
    assert got.data.params["supernet.epochs"] == "3"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1.0, 0.5, 1 / 3]


def test_unknown_parent_id_logs_top_level(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(tracking.PARENT_ENV, "0123456789abcdef")
    with tracking.stage_run("prepare", {"seed": 0}, tmp_path) as run:
        pass
    assert "mlflow.parentRunId" not in mlflow.get_run(run.info.run_id).data.tags


def test_default_uri_is_absolute_in_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_default_store_is_the_main_repository_under_dvc_experiments(tmp_path, monkeypatch):
    """``dvc exp run --temp`` / queued runs set DVC_ROOT to the main repository; the clone is deleted afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    assert tracking.tracking_uri(tmp_path / "main/.dvc/tmp/exps/tmpabc") == f"sqlite:///{tmp_path.resolve()}/main/mlflow.db"


def test_stages_of_one_dvc_experiment_share_a_parent_named_after_it(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    runs = {}
    for exp, stage in (("exp-a", "assemble"), ("exp-a", "retrain"), ("exp-b", "assemble")):
        monkeypatch.setenv("DVC_EXP_NAME", exp)
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
        with tracking.stage_run(stage, {"seed": 0}, tmp_path) as run:
            runs[exp, stage] = run.info.run_id
    client = mlflow.MlflowClient(uri)
    parents = {key: client.get_run(run_id).data.tags["mlflow.parentRunId"] for key, run_id in runs.items()}
    assert parents["exp-a", "assemble"] == parents["exp-a", "retrain"] != parents["exp-b", "assemble"]
    parent = client.get_run(parents["exp-a", "retrain"])
    assert parent.info.run_name == "exp-a" and parent.data.tags["dvc.exp"] == "exp-a"
    assert parent.info.status == "FINISHED", "a parent must not stay RUNNING after its last stage"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_does_not_answer_fails_in_one_line_before_the_stage_runs(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # repo_root(): nothing may be written there either
    with pytest.raises(SystemExit) as exit_:
        cli.main(lambda params: pytest.fail("the stage ran"), [])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert uri in err and "make server" in err and "MLFLOW_TRACKING_URI" in err
    assert list(tmp_path.iterdir()) == []


def test_repro_checks_the_server_before_dvc_starts(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path)  # no dvc.yaml here: a DVC start would fail differently
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert repro.main([]) == 2
    assert time.monotonic() - start < 30, "MLflow's client retries: the check must come first"
    err = capsys.readouterr().err
    assert err.startswith("error: MLflow tracking server http://127.0.0.1:") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the tests below (a fresh one takes seconds to migrate); each test its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracking.init_store(uri)
    return uri


@pytest.fixture
def experiment(store, request, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return request.node.name


def _raise_valueerror() -> None:
    raise ValueError("a bug")


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises in here


@pytest.mark.parametrize(("stop", "error", "status"), [
    (_raise_valueerror, ValueError, "FAILED"), (_raise_interrupt, KeyboardInterrupt, "KILLED"),
    (_sigterm_self, tracking.Terminated, "KILLED")])
def test_a_stopped_stage_does_not_stay_running(store, experiment, tmp_path, stop, error, status):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(error), tracking.stage_run("teacher", {"seed": 0}, tmp_path, experiment) as run:
        stop()
    assert mlflow.MlflowClient(store).get_run(run.info.run_id).info.status == status
    assert signal.getsignal(signal.SIGTERM) is handler, "the stage's SIGTERM handler must not outlive its run"


def test_runs_left_running_by_dead_processes_of_this_host_end_killed(store, experiment, tmp_path):
    client = mlflow.MlflowClient(store)
    experiment_id = client.create_experiment(experiment)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host, me = socket.gethostname(), str(os.getpid())
    before_me = int((psutil.Process().create_time() - 3600) * 1000)  # a run of an earlier process with my pid
    runs = {name: client.create_run(experiment_id, run_name=name, tags={"host": h, "pid": pid}, start_time=t).info
            for name, h, pid, t in (("dead", host, str(dead.pid), None), ("alive", host, me, None),
                                    ("reused", host, me, before_me), ("elsewhere", "other-host", str(dead.pid), None))}
    with tracking.stage_run("prepare", {"seed": 0}, tmp_path, experiment):
        pass
    status = {name: client.get_run(info.run_id).info.status for name, info in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "reused": "KILLED", "elsewhere": "RUNNING"}


def test_the_experiment_opens_on_the_model_training_view(store, experiment, tmp_path):
    client = mlflow.MlflowClient(store)
    client.create_experiment(f"{experiment}-older")  # made before the tag existed: it is added on first use
    for name in (f"{experiment}-older", experiment):
        with tracking.stage_run("prepare", {"seed": 0}, tmp_path, name):
            pass
        assert client.get_experiment_by_name(name).tags == tracking.EXPERIMENT_KIND


def test_an_interrupted_repro_passes_the_signal_to_dvc_once(tmp_path, monkeypatch):
    """DVC runs in its own process group: Ctrl-C or SIGTERM on `pipeline.repro` reaches it as one SIGINT."""
    fake = tmp_path / "dvc"
    fake.write_text("#!/bin/bash\ntrap 'echo INT >> got; kill $!; exit 3' INT\nsleep 30 & touch started; wait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(repro, "_DVC", str(fake))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a pytest-xdist worker may ignore SIGINT

    def interrupt() -> None:  # once the fake DVC has set its trap, however slow the machine
        while not (tmp_path / "started").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            repro._run_dvc(["repro"], tmp_path, dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "got").read_text() == "INT\n"


def test_dvc_can_be_interrupted_where_repro_was_started_ignoring_sigint(tmp_path, monkeypatch):
    """A background job from a script starts with SIGINT ignored; DVC must not inherit that (the signal that stops
    it is SIGINT), or SIGTERM on `pipeline.repro` would wait forever."""
    fake = tmp_path / "dvc"
    fake.write_text(f"#!{sys.executable}\nimport signal\nopen('disposition', 'w').write(repr(signal.getsignal(signal.SIGINT)))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(repro, "_DVC", str(fake))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert repro._run_dvc(["repro"], tmp_path, dict(os.environ)) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "SIG_IGN" not in (tmp_path / "disposition").read_text()
