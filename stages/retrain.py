"""DVC stage `retrain`: train the searched student from scratch (or from its supernet weights), export, register.

    python stages/retrain.py [retrain.kd_weight=0 retrain.init=supernet ...]

Reads ``search.out_dir``/architecture.json, the prepared data and the teacher (its blocks.json fixes the student's
geometry; its weights are the distillation target when retrain.kd_weight > 0). Writes artifacts/student (timm
config.json + model.safetensors + architecture.json, model.onnx with retrain.onnx=true), the per-epoch resume
checkpoint checkpoints/retrain.pt (kept by DVC between runs), metrics/student.json and plots/student.csv. The
model is logged to MLflow and registered as retrain.registry_name (an empty name skips both, e.g. in smoke runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3

from pipeline import checkpoint, cli, retrain, runtime, student, tracking
from pipeline.config import Params, as_dict, repo_root
from pipeline.data import load_meta, load_split, normalize, prepared_identity
from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks
from pipeline.teacher import load_teacher, weights_hash
from pipeline.train import evaluate, fit

PREPARED, TEACHER, SUPERNET = Path("data/prepared"), Path("artifacts/teacher"), Path("artifacts/supernet")
OUT, CKPT = Path("artifacts/student"), Path("checkpoints/retrain.pt")
METRICS, PLOT = Path("metrics/student.json"), Path("plots/student.csv")
EXPORT_ONLY = ("train", "onnx", "registry_name")  # retrain keys that do not change the training (train: the recipe)
log = logging.getLogger("stages.retrain")


def run(params: Params) -> dict[str, float]:
    root, cfg, rt = repo_root(), params.retrain, params.runtime
    meta = load_meta(root / PREPARED)
    spec = build_space(params.space, load_teacher_blocks(root / TEACHER_BLOCKS))
    runtime.seed_everything(params.seed)
    built = student.from_architecture(root / params.search.out_dir / student.ARCHITECTURE, spec, meta, params.search,
                                      cfg.drop_rate, cfg.drop_path)  # every check runs before any training
    splits = {s: load_split(root / PREPARED, s) for s in ("train", "val", "test")}
    runtime.init_distributed()
    device = runtime.select_device(rt)
    init = retrain.supernet_state(spec, built.choice, root / SUPERNET) if cfg.init == "supernet" else {}
    inherited = retrain.inherit(built.model, init) if init else 0.0
    model = runtime.to_device_model(built.model, device, rt.channels_last)
    loss_fn, teacher_sha = None, ""
    if cfg.kd_weight > 0:
        teacher = runtime.to_device_model(load_teacher(root / TEACHER, device)[0], device, rt.channels_last)
        loss_fn = retrain.distillation_loss(teacher, cfg.kd_weight, cfg.kd_temperature, cfg.train.label_smoothing)
        teacher_sha = weights_hash(root / TEACHER)
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema else None
    loop = runtime.loop_for(rt, device, params.seed)
    identity = {"architecture": retrain.fingerprint(args=built.args), "seed": params.seed, "amp": rt.amp,
                "teacher": teacher_sha, "supernet": checkpoint.tensors_digest(init) if init else "",
                "retrain": {k: v for k, v in as_dict(cfg).items() if k not in EXPORT_ONLY},
                "data": prepared_identity(root / PREPARED)}
    tracked = {"retrain": as_dict(cfg), "space": as_dict(params.space), "search.metric": params.search.metric,
               "search.budget": params.search.budget, "seed": params.seed, "runtime.amp": rt.amp}
    main = runtime.is_main()
    with tracking.stage_run("retrain", tracked, root, params.tracking.experiment) if main else contextlib.nullcontext():
        model = fit(model, splits["train"], splits["val"], meta, cfg.train, loop, root / CKPT, identity=identity,
                    on_epoch=lambda epoch, m: _on_epoch(root, epoch, m), loss_fn=loss_fn, ema=ema)
        if not main:
            return {}
        metrics = {f"{s}/acc": evaluate(model, splits[s], meta, loop, cfg.train.eval_batch_size)["acc"] for s in ("val", "test")}
        metrics.update({"params": built.cost.params, "flops": built.cost.flops, "init/inherited_fraction": inherited,
                        "search/score": float(built.architecture.get("score", 0.0))})
        model = model.cpu().eval().to(memory_format=torch.contiguous_format)
        student.save(model, root / OUT, built.architecture, meta.get("classes"))
        example = _examples(splits["test"], meta)
        if cfg.onnx:
            metrics["export/onnx_max_abs_diff"] = student.export_onnx(model, root / OUT / student.ONNX, example)
        tracking.log_metrics(metrics)
        if cfg.registry_name:
            retrain.register(model, example, cfg.registry_name)
    (root / METRICS).parent.mkdir(parents=True, exist_ok=True)
    (root / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("student %s: val %.4f, test %.4f, %d params, %d FLOPs", list(built.choice.values()), metrics["val/acc"],
             metrics["test/acc"], built.cost.params, built.cost.flops)
    return metrics


def _on_epoch(root: Path, epoch: int, metrics: dict[str, float]) -> None:
    tracking.log_metrics(metrics, step=epoch)
    retrain.record_epoch(root / PLOT, {"epoch": epoch, **metrics})


def _examples(split, meta: dict, n: int = 4) -> torch.Tensor:
    """A few normalised test images: the registry's input example and the ONNX check's input (batch >= 2)."""
    return normalize(torch.from_numpy(np.array(split.images[:n])), meta)


if __name__ == "__main__":
    cli.main(run)
