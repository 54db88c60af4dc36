"""The block-level fidelity check: the draw, a unit (the candidate alone, rated like its score), resume, rank
statistics on known inputs, bad settings and artifacts, and both stages on the tiny workspace."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, fidelity, supernet
from pipeline.config import ConfigError, Params, load_params
from pipeline.features import FeatureCache
from pipeline.scoring import score_naive
from pipeline.space import BlockSpec, build_candidate, build_space
from pipeline.supernet import SupernetBlock
from tests.fakes import copy_root, load_stage, teacher_blocks, tiny_params, write_scores


def _block(name: str, overrides: list[str] | None = None) -> BlockSpec:
    return build_space(tiny_params(overrides or []).space, teacher_blocks()).block(name)


@pytest.fixture
def root(block_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny block workspace with a score table per block (scores favour bigger candidates), as cwd."""
    root = copy_root(block_root, tmp_path / "root")
    write_scores(root / "artifacts/scores", build_space(tiny_params().space, teacher_blocks()))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def _setup(root: Path, params: Params, name: str = "b0") -> fidelity.BlockSetup:
    block = build_space(params.space, teacher_blocks()).block(name)
    return fidelity.setup_block(params, block, FeatureCache(root / "artifacts/features"), torch.device("cpu"),
                                root / "runs" / name, "rebuild-me")


# -------------------------------------------------------------------------------------------- the draw
def test_draw_takes_one_candidate_per_score_quantile_and_is_seeded() -> None:
    block = _block("b1")
    rng = np.random.default_rng(3)
    scores = {f"c{i:03d}": float(s) for i, s in enumerate(rng.normal(size=200))}
    drawn = fidelity.draw(scores, 16, seed=0, block=block)
    ranks = sorted(scores, key=scores.get)
    positions = [ranks.index(cid) for cid in drawn]
    assert len(set(drawn)) == 16
    assert all(12 * i <= p < 13 * (i + 1) for i, p in enumerate(positions)), "candidate i from the i-th of 16 bins"
    assert positions[0] < 200 / 16 and positions[-1] >= 200 - 200 / 16, "both ends of the score range"
    assert fidelity.draw(scores, 16, seed=0, block=block) == drawn
    assert fidelity.draw(scores, 16, seed=1, block=block) != drawn
    assert fidelity.draw(scores, 16, seed=0, block=_block("b2")) != drawn, "each block draws its own"
    every = fidelity.draw(dict(list(scores.items())[:5]), 5, seed=0, block=block)
    assert sorted(every) == sorted(list(scores)[:5]), "K = all candidates takes each once"


def test_k_beyond_the_block_or_below_two_is_one_line_naming_the_key() -> None:
    block = _block("b0")
    scores = {cid: float(i) for i, cid in enumerate(block.candidates())}
    with pytest.raises(ConfigError, match=r"'fidelity.candidates' = 5 .* block b0 has 4 candidates, choose 2..4"):
        fidelity.draw(scores, 5, seed=0, block=block)
    for override, key in [("fidelity.candidates=1", "fidelity.candidates"), ("fidelity.epochs=1", "fidelity.epochs"),
                          ("fidelity.seeds=0", "fidelity.seeds"), ("fidelity.bootstrap=10", "fidelity.bootstrap"),
                          ("fidelity.lr=-0.01", "fidelity.lr")]:
        with pytest.raises(ConfigError, match=key) as err:
            tiny_params([override])
        assert "\n" not in str(err.value)


def test_score_tables_missing_or_of_another_space_fail_naming_the_rebuild(tmp_path: Path) -> None:
    block = _block("b0")
    with pytest.raises(checkpoint.ArtifactError, match=r"b0.csv is missing: build it with `dvc repro score@b0`"):
        fidelity.read_scores(tmp_path / "b0.csv", block, "dvc repro score@b0")
    table = tmp_path / "b0.csv"
    table.write_text("candidate,score,mse\n" + "".join(f"{c},0.5,0.1\n" for c in list(block.candidates())[:3]))
    with pytest.raises(checkpoint.ArtifactError, match=r"rates 3 candidates, not the 4 of block b0"):
        fidelity.read_scores(table, block, "dvc repro score@b0")


