"""The GPU check without a GPU: its dry run (workspaces, params with the CUDA overrides, DVC's plan, torchrun), and
the comparisons it makes on a GPU, on synthetic tables and a tiny cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import gpu_check
from pipeline.records import append_row
from tests.fakes import REPO, write_cache


def test_dry_run_builds_validates_and_plans_every_stage_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.INFO, logger="pipeline.gpu_check")
    assert gpu_check.run(tmp_path / "check", REPO) == 0
    assert "no CUDA device here: dry run only" in capsys.readouterr().out
    for name, amp in (("cuda", False), ("cuda-amp", True)):
        params = OmegaConf.load(tmp_path / "check" / name / "params.yaml")
        assert params.runtime.device == "cuda" and params.runtime.amp is amp
        assert params.data.limit == OmegaConf.load(REPO / "configs/smoke.yaml").data.limit  # the smoke overlay
    plans = [r.getMessage() for r in caplog.records if "dvc would run" in r.getMessage()]
    assert len(plans) == 3 and all("supernet@b0" in p and "score@b3" in p and "report" in p for p in plans)
    assert gpu_check.torchrun_command()[1:] == ["--standalone", "--nproc_per_node=1", "stages/supernet.py",
                                                "block=b0"]


def test_a_bad_override_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "runs", lambda cores: {"cuda": ["runtime.device=tpu"]})
    assert gpu_check.run(tmp_path / "check", REPO) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu check failed:") and "runtime.device" in err and len(err.splitlines()) == 1


def _table(root: Path, block: int, scores: dict[str, float]) -> None:
    path = root / gpu_check.SCORES / f"b{block}.csv"
    for cid, score in scores.items():
        append_row(path, {"candidate": cid, "score": score, "mse": 0.0})


def test_score_taus_match_candidates_by_id(tmp_path: Path) -> None:
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    _table(cpu, 0, {"a": 0.1, "b": 0.2, "c": 0.3})
    _table(gpu, 0, {"c": 0.31, "a": 0.11, "b": 0.19})  # same ranking, another order
    _table(cpu, 1, {"a": 0.1, "b": 0.2, "c": 0.3})
    _table(gpu, 1, {"a": 0.3, "b": 0.2, "c": 0.1})
    assert gpu_check.score_taus(cpu, gpu) == pytest.approx({"b0": 1.0, "b1": -1.0})
    _table(gpu, 1, {"d": 0.4})
    with pytest.raises(RuntimeError, match="b1.csv"):
        gpu_check.score_taus(cpu, gpu)


def test_throughput_reads_the_run_metrics_from_the_workspace_store(tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("dna")
    logged = (("teacher", "run/train_images_per_s", [100.0, 120.0]), ("supernet@b0", "run/images_per_s", [900.0]),
              ("score@b0", "run/candidates_per_s", [4.5]), ("score@b0", "run/candidates_per_s", [5.0]))
    for stage, key, values in logged:  # the second score@b0 run (a rerun) is the one reported
        run = client.create_run(experiment, tags={"dvc.stage": stage})
        for step, value in enumerate(values):
            client.log_metric(run.info.run_id, key, value, step=step)
        client.log_metric(run.info.run_id, "val/acc", 0.5)
    assert gpu_check.throughput(tmp_path) == {"teacher images/s": 120.0, "supernet@b0 images/s": 900.0,
                                              "score@b0 candidates/s": 5.0}


def test_same_batches_compares_the_prefetched_reader_with_direct_reads(tmp_path: Path) -> None:
    write_cache(tmp_path / "artifacts/features", n_train=128, n_val=16)
    assert gpu_check.same_batches(tmp_path, torch.device("cpu"))
