"""The ranking check's library: drawing architectures, rank statistics, the searched-vs-random comparison."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import validation
from pipeline.assembly import synthetic_tables
from pipeline.checkpoint import ArtifactError
from pipeline.config import ConfigError, load_params
from stages.validate_report import TRAIN
from tests.fakes import REPO, load_stage, teacher_blocks, tiny_params, tiny_yaml, write_prepared

FIXED = {"params": 50_000.0, "flops": 1_000_000.0}


@pytest.fixture(scope="module")
def tables():
    return synthetic_tables()


def _searched(tables):
    return [t.candidates[len(t.candidates) // 2] for t in tables]


def _cost(tables, rows, metric="params"):
    return FIXED[metric] + sum(float(t.cost(metric)[r]) for t, r in zip(tables, rows, strict=True))


def test_draw_spreads_over_the_cost_range_and_holds_random_ones_at_the_budget(tables):
    budget = 0.8 * _cost(tables, [int(np.argmax(t.params)) for t in tables])
    drawn = validation.draw(tables, FIXED, "params", budget, _searched(tables), 12, 5, 0.1, seed=0)
    kinds = [a.kind for a in drawn]
    assert kinds == ["stratified"] * 12 + ["random"] * 5 + ["searched"]
    assert len({a.candidates for a in drawn}) == len(drawn), "no architecture twice"
    lo = _cost(tables, [int(np.argmin(t.params)) for t in tables])
    hi = _cost(tables, [int(np.argmax(t.params)) for t in tables])
    strat = np.array([a.params for a in drawn if a.kind == "stratified"])
    assert np.all(np.diff(strat) > 0), "one per bin, cheapest bin first"
    width = (hi - lo) / 12
    assert strat[0] <= lo + width and strat[-1] >= hi - width, "both ends of the range are reached"
    for a in drawn:
        rows = [t.candidates.index(c) for t, c in zip(tables, a.candidates, strict=True)]
        assert a.params == pytest.approx(_cost(tables, rows))
        assert a.flops == pytest.approx(_cost(tables, rows, "flops"))
        assert a.block_scores == pytest.approx([float(t.score[r]) for t, r in zip(tables, rows, strict=True)])
        assert a.score == pytest.approx(sum(a.block_scores))
        if a.kind == "random":
            assert 0.9 * budget <= a.params <= budget
    assert drawn[-1].candidates == tuple(_searched(tables))


def test_draw_is_seeded(tables):
    args = (tables, FIXED, "flops", None, _searched(tables), 5, 3, 0.1)
    first, again, other = (validation.draw(*args, seed=s) for s in (0, 0, 1))
    assert first == again and first != other


def test_draw_without_budget_uses_the_searched_cost(tables):
    drawn = validation.draw(tables, FIXED, "params", None, _searched(tables), 3, 4, 0.1, seed=0)
    target = drawn[-1].params
    assert all(0.9 * target <= a.params <= target for a in drawn if a.kind == "random")


def test_a_budget_window_without_enough_architectures_says_what_to_change(tables):
    cheapest = _cost(tables, [int(np.argmin(t.params)) for t in tables])
    with pytest.raises(validation.ValidationError, match="widen validate.window"):
        validation.draw(tables, FIXED, "params", cheapest * 1.0001, _searched(tables), 3, 5, 0.0001, seed=0)


def test_rank_quality_recovers_known_orderings():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    m = validation.rank_quality(truth, {"perfect": truth * 2, "reversed": -truth, "noise": rng.normal(size=30),
                                        "params": truth + rng.normal(0, 1, 30)}, 300, seed=0)
    assert m["perfect/tau"] == pytest.approx(1.0) and m["perfect/rho"] == pytest.approx(1.0)
    assert m["reversed/tau"] == pytest.approx(-1.0)
    assert m["perfect/tau_p"] < 1e-6 and m["noise/tau_p"] > 0.01
    assert m["noise/tau_lo"] < m["noise/tau"] < m["noise/tau_hi"]
    assert m["perfect/minus_params_lo"] > 0, "a perfect ranking beats a noisy one with confidence"
    assert m["n"] == 30


def test_searched_vs_random_at_budget():
    acc = {"r00": 0.90, "r01": 0.92, "r02": 0.91, "searched": 0.915, "s00": 0.99}
    kinds = {"r00": "random", "r01": "random", "r02": "random", "searched": "searched", "s00": "stratified"}
    m = validation.at_budget(acc, kinds)
    assert m["random/mean"] == pytest.approx(0.91) and m["random/std"] == pytest.approx(0.01)
    assert m["searched/rank"] == 2 and m["random/n"] == 3
    assert m["searched/minus_random_mean"] == pytest.approx(0.005)


@pytest.mark.parametrize("override, key", [("validate.stratified=1", "validate.stratified"),
                                           ("validate.window=1.5", "validate.window"),
                                           ("validate.seeds=0", "validate.seeds"),
                                           ("validate.train.epochs=0", "validate.train.epochs")])
def test_bad_validation_settings_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_params([override])


def _sampled(names):
    return [validation.Sampled(n, "random" if n.startswith("r") else "stratified", ("k3e3",), 1.0, 1.0, 0.5, (0.5,))
            for n in names]


def test_a_corrupt_architecture_list_names_the_stage_to_rerun(tmp_path):
    with pytest.raises(ArtifactError, match="validate_sample"):
        validation.read_sampled(tmp_path / "archs.json")
    (tmp_path / "archs.json").write_text('{"architectures": [{"name": "s00"}]}')
    with pytest.raises(ArtifactError, match="validate_sample"):
        validation.read_sampled(tmp_path / "archs.json")
    uneven = {**_sampled(["s00"])[0].as_json(), "block_scores": [0.2, 0.3]}
    (tmp_path / "archs.json").write_text(json.dumps({"architectures": [uneven]}))
    with pytest.raises(ArtifactError, match="s00 have a block score count unlike .*validate_sample"):
        validation.read_sampled(tmp_path / "archs.json")


def test_a_stale_searched_architecture_names_the_fix(tables):
    stale = _searched(tables)[:-1] + ["k9e9-k9e9"]
    with pytest.raises(validation.ValidationError, match=r"'k9e9-k9e9' is not in .*dvc repro assemble"):
        validation.draw(tables, FIXED, "params", None, stale, 3, 1, 0.1, seed=0)
    with pytest.raises(validation.ValidationError, match="3 blocks, the score tables 4"):
        validation.draw(tables, FIXED, "params", None, _searched(tables)[:3], 3, 1, 0.1, seed=0)


def test_paired_bootstrap_finds_the_better_predictor():
    """Same resamples for both: a predictor with a tenth of the other's noise leads it with confidence, in tau and rho;
    two equally noisy copies of one predictor do not."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=25)
    good, bad = truth + rng.normal(0, 0.1, 25), truth + rng.normal(0, 1.5, 25)
    m = validation.rank_quality(truth, {"dna_score": good, "spos": bad, "twin": good + 1e-9 * rng.normal(size=25),
                                        "params": rng.normal(size=25)}, 500, seed=0)
    assert m["dna_score/minus_spos_lo"] > 0 and m["dna_score/minus_spos_rho_lo"] > 0
    assert m["dna_score/minus_twin_lo"] <= 0 <= m["dna_score/minus_twin_hi"]
    for name in ("dna_score", "spos", "twin", "params"):
        assert m[f"{name}/rho_lo"] <= m[f"{name}/rho"] <= m[f"{name}/rho_hi"]
    assert m["dna_score/minus_params_lo"] > 0 and "spos/minus_params_lo" in m, "each predictor minus params, as before"
    unpaired = validation.rank_quality(truth, {"dna_score": good, "spos": bad}, 500, seed=1)
    assert unpaired["dna_score/tau_lo"] != m["dna_score/tau_lo"], "the seed picks the resamples"