def test_a_single_path_block_is_the_candidate_alone() -> None:
    block = _block("b1", ["space.identity=true"])
    for cid in ("d3w8:k5e6-k3e3-k5e6", "d3w8:k3e3-skip-k5e6", "d1w16:k5e6"):  # 2nd cell: narrowed to index 0
        net = SupernetBlock(fidelity.single_path(block, cid))
        assert list(net.block.candidates()) == [cid]
        size = sum(p.numel() for p in net.parameters())
        assert size == sum(p.numel() for p in build_candidate(block, cid).parameters())
        assert net(torch.randn(2, 8, 8, 8), cid).shape == (2, 16, 4, 4)


# -------------------------------------------------------------------------------------------- units
def test_a_unit_is_rated_like_its_score_resumes_after_a_kill_and_retrains_on_a_changed_setting(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tiny_params()
    setup = _setup(root, params)
    assert setup.target_stats is not None and setup.cfg.epochs == params.fidelity.epochs
    cid = list(setup.block.candidates())[3]
    reference = fidelity.train_unit(replace(setup, out_dir=tmp_path / "reference"), cid, 1)
    assert reference["epochs"] == 2 and reference["seed"] == params.seed + 1 and reference["error"] > 0

    # killed after its last epoch's checkpoint, before the rating: the rerun trains no epoch
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "score_naive", killed)
        with pytest.raises(KeyboardInterrupt):
            fidelity.train_unit(setup, cid, 1)
    unit = setup.unit_dir(cid, 1)
    state = checkpoint.load(unit / fidelity.CHECKPOINT, "x")
    assert state["epoch"] == 2 and not (unit / fidelity.RESULT).exists()
    net = SupernetBlock(fidelity.single_path(setup.block, cid))
    net.load_state_dict(state["model"])
    rated = score_naive(net, setup.rating, [cid])[cid]  # the score stage's relative L1, BN recalibrated

    def no_training(*args, **kwargs):
        raise AssertionError("a finished epoch was trained again")

    monkeypatch.setattr(supernet, "_train_epoch", no_training)
    resumed = fidelity.train_unit(setup, cid, 1)
    assert resumed["error"] == pytest.approx(float(rated[0].mean()), rel=1e-6)
    assert resumed["error"] == pytest.approx(reference["error"], rel=1e-6), "fixed seed, same result"
    assert not (unit / fidelity.CHECKPOINT).exists() and json.loads((unit / fidelity.RESULT).read_text())["error"]
    assert "run/seconds" not in json.loads((unit / fidelity.RESULT).read_text()), "results only on disk"
    assert fidelity.train_unit(setup, cid, 1)["fingerprint"] == resumed["fingerprint"], "finished: reused"
    assert fidelity.finished(setup, cid, 0) is None, "another seed is another unit"
    for override in ("fidelity.epochs=3", "score.batches=2", "fidelity.lr=0.02"):
        assert fidelity.finished(_setup(root, tiny_params([override])), cid, 1) is None, override
    assert fidelity.finished(_setup(root, tiny_params(["supernet.lr=0.02"])), cid, 1) is not None, \
        "the check's own lr: tuning the supernet keeps the ground truth"
    follows = _setup(root, tiny_params(["fidelity.lr=0", "space.blocks.b0.lr=0.03"]))
    assert follows.cfg.lr == 0.03 and fidelity.finished(follows, cid, 1) is None, "0 = the block's supernet lr"
    monkeypatch.undo()
    longer = fidelity.train_unit(_setup(root, tiny_params(["fidelity.epochs=3"])), cid, 1)
    assert longer["epochs"] == 3 and len(longer["history"]) == 3


# -------------------------------------------------------------------------------------------- statistics
def _rows(score, errors, params=None, gains=None) -> list[dict]:
    errors = np.asarray(errors, dtype=float)
    return [{"candidate": f"c{i}", "score": s, "error": float(e.mean()), "params": p, "epochs": 4,
             "last_gain": g, **{f"error_seed{k}": float(x) for k, x in enumerate(e)}}
            for i, (s, e, p, g) in enumerate(zip(score, errors, params if params is not None else -np.asarray(score),
                                                 gains if gains is not None else [0.001] * len(score), strict=True))]


