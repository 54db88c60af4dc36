"""Scoring: prefix-shared == naive on random supernets, the speed-up's limit, resume, the table and the stage."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, scoring
from pipeline.config import load_params
from pipeline.features import FeatureCache
from pipeline.space import build_space
from pipeline.supernet import BlockData, SupernetBlock, checkpoint_path, feature_keys
from tests.fakes import (
    BLOCKS,
    REPO,
    copy_root,
    load_stage,
    resnet18_blocks,
    teacher_blocks,
    tiny_params,
)

INPUTS = {"b0": (1, 16, 16), "b1": (8, 8, 8), "b2": (16, 4, 4)}


def _random_supernet(name: str, seed: int, overrides: list[str]) -> SupernetBlock:
    """Random weights and random target statistics: every candidate computes something different."""
    torch.manual_seed(seed)
    net = SupernetBlock(build_space(tiny_params(overrides).space, teacher_blocks()).block(name))
    for p in net.parameters():
        p.data.normal_(0, 0.5)
    net.set_target_stats(torch.rand(net.block.out_chs), torch.rand(net.block.out_chs) + 0.5)
    return net


def _random_rating(name: str, out_chs: int, seed: int, batches: int = 3) -> scoring.RatingData:
    gen = torch.Generator().manual_seed(seed)
    out = (out_chs, *(s // 2 for s in INPUTS[name][1:]))
    return scoring.RatingData(inputs=[torch.randn(8, *INPUTS[name], generator=gen) for _ in range(batches)],
                              targets=[torch.rand(8, *out, generator=gen) for _ in range(batches)],
                              bn_input=torch.randn(12, *INPUTS[name], generator=gen) * 2 + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("overrides", [[], ["space.identity=true", "space.ops=[k3e3,k5e6,k7e3]"]])
def test_prefix_shared_scores_equal_naive_scores(seed: int, overrides: list[str]) -> None:
    for name in BLOCKS:
        net = _random_supernet(name, seed, overrides)
        rating = _random_rating(name, net.block.out_chs, seed)
        shared = scoring.score_prefix(net, rating)
        naive = scoring.score_naive(net, rating, net.block.candidates())
        assert list(shared) == list(naive) == list(net.block.candidates())
        for cid in naive:
            np.testing.assert_allclose(shared[cid], naive[cid], rtol=1e-5, atol=0, err_msg=cid)
        spread = np.array([e[0].mean() for e in naive.values()])
        assert spread.std() > 1e-3 * spread.mean()  # candidates really differ: the equality is not trivial


def test_theoretical_speedup_limit_counts_distinct_prefixes() -> None:
    def limit(layers: int) -> float:
        params = load_params([f"space.blocks.b1.cells=[{{layers:{layers}}}]", "space.identity=false"], root=REPO)
        naive, prefix = scoring.layer_evaluations(build_space(params.space, resnet18_blocks()).block("b1"))
        return naive / prefix

    assert limit(3) == pytest.approx(648 / 258) and round(limit(3), 1) == 2.5
    assert round(limit(4), 1) == 3.3
    b0 = build_space(load_params(root=REPO).space, resnet18_blocks()).block("b0")
    assert scoring.layer_evaluations(b0) == (36 * 3, 1 + 6 + 36)  # the stem is a shared prefix too


def test_constant_predictor_and_split_half_tau() -> None:
    rating = _random_rating("b2", 16, 0, batches=4)
    exact = scoring.constant_errors(rating.targets[0][0], scoring.RatingData(
        inputs=rating.inputs[:1], targets=[rating.targets[0][:1]], bn_input=rating.bn_input))
    assert exact.shape == (2, 1) and exact.max() == 0
    assert scoring.constant_errors(torch.zeros(16, 2, 2), rating)[0].mean() == pytest.approx(
        np.mean([float(t.abs().mean() / t.std()) for t in rating.targets]))
    ranks = {f"c{i}": np.array([[i, i, i + 0.1, i + 0.1], [0, 0, 0, 0]]) for i in range(5)}
    assert scoring.split_half_tau(ranks) == pytest.approx(1.0)
    flipped = {f"c{i}": np.array([[i, i, -i, -i], [0, 0, 0, 0]]) for i in range(5)}
    assert scoring.split_half_tau(flipped) == pytest.approx(-1.0)


def test_target_units_weigh_channels_as_the_training_loss_does() -> None:
    """score.units=target: errors of the standardised output against standardised targets, the prefix-shared and
    the naive paths alike, and the input-blind predictor in the same units; teacher units otherwise."""
    from dataclasses import replace

    net = _random_supernet("b1", 0, [])
    rating = _random_rating("b1", net.block.out_chs, 0)
    target = replace(rating, units="target")
    cids = list(net.block.candidates())[:4]
    teacher, standardised = scoring.score_naive(net, rating, cids), scoring.score_naive(net, target, cids)
    for cid in cids:
        path = net.path(cid)
        scoring.recalibrate_bn(path, rating.bn_input)
        with torch.inference_mode():
            want = np.mean([scoring.batch_errors(path(x), net.to_target_units(t))[0]
                            for x, t in zip(rating.inputs, rating.targets, strict=True)])
        assert standardised[cid][0].mean() == pytest.approx(want, rel=1e-5)
        assert not np.allclose(standardised[cid], teacher[cid])
    shared = scoring.score_prefix(net, target)
    for cid in cids:
        np.testing.assert_allclose(shared[cid], standardised[cid], rtol=1e-5)
    blind = torch.zeros(rating.targets[0].shape[1:])
    assert scoring.constant_errors(blind, target, net)[0].mean() == pytest.approx(np.mean(
        [scoring.batch_errors(net.to_target_units(blind.expand_as(t)), net.to_target_units(t))[0]
         for t in rating.targets]))
    assert np.array_equal(scoring.constant_errors(blind, rating, net), scoring.constant_errors(blind, rating))
    with pytest.raises(Exception, match="score.units"):
        load_params(["score.units=standard"], root=REPO)


class Stop(Exception):
    pass


def test_killed_scoring_resumes_without_rerating(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    net = _random_supernet("b1", 0, [])
    rating = _random_rating("b1", net.block.out_chs, 0)
    full = scoring.score_naive(net, rating, net.block.candidates())
    partial = tmp_path / "b1.resume.pt"
    original, groups = scoring.score_prefix, []

    def killed_after_first_group(*args, on_group, **kwargs):
        def save_then_die(group: dict) -> None:
            on_group(group)
            groups.append(len(group))
            raise Stop

        return original(*args, on_group=save_then_die, **kwargs)

    monkeypatch.setattr(scoring, "score_prefix", killed_after_first_group)
    with pytest.raises(Stop):
        scoring.score_block(net, rating, partial, key="k1")
    monkeypatch.setattr(scoring, "score_prefix", original)
    saved = checkpoint.load(partial, "x")["errors"]
    assert len(saved) == groups[0] == 4  # cell d3w8 with its first op fixed: 2 x 2 candidates
    caplog.set_level("INFO")
    errors, rated, _ = scoring.score_block(net, rating, partial, key="k1")
    assert "4/10 candidates already rated" in caplog.text and rated == 10 - 4
    for cid in full:
        np.testing.assert_allclose(errors[cid], full[cid], rtol=1e-5)
    _, rated_again, _ = scoring.score_block(net, rating, partial, key="other weights")
    assert rated_again == 10 and "rating from scratch" in caplog.text


# -------------------------------------------------------------------------------------------- the stage
def test_score_stage_writes_the_table_contract(block_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_root(block_root, tmp_path / "root")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    params = load_params(["supernet.epochs=1", "+space.blocks.b1.epochs=2"], root=root)
    with pytest.raises(checkpoint.ArtifactError, match=r"missing: rebuild it with `dvc repro supernet@b1`"):
        load_stage("score").run(params, block="b1")
    assert len(load_stage("supernet").run(params, block="b1")) == 2, "the block's own epochs, not supernet.epochs"
    stats = load_stage("score").run(params, block="b1")
    table = root / "artifacts/scores/b1.csv"
    with table.open() as f:
        rows = list(csv.DictReader(f))
    block = build_space(params.space, teacher_blocks()).block("b1")
    assert list(rows[0]) == ["candidate", "score", "mse"]  # costs: the costs stage, from the space alone
    assert [r["candidate"] for r in rows] == list(block.candidates())
    assert all(float(r["score"]) > 0 and float(r["mse"]) > 0 for r in rows)
    assert stats["candidates"] == 10 and stats["score_best"] <= stats["score_median"] <= stats["score_worst"]
    assert math.isfinite(stats["score_trivial"]) and -1 <= stats["tau_halves"] <= 1
    assert not (root / "artifacts/scores/b1.resume.pt").exists()
    assert (root / "metrics/score/b1.json").is_file() and (root / "metrics/supernet/b1.json").is_file()
    # the stage's rating equals the naive reference on the same data
    net = SupernetBlock(block)
    net.load_state_dict(checkpoint.load(checkpoint_path(root, "b1"), "x")["model"])
    cache = FeatureCache(root / "artifacts/features")
    rating = scoring.load_rating_data(BlockData(cache, *feature_keys(BLOCKS, "b1")), params.score, params.seed,
                                      torch.device("cpu"))
    naive = scoring.score_naive(net, rating, [rows[3]["candidate"]])
    assert float(rows[3]["score"]) == pytest.approx(naive[rows[3]["candidate"]][0].mean(), rel=1e-5)
