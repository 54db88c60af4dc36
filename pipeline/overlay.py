"""``python -m pipeline.overlay OVERLAY DIR [key=value ...]``: a workspace for a named overlay (``configs/*.yaml``).

Stages read ``params.yaml`` alone, so an overlay such as ``configs/paper.yaml`` (DNA at ImageNet scale) runs in a copy
of the repository whose params.yaml is params.yaml merged with the overlay and the overrides, written by the smoke
run's ``make_workspace``: the copy's dvc.lock records the params that ran, and this workspace's outputs stay untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.smoke import make_workspace

USAGE = "usage: python -m pipeline.overlay configs/<overlay>.yaml DIR [key=value ...]"


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or "=" in argv[0] or "=" in argv[1]:
        print(USAGE, file=sys.stderr)
        return 2
    overlay, dest, overrides = Path(argv[0]), Path(argv[1]), list(argv[2:])
    src = Path.cwd().resolve()
    if not (src / overlay).is_file():
        print(f"error: overlay {overlay} not found under {src}: name a file such as configs/paper.yaml", file=sys.stderr)
        return 2
    try:
        make_workspace(src, dest.resolve(), overrides, overlay)
    except ConfigError as err:
        print(f"error: {overlay}: {err}", file=sys.stderr)
        return 2
    print(f"{dest}: params.yaml = params.yaml + {overlay}{' + overrides' if overrides else ''}. Next:\n"
          f"  cd {dest} && python -m pipeline.describe        # the space: candidates per block, architectures\n"
          f"  cd {dest} && python -m pipeline.repro           # the DAG (dvc repro under one MLflow parent run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
