"""The ranking check's SPOS baseline (Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform
Sampling", ECCV 2020): one weight-sharing supernet over the whole student (stem, every block's choice layers, head,
classifier), trained on labels with cross-entropy, one uniformly random architecture per step. A candidate is rated
by its val accuracy with the shared weights after its BN statistics are recalculated on a fixed set of train images
(as SPOS does before rating; DNA, Li et al., CVPR 2020, recalibrates per candidate the same way, block by block).
DNA's claim is that such whole-network weight sharing ranks architectures worse than its block-wise distillation
(its ranking figure: DNA vs SPOS, DARTS, MnasNet); the check measures both in one space.

Compute is matched (``match_compute``): backward costs about twice the forward in both, so training compute is
images x forward MACs per image. The DNA supernets spend, per block, its epochs (block_supernet) x its train images x the mean
MACs of a uniformly sampled path of that block at the supernet's (teacher-matched) widths, the stem in block 0;
SPOS spends its images x the mean MACs of a whole student at student widths. ``validate.spos.compute`` is the
ratio (1 = equal); the images it buys are spread over ``validate.spos.epochs`` epochs.

Resumable like every loop here: a checkpoint after each epoch, resumed only under the same identity; the per-epoch
data order and paths are seeded from (seed, epoch), so a resumed run replays what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models._efficientnet_builder import efficientnet_init_weights
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from pipeline import checkpoint, records, runtime
from pipeline import space as space_module
from pipeline.config import Params, Spos, as_dict, block_supernet
from pipeline.data import Split, batches, normalize
from pipeline.space import BlockSpec, SpaceSpec, build_layer, build_stem, candidate_id, fixed_parts_cost, module_cost
from pipeline.supernet import recalibrate_bn
from pipeline.train import evaluate

log = logging.getLogger(__name__)
REBUILD = "dvc repro validate/dvc.yaml:validate_spos"
RATING_KEYS = ("bn_samples", "val_samples", "eval_batch_size")  # rating settings: changing them retrains nothing
_PATHS, _BN = 1, 2  # random streams beside the seed


# ---------------------------------------------------------------------------------------------------- the model
class SposSupernet(nn.Module):
    """Every candidate of every block with shared weights at student widths, between the student's stem and head.

    ``path(choice)`` is the network timm builds for ``choice`` (one candidate id per block), made of shared modules;
    ``forward(x, choice)`` runs it.
    """

    def __init__(self, spec: SpaceSpec):
        super().__init__()
        self.spec = spec
        self.stem = build_stem(spec.stem, spec.act)
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(nn.ModuleDict({op: build_layer(block, layer, op, student=True)
                                                       for op in layer.choices}) for layer in cell.layers)
                          for cell in block.cells)
            for block in spec.blocks)
        width = spec.blocks[-1].width
        norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(spec.act))
        self.head = (nn.Sequential(create_conv2d(width, spec.head, 1), norm_act(spec.head, inplace=True))
                     if spec.head else nn.Identity())  # timm EfficientNet's conv_head + bn2
        self.pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.classifier = nn.Linear(spec.head or width, spec.num_classes)
        efficientnet_init_weights(self)

    def path(self, choice: Mapping[str, str]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for block, cells in zip(self.spec.blocks, self.blocks, strict=True):
            cell, ops = block.parse(choice[block.name])
            layers += [layer[op] for layer, op in zip(cells[cell.index], ops, strict=True)]
        return nn.Sequential(self.stem, *layers, self.head, self.pool, self.classifier)

    def forward(self, x: torch.Tensor, choice: Mapping[str, str]) -> torch.Tensor:
        return self.path(choice)(x)


class ArchitectureSampler:
    """Uniform over the whole networks the space holds: block by block, a cell in proportion to its candidates times
    the networks that can follow it (cells may write widths only some later cells read), then every op alike."""

    def __init__(self, spec: SpaceSpec):
        self.blocks = spec.blocks
        self.weights: list[list[int]] = []  # per block, per cell: its candidates x the networks that can follow it
        follow = {cell.layers[-1].student_out: 1 for cell in spec.blocks[-1].cells}  # width read -> networks
        for block in reversed(spec.blocks):
            weights = [math.prod(len(layer.choices) for layer in cell.layers) * follow.get(cell.layers[-1].student_out, 0)
                       for cell in block.cells]
            follow = {}
            for cell, weight in zip(block.cells, weights, strict=True):
                follow[cell.layers[0].student_in] = follow.get(cell.layers[0].student_in, 0) + weight
            self.weights.insert(0, weights)

    def __call__(self, rng: np.random.Generator) -> dict[str, str]:
        choice, reads = {}, self.blocks[0].cells[0].layers[0].student_in  # the stem's width
        for block, weights in zip(self.blocks, self.weights, strict=True):
            weight = np.array([w if cell.layers[0].student_in == reads else 0
                               for cell, w in zip(block.cells, weights, strict=True)], dtype=float)
            cell = block.cells[int(rng.choice(len(weight), p=weight / weight.sum()))]
            choice[block.name] = candidate_id(cell, [layer.choices[int(rng.integers(len(layer.choices)))]
                                                     for layer in cell.layers])
            reads = cell.layers[-1].student_out
        return choice


# ---------------------------------------------------------------------------------------------------- compute
@dataclass(frozen=True)
class Compute:
    """SPOS's training budget, matched to the DNA supernets' (forward MACs; backward is ~2x forward in both)."""

    dna_macs: float  # all DNA supernet training: every block, every epoch
    macs_per_image: float  # a uniformly random whole student (stem, blocks, head, classifier)
    steps: int  # SPOS steps per epoch

    def ratio(self, images: int) -> float:
        """SPOS training MACs over ``images`` as a multiple of the DNA supernets'."""
        return images * self.macs_per_image / self.dna_macs


