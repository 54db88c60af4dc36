"""Data too big to cache: the online teacher gives the supernet and score stages what the cache would have, auto picks
between them from the estimated size, and a cache that cannot fit fails in one line before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import kendalltau

from pipeline import cli, features
from pipeline.checkpoint import ArtifactError
from pipeline.config import Cache, ConfigError, load_params
from pipeline.features import MANIFEST, FeatureCache, OnlineFeatures, open_features
from tests.fakes import load_stage, tiny_yaml, write_prepared, write_teacher

Usage = namedtuple("Usage", "total used free")
BLOCK = "b1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared 16 px images (96 train, 32 val) and a real (untrained) timm teacher cut like the tiny space's blocks."""
    root = tmp_path_factory.mktemp("inputs")
    write_prepared(root / "data/prepared")
    write_teacher(root / "artifacts/teacher")
    return root


def _workspace(inputs: Path, root: Path, overrides: list[str]) -> Path:
    for part in ("data/prepared", "artifacts/teacher"):
        shutil.copytree(inputs / part, root / part)
    (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml(["supernet.epochs=1", *overrides])))
    return root


def _dirs(root: Path) -> dict[str, Path]:
    return {"teacher_dir": root / "artifacts/teacher", "prepared_dir": root / "data/prepared"}


def _disk(monkeypatch: pytest.MonkeyPatch, free: float) -> None:
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: Usage(10**15, 0, int(free)))


def _run_block(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], list[dict]]:
    """cache_features, supernet@b1 and score@b1 in ``root``; returns the supernet history and the score table."""
    monkeypatch.chdir(root)
    params = load_params(root=root)
    load_stage("cache_features").run(params)
    history = load_stage("supernet").run(params, block=BLOCK)
    load_stage("score").run(params, block=BLOCK)
    with (root / params.search.scores_dir / f"{BLOCK}.csv").open() as f:
        return history, list(csv.DictReader(f))


