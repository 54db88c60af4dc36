"""DVC stage `teacher`: train (or load) the timm teacher, cut it into blocks, report its accuracy."""

from __future__ import annotations

import logging

from pipeline import cli, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.data import load_meta, load_split, prepared_identity
from pipeline.records import append_row, write_metrics
from pipeline.runtime import loop_for, seed_everything, select_device, to_device_model
from pipeline.teacher import create_teacher, cut_blocks, load_weights, save_teacher
from pipeline.train import evaluate, fit

PREPARED, OUT, CKPT = "data/prepared", "artifacts/teacher", "checkpoints/teacher.pt"
METRICS, PLOT = "metrics/teacher.json", "plots/teacher.csv"
log = logging.getLogger("stages.teacher")


def run(params: Params) -> None:
    root, cfg = repo_root(), params.teacher
    meta = load_meta(root / PREPARED)
    splits = {s: load_split(root / PREPARED, s) for s in ("train", "val", "test")}
    seed_everything(params.seed)
    model = create_teacher(cfg, meta["in_chans"], meta["num_classes"])
    blocks = cut_blocks(model, cfg.boundaries, meta["in_chans"], meta["image_size"])  # fails before training
    device = select_device(params.runtime)
    model = to_device_model(model, device, params.runtime.channels_last)
    loop = loop_for(params.runtime, device, params.seed)
    tracked = {"teacher": as_dict(cfg), "seed": params.seed, "runtime.amp": params.runtime.amp}
    with tracking.stage_run("teacher", tracked, root, params.tracking.experiment):
        if cfg.checkpoint:
            load_weights(model, root / cfg.checkpoint)
        elif cfg.train.epochs:
            (root / PLOT).unlink(missing_ok=True)
            identity = {"data": prepared_identity(root / PREPARED), "seed": params.seed, "amp": params.runtime.amp,
                        "model": {k: v for k, v in as_dict(cfg).items() if k != "train"}}  # train: the recipe
            model = fit(model, splits["train"], splits["val"], meta, cfg.train, loop, root / CKPT, identity=identity,
                        on_epoch=lambda epoch, m: (tracking.log_metrics(m, step=epoch),
                                                   append_row(root / PLOT, {"epoch": epoch, **m})))
        metrics = {f"{s}/acc": evaluate(model, splits[s], meta, loop, cfg.train.eval_batch_size)["acc"]
                   for s in ("val", "test")}
        metrics["params"] = sum(p.numel() for p in model.parameters())
        tracking.log_metrics(metrics)
        save_teacher(model.cpu(), {"teacher": cfg.name, "config": as_dict(cfg), "image_size": meta["image_size"],
                                   "in_chans": meta["in_chans"], "num_classes": meta["num_classes"],
                                   "blocks": blocks}, root / OUT)
    write_metrics(root / METRICS, metrics)
    log.info("teacher %s: val %.4f, test %.4f", cfg.name, metrics["val/acc"], metrics["test/acc"])


if __name__ == "__main__":
    cli.main(run)
