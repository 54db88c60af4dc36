"""Multi-node DDP: two torchrun nodes of one process each (c10d rendezvous on 127.0.0.1, gloo) train what one
process trains with the same global batch, for a supernet block and for the retrained student.

Tolerance: 1e-4 relative on every epoch's losses and on the weights (all float tensors of the state dict as one
vector: |a - b| / |a|), and no tensor off by more than 1e-3 of its norm + 1e-6. The ranks compute the same sums
in another order (two part-batch reductions and an all-reduce instead of one reduction), so float32 rounding
differs by ~1e-7 per step. Measured after 6-8 steps: losses within 4e-6, weights within 4e-6 (student) and 1e-7
(supernet block), every tensor within 0.17 of its bound. Per-rank BN statistics instead of the global batch's
(the usual DDP default) miss by 5e-4..1e-3 on the supernet losses, 9e-3 on its weights and 510x one tensor's
bound; another data order by more. The absolute 1e-6 is for tensors that hold rounding noise only (norms
1e-9..1e-7: a BN bias right before another train-mode BN, which removes it, so its true gradient is zero). The
student is trained with SGD here: Adam turns that noise into full-size steps of those parameters (on one process
as on two), which says nothing about the sharding.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d

from pipeline import checkpoint, runtime
from pipeline.config import ConfigError, load_params
from tests.fakes import REPO, copy_root, load_stage

RTOL = 1e-4
TENSOR_RTOL, TENSOR_ATOL = 1e-3, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(store: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}


def two_nodes(script: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> list[str]:
    """Start two torchrun agents, as two machines would (one process each, rendezvous at 127.0.0.1); their stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--rdzv-id={uuid.uuid4().hex[:8]}",
           str(REPO / script), *args]
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=timeout)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-3000:]
    return logs


def assert_same_weights(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    floats = [k for k, v in one.items() if v.is_floating_point()]
    for key in one.keys() - set(floats):
        assert torch.equal(one[key], two[key]), key  # step counters
    for key in floats:
        a, b = one[key].double(), two[key].double()
        diff, norm = float((a - b).norm()), float(a.norm())
        assert diff <= TENSOR_RTOL * norm + TENSOR_ATOL, f"{key}: |a - b| = {diff:.3g}, |a| = {norm:.3g}"
    a, b = (torch.cat([state[k].double().flatten() for k in floats]) for state in (one, two))
    assert float((a - b).norm() / a.norm()) <= RTOL


def _rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------- the parts
def test_shards_split_every_global_batch_into_contiguous_near_equal_parts() -> None:
    for world in (1, 2, 3, 4):
        for n in (world, 7, 16, 45):
            parts = [runtime.Shard(rank, world).part(n) for rank in range(world)]
            rows = np.concatenate([np.arange(n)[p] for p in parts])
            np.testing.assert_array_equal(rows, np.arange(n))  # in order, each row once
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            weights = [runtime.Shard(r, world).global_mean(torch.tensor(1.0), s, n) for r, s in enumerate(sizes)]
            assert float(sum(weights)) / world == pytest.approx(1.0)  # DDP's average: the global batch's mean
    loss = torch.tensor(0.5)
    assert runtime.Shard().global_mean(loss, 16, 16) is loss  # one process: the loss itself, bit for bit
    with pytest.raises(ConfigError, match=r"^supernet.batch_size=1 is smaller than the 2 DDP ranks .*start fewer"):
        runtime.Shard(0, 2).check(1, "supernet.batch_size")


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank: the collectives run, the arithmetic is what one process computes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layer", [torch.nn.BatchNorm2d, BatchNormAct2d, torch.nn.BatchNorm1d])
def test_global_batch_norm_equals_torch_batch_norm_with_gradients_and_running_stats(one_rank_group, layer) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5) if layer is torch.nn.BatchNorm1d else (6, 5, 4, 3)
    x = (torch.randn(shape, generator=gen) * 3 + 2).requires_grad_()
    bns = [layer(5, momentum=0.3), layer(5, momentum=0.3)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.linspace(0.5, 2, 5))
            bn.bias.copy_(torch.linspace(-1, 1, 5))
    outs, grads = [], []
    for bn, mode in zip(bns, (runtime._GlobalBatchNorm(), contextlib.nullcontext()), strict=True):
        x.grad = None
        with mode:
            y = bn.train()(x)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs.append(y)
        grads.append([x.grad, bn.weight.grad, bn.bias.grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for ours, torchs in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bns[0].running_mean, bns[1].running_mean)
    torch.testing.assert_close(bns[0].running_var, bns[1].running_var)
    with runtime._GlobalBatchNorm():
        torch.testing.assert_close(bns[0].eval()(x), bns[1].eval()(x))  # eval mode: the running stats, untouched


def test_one_process_uses_the_plain_batch_norm() -> None:
    with runtime.global_batch_norm() as mode:
        assert mode is None  # no process group: nothing intercepted, single-process results unchanged


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.mark.scaleout
def test_two_nodes_train_a_supernet_block_as_one_process_does(block_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["supernet.epochs=2", "supernet.train_samples=64"]  # batch 16: 4 global steps an epoch, 8 per rank
    store = tmp_path / "mlflow.db"
    one, two = copy_root(block_root, tmp_path / "one"), copy_root(block_root, tmp_path / "two")
    logs = two_nodes("stages/supernet.py", ["block=b0", *overrides], two, _env(store))
    assert sum(log.count("checkpoint saved") for log in logs) == 2  # rank 0 alone writes, once per epoch
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(one)
    load_stage("supernet").run(load_params(overrides, root=one), block="b0")
    ref, ddp = (checkpoint.load(root / "artifacts/supernet/b0.pt", "x") for root in (one, two))
    assert len(ref["history"]) == len(ddp["history"]) == 2
    for a, b in zip(ref["history"], ddp["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_loss_min", "val_loss_max"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), key
    assert_same_weights(ref["model"], ddp["model"])


@pytest.mark.scaleout
def test_two_nodes_retrain_the_student_as_one_process_does(student_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """96 train images in global batches of 45: shares of 22 and 23 rows, then 3 and 3; KD, EMA, flips, shifts and
    random erasing on (all drawn for the global batch)."""
    overrides = ["retrain.registry_name=", "retrain.train.batch_size=45", "retrain.train.opt=sgd",
                 "retrain.train.lr=0.05"]
    store = tmp_path / "mlflow.db"
    one, two = copy_root(student_root, tmp_path / "one"), copy_root(student_root, tmp_path / "two")
    two_nodes("stages/retrain.py", overrides, two, _env(store))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(one)
    load_stage("retrain").run(load_params(overrides, root=one))
    ref, ddp = (_rows(root / "plots/student.csv") for root in (one, two))
    assert [r["epoch"] for r in ref] == [r["epoch"] for r in ddp] == [0, 1]
    for a, b in zip(ref, ddp, strict=True):
        for key in ("train/loss", "val/loss", "val/acc", "lr"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), key
    ref_ckpt, ddp_ckpt = (checkpoint.load(root / "checkpoints/retrain.pt", "x") for root in (one, two))
    assert_same_weights(ref_ckpt["model"], ddp_ckpt["model"])
    assert_same_weights(ref_ckpt["ema"], ddp_ckpt["ema"])
    metrics = [json.loads((root / "metrics/student.json").read_text()) for root in (one, two)]
    assert metrics[1]["test/acc"] == pytest.approx(metrics[0]["test/acc"], abs=1e-9)

