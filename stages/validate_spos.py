"""Validation stage `validate_spos`: the SPOS baseline (pipeline.spos), one weight-sharing supernet over the whole
student trained on labels at the DNA supernets' training compute, and every drawn architecture rated with it.

    dvc repro validate/dvc.yaml          # or: python stages/validate_spos.py validate.spos.compute=2

Reads artifacts/validate/archs.json, the prepared data and the teacher's blocks.json. Writes artifacts/validate/spos/:
supernet.pt (the per-epoch checkpoint, kept by DVC between runs: a killed run resumes, a finished one is only
re-rated), ratings.csv (name, acc, loss: val accuracy with BN recalibrated per candidate), epochs.csv and
summary.json (images, MACs, the compute ratio to the DNA supernets). MLflow: run validate_spos.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import cli, runtime, spos, student, tracking, validation
from pipeline.config import Params, as_dict, repo_root
from pipeline.data import load_meta, load_split, prepared_identity
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

OUT = Path("artifacts/validate")
SAMPLE = "dvc repro validate/dvc.yaml:validate_sample"
log = logging.getLogger("stages.validate_spos")


def run(params: Params) -> dict[str, dict[str, float]]:
    root, cfg, prepared = repo_root(), params.validate.spos, repo_root() / "data/prepared"
    archs = validation.read_sampled(root / OUT / "archs.json")
    meta = load_meta(prepared)
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS))
    choices = {a.name: student.choice_of({"candidates": list(a.candidates)}, spec, str(OUT / "archs.json"), SAMPLE)
               for a in archs}
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    compute = spos.match_compute(spec, cfg, params, len(train.labels) * params.cache.views)
    device = runtime.select_device(params.runtime)
    loop = runtime.loop_for(params.runtime, device, params.seed)
    runtime.seed_everything(params.seed)
    net, out = spos.SposSupernet(spec), root / OUT / "spos"
    tracked = {"validate": {"spos": as_dict(cfg)}, "space": as_dict(params.space), "seed": params.seed}
    with tracking.stage_run("validate_spos", tracked, root, params.tracking.experiment):
        history = spos.train(net, train, meta, cfg, compute.steps, loop, out / "supernet.pt",
                             spos.identity(params, compute, prepared_identity(prepared)),
                             on_epoch=lambda row: tracking.log_metrics(row, step=int(row["epoch"])))
        rated = spos.rate(net, choices, train, val, meta, cfg, loop)
        images = int(sum(row["images"] for row in history))
        summary = {"images": images, "steps_per_epoch": compute.steps, "macs_per_image": compute.macs_per_image,
                   "dna_macs": compute.dna_macs, "compute_ratio": compute.ratio(images)}
        tracking.log_metrics({f"spos/{k}": x for k, x in summary.items()})
    validation.write_rows(out / "ratings.csv", [{"name": n, **r} for n, r in rated.items()], ("name", "acc", "loss"))
    validation.write_rows(out / "epochs.csv", history, list(history[0]))
    validation.write_json(out / "summary.json", summary)
    log.info("SPOS: %d images = %.2fx the DNA supernets' training MACs; rated %d architectures (acc %.4f..%.4f)",
             images, summary["compute_ratio"], len(rated), min(r["acc"] for r in rated.values()),
             max(r["acc"] for r in rated.values()))
    return rated


if __name__ == "__main__":
    cli.main(run)
