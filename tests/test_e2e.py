"""The whole DAG on the smoke overlay, in a temporary copy of the repository."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from pipeline.config import load_params
from tests.fakes import REPO, load_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    dest = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DNA_", "DVC_"))}
    proc = subprocess.run([sys.executable, "-m", "pipeline.smoke", str(dest)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest, env


def dvc(dest, env, *args):
    return subprocess.run([str(REPO / ".venv" / "bin" / "dvc"), *args], cwd=dest, env=env, capture_output=True,
                          text=True, timeout=300)


def test_lock_records_the_smoke_params(smoke):
    dest, env = smoke
    lock = (dest / "dvc.lock").read_text()
    assert "limit: 600" in lock, "dvc.lock must describe the params the outputs were made with"
    status = dvc(dest, env, "status", "--quiet", "dvc.yaml")  # validate/dvc.yaml runs only on request
    assert status.returncode == 0, status.stdout


def test_second_repro_does_nothing(smoke):
    dest, env = smoke
    proc = dvc(dest, env, "repro")
    assert proc.returncode == 0
    assert "Running stage" not in proc.stdout and "up to date" in proc.stdout


DETERMINISTIC = ("prepare", "teacher", "cache_features", "supernet@b0", "score@b0", "assemble", "retrain")
PERSISTED = ("checkpoints/teacher.pt", "checkpoints/retrain.pt", "artifacts/supernet/b0.pt")  # else resumed


def _lock_outs(dest, stages) -> dict[str, str]:
    import yaml

    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for s in stages for out in lock[s]["outs"]}


def test_a_forced_rerun_reproduces_every_tracked_output_byte_for_byte(smoke):
    """Same inputs, same bytes: seconds and throughput stay in MLflow (``run/`` metrics), out of DVC's files, so a
    rerun from scratch leaves dvc.lock and `dvc metrics diff` unchanged (the report measures latency: not here)."""
    dest, env = smoke
    env = {**env, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}  # `python` = the venv's
    before = _lock_outs(dest, DETERMINISTIC)
    for path in PERSISTED:
        (dest / path).unlink()
    proc = dvc(dest, env, "repro", "--force", "--single-item", *DETERMINISTIC)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = _lock_outs(dest, DETERMINISTIC)
    assert {k for k in before if after.get(k) != before[k]} == set()  # metrics and plots files included


def test_mlflow_holds_one_child_run_per_stage(smoke):
    dest, env = smoke
    stages = dvc(dest, env, "stage", "list", "--name-only").stdout.split()
    client = mlflow.MlflowClient(f"sqlite:///{dest / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dna")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["dvc.exit_code"] == "0"
    children = {r.data.tags["dvc.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id}
    assert set(stages) <= set(children), f"stages without a run: {set(stages) - set(children)}"
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert {"stage", "block", "git.commit", "params.hash"} <= set(run.data.tags)
    teacher = children["teacher"]
    assert "val/acc" in teacher.data.metrics and client.get_metric_history(teacher.info.run_id, "train/loss")
    assert "teacher.train.epochs" in teacher.data.params
    assert any(k.startswith("teacher/") for k in parents[0].data.metrics), "dvc metrics belong on the parent"


def test_report_shows_the_latency_prediction_and_additivity(smoke):
    dest, _ = smoke
    additivity = json.loads((dest / "metrics/additivity.json").read_text())
    assert additivity["students"] == 2 and set(additivity["same_rounds"]) == {"latency_b1", "latency_b256"}
    latency = json.loads((dest / "metrics/latency.json").read_text())
    assert latency["student"]["latency_b1"] > 0 and "relative_error" in latency["predicted"]
    report = (dest / "reports/report.md").read_text()
    assert "## Additivity: 2 random whole students" in report and "| the costs stage's | latency_b256 |" in report


def test_main_workspace_untouched(smoke):
    dest, _ = smoke
    assert json.loads((dest / "data/prepared/meta.json").read_text())["sizes"]["train"] == 540
    assert "limit: 0" in (REPO / "params.yaml").read_text()


def test_validation_pipeline_on_the_smoke_run(smoke, monkeypatch, caplog):
    """The ranking check end to end (M=3, R=2, 2 seeds, tiny data): metrics, report, nothing to redo, units resume."""
    dest, env = smoke
    env = {**env, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}  # `python` = the venv's, as after activate
    proc = dvc(dest, env, "repro", "validate/dvc.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((dest / "metrics/validate.json").read_text())
    assert metrics["all/n"] == 3 + 2 + 1 and metrics["budget/random/n"] == 2
    for name in ("dna_score", "params", "flops"):
        assert -1 <= metrics[f"all/{name}/tau"] <= 1 and -1 <= metrics[f"all/{name}/rho"] <= 1
        assert metrics[f"all/{name}/tau_lo"] <= metrics[f"all/{name}/tau_hi"]
    assert 0 < metrics["budget/searched/acc"] <= 1 and 1 <= metrics["budget/searched/rank"] <= 3
    assert -1 <= metrics["noise/seed_tau"] <= 1, "two seeds per architecture give the noise ceiling"
    archs = json.loads((dest / "artifacts/validate/archs.json").read_text())["architectures"]
    assert all(len(a["block_scores"]) == len(a["candidates"]) for a in archs)
    assert all(-1 <= metrics[f"block/{i}/dna_score/tau"] <= 1 for i in range(len(archs[0]["candidates"])))
    report = (dest / "artifacts/validate/report/report.md").read_text()
    assert "Kendall tau" in report and "searched" in report
    assert (dest / "artifacts/validate/report/scatter.png").stat().st_size > 1000
    rows = (dest / "artifacts/validate/results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * 2 and rows[0].startswith("name,kind,seed,val_acc")
    again = dvc(dest, env, "repro", "validate/dvc.yaml")
    assert again.returncode == 0 and "Running stage" not in again.stdout

    (dest / "artifacts/validate/runs/s01/seed0/result.json").unlink()  # as if killed before s01 finished
    monkeypatch.chdir(dest)  # the stage in process: a stage process costs seconds of imports alone
    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(name)
    caplog.set_level("INFO")
    load_stage("validate_train").run(load_params(root=dest))
    assert "1 of 12 units to train (11 already done)" in caplog.text
    assert (dest / "artifacts/validate/runs/s01/seed0/result.json").is_file()


def _outputs_digest(root) -> dict[str, str]:
    import hashlib

    names = [p for d in ("data", "artifacts", "checkpoints", "metrics", "plots", "reports") for p in (root / d).rglob("*")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in [*names, root / "dvc.lock"] if p.is_file()}


def test_temp_and_queued_experiments_run_in_their_own_copy(smoke):
    """`dvc exp run --temp` and two queued experiments (`dvc queue start -j 2`): the main workspace's outputs stay
    byte-identical, all three are in `dvc exp show`, their MLflow runs are in the main store under their names."""
    import time

    dest, env = smoke
    git = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
           "GIT_COMMITTER_EMAIL": "ci@localhost"}
    env = {**env, **git, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    for args in (["add", "-A"], ["commit", "-qm", "smoke run"]):  # experiments start from a commit
        assert subprocess.run(["git", *args], cwd=dest, env=env).returncode == 0
    before = _outputs_digest(dest)
    temp = dvc(dest, env, "exp", "run", "--temp", "-n", "exp-temp", "-S", "report.latency_repeats=2")
    assert temp.returncode == 0, temp.stdout[-3000:] + temp.stderr[-3000:]
    for name, repeats in (("exp-q1", 4), ("exp-q2", 5)):
        assert dvc(dest, env, "exp", "run", "--queue", "-n", name, "-S", f"report.latency_repeats={repeats}").returncode == 0
    assert dvc(dest, env, "queue", "start", "-j", "2").returncode == 0
    deadline = time.monotonic() + 600
    while "Queued" in (status := dvc(dest, env, "queue", "status").stdout) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    assert _outputs_digest(dest) == before, "an experiment wrote into the main workspace"
    shown = dvc(dest, env, "exp", "show", "--csv").stdout
    assert all(name in shown for name in ("exp-temp", "exp-q1", "exp-q2")), shown
    client = mlflow.MlflowClient(f"sqlite:///{dest / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dna").experiment_id])
    for name in ("exp-temp", "exp-q1", "exp-q2"):
        parent = [r for r in runs if r.info.run_name == name and r.data.tags.get("dvc.stage") == "pipeline"]
        assert len(parent) == 1 and parent[0].info.status == "FINISHED", name
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
        assert [r.info.run_name for r in children] == ["report"], name