def _synthetic_report(n: int = 18, seeds: int = 2):
    rng = np.random.default_rng(0)
    kinds = ["stratified"] * (n - 6) + ["random"] * 5 + ["searched"]
    archs = [validation.Sampled("searched" if k == "searched" else f"{k[0]}{i:02d}", k, ("k3e3",) * 4,
                                float(rng.integers(1e5, 1e6)), float(rng.integers(1e7, 1e8)), float(rng.random()),
                                tuple(rng.random(4))) for i, k in enumerate(kinds)]
    by_seed = {a.name: {"val_acc": list(rng.uniform(0.8, 0.9, seeds)), "val_loss": list(rng.uniform(0.3, 0.5, seeds))}
               for a in archs}
    rated = {"spos": {a.name: float(rng.random()) for a in archs}, "naswot": {a.name: float(rng.normal(300, 5))
                                                                             for a in archs}}
    return archs, by_seed, rated


def test_the_report_keeps_every_committed_key_and_adds_the_new_predictors():
    archs, by_seed, rated = _synthetic_report()
    metrics, rows = validation.report_metrics(archs, by_seed, 2, 200, 0, rated)
    committed = json.loads((REPO / "metrics/validate.json").read_text())
    assert set(committed) - {"spos/compute_ratio", "spos/images"} <= set(metrics)
    for name in ("spos", "naswot"):
        for key in ("tau", "tau_lo", "tau_hi", "tau_p", "rho", "rho_lo", "rho_hi", "minus_params_lo"):
            assert f"all/{name}/{key}" in metrics
        assert {f"all/dna_score/minus_{name}_{end}" for end in ("lo", "hi", "rho_lo", "rho_hi")} <= set(metrics)
        assert {f"loss/{name}/tau", f"stratified/{name}/tau", f"at_budget/{name}/tau"} <= set(metrics)
    assert rows[0]["spos"] == rated["spos"][archs[0].name]
    page = validation.report_markdown(metrics, rows, tiny_params().validate, "params")
    assert "SPOS accuracy" in page and "NASWOT" in page and "paired" in page