def mean_block_macs(block: BlockSpec, student: bool) -> float:
    """Forward MACs per image of a uniformly sampled path of ``block`` (``supernet.PathSampler``'s law: a cell in
    proportion to its candidates, every op alike) at student or at supernet widths; block 0 includes the stem."""
    sizes = np.array([math.prod(len(layer.choices) for layer in cell.layers) for cell in block.cells], dtype=float)
    total = 0.0
    for weight, cell in zip(sizes / sizes.sum(), block.cells, strict=True):
        for layer in cell.layers:
            chs = layer.student_in if student else layer.in_chs
            total += weight * float(np.mean([module_cost(build_layer(block, layer, op, student),
                                                         (chs, *layer.in_size)).flops for op in layer.choices]))
    if block.stem is not None and not student:
        total += module_cost(build_stem(block.stem, block.act), (block.stem.in_chs, *block.stem.in_size)).flops
    return total


def match_compute(spec: SpaceSpec, cfg: Spos, params: Params, cached_train: int) -> Compute:
    """Steps per epoch that spend ``cfg.compute`` x the DNA supernets' training MACs (each block at its own
    epochs and train samples); ``cached_train`` = the train samples a supernet epoch draws from (train images x
    cache.views)."""

    def images(block: str) -> int:  # what the block's supernet trains on: its epochs x its whole batches
        own = block_supernet(params, block)
        return own.epochs * (min(own.train_samples or cached_train, cached_train) // own.batch_size) * own.batch_size

    dna = sum(images(b.name) * mean_block_macs(b, student=False) for b in spec.blocks)
    per_image = fixed_parts_cost(spec).flops + sum(mean_block_macs(b, student=True) for b in spec.blocks)
    steps = max(1, round(cfg.compute * dna / (per_image * cfg.epochs * cfg.batch_size)))
    return Compute(float(dna), float(per_image), steps)


def identity(params: Params, compute: Compute, data: str) -> dict[str, Any]:
    """What the trained supernet depends on: its recipe (not its rating settings), steps, space, seed, precision,
    the prepared data and the code (as the DNA supernets' fingerprint)."""
    code = {Path(m.__file__).name: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()[:16]
            for m in (space_module, sys.modules[__name__])}
    recipe = {k: v for k, v in as_dict(params.validate.spos).items() if k not in RATING_KEYS}
    return {"spos": recipe, "steps": compute.steps, "space": as_dict(params.space), "seed": params.seed,
            "amp": params.runtime.amp, "data": data, "code": code}


# ---------------------------------------------------------------------------------------------------- training
def train(net: SposSupernet, split: Split, meta: Mapping[str, Any], cfg: Spos, steps: int, loop: runtime.Loop,
          ckpt: Path, ident: Mapping[str, Any], on_epoch: Callable[[dict[str, float]], None] | None = None
          ) -> list[dict[str, float]]:
    """Train (or resume) ``cfg.epochs`` epochs of ``steps`` steps, a checkpoint after each; returns the per-epoch
    results. One process (the check's units parallelise across processes and machines instead)."""
    net = runtime.to_device_model(net, loop.device, loop.channels_last)
    optimizer = create_optimizer_v2(net, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=cfg.epochs, decay_epochs=1,
                                       decay_rate=cfg.lr_decay)
    precision = runtime.Precision(loop.device, loop.amp)
    history, start = _resume(ckpt, ident, net, optimizer, precision)
    sampler = ArchitectureSampler(net.spec)
    for epoch in range(start, cfg.epochs):
        scheduler.step(epoch)
        row = _train_epoch(net, optimizer, precision, sampler, _epoch_batches(split, meta, cfg, loop, epoch, steps),
                           cfg.label_smoothing, loop, np.random.default_rng([loop.seed, _PATHS, epoch]))
        row.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        history.append(records.results(row))
        checkpoint.save(ckpt, {"identity": dict(ident), "epoch": epoch + 1, "epochs": cfg.epochs,
                               "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": precision.state_dict(), "history": history})
        log.info("SPOS epoch %d/%d: train loss %.4f, %.0f img/s, checkpoint saved", epoch + 1, cfg.epochs,
                 row["train/loss"], row["run/images_per_s"])
        if on_epoch is not None:
            on_epoch(row)
    return history


def _resume(path: Path, ident: Mapping[str, Any], net: nn.Module, optimizer: torch.optim.Optimizer,
            precision: runtime.Precision) -> tuple[list[dict[str, float]], int]:
    if not path.is_file():
        return [], 0
    state = checkpoint.load(path, REBUILD)
    if not checkpoint.same_identity(state, ident, path):
        return [], 0
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    precision.load_state_dict(state.get("scaler", {}))
    log.info("SPOS: resuming from %s after epoch %d/%d", path, state["epoch"], state["epochs"])
    return list(state["history"]), int(state["epoch"])


def _epoch_batches(split: Split, meta: Mapping[str, Any], cfg: Spos, loop: runtime.Loop, epoch: int, steps: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` augmented batches of freshly shuffled train images; more passes over the split when it is short."""
    passes = -(-steps // -(-len(split.labels) // cfg.batch_size))
    chained = itertools.chain.from_iterable(
        batches(split, meta, cfg.batch_size, loop.device, shuffle=True, seed=loop.seed, epoch=epoch * passes + p,
                augment_cfg=cfg.augment, channels_last=loop.channels_last, workers=loop.workers) for p in range(passes))
    return itertools.islice(chained, steps)


def _train_epoch(net: SposSupernet, optimizer: torch.optim.Optimizer, precision: runtime.Precision,
                 sampler: ArchitectureSampler, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                 label_smoothing: float, loop: runtime.Loop, rng: np.random.Generator) -> dict[str, float]:
    net.train()
    loss_sum, seen, start = torch.zeros((), dtype=torch.float64, device=loop.device), 0, time.perf_counter()
    for x, y in data:
        choice = sampler(rng)
        with precision.autocast():
            loss = F.cross_entropy(net(x, choice), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)  # unsampled ops keep grad None, so the optimizer leaves them alone
        precision.backward(loss)
        precision.step(optimizer)
        loss_sum += loss.detach().double() * len(y)  # on the device: no sync per step
        seen += len(y)
    return {"train/loss": float(loss_sum) / max(seen, 1), "images": float(seen),
            "run/images_per_s": seen / max(time.perf_counter() - start, 1e-9)}


# ---------------------------------------------------------------------------------------------------- rating
@torch.no_grad()
def rate(net: SposSupernet, choices: Mapping[str, Mapping[str, str]], train_split: Split, val: Split,
         meta: Mapping[str, Any], cfg: Spos, loop: runtime.Loop) -> dict[str, dict[str, float]]:
    """{name: {"acc", "loss"}} on val for each architecture with the shared weights, BN recalibrated for each on the
    same ``cfg.bn_samples`` train images (seeded, not augmented); on a copy, so the trained state stays as saved."""
    net = copy.deepcopy(runtime.unwrap(net))
    index = np.sort(np.random.default_rng([loop.seed, _BN]).permutation(len(train_split.labels))[:cfg.bn_samples])
    x_bn = normalize(torch.from_numpy(np.asarray(train_split.images[index])).to(loop.device), meta)
    if loop.channels_last:
        x_bn = x_bn.contiguous(memory_format=torch.channels_last)
    if cfg.val_samples:
        val = Split(val.images[:cfg.val_samples], val.labels[:cfg.val_samples])
    rated = {}
    for name, choice in choices.items():
        path = net.path(choice)
        recalibrate_bn(path, x_bn)
        rated[name] = evaluate(path, val, meta, loop, cfg.eval_batch_size)
    return rated
