"""The ranking check's library: drawing architectures, rank statistics, the searched-vs-random comparison."""

import json

import numpy as np
import pytest

from pipeline import validation
from pipeline.assembly import synthetic_tables
from pipeline.config import ConfigError
from stages.validate_report import TRAIN
from tests.fakes import tiny_params

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


def test_missing_or_short_results_name_the_stage_to_run(tmp_path):
    from pipeline.checkpoint import ArtifactError

    with pytest.raises(ArtifactError, match="validate/dvc.yaml:validate_train"):
        validation.read_results(tmp_path / "results.csv", _sampled(["s00"]), 1, TRAIN)
    (tmp_path / "results.csv").write_text("name,kind,seed,val_acc,val_loss,seconds\n"
                                          "s00,stratified,1,0.9,0.4,1\ns00,stratified,0,0.8,0.5,1\n"
                                          "r00,random,0,0.7,0.6,1\n")
    assert validation.read_results(tmp_path / "results.csv", _sampled(["s00", "r00"]), 1, TRAIN) == {
        "s00": {"val_acc": [0.8], "val_loss": [0.5]}, "r00": {"val_acc": [0.7], "val_loss": [0.6]}}
    with pytest.raises(ArtifactError, match=r"lacks results for r00 \(2 seed"):
        validation.read_results(tmp_path / "results.csv", _sampled(["s00", "r00"]), 2, TRAIN)
    (tmp_path / "results.csv").write_text("name,kind,seed,val_acc\ns00,stratified,zero,0.8\n")
    with pytest.raises(ArtifactError, match="unreadable"):
        validation.read_results(tmp_path / "results.csv", _sampled(["s00"]), 1, TRAIN)


def test_a_corrupt_architecture_list_names_the_stage_to_rerun(tmp_path):
    from pipeline.checkpoint import ArtifactError

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
