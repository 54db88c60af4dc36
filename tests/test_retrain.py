"""Retrain and report stages: distillation loss, supernet initialisation, the stage end to end on a tiny root
(metrics, curve, export, MLflow registry), kill-and-resume, one-line errors before any output is touched."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline import checkpoint, cli, retrain, space, student
from pipeline.config import load_params
from pipeline.supernet import SupernetBlock
from tests.fakes import OP_EXAMPLES, REPO, copy_root, params_at, rotating_choice, teacher_blocks, tiny_params


# -------------------------------------------------------------------------------------------- pieces
class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_distillation_loss_mixes_smoothed_ce_and_tempered_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    student_logits, teacher_logits = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    labels, x = torch.randint(0, 10, (6,), generator=gen), torch.zeros(6, 1, 4, 4)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=0.1)
    t = 3.0
    kl = (F.softmax(teacher_logits / t, -1) * (F.log_softmax(teacher_logits / t, -1)
                                               - F.log_softmax(student_logits / t, -1))).sum(-1).mean() * t * t
    for w in (0.0, 0.3, 1.0):
        loss = retrain.distillation_loss(_Fixed(teacher_logits), w, t, 0.1)(student_logits, x, labels)
        torch.testing.assert_close(loss, (1 - w) * ce + w * kl)
    same = retrain.distillation_loss(_Fixed(student_logits), 1.0, t, 0.1)(student_logits, x, labels)
    assert abs(float(same)) < 1e-6  # a student that matches its teacher pays nothing


def test_record_epoch_drops_the_rows_a_resumed_run_redoes(tmp_path: Path) -> None:
    path = tmp_path / "curve.csv"
    for epoch in (0, 1, 2):
        retrain.record_epoch(path, {"epoch": epoch, "val/acc": epoch / 10})
    retrain.record_epoch(path, {"epoch": 1, "val/acc": 0.9})  # killed during epoch 2, resumed after epoch 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", "0.0"), ("1", "0.9")]


def _finished_supernets(folder: Path, spec: space.SpaceSpec) -> dict[str, SupernetBlock]:
    """Finished supernet checkpoints (random weights) for every block, in the supernet stage's format."""
    nets = {}
    for block in spec.blocks:
        torch.manual_seed(block.index)
        nets[block.name] = SupernetBlock(block)
        checkpoint.save(folder / f"{block.name}.pt", {"model": nets[block.name].state_dict(), "epoch": 2, "epochs": 2})
    return nets


def _student(spec: space.SpaceSpec, choice: dict[str, str]) -> torch.nn.Module:
    return student.create(student.model_args(spec, choice), {"num_classes": 10, "in_chans": 1, "image_size": 16,
                                                              "mean": [0.5], "std": [0.5]})


@pytest.fixture
def supernets(tmp_path: Path) -> tuple[Path, space.SpaceSpec, dict[str, str], dict[str, SupernetBlock]]:
    """Block b2 is 24 wide in the student but ends at the teacher's 16 channels in the supernet (channel matching)."""
    spec = space.build_space(tiny_params(["space.identity=true", "space.blocks.b2.width=24"]).space, teacher_blocks())
    choice = {"b0": "k5e6-k3e3", "b1": "d3w8:k3e3-skip-k5e6", "b2": "k3e3-k5e6"}
    return tmp_path, spec, choice, _finished_supernets(tmp_path, spec)


