"""Per-epoch rows in CSV files that `dvc plots` and people can read."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path


def append_row(path: Path, row: Mapping[str, float]) -> None:
    """Append one row, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(dict(row))
