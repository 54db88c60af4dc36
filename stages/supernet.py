"""DVC stage `supernet@bN`: train block N's supernet on the teacher's features (DNA Sec. 3.2), cached or, when the
cache stage chose cache.mode=online, computed by the teacher from the prepared images as batches are read.

    python stages/supernet.py block=b1 [key=value ...]
    torchrun --standalone --nproc_per_node 2 stages/supernet.py block=b1     # DDP (gloo on CPU, nccl on GPU)

Writes the per-epoch checkpoint artifacts/supernet/<block>.pt (kept by DVC between runs, so a killed run
resumes), metrics/supernet/<block>.json and the loss curves plots/supernet/<block>.csv.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path

import torch.distributed as dist

from pipeline import cli, runtime, tracking
from pipeline.config import Params, as_dict, block_supernet, repo_root
from pipeline.features import open_features
from pipeline.records import write_metrics
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks
from pipeline.supernet import (
    BlockCheckpoint,
    BlockData,
    SupernetBlock,
    checkpoint_path,
    feature_keys,
    feature_moments,
    fingerprint,
    train_block,
)

FEATURES, TEACHER, PREPARED = Path("artifacts/features"), Path("artifacts/teacher"), Path("data/prepared")
METRICS_DIR, PLOTS_DIR = Path("metrics/supernet"), Path("plots/supernet")
log = logging.getLogger("stages.supernet")


def run(params: Params, block: str) -> list[dict[str, float]]:
    root = repo_root()
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS)).block(block)
    runtime.init_distributed()
    device = runtime.select_device(params.runtime)
    runtime.seed_everything(params.seed)
    in_key, target_key = feature_keys(list(params.space.blocks), block)
    cache = open_features(root / FEATURES, teacher_dir=root / TEACHER, prepared_dir=root / PREPARED, device=device,
                          upto=target_key, verify=runtime.is_main(), channels_last=params.runtime.channels_last)
    net = SupernetBlock(spec)
    if params.supernet.target_norm:
        stats = feature_moments(cache, "train", target_key)
        net.set_target_stats(stats["channel_mean"], stats["channel_std"])
    cfg = block_supernet(params, block)  # a block's own lr and epochs
    loop = runtime.loop_for(params.runtime, device, params.seed)
    ckpt = BlockCheckpoint(checkpoint_path(root, block), fingerprint(params, block, cache),
                           rebuild=f"dvc repro supernet@{block}")
    tracked = {"space": as_dict(params.space), "supernet": as_dict(cfg), "seed": params.seed}
    opened = tracking.stage_run("supernet", tracked, root, params.tracking.experiment, block=block) \
        if runtime.is_main() else contextlib.nullcontext()
    with opened:
        history = train_block(net, BlockData(cache, in_key, target_key), cfg, loop, ckpt,
                              on_epoch=lambda row: tracking.log_metrics(_mlflow_row(row), step=int(row["epoch"])))
        if runtime.is_main():
            _write_outputs(root, block, history)
    if dist.is_initialized():
        dist.destroy_process_group()
    return history


def _mlflow_row(row: dict[str, float]) -> dict[str, float]:
    return {"train/loss": row["train_loss"], "val/loss": row["val_loss"], "val/loss_spread": row["val_loss_std"],
            "val/loss_min": row["val_loss_min"], "val/loss_max": row["val_loss_max"],
            "run/images_per_s": row["run/images_per_s"], "lr": row["lr"]}


def _write_outputs(root: Path, block: str, history: list[dict[str, float]]) -> None:
    """Curves and summary from the checkpoint's history, so a resumed run writes every epoch exactly once."""
    plots = root / PLOTS_DIR / f"{block}.csv"
    plots.parent.mkdir(parents=True, exist_ok=True)
    with plots.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *(k for k in history[0] if k != "epoch")])
        writer.writeheader()
        writer.writerows(history)
    summary = {"epochs": len(history), "val_loss_first": history[0]["val_loss"],
               "val_loss_last": history[-1]["val_loss"], "train_loss_last": history[-1]["train_loss"]}
    write_metrics(root / METRICS_DIR / f"{block}.json", summary)
    log.info("block %s: val loss %.5f -> %.5f over %d epochs", block, summary["val_loss_first"],
             summary["val_loss_last"], len(history))


if __name__ == "__main__":
    cli.main_block(run)
