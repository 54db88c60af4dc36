"""Block-wise supernet training (DNA, Li et al., CVPR 2020, Sec. 3.2): one block of the student learns to map the
teacher's features at boundary b-1 (the images for block 0) to those at boundary b, one sampled path per step.

Inputs and targets come from the feature cache, or for data too big to cache from ``features.OnlineFeatures`` (the
frozen teacher run as batches are read, same samples and values); blocks train independently (as separate stages,
processes or machines). A checkpoint after every epoch makes a killed run resumable;
the per-epoch data order and paths are seeded from (seed, block, epoch), so a resumed run replays exactly what
an uninterrupted one would have done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models._efficientnet_builder import efficientnet_init_weights
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import checkpoint, records, runtime
from pipeline import space as space_module
from pipeline.config import Params, Supernet, as_dict
from pipeline.features import prefetch
from pipeline.space import BlockSpec, build_layer, build_stem, candidate_id

log = logging.getLogger(__name__)
INPUT_KEY = "input"  # the feature cache's key for the normalised images (block 0's input)
CHECKPOINT_DIR = Path("artifacts/supernet")


def checkpoint_path(root: Path, block: str) -> Path:
    """The block's per-epoch checkpoint, which is also the trained supernet the score stage reads."""
    return root / CHECKPOINT_DIR / f"{block}.pt"


class Features(Protocol):
    """What training and scoring need from ``pipeline.features.FeatureCache`` (or ``OnlineFeatures``)."""

    def identity(self, keys: Sequence[str]) -> dict[str, Any]: ...

    def num_samples(self, split: str) -> int: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, split: str, key: str, index: np.ndarray | slice, pin_memory: bool = False) -> torch.Tensor: ...


def fingerprint(params: Params, name: str, cache: Features) -> str:
    """Identity of a block's training: its params, the code and the cached features it reads.

    A checkpoint is resumed (or scored) only under the same fingerprint; anything else retrains from scratch,
    so DVC's ``persist`` checkpoint can never leak an old configuration into a new result.
    """
    keys = feature_keys(list(params.space.blocks), name)
    space = {k: v for k, v in as_dict(params.space).items() if k not in ("blocks", "head")}
    code = {Path(m.__file__).name: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
            for m in (space_module, sys.modules[__name__])}
    identity = {"space": space, "block": as_dict(params.space.blocks[name]), "supernet": as_dict(params.supernet),
                "seed": params.seed, "amp": params.runtime.amp, "features": cache.identity(keys), "code": code}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def feature_keys(block_names: Sequence[str], name: str) -> tuple[str, str]:
    """(input key, target key) of a block in the feature cache: the previous boundary (images for the first)."""
    i = list(block_names).index(name)
    return (INPUT_KEY if i == 0 else block_names[i - 1]), name


