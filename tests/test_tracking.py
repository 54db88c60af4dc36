import subprocess
import sys

import mlflow

from pipeline import tracking


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
