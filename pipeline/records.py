"""What a stage writes for DVC to track: per-epoch CSV rows and metrics JSON, without the run's own noise.

Keys under ``run/`` describe one execution (seconds, images/s, how much a resumed run redid), not its result:
they go to MLflow only. Everything else is a result and must be identical when the same inputs run again, so
``dvc repro --force`` of a deterministic stage leaves ``dvc.lock`` and ``dvc metrics diff`` unchanged.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic

RUN = "run/"  # the prefix of per-execution facts: MLflow only


def results(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` without its ``run/`` keys."""
    return {k: v for k, v in row.items() if not k.startswith(RUN)}


def append_row(path: Path, row: Mapping[str, float]) -> None:
    """Append one row of results, writing the header when the file is new."""
    row = results(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """A metrics JSON file (``dvc metrics``) of the results in ``metrics``, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(results(metrics), indent=2) + "\n")
