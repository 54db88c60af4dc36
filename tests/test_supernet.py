"""Supernet: path == standalone candidate, samplers, BN recalibration, training, resume (in process and after
kill -9), DDP with two CPU processes, and the stage's errors."""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, cli, runtime
from pipeline.config import load_params
from pipeline.features import FeatureCache
from pipeline.scoring import constant_errors, load_rating_data, score_naive
from pipeline.space import build_candidate, build_space
from pipeline.supernet import (
    BlockCheckpoint,
    BlockData,
    PathSampler,
    SupernetBlock,
    candidate_state_dict,
    checkpoint_path,
    feature_keys,
    feature_moments,
    load_trained,
    recalibrate_bn,
    train_block,
)
from tests.fakes import (
    BLOCKS,
    REPO,
    copy_root,
    load_stage,
    resnet18_blocks,
    teacher_blocks,
    tiny_params,
)


def _randomise_bn(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine BN weights, so eval-mode equality means something."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


@pytest.mark.parametrize("which", ["default", "tiny-identity-cells"])
def test_supernet_path_equals_standalone_candidate_with_the_same_weights(which: str) -> None:
    if which == "default":
        spec = build_space(load_params(root=REPO).space, resnet18_blocks())
        inputs = {"b0": (1, 28, 28), "b1": (32, 14, 14), "b2": (64, 7, 7), "b3": (128, 4, 4)}
    else:
        spec = build_space(tiny_params(["space.identity=true"]).space, teacher_blocks())
        inputs = {"b0": (1, 16, 16), "b1": (8, 8, 8), "b2": (16, 4, 4)}
    rng = random.Random(0)
    for block in spec.blocks:
        net = SupernetBlock(block)
        _randomise_bn(net, block.index)
        x = torch.randn(3, *inputs[block.name])
        for cid in rng.sample(list(block.candidates()), 3):
            alone = build_candidate(block, cid)
            alone.load_state_dict(candidate_state_dict(net, cid), strict=True)
            with torch.no_grad():
                net.eval(), alone.eval()
                assert torch.equal(net(x, cid), alone(x)), cid
                net.train(), alone.train()
                assert torch.equal(net(x, cid), alone(x)), cid
            assert alone(x).shape[1] == block.out_chs


def test_uniform_sampler_covers_every_candidate_evenly() -> None:
    block = build_space(tiny_params().space, teacher_blocks()).block("b1")
    sampler = PathSampler(block, "uniform", np.random.default_rng(0))
    counts = Counter(sampler() for _ in range(5000))
    assert set(counts) == set(block.candidates())
    expected = 5000 / block.num_candidates()
    assert all(abs(c - expected) < 0.25 * expected for c in counts.values())


def test_fair_sampler_gives_each_op_once_per_layer_every_round() -> None:
    block = build_space(tiny_params(["space.ops=[k3e3,k5e3,k5e6]"]).space, teacher_blocks()).block("b0")
    sampler = PathSampler(block, "fair", np.random.default_rng(0))
    for _ in range(4):
        paths = [block.parse(sampler())[1] for _ in range(3)]
        for layer in range(2):
            assert sorted(p[layer] for p in paths) == ["k3e3", "k5e3", "k5e6"]


def test_recalibrate_bn_sets_exact_batch_statistics() -> None:
    block = build_space(tiny_params().space, teacher_blocks()).block("b1")
    path = SupernetBlock(block).path("d1w16:k3e3")
    x = torch.randn(32, 8, 8, 8) * 3 + 1
    recalibrate_bn(path, x)
    bn = path[1].bn1
    mid = path[1].conv_pw(x)
    assert torch.allclose(bn.running_mean, mid.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, mid.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert bn.momentum == 0.1 and not path.training


# -------------------------------------------------------------------------------------------- training
class Stop(Exception):
    pass


def _train(cache: FeatureCache, ckpt: Path, name: str = "b1", epochs: int = 3, stop_after: int = 0,
           standardise: bool = False, **overrides: object) -> tuple[SupernetBlock, list[dict]]:
    params = tiny_params([f"supernet.epochs={epochs}", *(f"supernet.{k}={v}" for k, v in overrides.items())])
    spec = build_space(params.space, teacher_blocks()).block(name)
    torch.manual_seed(0)
    net = SupernetBlock(spec)
    if standardise:
        stats = feature_moments(cache, "train", name)
        net.set_target_stats(stats["channel_mean"], stats["channel_std"])
    loop = runtime.Loop(torch.device("cpu"), seed=0, channels_last=True, progress=False)
    run = BlockCheckpoint(ckpt, fingerprint=f"fp-{epochs}-{overrides}")

    def maybe_stop(row: dict) -> None:
        if stop_after and row["epoch"] == stop_after:
            raise Stop

    data = BlockData(cache, *feature_keys(BLOCKS, name))
    return net, train_block(net, data, params.supernet, loop, run, on_epoch=maybe_stop)


def test_training_lowers_val_loss_and_is_reproducible(tiny_cache: FeatureCache, tmp_path: Path) -> None:
    net, history = _train(tiny_cache, tmp_path / "a.pt", name="b0", epochs=4, lr=0.01)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    assert history[1]["lr"] == pytest.approx(0.01 * 0.9)  # DNA's per-epoch decay
    again, _ = _train(tiny_cache, tmp_path / "b.pt", name="b0", epochs=4, lr=0.01)
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_standardised_targets_train_in_standard_units_and_predict_in_teacher_units(tiny_cache: FeatureCache,
                                                                                   tmp_path: Path) -> None:
    """target_norm: the loss is taken on standardised targets, predictions are mapped back before rating."""
    net, history = _train(tiny_cache, tmp_path / "n.pt", name="b0", epochs=4, standardise=True, lr=0.01)
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]
    moments = feature_moments(tiny_cache, "train", "b0")
    params = tiny_params()
    rating = load_rating_data(BlockData(tiny_cache, *feature_keys(BLOCKS, "b0")), params.score, 0,
                              torch.device("cpu"))
    blind = constant_errors(moments["element_mean"], rating)[0].mean()
    scores = [e[0].mean() for e in score_naive(net.eval(), rating, net.block.candidates()).values()]
    assert max(scores) < 0.8 * blind  # every candidate beats the input-blind predictor in the teacher's units


def test_unsampled_ops_are_never_updated(tiny_cache: FeatureCache, tmp_path: Path) -> None:
    """Adam with set_to_none: an op that no step sampled keeps its initial weights (no decay drift)."""
    params = tiny_params(["supernet.epochs=1", "supernet.train_samples=16"])  # exactly one step
    block = build_space(params.space, teacher_blocks()).block("b1")
    net = SupernetBlock(block)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loop = runtime.Loop(torch.device("cpu"), channels_last=False, progress=False)
    train_block(net, BlockData(tiny_cache, *feature_keys(BLOCKS, "b1")), params.supernet, loop,
                BlockCheckpoint(tmp_path / "c.pt", "f"))
    changed = {".".join(k.split(".")[:4]) for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert len(changed) in (1, 3)  # the ops of exactly one sampled path (one-layer cell or three-layer cell)


def test_interrupted_training_resumes_and_matches_an_uninterrupted_run(tiny_cache: FeatureCache, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    full, history = _train(tiny_cache, tmp_path / "full.pt")
    with pytest.raises(Stop):
        _train(tiny_cache, tmp_path / "cut.pt", stop_after=1)
    assert checkpoint.load(tmp_path / "cut.pt", "x")["epoch"] == 1
    caplog.set_level("INFO")
    resumed, history2 = _train(tiny_cache, tmp_path / "cut.pt")
    assert "resuming from checkpoint" in caplog.text and "after epoch 1/3" in caplog.text
    assert [r["epoch"] for r in history2] == [1, 2, 3]
    assert [r["val_loss"] for r in history2] == [r["val_loss"] for r in history]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_other_settings_is_not_resumed(tiny_cache: FeatureCache, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _train(tiny_cache, tmp_path / "c.pt", epochs=1)
    caplog.set_level("INFO")
    _, history = _train(tiny_cache, tmp_path / "c.pt", epochs=2)  # other fingerprint
    assert "training from scratch" in caplog.text and len(history) == 2


def test_load_trained_rejects_missing_unfinished_foreign_and_corrupt(tiny_cache: FeatureCache,
                                                                    tmp_path: Path) -> None:
    net = SupernetBlock(build_space(tiny_params().space, teacher_blocks()).block("b1"))
    rebuild = "dvc repro supernet@b1"
    with pytest.raises(checkpoint.ArtifactError, match="missing: rebuild it with `dvc repro supernet@b1`"):
        load_trained(tmp_path / "none.pt", net, "fp", rebuild)
    with pytest.raises(Stop):
        _train(tiny_cache, tmp_path / "cut.pt", stop_after=1)
    with pytest.raises(checkpoint.ArtifactError, match="1/3 epochs: finish training"):
        load_trained(tmp_path / "cut.pt", net, "fp-3-{}", rebuild)
    with pytest.raises(checkpoint.ArtifactError, match="other params or features"):
        load_trained(tmp_path / "cut.pt", net, "other", rebuild)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.ArtifactError, match="corrupt"):
        load_trained(tmp_path / "bad.pt", net, "fp", rebuild)


# -------------------------------------------------------------------------------------------- the stage
def _env(root: Path, tracking: Path) -> dict[str, str]:
    """Stage subprocesses: one MLflow store for the whole module (a fresh sqlite store costs seconds to migrate)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tracking / 'mlflow.db'}"}


def test_kill_9_mid_training_then_rerun_resumes_without_redoing_an_epoch(block_root: Path, tmp_path: Path) -> None:
    root = copy_root(block_root, tmp_path / "root")
    cmd = [sys.executable, str(REPO / "stages/supernet.py"), "block=b0", "supernet.epochs=5"]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(root, block_root), stderr=subprocess.PIPE, text=True)
    first_run = []
    for line in proc.stderr:  # kill right after the first epoch's checkpoint: mid epoch 2
        first_run.append(line)
        if "epoch 1/5" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint.load(checkpoint_path(root, "b0"), "x")["epoch"]
    assert 1 <= done < 5
    rerun = subprocess.run(cmd, cwd=root, env=_env(root, block_root), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from checkpoint {checkpoint_path(root, 'b0')} after epoch {done}/5" in rerun.stderr
    trained = [int(e) for e in re.findall(r"epoch (\d)/5: train", rerun.stderr)]
    assert trained == list(range(done + 1, 6))  # no completed epoch redone
    with (root / "plots/supernet/b0.csv").open() as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_ddp_two_cpu_processes_train_a_block_that_scoring_loads(block_root: Path, tmp_path: Path) -> None:
    root = copy_root(block_root, tmp_path / "root")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "stages/supernet.py"), "block=b1", "supernet.epochs=1"]
    out = subprocess.run(cmd, cwd=root, env=_env(root, block_root), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("epoch 1/1: train") == 1  # only rank 0 logs and writes
    params = load_params(["supernet.epochs=1"], root=root)
    net = SupernetBlock(build_space(params.space, teacher_blocks()).block("b1"))
    from pipeline.supernet import fingerprint

    state = load_trained(checkpoint_path(root, "b1"), net, fingerprint(params, "b1", FeatureCache(
        root / "artifacts/features")), "dvc repro supernet@b1")
    assert state["epoch"] == 1 and state["history"][0]["train_loss"] > 0
    assert not any(k.startswith("run/") for k in state["history"][0]), "timings stay out of the checkpoint"


def test_stage_rejects_an_unknown_block_in_one_line(block_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(block_root)
    for argv, message in ((["block=b7"], "block 'b7' is not in the space: choose one of b0, b1, b2"),
                          ([], "name exactly one block")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main_block(load_stage("supernet").run, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err)
