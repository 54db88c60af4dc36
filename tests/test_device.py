"""Mixed-device code, caught on a CPU-only machine: the training loops and scoring run on the ``meta`` device
under a dispatch mode that fails on any op mixing devices, and collectives must get tensors on the loop's device.

A CPU tensor leaking into a loop shows up on CUDA only (a device error in place, a hidden host-device copy and
sync otherwise, an error from NCCL for collectives); with the model and data on ``meta`` the same leak mixes
``cpu`` and ``meta`` here. Torch lets a CPU 0-dim tensor mix with any device in out-of-place ops, so the mode
flags those explicitly.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline import runtime, scoring, supernet
from pipeline.config import Augment, Recipe, Runtime
from pipeline.data import Split, prefetch
from pipeline.features import FeatureCache
from pipeline.runtime import Loop
from pipeline.space import build_space
from pipeline.supernet import BlockCheckpoint, BlockData, SupernetBlock, feature_keys, train_block
from pipeline.train import fit
from tests.fakes import BLOCKS, teacher_blocks, tiny_params

META = torch.device("meta")
aten = torch.ops.aten
_MOVES = {aten._to_copy.default, aten.copy_.default}  # moving data between devices is what .to() and copy_ are for
_SCALARS = {aten.item.default, aten._local_scalar_dense.default}  # .item() (the first one under inference mode)


class MixedDevices(AssertionError):
    pass


class SameDevice(TorchDispatchMode):
    """Fail on any op whose tensor arguments live on more than one device, CPU 0-dim tensors included.

    ``.item()`` of a meta tensor (which holds no data) returns a placeholder, so loops that log numbers run on meta.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _SCALARS and tensors[0].device == META:
            return False if tensors[0].dtype == torch.bool else 1 if not tensors[0].is_floating_point() else 0.5
        devices = {str(t.device) for t in tensors}
        if len(devices) > 1 and func not in _MOVES:
            shapes = ", ".join(f"{t.device}{list(t.shape)}" for t in tensors)
            raise MixedDevices(f"{func} mixes devices: {shapes}")
        return func(*args, **kwargs)