def test_block_metrics_on_known_rankings() -> None:
    score = np.arange(10.0)
    same = fidelity.block_metrics(_rows(score, np.stack([score, score], 1) + 1), 2, 300, seed=0)
    assert same["tau"] == pytest.approx(1) and same["rho"] == pytest.approx(1) and same["seed_tau"] == pytest.approx(1)
    assert same["tau_lo"] <= same["tau"] <= same["tau_hi"] and same["tau_p"] < 1e-4
    assert same["params_tau"] == pytest.approx(1), "params = -score: bigger ranks lower error here"
    assert same["k"] == 10 and same["epochs"] == 4 and same["last_gain_max"] == pytest.approx(0.001)
    reversed_ = fidelity.block_metrics(_rows(score, np.stack([-score, -score], 1), params=score), 2, 300, seed=0)
    assert reversed_["tau"] == pytest.approx(-1) and reversed_["params_tau"] == pytest.approx(1)
    # seeds disagreeing completely: the ground truth's own tau is -1, whatever its mean ranks
    split = fidelity.block_metrics(_rows(score, np.stack([score, -2 * score], 1)), 2, 300, seed=0)
    assert split["seed_tau"] == pytest.approx(-1) and split["tau"] == pytest.approx(-1), "the mean follows seed 1"
    assert "seed_tau" not in fidelity.block_metrics(_rows(score, score[:, None]), 1, 300, seed=0)


def test_seed_tau_averages_every_pair_of_seeds() -> None:
    a = np.arange(8.0)
    errors = np.stack([a, a, a[::-1]], 1)  # pairs: +1, -1, -1
    assert fidelity.seed_tau(errors) == pytest.approx(-1 / 3)


def test_tables_round_trip_and_a_short_one_names_the_rebuild(tmp_path: Path) -> None:
    rows = _rows([0.3, 0.1, 0.2], [[0.5, 0.6], [0.2, 0.25], [0.4, 0.3]])
    path = tmp_path / "b0.csv"
    fidelity.write_rows(path, rows)
    assert fidelity.read_rows(path, 2, "r") == rows
    with pytest.raises(checkpoint.ArtifactError, match=r"error_seed2.*fidelity.seeds=3.*`dvc repro x`"):
        fidelity.read_rows(path, 3, "dvc repro x")
    with pytest.raises(checkpoint.ArtifactError, match=r"missing: build it with `dvc repro x`"):
        fidelity.read_rows(tmp_path / "b9.csv", 2, "dvc repro x")


# -------------------------------------------------------------------------------------------- the stages
def test_stages_write_tables_and_metrics_and_a_rerun_trains_nothing(root: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    params = load_params(["fidelity.train_samples=128"], root=root)
    f = params.fidelity
    assert (f.candidates, f.seeds, f.epochs) == (3, 2, 2), "the smoke overlay's check"
    train = load_stage("fidelity_train")
    caplog.set_level("INFO")
    tables = {}
    for block in params.space.blocks:
        rows = tables[block] = train.run(params, block=block)
        assert len(rows) == 3 and all(r["error"] > 0 and r["epochs"] == 2 for r in rows)
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores), "drawn best bin first"
    assert "b0: 6 of 6 units to train" in caplog.text
    with open(root / "plots/fidelity/b1.csv", newline="") as table:
        header = next(csv.reader(table))
    assert header[:3] == ["candidate", "score", "error"] and {"error_seed0", "error_seed1", "last_gain"} <= set(header)
    metrics = load_stage("fidelity_report").run(params)
    assert metrics == json.loads((root / "metrics/fidelity.json").read_text())
    for block in params.space.blocks:
        assert metrics[f"{block}/k"] == 3 and metrics[f"{block}/epochs"] == 2
        assert -1 <= metrics[f"{block}/tau_lo"] <= metrics[f"{block}/tau"] <= metrics[f"{block}/tau_hi"] <= 1
        assert -1 <= metrics[f"{block}/seed_tau"] <= 1
    caplog.clear()
    again = train.run(params, block="b2")
    assert "b2: 0 of 6 units to train (6 already done)" in caplog.text
    assert again == tables["b2"], "the same units, the same table"
    with pytest.raises(ConfigError, match="fidelity.candidates"):
        train.run(load_params(["fidelity.candidates=5", "fidelity.train_samples=128"], root=root), block="b0")