def test_supernet_init_copies_the_chosen_paths_where_shapes_match(supernets) -> None:
    folder, spec, choice, nets = supernets
    model = _student(spec, choice)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    fraction = retrain.inherit(model, retrain.supernet_state(spec, choice, folder))
    assert 0.5 < fraction < 1
    torch.testing.assert_close(model.conv_stem.weight, nets["b0"].stem.conv_stem.weight)
    b1_last = nets["b1"].cells[0][2]["k5e6"]  # b1 layer 2 is timm's blocks.1.1: the skip is no timm block
    for name in ("conv_pw", "conv_dw", "conv_pwl"):
        torch.testing.assert_close(getattr(model.blocks[1][1], name).weight, getattr(b1_last, name).weight)
    b2_last = nets["b2"].cells[0][1]["k5e6"]
    torch.testing.assert_close(model.blocks[2][1].conv_dw.weight, b2_last.conv_dw.weight)
    assert b2_last.conv_pwl.weight.shape[0] == 16 and model.blocks[2][1].conv_pwl.weight.shape[0] == 24
    torch.testing.assert_close(model.blocks[2][1].conv_pwl.weight, fresh["blocks.2.1.conv_pwl.weight"])
    torch.testing.assert_close(model.conv_head.weight, fresh["conv_head.weight"])  # not in any supernet


@pytest.mark.parametrize("ops", [[op] for op in OP_EXAMPLES] + [OP_EXAMPLES], ids=[*OP_EXAMPLES, "mixed"])
def test_supernet_init_inherits_every_op_type(tmp_path: Path, ops: list[str]) -> None:
    """Each op type's supernet path runs and reaches the student; the mixed space puts every type into one path.
    b1's middle layer has the same channels in search and student (8 -> 8), so all of its tensors are copied."""
    spec = space.build_space(tiny_params([f"space.ops=[{','.join(ops)}]"]).space, teacher_blocks())
    choice = rotating_choice(spec)
    nets = _finished_supernets(tmp_path, spec)
    for block in spec.blocks:
        shape = (block.stem.in_chs, *block.stem.in_size) if block.stem else (block.in_chs, *block.in_size)
        with torch.no_grad():
            out = nets[block.name].eval()(torch.randn(2, *shape), choice[block.name])
        assert out.shape == (2, block.out_chs, *block.out_size)
    model = _student(spec, choice)
    assert 0 < retrain.inherit(model, retrain.supernet_state(spec, choice, tmp_path)) < 1
    middle, target = nets["b1"].cells[0][1][choice["b1"].split("-")[1]].state_dict(), model.blocks[1][1].state_dict()
    assert middle.keys() == target.keys() and all(torch.equal(target[k], v) for k, v in middle.items())


def test_supernet_init_rejects_missing_unfinished_and_foreign_checkpoints(supernets) -> None:
    folder, spec, choice, _ = supernets
    state = checkpoint.load(folder / "b1.pt", "")
    checkpoint.save(folder / "b1.pt", {**state, "epoch": 1})
    with pytest.raises(checkpoint.ArtifactError, match=r"holds 1/2 epochs: .*`dvc repro supernet@b1`"):
        retrain.supernet_state(spec, choice, folder)
    checkpoint.save(folder / "b1.pt", {**state, "model": {"nothing": torch.zeros(1)}})
    with pytest.raises(checkpoint.ArtifactError, match="another search space: .*`dvc repro supernet@b1`"):
        retrain.supernet_state(spec, choice, folder)
    (folder / "b1.pt").unlink()
    with pytest.raises(checkpoint.ArtifactError, match="b1.pt is missing: .*`dvc repro supernet@b1`"):
        retrain.supernet_state(spec, choice, folder)


