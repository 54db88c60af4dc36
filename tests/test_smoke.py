"""The smoke workspace: a copy of the sources with merged params, never the default run's records."""

import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError
from pipeline.smoke import make_workspace
from tests.fakes import REPO


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git work tree with the real params and overlay, a source file, and the default run's committed records."""
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", src / "params.yaml")
    shutil.copy(REPO / "configs/smoke.yaml", src / "configs/smoke.yaml")
    files = {"pipeline/x.py": "x = 1\n", "dvc.lock": "schema: '2.0'\n", "validate/dvc.lock": "schema: '2.0'\n",
             "validate/dvc.yaml": "stages: {}\n", "metrics/student.json": "{}\n", "plots/student.csv": "epoch\n"}
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    return src


def test_copy_has_the_sources_and_merged_params_but_no_run_records(repo: Path, tmp_path: Path) -> None:
    dest = make_workspace(repo, tmp_path / "smoke", ["retrain.train.epochs=3"])
    assert (dest / "pipeline/x.py").read_text() == "x = 1\n" and (dest / "validate/dvc.yaml").is_file()
    for record in ("dvc.lock", "validate/dvc.lock", "metrics/student.json", "plots/student.csv"):
        assert not (dest / record).exists(), f"{record} describes the default run, not the smoke copy"
    params = OmegaConf.load(dest / "params.yaml")
    assert params.data.limit == OmegaConf.load(repo / "configs/smoke.yaml").data.limit
    assert params.retrain.train.epochs == 3
    assert (dest / ".git").is_dir()


def test_bad_override_fails_before_copying(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retrain.init"):
        make_workspace(repo, tmp_path / "smoke", ["retrain.init=warm"])
    assert not (tmp_path / "smoke").exists()