# ---------------------------------------------------------------------------------------------------- the model
class SupernetBlock(nn.Module):
    """All candidates of one block with shared weights: stem (block 0), then per cell a dict of ops per layer.

    ``forward(x, cid)`` runs candidate ``cid``'s path. Its output is in target units ``(t - target_mean) /
    target_std``: the teacher's own units unless ``supernet.target_norm`` set per-channel statistics;
    ``to_teacher_units`` maps it back.
    """

    def __init__(self, block: BlockSpec):
        super().__init__()
        self.block = block
        self.stem = build_stem(block.stem, block.act) if block.stem is not None else nn.Identity()
        self.cells = nn.ModuleList(
            nn.ModuleList(nn.ModuleDict({op: build_layer(block, layer, op) for op in layer.choices})
                          for layer in cell.layers)
            for cell in block.cells)
        self.register_buffer("target_mean", torch.zeros(block.out_chs, 1, 1))
        self.register_buffer("target_std", torch.ones(block.out_chs, 1, 1))
        efficientnet_init_weights(self)

    def path(self, cid: str) -> nn.Sequential:
        """The modules of one candidate (shared, not copied), in order."""
        cell, ops = self.block.parse(cid)
        layers = self.cells[cell.index]
        return nn.Sequential(self.stem, *(layer[op] for layer, op in zip(layers, ops, strict=True)))

    def forward(self, x: torch.Tensor, cid: str) -> torch.Tensor:
        return self.path(cid)(x)

    def to_teacher_units(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.target_std + self.target_mean

    def to_target_units(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.target_mean) / self.target_std

    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel standardisation of the targets. A floor at 1% of the mean channel std keeps a
        (nearly) dead teacher channel from dominating the loss with a huge weight."""
        self.target_mean.copy_(mean.reshape(-1, 1, 1))
        self.target_std.copy_(std.clamp_min(0.01 * float(std.mean())).reshape(-1, 1, 1))


def candidate_state_dict(net: SupernetBlock, cid: str) -> dict[str, torch.Tensor]:
    """The weights of one candidate, keyed as ``space.build_candidate`` names them (weight inheritance)."""
    cell, ops = net.block.parse(cid)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    if net.block.stem is not None:
        state.update({f"stem.{k}": v for k, v in net.stem.state_dict().items()})
    for i, (layer, op) in enumerate(zip(net.cells[cell.index], ops, strict=True)):
        state.update({f"layers.{i}.{k}": v for k, v in layer[op].state_dict().items()})
    return state


def recalibrate_bn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reset BN statistics and set them from one train-mode pass on ``x`` (DNA's per-candidate recalibration).

    Statistics accumulated during supernet training are wrong for any single path (changlin31/DNA#18).
    Returns the train-mode output, which is what the next layer recalibrates on. Leaves ``module`` in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    module.train()
    with torch.no_grad():
        out = module(x)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    module.eval()
    return out


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class BlockData:
    """A block's (input, target) pairs from the feature cache."""

    cache: Features
    in_key: str
    target_key: str

    def batch(self, split: str, index: np.ndarray, device: torch.device, channels_last: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to(self._read(split, index, device), device, channels_last)

    def batches(self, split: str, indices: Iterable[np.ndarray], device: torch.device, channels_last: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch`` of every index array, in order; a background thread reads and converts the next one while
        the caller computes on this one (into pinned memory on CUDA, so the copy to the GPU is asynchronous)."""
        for pair in prefetch(lambda index: self._read(split, index, device), indices):
            yield self._to(pair, device, channels_last)

    def _read(self, split: str, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(index)  # sorted reads are sequential in the memory-mapped cache
        pin = device.type == "cuda"
        return (self.cache.get(split, self.in_key, index, pin_memory=pin),
                self.cache.get(split, self.target_key, index, pin_memory=pin))

    @staticmethod
    def _to(pair: tuple[torch.Tensor, torch.Tensor], device: torch.device, channels_last: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
        x, t = (v.to(device, non_blocking=True) for v in pair)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), t


def feature_moments(cache: Features, split: str, key: str, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-element mean and per-channel mean/std of a cached feature over a whole split (float64 sums)."""
    n = cache.num_samples(split)
    total = squares = torch.zeros(cache.shape(key), dtype=torch.float64)
    for start in range(0, n, chunk):
        x = cache.get(split, key, slice(start, min(n, start + chunk)))  # on the reader's device (online: the loop's)
        total = total.to(x.device) + x.sum(0, dtype=torch.float64)
        squares = squares.to(x.device) + (x * x).sum(0, dtype=torch.float64)
    element_mean = total / n
    channel_mean = element_mean.flatten(1).mean(1)
    channel_var = (squares / n).flatten(1).mean(1) - channel_mean ** 2
    return {"element_mean": element_mean.float(), "channel_mean": channel_mean.float(),
            "channel_std": channel_var.clamp_min(1e-12).sqrt().float()}


# ---------------------------------------------------------------------------------------------------- sampling
class PathSampler:
    """One candidate per step. ``uniform``: uniform over all candidates of the block (SPOS / DNA).

    ``fair``: cells in turn, and within a cell each layer takes every op once per ``len(choices)`` visits
    (FairNAS-style), in a random order per round.
    """

    def __init__(self, block: BlockSpec, kind: str, rng: np.random.Generator):
        self.block, self.kind, self.rng = block, kind, rng
        sizes = [math.prod(len(layer.choices) for layer in cell.layers) for cell in block.cells]
        self.cell_prob = np.array(sizes, dtype=float) / sum(sizes)
        self.rounds: dict[tuple[int, int], list[str]] = {}
        self.step = 0

    def __call__(self) -> str:
        if self.kind == "fair":
            cell = self.block.cells[self.step % len(self.block.cells)]
            ops = [self._fair(cell.index, i, layer.choices) for i, layer in enumerate(cell.layers)]
        else:
            cell = self.block.cells[int(self.rng.choice(len(self.block.cells), p=self.cell_prob))]
            ops = [layer.choices[int(self.rng.integers(len(layer.choices)))] for layer in cell.layers]
        self.step += 1
        return candidate_id(cell, ops)

    def _fair(self, cell: int, layer: int, choices: Sequence[str]) -> str:
        queue = self.rounds.setdefault((cell, layer), [])
        if not queue:
            queue.extend(choices[i] for i in self.rng.permutation(len(choices)))
        return queue.pop()


def _rng(seed: int, block: BlockSpec, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, block.index, *stream])


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class BlockCheckpoint:
    """A block's per-epoch checkpoint: where it lives and what it must match to be resumed."""

    path: Path
    fingerprint: str  # identifies config + data: a checkpoint with another fingerprint is never resumed
    rebuild: str = "dvc repro supernet"  # named in errors about the checkpoint


def load_trained(path: Path, net: SupernetBlock, fingerprint: str, rebuild: str) -> dict[str, Any]:
    """Load a finished supernet checkpoint into ``net``; an unfinished or foreign one is an ArtifactError."""
    state = checkpoint.load(path, rebuild)
    if state.get("fingerprint") != fingerprint:
        raise checkpoint.ArtifactError(f"{path} was trained with other params or features: rebuild with `{rebuild}`")
    if state.get("epoch") != state.get("epochs"):
        raise checkpoint.ArtifactError(f"{path} holds {state.get('epoch')}/{state.get('epochs')} epochs: "
                                       f"finish training with `{rebuild}`")
    net.load_state_dict(state["model"])
    return state


def train_block(net: SupernetBlock, data: BlockData, cfg: Supernet, loop: runtime.Loop, ckpt: BlockCheckpoint,
                on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train (or resume) one block's supernet at ``cfg.lr`` (the stage sets a block's own lr there); returns the
    per-epoch history of results. Rank 0 writes the checkpoint."""
    runtime.shard().check(cfg.batch_size, "supernet.batch_size")
    net = runtime.to_device_model(net, loop.device, loop.channels_last)
    optimizer = create_optimizer_v2(net, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=cfg.epochs, decay_epochs=1,
                                       decay_rate=cfg.lr_decay)
    precision = runtime.Precision(loop.device, loop.amp)
    history, start = _resume(ckpt, net, optimizer, precision)
    if start == cfg.epochs:
        log.info("block %s: checkpoint %s already holds all %d epochs", net.block.name, ckpt.path, cfg.epochs)
        return history
    # the same path on every rank, so unsampled ops stay unused everywhere and keep grad None
    model = runtime.maybe_ddp(net, loop.device, find_unused_parameters=True)
    val_index, bn_index = _eval_indices(data, cfg, net.block, loop.seed)
    val_sampler = PathSampler(net.block, "uniform", _rng(loop.seed, net.block, 1))
    val_paths = [val_sampler() for _ in range(cfg.val_paths)]
    for epoch in range(start, cfg.epochs):
        scheduler.step(epoch)
        row = _train_epoch(model, optimizer, precision, data, cfg, loop, epoch)
        row.update(val_loss(net, data, val_index, bn_index, val_paths, loop))
        row.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        history.append(records.results(row))  # the checkpoint and the curves keep results only
        if runtime.is_main():
            checkpoint.save(ckpt.path, {"fingerprint": ckpt.fingerprint, "block": net.block.name,
                                             "epoch": epoch + 1, "epochs": cfg.epochs, "model": net.state_dict(),
                                             "optimizer": optimizer.state_dict(), "scaler": precision.state_dict(),
                                             "history": history})
            log.info("block %s epoch %d/%d: train %.5f val %.5f (paths %.5f..%.5f) %.0f img/s, checkpoint saved",
                     net.block.name, epoch + 1, cfg.epochs, row["train_loss"], row["val_loss"], row["val_loss_min"],
                     row["val_loss_max"], row["run/images_per_s"])
            if on_epoch is not None:
                on_epoch(row)
        if dist.is_initialized():
            dist.barrier()
    return history


def _resume(ckpt: BlockCheckpoint, net: SupernetBlock, optimizer: torch.optim.Optimizer,
            precision: runtime.Precision) -> tuple[list[dict[str, float]], int]:
    if not ckpt.path.exists():
        return [], 0
    state = checkpoint.load(ckpt.path, ckpt.rebuild)
    if state.get("fingerprint") != ckpt.fingerprint:
        log.info("block %s: %s is from other params or features; training from scratch", net.block.name,
                 ckpt.path)
        return [], 0
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    precision.load_state_dict(state.get("scaler", {}))
    log.info("block %s: resuming from checkpoint %s after epoch %d/%d", net.block.name, ckpt.path,
             state["epoch"], state["epochs"])
    return list(state["history"]), int(state["epoch"])


def _eval_indices(data: BlockData, cfg: Supernet, block: BlockSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The val samples of the per-epoch val loss and the fixed train batch that recalibrates BN for it."""
    bn = _rng(seed, block, 0).permutation(data.cache.num_samples("train"))[:cfg.batch_size]
    return np.arange(min(cfg.val_samples, data.cache.num_samples("val"))), bn


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, precision: runtime.Precision, data: BlockData,
                 cfg: Supernet, loop: runtime.Loop, epoch: int) -> dict[str, float]:
    """``train_samples`` fresh random train samples (all by default), one sampled path per step.

    Under DDP ``batch_size`` is the global batch and each rank takes its part (``runtime.Shard``), with the global
    batch's BN statistics: the steps one process takes. The loss sum stays on the device (no sync per step) in
    float64, as exact as Python floats, and is all-reduced there (NCCL takes device tensors only).
    """
    net = runtime.unwrap(model)
    shard = runtime.shard()
    rng = _rng(loop.seed, net.block, 2, epoch)
    n_train = data.cache.num_samples("train")
    order = rng.permutation(n_train)[:cfg.train_samples or n_train]
    sampler = PathSampler(net.block, cfg.sampler, rng)
    steps = len(order) // cfg.batch_size
    bs = cfg.batch_size
    indices = [order[first:first + bs][shard.part(bs)] for first in range(0, steps * bs, bs)]
    model.train()
    stats, start = torch.zeros(2, dtype=torch.float64, device=loop.device), time.perf_counter()  # loss sum, samples
    pairs = data.batches("train", indices, loop.device, loop.channels_last)
    for x, t in runtime.progress(pairs, loop.progress, total=steps, desc=f"{net.block.name} epoch {epoch + 1}"):
        cid = sampler()  # every rank draws the same path: same seed, same sequence
        with precision.autocast(), runtime.global_batch_norm():
            y = model(x, cid)
        loss = F.mse_loss(y.float(), net.to_target_units(t))
        scaled = shard.global_mean(loss, len(x), bs)
        optimizer.zero_grad(set_to_none=True)  # unsampled ops keep grad None, so Adam leaves them alone
        precision.backward(scaled)
        precision.step(optimizer)
        stats[0] += loss.detach().double() * len(x)
        stats[1] += len(x)
    elapsed = time.perf_counter() - start
    if dist.is_initialized():
        dist.all_reduce(stats)
    loss_sum, seen = (float(v) for v in stats)
    return {"train_loss": loss_sum / max(seen, 1), "run/images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def val_loss(net: SupernetBlock, data: BlockData, val_index: np.ndarray, bn_index: np.ndarray,
             paths: Sequence[str], loop: runtime.Loop, cfg_batch: int = 512) -> dict[str, float]:
    """Val loss of fixed paths, each with BN recalibrated on a fixed train batch, on a copy of the weights.

    The copy keeps the training state (BN buffers) untouched, so evaluation never changes the result.
    """
    net = copy.deepcopy(runtime.unwrap(net)).eval()
    x_bn, _ = data.batch("train", bn_index, loop.device, loop.channels_last)
    batches = list(data.batches("val", (val_index[i:i + cfg_batch] for i in range(0, len(val_index), cfg_batch)),
                                loop.device, loop.channels_last))
    losses = []
    for cid in paths:
        path = net.path(cid)
        recalibrate_bn(path, x_bn)
        sq = sum(F.mse_loss(path(x).float(), net.to_target_units(t), reduction="sum").item()
                 for x, t in batches)
        losses.append(sq / sum(t.numel() for _, t in batches))
    return {"val_loss": float(np.mean(losses)), "val_loss_std": float(np.std(losses)),
            "val_loss_min": float(np.min(losses)), "val_loss_max": float(np.max(losses))}