def test_online_teacher_trains_and_scores_a_block_like_the_cache(inputs: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {mode: _run_block(_workspace(inputs, tmp_path / mode, [f"cache.mode={mode}"]), monkeypatch)
            for mode in ("cache", "online")}
    online = tmp_path / "online/artifacts/features"
    assert [p.name for p in online.iterdir()] == [MANIFEST]  # nothing cached
    assert json.loads((online / MANIFEST).read_text())["decision"]["mode"] == "online"
    cached = FeatureCache(tmp_path / "cache/artifacts/features")
    stored = sum(f["bytes"] for s in cached.manifest["splits"].values() for f in s["files"].values())
    estimate = cached.manifest["decision"]["estimate_bytes"]
    assert 0 <= stored - estimate <= 128 * 10  # the estimate is the cache's size but for its 10 .npy headers

    (hist_c, rows_c), (hist_o, rows_o) = runs["cache"], runs["online"]
    for a, b in zip(hist_c, hist_o, strict=True):  # same batches, paths and values: the same training
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert [r["candidate"] for r in rows_c] == [r["candidate"] for r in rows_o] and len(rows_c) == 10
    scores_c, scores_o = (np.array([float(r["score"]) for r in rows]) for rows in (rows_c, rows_o))
    assert np.ptp(scores_c) > 1e-3 * scores_c.mean()  # candidates really differ: the ranking means something
    assert kendalltau(scores_c, scores_o).statistic >= 0.99
    np.testing.assert_allclose(scores_o, scores_c, rtol=1e-3)


def test_online_batches_hold_the_cached_views_and_a_stale_manifest_fails(
        inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    views = ["cache.views=2", "teacher.train.augment.erase_prob=0.5", "cache.batch_size=40"]
    roots = {}
    for mode, free in (("cache", 1e12), ("online", 1e3)):  # auto: the same settings, only the free disk differs
        roots[mode] = _workspace(inputs, tmp_path / mode, ["cache.mode=auto", *views])
        monkeypatch.chdir(roots[mode])
        _disk(monkeypatch, free)
        load_stage("cache_features").run(load_params(root=roots[mode]))
    cache = open_features(roots["cache"] / "artifacts/features", **_dirs(roots["cache"]))
    online = open_features(roots["online"] / "artifacts/features", **_dirs(roots["online"]))
    assert isinstance(cache, FeatureCache) and isinstance(online, OnlineFeatures)
    assert "exceeds the free disk" in online.manifest["decision"]["reason"]
    assert online.num_samples("train") == cache.num_samples("train") == 2 * 96
    np.testing.assert_array_equal(online.labels("train"), cache.labels("train"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        index = np.sort(rng.permutation(cache.num_samples(split))[:24])  # both views, in a training batch's order
        for key in cache.keys:
            want = cache.get(split, key, index)
            torch.testing.assert_close(online.get(split, key, index), want, rtol=1e-3,
                                       atol=1e-3 * float(want.abs().max()))
    augmented = slice(96, 192)
    assert not torch.equal(online.get("train", "input", augmented), online.get("train", "input", slice(0, 96)))

    with pytest.raises(ArtifactError, match="cache.mode=online manifest"):
        FeatureCache(roots["online"] / "artifacts/features")
    with pytest.raises(KeyError, match="past this reader's last boundary"):
        open_features(roots["online"] / "artifacts/features", upto="b0", **_dirs(roots["online"])).get(
            "val", "b1", slice(0, 2))
    labels = roots["online"] / "data/prepared/val_labels.npy"
    np.save(labels, np.load(labels)[::-1].copy())
    with pytest.raises(ArtifactError, match=r"other prepared data .* `dvc repro cache_features`"):
        open_features(roots["online"] / "artifacts/features", **_dirs(roots["online"]))


def test_auto_caches_within_the_cap_and_the_free_disk_else_goes_online(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "artifacts/features"  # not there yet: its nearest existing folder's disk counts
    _disk(monkeypatch, 10e9)
    auto = Cache(mode="auto", max_gb=5)
    assert features.resolve_mode(auto, int(4e9), out).mode == "cache"
    over_cap = features.resolve_mode(auto, int(6e9), out)
    assert over_cap.mode == "online" and "cache.max_gb=5" in over_cap.reason
    assert features.resolve_mode(Cache(mode="auto", max_gb=0), int(9e9), out).mode == "cache"  # 0: no cap
    assert features.resolve_mode(Cache(mode="auto", max_gb=0), int(9.5e9), out).mode == "online"  # 10% margin
    assert features.resolve_mode(Cache(mode="online"), 1, out).mode == "online"
    _disk(monkeypatch, 3e9)
    over_disk = features.resolve_mode(auto, int(4e9), out)
    assert over_disk.mode == "online" and "free disk" in over_disk.reason and over_disk.free_bytes == int(3e9)
    # an interrupted build's bytes are reused (or freed) by the next one: they count as free
    (out.parent / "features.partial").mkdir(parents=True)
    (out.parent / "features.partial" / "b0.npy").write_bytes(b"x" * (1 << 20))
    assert features.resolve_mode(auto, 1, out).free_bytes >= int(3e9) + (1 << 20)


def test_a_cache_the_disk_cannot_hold_fails_in_one_line_before_writing(
        inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    root = _workspace(inputs, tmp_path / "ws", [])
    monkeypatch.chdir(root)
    caplog.set_level("INFO")
    _disk(monkeypatch, 1e5)
    with pytest.raises(SystemExit):
        cli.main(load_stage("cache_features").run, ["cache.mode=cache", "cache.dtype=float32"])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1]
    # 128 samples x ((1x16x16 + 8x8x8 + 16x4x4 + 16x2x2) float32 + an int64 label) = 0.000558 GB; 1e5 bytes free
    assert "needs ~0.000558 GB (float32" in errors[0] and "0.0001 GB free" in errors[0]
    for fix in ("cache.mode=online", "cache.dtype=float16", "data.limit"):
        assert fix in errors[0]
    assert "estimated 0.000558 GB" in caplog.text  # the size is logged before the check
    assert not (root / "artifacts/features").exists() and not (root / "artifacts/features.partial").exists()


@pytest.mark.parametrize("override, expected", [("cache.mode=sometimes", "auto (cache when it fits"),
                                                ("cache.max_gb=-1", "must be >= 0 GB")])
def test_a_bad_cache_mode_or_cap_is_one_line(override: str, expected: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_params([override], root=tmp_path)
    with pytest.raises(SystemExit):
        cli.main(load_stage("cache_features").run, [override])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: params key '{override.split('=')[0]}'") and expected in err[0]
