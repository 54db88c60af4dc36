"""Validation stage `validate_proxy`: the NASWOT zero-cost proxy (Mellor et al., ICML 2021) of every drawn
architecture, its timm student at initialisation (seeded), one more predictor for the ranking check.

    dvc repro validate/dvc.yaml          # or: python stages/validate_proxy.py validate.proxy_batch=64

Reads artifacts/validate/archs.json and the prepared train split; writes artifacts/validate/proxy.csv
(name, naswot). Seconds: one forward pass per architecture.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import cli, runtime, student, tracking, validation
from pipeline.config import Params, repo_root
from pipeline.data import load_meta, load_split
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

OUT = Path("artifacts/validate")
SAMPLE = "dvc repro validate/dvc.yaml:validate_sample"
log = logging.getLogger("stages.validate_proxy")


def run(params: Params) -> dict[str, float]:
    root = repo_root()
    archs = validation.read_sampled(root / OUT / "archs.json")
    meta = load_meta(root / "data/prepared")
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS))
    for a in archs:
        student.choice_of({"candidates": list(a.candidates)}, spec, str(OUT / "archs.json"), SAMPLE)
    tracked = {"validate": {"proxy_batch": params.validate.proxy_batch}, "space": {"act": params.space.act},
               "seed": params.seed}
    with tracking.stage_run("validate_proxy", tracked, root, params.tracking.experiment):
        scores = validation.zero_cost(archs, params, spec, meta, load_split(root / "data/prepared", "train"),
                                      runtime.select_device(params.runtime))
        tracking.log_metrics({f"naswot/{name}": score for name, score in scores.items()})
    validation.write_rows(root / OUT / "proxy.csv", [{"name": n, "naswot": s} for n, s in scores.items()],
                          ("name", "naswot"))
    for name, score in scores.items():
        log.info("%-9s NASWOT %.2f", name, score)
    return scores


if __name__ == "__main__":
    cli.main(run)