class FakeGroup:
    """A one-rank process group that, like NCCL, accepts only tensors on the loop's device."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.reduced = device, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if tensor.device != self.device:
            raise MixedDevices(f"all_reduce of a {tensor.device} tensor in a loop on {self.device}")
        self.reduced += 1


def test_the_checker_catches_a_cpu_scalar_leaking_into_a_meta_loop() -> None:
    """What the bug of issue 13 looked like: a CPU accumulator and a device loss."""
    loss = torch.ones((), device=META)
    with SameDevice():
        assert float(loss * 2) == 0.5 and (loss.sum() + loss).device == META
        with pytest.raises(MixedDevices, match="cpu"):
            torch.zeros(()) + loss
        with pytest.raises(MixedDevices, match="cpu"):
            loss * torch.tensor(2.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, n))


def test_classification_loop_keeps_every_tensor_on_the_loop_device(tmp_path: Path) -> None:
    """teacher, retrain and validate_train: train steps, EMA-free evaluation and the checkpoint, all on meta."""
    recipe = Recipe(epochs=2, batch_size=8, eval_batch_size=16, warmup_epochs=0, augment=Augment(erase_prob=0.5))
    loop = Loop(META, seed=0, channels_last=True, progress=False)
    rows: list[dict] = []
    with SameDevice():
        model = fit(_Net().to(META), _split(24, 0), _split(16, 1), {"mean": [0.5], "std": [0.25]}, recipe, loop, tmp_path / "ckpt.pt",
                    on_epoch=lambda epoch, metrics: rows.append(metrics))
    assert len(rows) == 2 and next(model.parameters()).device == META


def _block(name: str) -> SupernetBlock:
    torch.manual_seed(0)
    return SupernetBlock(build_space(tiny_params().space, teacher_blocks()).block(name))


@pytest.mark.parametrize("name", ["b0", "b1"])
def test_supernet_training_and_its_collective_stay_on_the_loop_device(tiny_cache: FeatureCache, tmp_path: Path,
                                                                      name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_params(["supernet.epochs=1", "supernet.val_samples=16"]).supernet
    data = BlockData(tiny_cache, *feature_keys(BLOCKS, name))
    loop = Loop(META, channels_last=True, progress=False)
    with SameDevice():
        history = train_block(_block(name), data, cfg, loop, BlockCheckpoint(tmp_path / "ckpt.pt", "meta"))
    assert len(history) == 1
    group = FakeGroup(META)
    group.install(monkeypatch)
    net = runtime.to_device_model(_block(name), META, True)
    optimizer = torch.optim.Adam(net.parameters())
    with SameDevice():
        supernet._train_epoch(net, optimizer, runtime.Precision(META, False), data, cfg, loop, epoch=0)
    assert group.reduced == 1


def test_scoring_keeps_every_tensor_on_the_loop_device(tiny_cache: FeatureCache) -> None:
    params = tiny_params()
    data = BlockData(tiny_cache, *feature_keys(BLOCKS, "b1"))
    net = runtime.to_device_model(_block("b1"), META, True)
    with SameDevice():
        rating = scoring.load_rating_data(data, params.score, params.seed, META, channels_last=True)
        errors = scoring.score_prefix(net, rating)
        trivial = scoring.constant_errors(torch.zeros(rating.targets[0].shape[1:], device=META), rating)
    assert set(errors) == set(net.block.candidates()) and trivial.shape == (2, rating.num_batches)


# ---------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(("device", "bf16", "amp", "dtype", "scaled"), [
    ("cpu", False, True, torch.bfloat16, False),
    ("cuda", True, True, torch.bfloat16, False),
    ("cuda", False, True, torch.float16, True),
    ("cuda", False, False, None, False),
])
def test_amp_uses_bfloat16_where_supported_else_float16_with_a_scaler(device: str, bf16: bool, amp: bool,
                                                                      dtype: torch.dtype | None, scaled: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert runtime.amp_dtype(torch.device(device), amp) == dtype
    requested: list[bool] = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda dev, enabled: requested.append(enabled))
    runtime.Precision(torch.device(device), amp)
    assert requested == [scaled]


def test_float16_training_keeps_its_loss_scale_across_a_resume(tiny_cache: FeatureCache, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 + GradScaler (what GPUs without bfloat16 get), here on CPU: the scale's state is in the checkpoint."""
    monkeypatch.setattr(runtime, "amp_dtype", lambda device, enabled: torch.float16 if enabled else None)
    cfg = tiny_params(["supernet.epochs=2", "supernet.val_samples=16"]).supernet
    data = BlockData(tiny_cache, *feature_keys(BLOCKS, "b1"))
    steps = min(cfg.train_samples or tiny_cache.num_samples("train"), tiny_cache.num_samples("train")) // cfg.batch_size

    def train(ckpt: Path, amp: bool = True, stop: bool = False) -> dict:
        def maybe_stop(row: dict) -> None:
            if stop:
                raise _Stop

        loop = Loop(torch.device("cpu"), amp=amp, channels_last=False, progress=False)
        with contextlib.suppress(_Stop):
            train_block(_block("b1"), data, cfg, loop, BlockCheckpoint(ckpt, f"amp={amp}"), on_epoch=maybe_stop)
        return torch.load(ckpt, weights_only=True)

    assert train(tmp_path / "a.pt", stop=True)["scaler"]["_growth_tracker"] == steps  # stopped after one epoch
    resumed = train(tmp_path / "a.pt")
    assert resumed["epoch"] == 2 and resumed["scaler"]["_growth_tracker"] == 2 * steps  # counted on, not restarted
    assert train(tmp_path / "full.pt", amp=False)["scaler"] == {}  # no scaler to keep


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------------- feature batches
def test_prefetched_batches_are_the_direct_reads_in_order(tiny_cache: FeatureCache) -> None:
    data = BlockData(tiny_cache, *feature_keys(BLOCKS, "b1"))
    rng = np.random.default_rng(0)
    indices = [rng.permutation(tiny_cache.num_samples("train"))[:16] for _ in range(6)]
    got = list(data.batches("train", indices, torch.device("cpu"), channels_last=True))
    assert len(got) == len(indices)
    for index, (x, t) in zip(indices, got, strict=True):
        want_x, want_t = data.batch("train", index, torch.device("cpu"), channels_last=True)
        assert torch.equal(x, want_x) and torch.equal(t, want_t)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


def test_prefetch_reads_ahead_in_order_and_reraises_at_the_failing_item() -> None:
    loaded: list[int] = []
    ready = threading.Event()

    def load(i: int) -> int:
        loaded.append(i)
        if i == 1:
            ready.set()
        if i == 3:
            raise ValueError("item 3 is bad")
        return i * 10

    items = prefetch(load, range(5))
    assert next(items) == 0
    assert ready.wait(5), "item 1 was not read while item 0 was in use"
    assert next(items) == 10 and next(items) == 20
    with pytest.raises(ValueError, match="item 3"):
        next(items)
    assert loaded[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize("omp, procs, expected", [("3", 2, 3), ("", 2, None), ("0", 1, None), ("many", 1, None)])
def test_cpu_threads_follow_omp_num_threads_else_share_the_cores(omp: str, procs: int, expected: int | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher's OMP_NUM_THREADS (per process) wins: CI's two test workers must not each spin two threads."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    cores = max(1, len(os.sched_getaffinity(0)) // procs)
    assert runtime.cpu_threads(procs) == (expected or cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    runtime.select_device(Runtime(device="cpu"))  # runtime.threads: 0
    assert torch.get_num_threads() == 3
    runtime.select_device(Runtime(device="cpu", threads=1))  # an explicit setting wins
    assert torch.get_num_threads() == 1
