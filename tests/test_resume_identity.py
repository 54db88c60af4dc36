"""A persisted checkpoint is resumed only when everything that defines its result is unchanged (issue: a changed
seed reused the old teacher, which had trained on most of the new val split)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.data import prepare
from tests.fakes import REPO

TINY_TEACHER = ("teacher.kwargs.channels=[8,16,16,32]", "teacher.kwargs.stem_width=8", "teacher.train.epochs=1",
                "teacher.train.warmup_epochs=0", "runtime.threads=1")


def _stage(root: Path, stage: str, *overrides: str) -> str:
    """Each stage in its own process, as DVC runs it."""
    proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *overrides], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _changed(log: str) -> set[str]:
    found = re.search(r"teacher\.pt was made with another (.*): starting over", log)
    return set(found[1].split(", ")) if found else set()


def test_teacher_resumes_unchanged_and_starts_over_when_data_or_seed_change(repo_copy: Path, idx_dir: Path) -> None:
    def run(*change: str) -> str:
        params = load_params([f"data.root={idx_dir}", *change], root=repo_copy)
        prepare(params.data, params.seed, repo_copy / "data/prepared")  # in process: no training, no MLflow
        return _stage(repo_copy, "teacher", *TINY_TEACHER, *change)

    run()
    unchanged = _stage(repo_copy, "teacher", *TINY_TEACHER)
    assert "resuming from" in unchanged and not _changed(unchanged), "an unchanged rerun must resume"
    seed = run("seed=1")  # a new seed draws a new val split: the old teacher has trained on most of it
    assert _changed(seed) == {"data", "seed"} and "resuming from" not in seed
    limit = run("seed=1", "data.limit=150")
    assert _changed(limit) == {"data"} and "resuming from" not in limit
