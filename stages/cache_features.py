"""DVC stage `cache_features`: run the teacher once over train and val, store every block boundary.

Writes artifacts/features (see pipeline.features); the supernet and scoring stages read it through
``FeatureCache`` and never run the teacher.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline import cli, tracking
from pipeline.config import ConfigError, Params, as_dict, repo_root
from pipeline.data import augment, load_meta, load_split, normalize
from pipeline.features import SPLITS, write_features
from pipeline.runtime import select_device, to_device_model
from pipeline.teacher import block_outputs, load_teacher, weights_hash

PREPARED, TEACHER, OUT = "data/prepared", "artifacts/teacher", "artifacts/features"
log = logging.getLogger("stages.cache_features")


def run(params: Params) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ranks would write the same files
        raise ConfigError("cache_features runs as one process: start it with python, not torchrun")
    root, cfg, rt = repo_root(), params.cache, params.runtime
    aug_cfg = params.teacher.train.augment
    meta = load_meta(root / PREPARED)
    splits = {s: load_split(root / PREPARED, s) for s in SPLITS}
    device = select_device(rt)
    model, blocks = load_teacher(root / TEACHER, device)
    model = to_device_model(model, device, rt.channels_last)
    layout = torch.channels_last if rt.channels_last else torch.contiguous_format

    def extract(x: torch.Tensor) -> list[torch.Tensor]:
        return block_outputs(model, blocks, x.contiguous(memory_format=layout))

    tracked = {"cache": as_dict(cfg), "seed": params.seed, "teacher.train.augment": as_dict(aug_cfg)}
    with tracking.stage_run("cache_features", tracked, root, params.tracking.experiment):
        summary = write_features(
            root / OUT, splits, extract, [b["name"] for b in blocks["blocks"]], lambda u8: normalize(u8, meta),
            augment=lambda x, g: augment(x, aug_cfg, g), views=cfg.views, dtype=cfg.dtype,
            batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, seed=params.seed,
            teacher_sha256=weights_hash(root / TEACHER), info={"name": blocks["teacher"], "blocks": blocks["blocks"]},
            device=device, show_progress=rt.progress)
        tracking.log_metrics(summary)
    log.info("feature cache: %.1f MB in %.1f s (%.0f MB/s written)", summary["cache/bytes"] / 1e6,
             summary["cache/wall_s"], summary["cache/write_mb_s"])


if __name__ == "__main__":
    cli.main(run)
