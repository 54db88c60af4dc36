"""``python -m pipeline.overlay OVERLAY [OVERLAY ...] DIR [key=value ...]``: a workspace for named overlays
(``configs/*.yaml``, merged in order: ``configs/paper.yaml configs/paper_mini.yaml`` is the paper setting shrunk).

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

USAGE = "usage: python -m pipeline.overlay configs/<overlay>.yaml [configs/<more>.yaml ...] DIR [key=value ...]"


def main(argv: Sequence[str]) -> int:
    positional = next((i for i, arg in enumerate(argv) if "=" in arg), len(argv))
    if positional < 2:
        print(USAGE, file=sys.stderr)
        return 2
    overlays, dest, overrides = [Path(a) for a in argv[:positional - 1]], Path(argv[positional - 1]), list(argv[positional:])
    src = Path.cwd().resolve()
    named = " + ".join(map(str, overlays))
    for overlay in overlays:
        if not (src / overlay).is_file():
            print(f"error: overlay {overlay} not found under {src}: name a file such as configs/paper.yaml",
                  file=sys.stderr)
            return 2
    try:
        make_workspace(src, dest.resolve(), overrides, overlays)
    except ConfigError as err:
        print(f"error: {named}: {err}", file=sys.stderr)
        return 2
    print(f"{dest}: params.yaml = params.yaml + {named}{' + overrides' if overrides else ''}. Next:\n"
          f"  cd {dest} && python -m pipeline.describe        # the space: candidates per block, architectures\n"
          f"  cd {dest} && python -m pipeline.repro           # the DAG (dvc repro under one MLflow parent run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