def test_a_predictor_file_without_an_architecture_names_the_stage(tmp_path):
    archs = _sampled(["s00", "r00"])
    with pytest.raises(ArtifactError, match="proxy.csv is missing.*validate_proxy"):
        validation.read_rated(tmp_path / "proxy.csv", archs, "naswot", "dvc repro validate/dvc.yaml:validate_proxy")
    validation.write_rows(tmp_path / "proxy.csv", [{"name": "s00", "naswot": 1.5}], ("name", "naswot"))
    with pytest.raises(ArtifactError, match=r"no naswot for r00 .*validate_proxy"):
        validation.read_rated(tmp_path / "proxy.csv", archs, "naswot", "dvc repro validate/dvc.yaml:validate_proxy")
    assert validation.read_rated(tmp_path / "proxy.csv", archs[:1], "naswot", "x") == {"s00": 1.5}


# ---------------------------------------------------------------------------------------------------- shards
def _units(n: int):
    archs = [validation.Sampled(f"s{i:02d}", "stratified", ("k3e3",), 1.0, float(100 - i), 0.5, (0.5,))
             for i in range(n)]
    return validation.jobs(archs, tiny_params(["validate.seeds=2"]), Path("/nowhere"))


@pytest.mark.parametrize("machines", [1, 2, 3, 7])
def test_shards_partition_the_units(machines):
    units = _units(5)
    parts = [validation.shard(units, f"{i}/{machines}") for i in range(machines)]
    dirs = [job.out_dir for part in parts for job in part]
    assert sorted(dirs) == sorted(job.out_dir for job in units) and len(set(dirs)) == len(dirs), "complete, disjoint"
    assert validation.shard(units, "") == units
    assert max(map(len, parts)) - min(map(len, parts)) <= 1, "round robin: every machine gets its share"


@pytest.mark.parametrize("value", ["2/2", "1", "a/b", "0/0", "-1/2", "1/2/3", " 0/2"])
def test_a_bad_shard_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"validate\.shard.*0 <= i < n") as err:
        tiny_params([f"validate.shard='{value}'"])
    assert "\n" not in str(err.value)


def test_a_shard_parses_from_the_command_line(repo_copy):
    assert load_params(["validate.shard=1/2"], root=repo_copy).validate.shard == "1/2"


