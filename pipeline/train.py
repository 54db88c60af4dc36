"""The shared classification loop (teacher, retrained student): resume, epochs, evaluate, checkpoint.

Optimizer and schedule come from timm's factories; the checkpoint after every epoch holds model,
optimizer, epoch and the run's identity (recipe, data, seed, model, inputs), so a killed run resumes where it
stopped and a changed setting starts over. Callers may swap the loss (knowledge distillation) and keep a timm EMA
of the weights (the retrained student).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline import checkpoint
from pipeline.config import Recipe, as_dict
from pipeline.data import Split, batches
from pipeline.runtime import (
    Loop,
    Precision,
    autocast,
    global_batch_norm,
    init_distributed,
    is_main,
    maybe_ddp,
    progress,
    shard,
    unwrap,
)

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, meta: Mapping[str, Any], loop: Loop, batch_size: int) -> dict[str, float]:
    """Top-1 accuracy and cross-entropy over a whole split."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches(split, meta, batch_size, loop.device, channels_last=loop.channels_last, workers=loop.workers):
        with autocast(loop.device, loop.amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return {"acc": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


def _optimizer_and_schedule(model: nn.Module, recipe: Recipe, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    kwargs = {"momentum": recipe.momentum} if recipe.opt in ("sgd", "momentum", "rmsprop", "rmsproptf") else {}
    opt = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay, **kwargs)
    sched, _ = create_scheduler_v2(opt, sched=recipe.sched, num_epochs=recipe.epochs,
                                   warmup_epochs=recipe.warmup_epochs, min_lr=recipe.min_lr,
                                   updates_per_epoch=steps_per_epoch, step_on_epochs=False)
    return opt, sched


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched, train: Split, meta: Mapping[str, Any],
                 recipe: Recipe, loop: Loop, precision: Precision, epoch: int, steps_per_epoch: int, loss_fn: LossFn | None = None,
                 ema: nn.Module | None = None) -> dict[str, float]:
    """One epoch. Under DDP every rank reads and augments the same global batch (the augmentation draws one process
    makes) and trains on its part (``runtime.Shard``): the steps of one process, up to float32 rounding."""
    model.train()
    part = shard()
    loss_sum, n, start = torch.zeros((), device=loop.device), 0, time.perf_counter()
    data = batches(train, meta, recipe.batch_size, loop.device, shuffle=True, seed=loop.seed, epoch=epoch,
                   augment_cfg=recipe.augment, channels_last=loop.channels_last, workers=loop.workers)
    for step, (x, y) in enumerate(progress(data, loop.progress, total=steps_per_epoch, desc=f"epoch {epoch}")):
        if len(y) < part.world:  # a last batch too small to give every rank a row
            break
        batch = len(y)
        x, y = x[part.part(batch)], y[part.part(batch)]
        with precision.autocast(), global_batch_norm():
            logits = model(x)
            loss = (loss_fn(logits, x, y) if loss_fn is not None
                    else F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing))
        opt.zero_grad(set_to_none=True)
        precision.backward(part.global_mean(loss, len(y), batch))
        precision.step(opt)
        updates = epoch * steps_per_epoch + step + 1
        sched.step_update(num_updates=updates)
        if ema is not None:
            ema.update(unwrap(model), step=updates)
        loss_sum += loss.detach().float() * len(y)  # no .item(): keeps the step free of syncs
        n += batch
    if dist.is_initialized():
        dist.all_reduce(loss_sum)  # the ranks' parts: the global batches' loss sum
    seconds = time.perf_counter() - start
    return {"train/loss": float(loss_sum) / max(n, 1), "run/train_images_per_s": n / seconds,
            "lr": opt.param_groups[0]["lr"]}


def fit(model: nn.Module, train: Split, val: Split, meta: Mapping[str, Any], recipe: Recipe, loop: Loop, ckpt_path: Path,
        on_epoch: Callable[[int, dict], None] | None = None, *, loss_fn: LossFn | None = None,
        ema: nn.Module | None = None, identity: Mapping[str, Any] | None = None) -> nn.Module:
    """Train ``recipe.epochs`` epochs, resuming from ``ckpt_path``; returns the best-val-accuracy model.

    ``loss_fn`` replaces the label-smoothed cross-entropy; ``ema`` (a timm ``ModelEmaV3`` of ``model``) is updated
    every step and is what gets evaluated and selected; a checkpoint is resumed only under the same recipe and
    ``identity`` (plain containers naming what else defines the run: data, seed, model, initialisation, loss).
    """
    identity = {"recipe": as_dict(recipe), **(identity or {})}
    init_distributed()
    shard().check(recipe.batch_size, "train.batch_size")
    steps = -(-len(train.labels) // recipe.batch_size)  # global batches: the same schedule on any number of ranks
    model = maybe_ddp(model, loop.device)
    opt, sched = _optimizer_and_schedule(model, recipe, steps)
    precision = Precision(loop.device, loop.amp)
    start, best = 0, {"acc": -1.0, "state": None}
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path, rebuild=f"rm {ckpt_path} (a fresh run starts over)")
        if checkpoint.same_identity(state, identity, ckpt_path):
            unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            precision.load_state_dict(state.get("scaler", {}))
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            start, best = state["epoch"] + 1, state["best"]
            log.info("resuming from %s after epoch %d", ckpt_path, state["epoch"])
    for epoch in range(start, recipe.epochs):
        metrics = _train_epoch(model, opt, sched, train, meta, recipe, loop, precision, epoch, steps, loss_fn, ema)
        selected = ema.module if ema is not None else unwrap(model)
        metrics.update({f"val/{k}": v for k, v in evaluate(selected, val, meta, loop, recipe.eval_batch_size).items()})
        if metrics["val/acc"] > best["acc"]:
            best = {"acc": metrics["val/acc"], "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in selected.state_dict().items()}}
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if is_main():
            state = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "scaler": precision.state_dict(), "best": best, "identity": identity}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            checkpoint.save(ckpt_path, state)
            if on_epoch:
                on_epoch(epoch, metrics)
    model = unwrap(model)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return model
