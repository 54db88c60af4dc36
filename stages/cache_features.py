"""DVC stage `cache_features`: run the teacher once over train and val, store every block boundary.

Writes artifacts/features (see pipeline.features); the supernet and scoring stages read it through
``open_features``. Before writing, the cache's size is estimated from blocks.json and ``cache.mode`` resolved
against it (``pipeline.features.resolve_mode``): online writes only a manifest and those stages run the teacher.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline import cli, tracking
from pipeline.config import ConfigError, Params, as_dict, repo_root
from pipeline.data import augment, load_meta, load_split, normalize, prepared_identity
from pipeline.features import (
    SPLITS,
    boundary_shapes,
    estimate_bytes,
    resolve_mode,
    sample_counts,
    write_features,
    write_online_manifest,
)
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
    shapes, samples = boundary_shapes(blocks), sample_counts(splits, cfg.views)
    estimate = estimate_bytes(shapes, samples, cfg.dtype)
    log.info("feature cache: estimated %.3g GB (%s, %s samples, %d train view(s))", estimate / 1e9, cfg.dtype,
             samples, cfg.views)
    decision = resolve_mode(cfg, estimate, root / OUT)
    log.info("cache.mode=%s -> %s: %s (%.3g GB free)", cfg.mode, decision.mode, decision.reason,
             decision.free_bytes / 1e9)
    info = {"name": blocks["teacher"], "blocks": blocks["blocks"]}
    sizing = {"cache/estimate_bytes": estimate, "cache/online": float(decision.mode == "online"),
              "run/free_bytes": decision.free_bytes}
    tracked = {"cache": as_dict(cfg), "seed": params.seed, "teacher.train.augment": as_dict(aug_cfg)}
    with tracking.stage_run("cache_features", tracked, root, params.tracking.experiment):
        if decision.mode == "online":
            write_online_manifest(root / OUT, shapes=shapes, samples=samples, dtype=cfg.dtype, views=cfg.views,
                                  seed=params.seed, batch_size=cfg.batch_size, augment_cfg=aug_cfg,
                                  teacher_sha256=weights_hash(root / TEACHER), prepared=prepared_identity(root / PREPARED),
                                  info=info, decision=decision.record(cfg))
            tracking.log_metrics(sizing)
            log.info("online teacher: %s holds only the manifest; the supernet and score stages run the teacher",
                     root / OUT)
            return
        model = to_device_model(model, device, rt.channels_last)
        layout = torch.channels_last if rt.channels_last else torch.contiguous_format

        def extract(x: torch.Tensor) -> list[torch.Tensor]:
            return block_outputs(model, blocks, x.contiguous(memory_format=layout))

        summary = write_features(
            root / OUT, splits, extract, [b["name"] for b in blocks["blocks"]], lambda u8: normalize(u8, meta),
            augment=lambda x, g: augment(x, aug_cfg, g), views=cfg.views, dtype=cfg.dtype,
            batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, seed=params.seed,
            teacher_sha256=weights_hash(root / TEACHER), info=info, decision=decision.record(cfg),
            device=device, show_progress=rt.progress)
        tracking.log_metrics({**summary, **sizing})
    log.info("feature cache: %.1f MB in %.1f s (%.0f MB/s written)", summary["cache/bytes"] / 1e6,
             summary["cache/wall_s"], summary["cache/write_mb_s"])


if __name__ == "__main__":
    cli.main(run)
