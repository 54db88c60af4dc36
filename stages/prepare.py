"""DVC stage `prepare`: raw dataset -> seeded train / val / test uint8 arrays in data/prepared."""

from __future__ import annotations

import logging

from pipeline import cli, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.data import prepare

OUT = "data/prepared"
log = logging.getLogger("stages.prepare")


def run(params: Params) -> None:
    root = repo_root()
    with tracking.stage_run("prepare", {"data": as_dict(params.data), "seed": params.seed}, root,
                            params.tracking.experiment):
        meta = prepare(params.data, params.seed, root / OUT, workers=params.runtime.workers)
        tracking.log_metrics({f"data/{k}_images": v for k, v in meta["sizes"].items()})
    log.info("prepared %s: %s", params.data.name, meta["sizes"])


if __name__ == "__main__":
    cli.main(run)
