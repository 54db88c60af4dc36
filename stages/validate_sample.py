"""Validation stage `validate_sample`: the architectures whose stand-alone accuracy tests the block scores.

    dvc repro validate/dvc.yaml          # or: python stages/validate_sample.py validate.stratified=20

Reads the score tables and the searched architecture of the default pipeline; writes
artifacts/validate/archs.json: validate.stratified architectures spread over the cost range, validate.random
ones within validate.window below the search budget, and the searched one (see pipeline.validation.draw).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import assembly, cli, student, validation
from pipeline.config import Params, repo_root

OUT = Path("artifacts/validate")
log = logging.getLogger("stages.validate_sample")


def run(params: Params) -> list[validation.Sampled]:
    root, s, v = repo_root(), params.search, params.validate
    prob = assembly.problem(params, assembly.read_tables(root / s.scores_dir), root)
    tables, fixed = prob.tables, prob.fixed
    searched = student.read_architecture(root / s.out_dir / student.ARCHITECTURE)
    sampled = validation.draw(tables, fixed, s.metric, prob.budget, searched["candidates"], v.stratified,
                              v.random, v.window, params.seed)
    validation.write_json(root / OUT / "archs.json", {"metric": s.metric, "budget": prob.budget,
                                                      "architectures": [a.as_json() for a in sampled]})
    for a in sampled:
        log.info("%-9s %-10s params %9.0f  flops %11.0f  score %.4f  %s", a.name, a.kind, a.params, a.flops, a.score,
                 " ".join(a.candidates))
    return sampled


if __name__ == "__main__":
    cli.main(run)
