"""dvc.yaml says exactly what each stage touches: every library module a stage's entry point imports, directly or
through other modules, is one of its deps; otherwise a change there reruns nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.fakes import REPO

PIPELINES = ("dvc.yaml", "validate/dvc.yaml")
# Modules that cannot change what a stage writes: argument parsing, exception types, MLflow logging.
NEVER_CHANGE_OUTPUTS = {"pipeline/cli.py", "pipeline/errors.py", "pipeline/tracking.py"}


def _imports(path: Path) -> set[str]:
    """The ``pipeline.*`` modules a file imports anywhere (also inside functions: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "pipeline" and (REPO / f"{n.replace('.', '/')}.py").is_file()}
    return found


def _closure(script: Path) -> set[str]:
    """Files of every ``pipeline`` module reachable from ``script`` by imports."""
    todo, seen = [script], set()
    while todo:
        for module in _imports(todo.pop()):
            path = f"{module.replace('.', '/')}.py"
            if path not in seen:
                seen.add(path)
                todo.append(REPO / path)
    return seen


def _stages() -> list[tuple[str, str, list[str]]]:
    out = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].items():
            body = stage.get("do", stage)
            out.append((f"{pipeline}:{name}", body["cmd"], [d if isinstance(d, str) else next(iter(d))
                                                           for d in body.get("deps", [])]))
    return out


@pytest.mark.parametrize("stage, cmd, deps", _stages(), ids=[s[0] for s in _stages()])
def test_every_imported_module_is_a_dep(stage: str, cmd: str, deps: list[str]) -> None:
    script = re.search(r"python (stages/\w+\.py)", cmd)
    assert script, f"{stage}: cmd {cmd!r} does not run a stage file"
    assert script[1] in deps, f"{stage}: its own script {script[1]} must be a dep"
    missing = sorted(_closure(REPO / script[1]) - set(deps) - NEVER_CHANGE_OUTPUTS)
    assert not missing, f"{stage} imports {missing} but dvc.yaml does not list them as deps"


def test_the_rule_sees_lazy_imports(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text("def run():\n    from pipeline.space import build_space\n    import pipeline.data\n")
    assert _imports(script) == {"pipeline.space", "pipeline.data"}