@pytest.fixture
def ranking_root(tmp_path, monkeypatch):
    """params.yaml (tiny space, 1 seed), data/prepared, blocks.json and four drawn architectures; MLflow left out
    (the stages' runs are tested end to end by the smoke DAG)."""
    import contextlib

    from omegaconf import OmegaConf

    from pipeline import space, tracking

    def make(name: str) -> Path:
        root = tmp_path / name
        (root / "artifacts/teacher").mkdir(parents=True)
        overrides = ["validate.seeds=1", "validate.workers=1", "validate.train.batch_size=48"]
        (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml(overrides)))
        write_prepared(root / "data/prepared")
        (root / "artifacts/teacher/blocks.json").write_text(json.dumps(teacher_blocks()))
        spec = space.build_space(tiny_params(overrides).space, teacher_blocks())
        candidates = [list(b.candidates()) for b in spec.blocks]
        archs = [validation.Sampled(f"s{i:02d}", "stratified", tuple(c[i % len(c)] for c in candidates),
                                    1.0, float(i), 0.5, (0.5,) * 3) for i in range(4)]
        validation.write_json(root / "artifacts/validate/archs.json", {"architectures": [a.as_json() for a in archs]})
        return root

    monkeypatch.setattr(tracking, "stage_run", lambda *a, **k: contextlib.nullcontext())
    return make


def test_two_shards_train_what_one_run_trains(ranking_root, monkeypatch):
    from tests.fakes import params_at

    stage = load_stage("validate_train")
    monkeypatch.setattr(stage, "_log_unit", lambda job, result: None)
    one, split = ranking_root("one"), ranking_root("split")
    monkeypatch.chdir(one)
    stage.run(tiny_params_like(params_at(one), "", workers=2))  # two worker processes train what one process trains
    monkeypatch.chdir(split)
    params = params_at(split)
    first = stage.run(tiny_params_like(params, "0/2"))
    assert len(first) == 2, "results.csv lists the finished units found"
    units = validation.jobs(validation.read_sampled(split / "artifacts/validate/archs.json"), params, split)
    with pytest.raises(ArtifactError, match=r"2 of 4 ranking units .*s02/seed0 \(shard 1/2\), s00/seed0 \(shard 1/2\)"
                                            r".*validate\.shard=i/n"):
        validation.gather(units, "0/2", TRAIN)
    stage.run(tiny_params_like(params, "1/2"))
    results = sorted(p.relative_to(split) for p in split.glob("artifacts/validate/runs/*/*/result.json"))
    assert results == sorted(p.relative_to(one) for p in one.glob("artifacts/validate/runs/*/*/result.json"))
    assert len(results) == 4
    for path in results:
        assert (split / path).read_bytes() == (one / path).read_bytes(), path
    assert (split / "artifacts/validate/results.csv").read_text() == (one / "artifacts/validate/results.csv").read_text()
    assert validation.gather(units, "", TRAIN) == validation.gather(
        validation.jobs(validation.read_sampled(one / "artifacts/validate/archs.json"), params_at(one), one), "", TRAIN)


def tiny_params_like(params, shard: str, workers: int = 1):
    from dataclasses import replace

    return replace(params, validate=replace(params.validate, shard=shard, workers=workers))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_stops_the_parallel_units_and_leaves_no_worker(ranking_root):
    """Ctrl-C signals the whole process group: workers killed mid-protocol used to leave the pool's parent joining
    a dead manager thread forever (found interrupting `dvc repro validate/dvc.yaml`)."""
    root = ranking_root("interrupt")
    log = root / "stage.log"  # a file, not a pipe: nothing here reads while the stage writes
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "stages/validate_train.py"), "validate.workers=2",
                                 "validate.train.epochs=1000"], cwd=root, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                     "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    try:
        deadline = time.monotonic() + 120
        while len(list(root.glob("artifacts/validate/runs/*/seed0"))) < 2:  # both workers are training
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) != 0
        left = _group_members(proc.pid)
        assert not left, f"outlived the stage: {left}"
        assert not list(root.glob("artifacts/validate/runs/*/seed0/result.json")), "the units were still training"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_members(group: int, wait: float = 10.0) -> list[str]:
    """Command lines of the processes still in ``group`` after up to ``wait`` s (multiprocessing's resource tracker
    leaves once the last of the processes it serves is gone)."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group:
                    left.append((stat.parent / "cmdline").read_text().replace("\0", " "))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