# -------------------------------------------------------------------------------------------- the stages
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow store for the module: a fresh sqlite store costs seconds to migrate."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("DNA_PARENT_RUN_ID", raising=False)
        yield uri


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run_retrain(root: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    from stages import retrain as stage

    monkeypatch.chdir(root)
    return stage.run(load_params(list(overrides), root=root))


@pytest.fixture(scope="module")
def trained(student_root: Path, store: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = copy_root(student_root, tmp_path_factory.mktemp("trained") / "root")
    with pytest.MonkeyPatch.context() as mp:
        metrics = _run_retrain(root, mp)
    return root, metrics


def test_retrain_writes_metrics_curve_and_an_export_that_costs_the_prediction(trained) -> None:
    root, metrics = trained
    architecture = json.loads((root / "artifacts/search/architecture.json").read_text())
    saved = json.loads((root / "metrics/student.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"val/acc", "test/acc", "params", "flops"} <= set(saved) and 0 <= saved["test/acc"] <= 1
    assert (saved["params"], saved["flops"]) == (architecture["params"], architecture["flops"])
    assert saved["params"] <= params_at(root).search.budget
    rows = _rows(root / "plots/student.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"] and {"train/loss", "val/acc", "lr"} <= set(rows[0])
    model = student.load(root / "artifacts/student")
    assert sum(p.numel() for p in model.parameters()) == saved["params"]
    assert json.loads((root / "artifacts/student" / student.ARCHITECTURE).read_text()) == architecture


def test_model_is_registered_with_metrics_and_reloads_with_any_batch(trained, store: str) -> None:
    root, metrics = trained
    client = mlflow.MlflowClient(store)
    (version,) = client.search_model_versions("name = 'tiny-student'")
    assert client.get_run(version.run_id).data.tags["stage"] == "retrain"
    logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test/acc"] == pytest.approx(metrics["test/acc"]) and linked["params"] == metrics["params"]
    registered = mlflow.pytorch.load_model(f"models:/tiny-student/{version.version}")
    x = torch.randn(3, 1, 16, 16)  # not the example's batch of 4: the batch axis must stay dynamic
    with torch.no_grad():
        np.testing.assert_allclose(registered(x).numpy(), student.load(root / "artifacts/student")(x).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_killed_retrain_resumes_after_its_last_epoch_and_matches(student_root: Path, trained, store: str,
                                                                 tmp_path: Path, monkeypatch) -> None:
    reference, _ = trained
    root = copy_root(student_root, tmp_path / "root")
    record = retrain.record_epoch

    def killed_after_first_epoch(path: Path, row: dict) -> None:
        record(path, row)
        raise KeyboardInterrupt  # the checkpoint of epoch 0 is on disk, as after a kill -9 during epoch 1

    monkeypatch.setattr(retrain, "record_epoch", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run_retrain(root, monkeypatch, "retrain.registry_name=")
    assert checkpoint.load(root / "checkpoints/retrain.pt", "")["epoch"] == 0
    monkeypatch.setattr(retrain, "record_epoch", record)
    _run_retrain(root, monkeypatch, "retrain.registry_name=")
    expected, resumed = (load_file(r / "artifacts/student" / student.WEIGHTS) for r in (reference, root))
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert [r["epoch"] for r in _rows(root / "plots/student.csv")] == ["0", "1"]
    assert (root / "plots/student.csv").read_bytes() == (reference / "plots/student.csv").read_bytes()  # no timings


def _save_supernets(root: Path, seed: int) -> None:
    """Finished supernet checkpoints of the root's space, freshly initialised from ``seed``."""
    torch.manual_seed(seed)
    spec = space.build_space(params_at(root).space, json.loads((root / "artifacts/teacher/blocks.json").read_text()))
    for block in spec.blocks:
        checkpoint.save(root / f"artifacts/supernet/{block.name}.pt",
                        {"model": SupernetBlock(block).state_dict(), "epoch": 1, "epochs": 1})


def _other_splits(root: Path) -> None:
    path = root / "data/prepared/splits.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 7'))


@pytest.mark.parametrize("part, change, override", [
    ("supernet", lambda root: _save_supernets(root, seed=1), ()),  # the supernet stage reran with other results
    ("data", _other_splits, ()),
    ("seed", lambda root: None, ("seed=1",)),
    ("retrain", lambda root: None, ("retrain.drop_rate=0.1",)),
])
def test_retrain_checkpoint_resumes_only_under_the_same_identity(student_root: Path, tmp_path: Path, store: str,
                                                                 monkeypatch, caplog, part, change, override) -> None:
    """An unchanged rerun resumes; a change to anything that defines the result starts over and names it."""
    root = copy_root(student_root, tmp_path / "root")
    _save_supernets(root, seed=0)
    settings = ("retrain.registry_name=", "retrain.train.epochs=1", "retrain.init=supernet")
    _run_retrain(root, monkeypatch, *settings)
    caplog.set_level("INFO")
    _run_retrain(root, monkeypatch, *settings)
    assert "resuming from" in caplog.text and "starting over" not in caplog.text
    change(root)
    caplog.clear()
    _run_retrain(root, monkeypatch, *settings, *override)
    changed = re.search(r"was made with another (.*): starting over", caplog.text)
    assert changed and part in changed[1].split(", ") and "resuming from" not in caplog.text


def test_retrain_from_supernet_weights_inherits_the_chosen_paths(student_root: Path, tmp_path: Path, store: str,
                                                                   monkeypatch) -> None:
    root = copy_root(student_root, tmp_path / "root")
    _save_supernets(root, seed=0)
    metrics = _run_retrain(root, monkeypatch, "retrain.init=supernet", "retrain.registry_name=", "retrain.train.epochs=1")
    model = student.load(root / "artifacts/student")
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv_head", "bn2", "classifier")))
    # the tiny space's student widths equal the teacher's, so everything but the head comes from the supernets
    assert metrics["init/inherited_fraction"] == pytest.approx(1 - head / metrics["params"])


def test_retrain_reads_the_search_output_from_its_param(student_root: Path, tmp_path: Path, store: str,
                                                        monkeypatch) -> None:
    """``search.out_dir`` is where assemble writes the architecture, so it is where retrain reads it."""
    root = copy_root(student_root, tmp_path / "root")
    (root / "artifacts/search").rename(root / "artifacts/search_b300k")
    metrics = _run_retrain(root, monkeypatch, "retrain.registry_name=", "retrain.train.epochs=1",
                           "search.out_dir=artifacts/search_b300k")
    assert metrics["params"] > 0 and (root / "artifacts/student" / student.WEIGHTS).is_file()


def test_bad_architecture_fails_in_one_line_and_leaves_outputs_alone(trained, tmp_path: Path) -> None:
    reference, _ = trained
    root = copy_root(reference, tmp_path / "root")
    path = root / "artifacts/search/architecture.json"
    architecture = json.loads(path.read_text())
    architecture["candidates"][1] = architecture["candidates"][1].replace("k5e6", "k11e6").replace("k3e3", "k11e6")
    path.write_text(json.dumps(architecture))
    before = (root / "artifacts/student" / student.WEIGHTS).read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "stages/retrain.py")], cwd=root, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "op 'k11e6'" in proc.stderr and "dvc repro assemble" in proc.stderr
    assert (root / "artifacts/student" / student.WEIGHTS).read_bytes() == before


@pytest.mark.parametrize("overrides, words", [
    (["search.budget=1000"], "searched for params budget"),  # the architecture is stale for this budget
    (["retrain.init=warm"], "'retrain.init' = 'warm' is invalid: scratch or supernet"),
    (["retrain.kd_weight=1.5"], "'retrain.kd_weight' = 1.5 is invalid"),
])
def test_bad_settings_fail_in_one_line_before_training(student_root: Path, tmp_path: Path, monkeypatch, capsys,
                                                       overrides: list[str], words: str) -> None:
    from stages import retrain as stage

    root = copy_root(student_root, tmp_path / "root")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_:
        cli.main(stage.run, overrides)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and err.count("\n") == 1
    assert not (root / "checkpoints").exists() and not (root / "artifacts/student").exists()


def test_report_compares_teacher_and_student_and_logs_to_mlflow(trained, store: str, tmp_path: Path,
                                                                monkeypatch) -> None:
    from stages import report as stage

    root = copy_root(trained[0], tmp_path / "root")
    (root / "plots/supernet").mkdir(parents=True)
    for block in ("b0", "b1", "b2"):
        (root / f"plots/supernet/{block}.csv").write_text("epoch,train_loss,val_loss\n1,0.9,0.8\n2,0.5,0.6\n")
    (root / "metrics/additivity.json").write_text(json.dumps({"students": 0}))  # costs.additivity=0
    monkeypatch.chdir(root)
    summary = stage.run(load_params(root=root))
    saved = json.loads((root / "metrics/summary.json").read_text())
    assert saved == summary
    student_metrics = json.loads((root / "metrics/student.json").read_text())
    assert saved["student"]["params"] == student_metrics["params"] and saved["student"]["flops"] == student_metrics["flops"]
    assert saved["student_vs_teacher"]["params"] == pytest.approx(saved["student"]["params"] / saved["teacher"]["params"])
    assert not any(k.startswith("latency") for k in saved["student"]), "measured latency has its own file"
    latency = json.loads((root / "metrics/latency.json").read_text())
    assert set(latency["student"]) == {"latency_b1", "latency_b4"} and latency["student"]["latency_b4"] > 0
    assert latency["student_vs_teacher"]["latency_b4"] == pytest.approx(
        latency["student"]["latency_b4"] / latency["teacher"]["latency_b4"])
    assert "predicted" not in latency  # searched on params: nothing measured to predict it
    assert saved["search"]["front_points"] == sum(1 for _ in open(root / "artifacts/search/pareto.csv")) - 1
    page = (root / "reports/report.md").read_text()
    for file in ("pareto.png", "supernet_loss.png", "training.png"):
        assert f"]({file})" in page and (root / "reports" / file).stat().st_size > 1000
    assert "| params |" in page and student_metrics["search/score"] > 0
    assert "Additivity not measured (costs.additivity=0)." in page
    (root / "metrics/additivity.json").write_text("[1, 2]")
    with pytest.raises(checkpoint.ArtifactError, match=r"additivity.json is not the additivity stage's output: run `dvc repro"):
        stage.run(load_params(root=root))
    runs = mlflow.search_runs(filter_string="tags.stage = 'report'", output_format="list")
    assert runs and "student_vs_teacher.params" in runs[0].data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(store).list_artifacts(runs[0].info.run_id, "report")}
    assert "report/report.md" in artifacts


def test_report_without_a_retrained_student_names_the_stage_to_run(student_root: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    from stages import report as stage

    root = copy_root(student_root, tmp_path / "root")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit):
        cli.main(stage.run, [])
    err = capsys.readouterr().err
    assert "metrics/student.json is missing" in err and "`dvc repro retrain`" in err and err.count("\n") == 1
    assert not (root / "reports").exists() and not (root / "metrics/summary.json").exists()


def test_report_with_a_wrong_search_out_dir_names_the_stage_to_run(trained, store: str, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    from stages import report as stage

    root = copy_root(trained[0], tmp_path / "root")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit):
        cli.main(stage.run, ["search.out_dir=artifacts/nosuch"])
    err = capsys.readouterr().err
    assert "nosuch/pareto.csv is missing" in err and "`dvc repro assemble`" in err and err.count("\n") == 1
    assert not (root / "reports").exists()


def test_latency_summary_puts_the_cost_tables_prediction_beside_the_measurement() -> None:
    from pipeline import report

    measured = {"teacher": {1: 4.0, 256: 200.0}, "student": {1: 2.0, 256: 100.0}}
    out = report.latency_summary(measured, {"latency_b256": 105.0, "costs_fingerprint": "abc"}, tolerance=0.1)
    assert out["student_vs_teacher"] == {"latency_b1": 0.5, "latency_b256": 0.5}
    assert out["predicted"]["relative_error"] == {"latency_b256": pytest.approx(0.05)}
    assert out["predicted"]["within_tolerance"] and out["predicted"]["fingerprint"] == "abc"
    assert not report.latency_summary(measured, {"latency_b256": 120.0}, tolerance=0.1)["predicted"]["within_tolerance"]
