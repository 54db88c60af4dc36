"""Bad input at the stage entry points: non-zero exit within seconds, one clear line, nothing destroyed."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_idx_dir, make_repo_copy
from tests.fakes import REPO


def run_stage(root: Path, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *overrides], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory) -> Path:
    """One prepare stage run for the module (a stage process costs seconds of imports alone)."""
    base = tmp_path_factory.mktemp("prepared")
    root, data = make_repo_copy(base), make_idx_dir(base)
    proc = run_stage(root, "prepare", f"data.root={data}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.fixture
def prepared(repo_copy, prepared_once):
    shutil.copytree(prepared_once / "data", repo_copy / "data")
    return repo_copy


@pytest.mark.parametrize("overrides, expected", [
    (["data.name=mnist"], "data.name"),
    (["data.root=/nonexistent/folder"], "apt-get install dataset-fashion-mnist"),
    (["data.limit=-5"], "data.limit"),
    (["data.image_size=big"], "data.image_size"),
    (["data.colour=1"], "data.colour"),
])
def test_prepare_bad_input(repo_copy, overrides, expected):
    start = time.monotonic()
    line = error_line(run_stage(repo_copy, "prepare", *overrides))
    assert expected in line and time.monotonic() - start < 60


@pytest.mark.parametrize("overrides, expected", [
    (["teacher.name=resnet_18"], "not a timm model"),
    (["teacher.checkpoint=missing.safetensors"], "does not exist"),
    (["teacher.boundaries=[1,2,3,9]"], "out of range"),
    (["teacher.train.epochs=many"], "teacher.train.epochs"),
])
def test_teacher_bad_input_keeps_outputs(prepared, overrides, expected):
    out = prepared / "artifacts" / "teacher"
    out.mkdir(parents=True)
    (out / "blocks.json").write_text("{}")  # a previous result that must survive
    line = error_line(run_stage(prepared, "teacher", *overrides))
    assert expected in line
    assert (out / "blocks.json").read_text() == "{}"


def test_teacher_corrupt_checkpoint(prepared):
    (prepared / "bad.pt").write_bytes(b"PK\x03\x04 truncated zip")
    line = error_line(run_stage(prepared, "teacher", "teacher.checkpoint=bad.pt"))
    assert "bad.pt" in line and "corrupt" in line


def test_teacher_missing_prepared_data(repo_copy):
    line = error_line(run_stage(repo_copy, "teacher"))
    assert "dvc repro prepare" in line


def test_teacher_trains_and_writes_contract(prepared):
    proc = run_stage(prepared, "teacher", "teacher.kwargs.channels=[8,16,16,32]", "teacher.kwargs.stem_width=8",
                     "teacher.train.epochs=1", "teacher.train.warmup_epochs=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    blocks = json.loads((prepared / "artifacts/teacher/blocks.json").read_text())
    assert [b["name"] for b in blocks["blocks"]] == ["b0", "b1", "b2", "b3"]
    metrics = json.loads((prepared / "metrics/teacher.json").read_text())
    assert 0 <= metrics["test/acc"] <= 1 and "val/acc" in metrics
    assert (prepared / "plots/teacher.csv").read_text().startswith("epoch,")
    shutil.rmtree(prepared / "artifacts")
