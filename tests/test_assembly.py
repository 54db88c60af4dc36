"""Assembly: exactness against brute force, bad tables, Optuna, and the stage's standalone contract."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import assembly, cli, tracking
from pipeline.assembly import AssemblyError, ExactSearch, optuna_search, read_tables, synthetic_tables
from pipeline.checkpoint import ArtifactError
from pipeline.config import COUNTED_METRICS, ConfigError, load_params
from tests.fakes import REPO, write_counted_costs

# ---------------------------------------------------------------------------------------------- brute force


def brute_force(costs, scores, fixed):
    """Every architecture's (cost, score), summed in block order like the solver, and its choice."""
    choices = np.array(list(itertools.product(*[range(len(c)) for c in costs])))
    cost = np.full(len(choices), float(fixed))
    score = np.zeros(len(choices))
    for b, (c, s) in enumerate(zip(costs, scores, strict=True)):
        cost = cost + c[choices[:, b]]
        score = score + s[choices[:, b]]
    return cost, score, choices


def brute_front(cost, score):
    """Non-dominated (cost, score) pairs by the definition: nothing at most as costly and as bad, better in one."""
    weakly = (cost[None, :] <= cost[:, None]) & (score[None, :] <= score[:, None])
    strictly = (cost[None, :] < cost[:, None]) | (score[None, :] < score[:, None])
    dominated = (weakly & strictly).any(axis=1)
    return set(zip(cost[~dominated].tolist(), score[~dominated].tolist(), strict=True))


def ranked(score, cost):
    """(score, cost) pairs best first, ties cheaper first: the order top_k promises."""
    order = np.lexsort((cost, score))
    return list(zip(score[order].tolist(), cost[order].tolist(), strict=True))


values = st.one_of(st.integers(-3, 3).map(float), st.floats(-5, 5, allow_nan=False, width=64))
cost_values = st.one_of(st.integers(0, 6).map(float), st.floats(0, 50, allow_nan=False))


@st.composite
def instances(draw):
    blocks = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(blocks)]
    costs = [np.array(draw(st.lists(cost_values, min_size=n, max_size=n))) for n in sizes]
    scores = [np.array(draw(st.lists(values, min_size=n, max_size=n))) for n in sizes]
    fixed = draw(st.one_of(st.just(0.0), st.integers(0, 10).map(float)))
    return costs, scores, fixed, draw(st.floats(0, 1)), draw(st.integers(1, 8))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_exact_equals_brute_force(instance):
    costs, scores, fixed, where, k = instance
    cost, score, choices = brute_force(costs, scores, fixed)
    search = ExactSearch(costs, scores, fixed)

    front = search.front()
    assert set(zip(front.cost.tolist(), front.score.tolist(), strict=True)) == brute_front(cost, score)
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.score) < 0)
    for c, s, choice in zip(front.cost, front.score, front.choice, strict=True):  # each point is realised
        arch = assembly.summed(costs, scores, fixed, choice)
        assert (arch.cost, arch.score) == (c, s)

    budget = float(cost.min() + where * (cost.max() - cost.min()))
    feasible = cost <= budget
    best = search.best(budget)
    order = np.lexsort((cost[feasible], score[feasible]))  # lowest score, then cheapest
    assert (best.score, best.cost) == (score[feasible][order[0]], cost[feasible][order[0]])
    assert best.cost <= budget
    assert assembly.summed(costs, scores, fixed, best.choice) == best

    top = search.top_k(k, budget)
    assert [(a.score, a.cost) for a in top] == ranked(score[feasible], cost[feasible])[:k]
    assert len({a.choice for a in top}) == len(top) and all(a.cost <= budget for a in top)
    assert (top[0].score, top[0].cost) == (best.score, best.cost)


def test_no_budget_takes_the_global_best():
    costs = [np.array([1.0, 9.0]), np.array([5.0, 2.0, 7.0])]
    scores = [np.array([0.5, 0.1]), np.array([0.3, 0.9, 0.2])]
    best = ExactSearch(costs, scores, fixed_cost=3).best(None)
    assert best.choice == (1, 2) and best.cost == 19.0 and best.score == pytest.approx(0.3)


def test_infeasible_budget_names_the_cheapest_cost():
    search = ExactSearch([np.array([4.0, 2.0]), np.array([3.0, 8.0])], [np.zeros(2), np.zeros(2)], fixed_cost=10)
    with pytest.raises(AssemblyError, match=r"budget 14 is infeasible: the cheapest architecture costs 15"):
        search.best(14)
    with pytest.raises(AssemblyError, match="costs 15"):
        search.top_k(3, 14.9)
    assert search.best(15).cost == 15


def test_merge_in_chunks_matches_one_piece(monkeypatch):
    rng = np.random.default_rng(3)
    costs = [rng.integers(0, 1000, 300).astype(float) for _ in range(3)]
    scores = [1 - np.log1p(c) / 10 + rng.normal(0, 0.05, 300) for c in costs]  # large fronts
    whole = ExactSearch(costs, scores).front()
    monkeypatch.setattr(assembly, "_MAX_PAIRS", 64)
    chunked = ExactSearch(costs, scores).front()
    assert len(whole.cost) > 100
    np.testing.assert_array_equal(whole.cost, chunked.cost)
    np.testing.assert_array_equal(whole.score, chunked.score)


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_needed_rows_match_the_definition(k):
    """Fewer than k rows at most as large in every column that sort first (of equal rows, the earlier)."""
    rng = np.random.default_rng(k)
    points = np.column_stack([rng.integers(0, 6, 300), rng.integers(0, 6, 300), rng.normal(size=300)])
    points[::7] = points[3]  # duplicates, several chunks apart
    at_most = (points[None, :, :] <= points[:, None, :]).all(axis=2)  # [i, j]: row j <= row i everywhere
    first = (points[None, :, :] != points[:, None, :]).any(axis=2) | np.tri(len(points), k=-1, dtype=bool)
    expected = np.flatnonzero((at_most & first).sum(axis=1) < k)
    assert 0 < len(expected) < len(points)
    np.testing.assert_array_equal(assembly._needed(points, k), expected)


# ---------------------------------------------------------------------------------------------- limits


def place(totals: np.ndarray, where: float | int) -> float:
    """A limit from brute-force totals: a float is a position between the smallest and the largest (below 0:
    under the smallest, infeasible), an int picks one architecture's total exactly (a tie with the limit)."""
    if isinstance(where, int):
        return float(totals[where % len(totals)])
    return float(totals.min() + where * (totals.max() - totals.min()))


@st.composite
def limited_instances(draw):
    """Up to 4 blocks x 8 candidates with one or two more metrics, each the searched cost scaled plus noise or
    independent of it; limits from infeasible to loose, often exactly at a total; the budget as one of them."""
    blocks = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 8)) for _ in range(blocks)]

    def arrays(elements):
        return [np.array(draw(st.lists(elements, min_size=n, max_size=n))) for n in sizes]

    costs, scores = arrays(cost_values), arrays(values)
    others = {}
    for name in ("latency", "flops")[:draw(st.integers(1, 2))]:
        if draw(st.booleans()):
            factor = draw(st.sampled_from([0.5, 1.0, 3.0]))
            other = [factor * c + noise for c, noise in zip(costs, arrays(st.integers(0, 4).map(float)), strict=True)]
        else:
            other = arrays(cost_values)
        others[name] = (other, draw(st.sampled_from([0.0, 2.0, 0.25])))
    where = st.one_of(st.floats(-0.2, 1.0), st.integers(0, 10_000))
    positions = {"latency": draw(where)}  # always one limit beyond the budget
    for name in ("cost", *others):
        if name not in positions and draw(st.booleans()):
            positions[name] = draw(where)
    fixed = draw(st.sampled_from([0.0, 1.0, 7.0]))
    return costs, scores, fixed, others, positions, draw(st.integers(1, 10))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limited_instances())
def test_limits_equal_brute_force(instance):
    costs, scores, fixed, others, positions, k = instance
    cost, score, _ = brute_force(costs, scores, fixed)
    totals = {"cost": cost, **{name: brute_force(c, scores, f)[0] for name, (c, f) in others.items()}}
    caps = {name: place(totals[name], where) for name, where in positions.items()}
    budget, limits = caps.get("cost"), {name: c for name, c in caps.items() if name != "cost"}
    feasible = np.logical_and.reduce([totals[name] <= c for name, c in caps.items()])
    search = ExactSearch(costs, scores, fixed, others=others)

    if not feasible.any():
        for call in (lambda: search.best(budget, limits), lambda: search.top_k(k, budget, limits),
                     lambda: search.front(caps)):
            with pytest.raises(AssemblyError, match="are infeasible together: the smallest") as err:
                call()
            assert "\n" not in str(err.value)
        return

    def meets(arch) -> bool:
        got = search.totals(arch.choice)
        return arch == assembly.summed(costs, scores, fixed, arch.choice) and all(got[n] <= caps[n] for n in caps)

    best = search.best(budget, limits)
    assert (best.score, best.cost) == ranked(score[feasible], cost[feasible])[0] and meets(best)

    top = search.top_k(k, budget, limits)
    assert [(a.score, a.cost) for a in top] == ranked(score[feasible], cost[feasible])[:k]
    assert len({a.choice for a in top}) == len(top) and all(meets(a) for a in top)

    front = search.front(caps)  # the budget is the searched metric's limit
    assert set(zip(front.cost.tolist(), front.score.tolist(), strict=True)) == brute_front(cost[feasible],
                                                                                           score[feasible])
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.score) < 0)
    assert all(meets(assembly.Architecture(tuple(c), s, a)) for a, s, c in zip(front.cost, front.score,
                                                                                front.choice, strict=True))


@pytest.mark.parametrize("params_at, latency_at", [(0.3, 0.3), (0.6, 0.2), (0.1, 0.9), (0.05, 0.05)])
def test_two_limits_on_space_shaped_tables(params_at, latency_at):
    """36^3 architectures with the ties real tables have (permuted ops: equal params and FLOPs); both limits
    bind at (0.3, 0.3) and (0.05, 0.05), one of them at the others."""
    tables = synthetic_tables(layers=(2, 2, 2), widths=(16, 32, 64), sizes=(14, 7, 4), seed=1)
    scores, params, latency = [t.score for t in tables], [t.params for t in tables], assembly.synthetic_latency(tables)
    cost, score, _ = brute_force(params, scores, 1000.0)
    lat = brute_force(latency, scores, 0.5)[0]
    caps = {"params": place(cost, params_at), "latency_ms": place(lat, latency_at)}
    feasible = (cost <= caps["params"]) & (lat <= caps["latency_ms"])
    search = ExactSearch(params, scores, 1000.0, metric="params", others={"latency_ms": (latency, 0.5)})
    assert feasible.any()
    best = search.best(limits=caps)
    assert (best.score, best.cost) == ranked(score[feasible], cost[feasible])[0]
    assert [(a.score, a.cost) for a in search.top_k(5, limits=caps)] == ranked(score[feasible], cost[feasible])[:5]
    front = search.front(caps)
    assert set(zip(front.cost.tolist(), front.score.tolist(), strict=True)) == brute_front(cost[feasible],
                                                                                           score[feasible])


def test_infeasible_limits_name_each_metric_smallest():
    params = [np.array([4.0, 2.0]), np.array([3.0, 8.0])]  # fixed 10: cheapest 15, architecture (1, 0)
    latency = [np.array([1.0, 5.0]), np.array([2.0, 0.5])]  # fixed 0.25: fastest 1.75, architecture (0, 1)
    search = ExactSearch(params, [np.zeros(2), np.zeros(2)], 10, metric="params",
                         others={"latency_ms": (latency, 0.25)})
    together = ("limits params <= 16 and latency_ms <= 2 are infeasible together: the smallest params is 15, "
                "the smallest latency_ms is 1.75 (fixed parts included, each metric on its own); raise a limit")
    for call in (lambda: search.best(16, {"latency_ms": 2}), lambda: search.top_k(3, 16, {"latency_ms": 2}),
                 lambda: search.best(limits={"params": 16, "latency_ms": 2}),
                 lambda: search.front({"params": 16, "latency_ms": 2})):
        with pytest.raises(AssemblyError) as err:
            call()
        assert str(err.value) == together
    with pytest.raises(AssemblyError, match=r"^limits latency_ms <= 1 are infeasible together: the smallest "
                                            r"latency_ms is 1.75 \("):
        search.best(limits={"latency_ms": 1})
    with pytest.raises(ValueError, match="unknown metric 'flops': this search has params, latency_ms"):
        search.best(limits={"flops": 1})
    best = search.best(16, {"latency_ms": 7.25})  # exactly at the only fitting architecture's latency
    assert best.choice == (1, 0) and search.totals(best.choice) == {"params": 15.0, "latency_ms": 7.25}


def test_front_under_limits_drops_what_breaks_them():
    """front(limits) is the front of the architectures meeting the limits: the unlimited front's points that meet
    them, plus points they uncover; it ends at best(limits=...). Without limits it is the plain front."""
    tables = synthetic_tables(layers=(2, 2, 2), widths=(16, 32, 64), sizes=(14, 7, 4), seed=2)
    latency = assembly.synthetic_latency(tables, seed=2)
    search = ExactSearch([t.params for t in tables], [t.score for t in tables], metric="params",
                         others={"latency_ms": (latency, 0.0)})
    whole = search.front()
    ms = [search.totals(c)["latency_ms"] for c in whole.choice]
    limit = {"latency_ms": (ms[0] + ms[-1]) / 2}  # midway between the cheapest and the best point's latency
    fast = search.front(limit)
    assert all(search.totals(c)["latency_ms"] <= limit["latency_ms"] for c in fast.choice)
    kept = {(c, s) for c, s, t in zip(whole.cost, whole.score, ms, strict=True) if t <= limit["latency_ms"]}
    assert kept and kept < set(zip(fast.cost, fast.score, strict=True))
    best = search.best(limits=limit)
    assert (fast.cost[-1], fast.score[-1]) == (best.cost, best.score) and best.cost < whole.cost[-1]
    assert search.front({}).cost.tolist() == whole.cost.tolist()


# ---------------------------------------------------------------------------------------------- tables


def write_table(path: Path, rows, header=("candidate", "score", "params", "flops")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_tables(folder: Path, tables) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tables):
        write_table(folder / f"b{i}.csv",
                    [(c, repr(float(s)), int(p), int(f)) for c, s, p, f in
                     zip(t.candidates, t.score, t.params, t.flops, strict=True)])
    return folder


def test_tables_read_in_natural_file_name_order(tmp_path):
    for i in (10, 2, 1):
        write_table(tmp_path / f"b{i}.csv", [(f"c{i}", 0.5, i, 2 * i)])
    (tmp_path / "b1.resume.pt").write_bytes(b"")  # the score stage's partial results: not a table
    tables = read_tables(tmp_path)
    assert [t.name for t in tables] == ["b1", "b2", "b10"]
    assert tables[2].candidates == ("c10",) and tables[2].flops.tolist() == [20.0]
    with pytest.raises(AssemblyError, match=r"b1.csv has no cost 'latency_b1' \(it has params, flops\)"):
        tables[0].cost("latency_b1")


@pytest.mark.parametrize("rows, header, words", [
    ([("a", 1)], ("candidate", "params"), ["line 1", "missing column(s) score"]),
    ([("a", 0.1, 1, 2), ("b", "abc", 1, 2)], None, ["line 3", "score = 'abc'", "not a finite number"]),
    ([("a", 0.1, 1, 2), ("b", 0.2, "nan", 2)], None, ["line 3", "params = 'nan'"]),
    ([("a", 0.1, 1, 2), ("b", 0.2, 1, "")], None, ["line 3", "flops = ''"]),
    ([("a", 0.1, 1, 2), ("b", 0.2, -1, 2)], None, ["line 3", "negative"]),
    ([("a", 0.1, 1, 2), ("b", 0.2, 1, 2), ("a", 0.3, 1, 2)], None, ["line 4", "duplicate candidate id 'a'",
                                                                   "line 2"]),
    ([("a", 0.1, 1, 2), (" ", 0.2, 1, 2)], None, ["line 3", "empty candidate id"]),
    ([("a", 0.1, 1, 2), ("b", 0.2, 1)], None, ["line 3", "expected 4 fields"]),
    ([], None, ["no candidate rows (empty block)"]),
])
def test_malformed_table_names_file_and_line(tmp_path, rows, header, words):
    write_table(tmp_path / "b0.csv", [("ok", 0.1, 1, 2)])
    bad = write_table(tmp_path / "b1.csv", rows, header or ("candidate", "score", "params", "flops"))
    with pytest.raises(AssemblyError) as err:
        read_tables(tmp_path)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message and "dvc repro score" in message
    for word in words:
        assert word in message


def test_empty_file_and_missing_tables(tmp_path):
    (tmp_path / "b0.csv").write_text("")
    with pytest.raises(AssemblyError, match="b0.csv is empty"):
        read_tables(tmp_path)
    (tmp_path / "b0.csv").unlink()
    with pytest.raises(AssemblyError, match=r"holds no \*.csv score tables: build them with `dvc repro score`"):
        read_tables(tmp_path)
    with pytest.raises(AssemblyError, match="does not exist"):
        read_tables(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- Optuna


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One tracking store for the module: creating a sqlite store takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking.init_store(uri)
    return uri


@pytest.fixture
def mlflow_uri(mlflow_store, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    mlflow.set_tracking_uri(mlflow_store)
    return mlflow_store


@pytest.fixture(scope="module")
def default_shaped():
    """Synthetic tables shaped like the default config (36, 216, 216, 36 candidates)."""
    tables = synthetic_tables(seed=0)
    assert [len(t.candidates) for t in tables] == [36, 216, 216, 36]
    return tables


def midway_budget(tables) -> float:
    search = ExactSearch([t.params for t in tables], [t.score for t in tables])
    return float((search.cheapest + search.front().cost[-1]) / 2)


def test_optuna_is_deterministic_for_a_seed(default_shaped):
    budget = midway_budget(default_shaped)
    runs = [optuna_search(default_shaped, "params", budget, 0.0, 40, "tpe", seed=s) for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0].history, runs[1].history)
    assert runs[0].best == runs[1].best
    assert not np.array_equal(runs[0].history, runs[2].history)
    assert runs[0].trials == 40 and runs[0].best.cost <= budget


def test_optuna_500_trials_default_config_within_2_percent(default_shaped):
    """The default config has no budget (search.budget: 0); figures for other seeds and budgets:
    benchmarks/results/assembly.md."""
    exact = ExactSearch([t.params for t in default_shaped], [t.score for t in default_shaped]).best(None)
    found = optuna_search(default_shaped, "params", None, 0.0, 500, "tpe", seed=0)
    gap = assembly.relative_gap(found.best.score, exact.score)
    assert found.trials == 500 and found.feasible == 500
    assert 0 <= gap <= 0.02, f"Optuna TPE is {100 * gap:.2f}% above the exact optimum"


def test_nsga2_two_objectives_respects_budget(default_shaped):
    budget = midway_budget(default_shaped)
    found = optuna_search(default_shaped, "params", budget, 0.0, 60, "nsga2", seed=0)
    assert found.trials == 60 and 0 < found.feasible <= 60
    assert found.best.cost <= budget
    feasible = found.history[found.history[:, 2] > 0]
    assert found.best.score == feasible[:, 1].min()


def test_journal_storage_resumes_and_sqlite_works(default_shaped, tmp_path):
    journal = str(tmp_path / "study.journal")
    first = optuna_search(default_shaped, "params", None, 0.0, 15, "tpe", seed=0, storage=journal)
    resumed = optuna_search(default_shaped, "params", None, 0.0, 25, "tpe", seed=0, storage=journal)
    assert (first.trials, resumed.trials) == (15, 25)
    np.testing.assert_array_equal(resumed.history[:15], first.history)
    again = optuna_search(default_shaped, "params", None, 0.0, 25, "tpe", seed=0, storage=journal)
    np.testing.assert_array_equal(again.history, resumed.history)  # already complete: no new trials
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert optuna_search(default_shaped, "params", None, 0.0, 5, "tpe", seed=0, storage=url).trials == 5
    with pytest.raises(AssemblyError, match="does not exist"):
        optuna_search(default_shaped, "params", None, 0.0, 5, "tpe", storage=str(tmp_path / "no" / "j.log"))


def test_trials_are_logged_as_steps_of_the_active_run(default_shaped, mlflow_uri):
    uri = mlflow_uri
    logger = assembly.MlflowTrialLogger([t.name for t in default_shaped], [t.candidates for t in default_shaped])
    mlflow.set_experiment("trials")  # not an experiment id left active by an earlier test's store
    with mlflow.start_run() as run:
        found = optuna_search(default_shaped, "params", midway_budget(default_shaped), 0.0, 12, "tpe", seed=0,
                              callbacks=[logger])
    client = mlflow.MlflowClient(uri)
    scores = client.get_metric_history(run.info.run_id, "optuna/score")
    assert [m.step for m in scores] == list(range(12))
    np.testing.assert_allclose([m.value for m in scores], found.history[:, 1])
    choice = client.get_metric_history(run.info.run_id, "optuna/choice/b1")
    assert len(choice) == 12 and all(0 <= m.value < 216 for m in choice)
    best = client.get_metric_history(run.info.run_id, "optuna/best_score")[-1].value
    assert best == pytest.approx(found.best.score)


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture
def stage_root(repo_copy, mlflow_uri, monkeypatch):
    """A scratch repository root with the default-shaped tables in artifacts/scores, the counted costs of the
    default space in artifacts/costs: the default config over DNA's six ops (the synthetic tables' names),
    searched on params (counted costs need no timing)."""
    from omegaconf import OmegaConf

    from pipeline import space

    cfg = OmegaConf.load(repo_copy / "params.yaml")
    cfg.space.update(ops=["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6"], identity=False)
    cfg.search.update(metric="params", budget=650000, relative=False, limits={})
    (repo_copy / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_tables(repo_copy / "artifacts" / "scores", synthetic_tables(seed=0))
    spec = space.build_space(load_params([], root=repo_copy).space, teacher_blocks())
    write_counted_costs(repo_copy / "artifacts" / "costs", spec)
    monkeypatch.chdir(repo_copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return repo_copy


def run_stage(root: Path, uri: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / "assemble.py"), *overrides], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri})


def test_standalone_contract_and_infeasible_budget(stage_root, mlflow_uri, tmp_path):
    from stages import assemble as stage

    tables = synthetic_tables(seed=0)
    scores = write_tables(tmp_path / "raw", tables)
    out = tmp_path / "out"
    budget = int(midway_budget(tables))
    args = [f"search.scores_dir={scores}", f"search.out_dir={out}", "search.metric=params", "search.method=exact",
            "search.fixed_cost=0"]
    cli.main(stage.run, [*args, f"search.budget={budget}"])  # the command line, parsed in this process
    arch = json.loads((out / "architecture.json").read_text())
    exact = ExactSearch([t.params for t in tables], [t.score for t in tables]).best(budget)
    assert arch["candidates"] == [t.candidates[r] for t, r in zip(tables, exact.choice, strict=True)]
    rows = [t.candidates.index(c) for t, c in zip(tables, arch["candidates"], strict=True)]
    assert arch["score"] == pytest.approx(sum(t.score[r] for t, r in zip(tables, rows, strict=True)))
    assert arch["params"] == sum(t.params[r] for t, r in zip(tables, rows, strict=True)) <= budget
    assert arch["flops"] == sum(t.flops[r] for t, r in zip(tables, rows, strict=True))
    with open(out / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    assert list(front[0]) == ["cost", "score", "b0", "b1", "b2", "b3"]
    assert [float(r["cost"]) for r in front] == sorted(float(r["cost"]) for r in front)
    assert any(float(r["cost"]) == arch["params"] and float(r["score"]) == arch["score"] for r in front)
    assert (out / "pareto.png").stat().st_size > 10_000

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cheapest = int(ExactSearch([t.params for t in tables], [t.score for t in tables]).cheapest)
    proc = run_stage(stage_root, mlflow_uri, *args, f"search.budget={cheapest - 1}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "infeasible" in errors[0] and f"cheapest architecture costs {cheapest}" in errors[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing destroyed


@pytest.mark.parametrize("override, key", [("search.budget=-5", "search.budget"),
                                           ("search.fixed_cost=-1", "search.fixed_cost"),
                                           ("search.trials=0", "search.trials"),
                                           ("search.method=random", "search.method")])
def test_bad_search_params_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_params([override], root=REPO)


def teacher_blocks() -> dict:
    """blocks.json of the default teacher (narrow ResNet-18 on 28 px Fashion-MNIST, no stem pool)."""
    sizes, chans = [28, 14, 7, 4, 2], [1, 32, 64, 128, 256]
    return {"teacher": "resnet18", "num_classes": 10, "in_chans": 1, "image_size": 28, "blocks": [
        {"name": f"b{i}", "in_channels": chans[i], "out_channels": chans[i + 1], "in_size": [sizes[i]] * 2,
         "out_size": [sizes[i + 1]] * 2, "stride": 2} for i in range(4)]}


def test_pipeline_mode_uses_the_space(stage_root):
    from timm.models._efficientnet_builder import decode_arch_def

    from pipeline import space
    from stages import assemble as stage

    (stage_root / "artifacts" / "teacher").mkdir(parents=True)
    (stage_root / "artifacts" / "teacher" / "blocks.json").write_text(json.dumps(teacher_blocks()))
    params = load_params(["search.top_k=3", "search.method=optuna", "search.trials=30",
                          "search.storage=study.journal"], root=stage_root)
    spec = space.build_space(params.space, teacher_blocks())
    fixed = space.fixed_parts_cost(spec)
    stage.run(params)
    arch = json.loads((stage_root / "artifacts" / "search" / "architecture.json").read_text())
    assert arch["blocks"] == ["b0", "b1", "b2", "b3"] and arch["method"] == "optuna"
    assert arch["fixed_cost"] == fixed.counted() and fixed.params > 0
    assert len(arch["arch"]) == 4 and decode_arch_def(arch["arch"])
    assert len(arch["top_k"]) == 3 and arch["top_k"][0]["candidates"] == arch["exact"]["candidates"]
    assert arch["optuna"]["trials"] == 30 and arch["optuna"]["gap"] >= 0
    assert arch["score"] >= arch["exact"]["score"]
    assert (stage_root / "study.journal").is_file()
    runs = mlflow.search_runs(experiment_names=["dna"], output_format="list", order_by=["start_time DESC"])
    assert runs[0].data.tags["stage"] == "assemble" and runs[0].data.metrics["search/optuna_gap"] >= 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"architecture.json", "pareto.csv", "pareto.png"} <= artifacts


def test_pipeline_mode_rejects_foreign_tables(stage_root, tmp_path):
    from stages import assemble as stage

    (stage_root / "artifacts" / "teacher").mkdir(parents=True)
    (stage_root / "artifacts" / "teacher" / "blocks.json").write_text(json.dumps(teacher_blocks()))
    table = stage_root / "artifacts" / "scores" / "b2.csv"
    table.write_text(table.read_text().replace("k3e3-k3e3-k3e3,", "k9e9-k3e3-k3e3,"))
    with pytest.raises(AssemblyError, match=r"b2.csv: 'k9e9-k3e3-k3e3' is not a candidate of block b2"):
        stage.run(load_params([], root=stage_root))
    shutil.rmtree(stage_root / "artifacts" / "teacher")
    with pytest.raises(Exception, match="dvc repro teacher"):
        stage.run(load_params([], root=stage_root))
    assert not (stage_root / "artifacts" / "search").exists()


def _latency_costs(root: Path, spec, fingerprint: dict) -> dict:
    """A costs folder whose latencies follow the FLOPs (deterministic), measured 'here' per ``fingerprint``."""
    from pipeline import costs, space

    def row(cost) -> dict:
        return {**{m: float(v) for m, v in cost.counted().items()}, "latency_b1": cost.flops / 3e6,
                "latency_b256": cost.flops / 1e5}

    blocks = {b.name: {cid: row(space.candidate_cost(b, cid)) for cid in b.candidates()} for b in spec.blocks}
    teacher = {"params": 2811274.0, "flops": 33250048.0, "flops_dna": 33300000.0, "latency_b1": 3.0,
               "latency_b256": 180.0}
    tables = costs.CostTables([*COUNTED_METRICS, "latency_b1", "latency_b256"], blocks,
                              row(space.fixed_parts_cost(spec)), teacher, fingerprint)
    costs.write_costs(root / "artifacts" / "costs", spec, tables)
    return teacher


def test_pipeline_mode_searches_measured_latency_under_limits_relative_to_the_teacher(stage_root):
    from pipeline import costs, space
    from stages import assemble as stage

    (stage_root / "artifacts" / "teacher").mkdir(parents=True)
    (stage_root / "artifacts" / "teacher" / "blocks.json").write_text(json.dumps(teacher_blocks()))
    params = load_params([], root=stage_root)
    here = costs.fingerprint(params.costs, params.runtime.channels_last)
    teacher = _latency_costs(stage_root, space.build_space(params.space, teacher_blocks()), here)
    search = ["search.metric=latency_b256", "search.relative=true", "search.budget=0.5", "+search.limits.latency_b1=0.8"]
    stage.run(load_params(search, root=stage_root))
    arch = json.loads((stage_root / "artifacts" / "search" / "architecture.json").read_text())
    assert arch["budget"] == 0.5 * teacher["latency_b256"] and arch["limits"] == {"latency_b1": 0.8 * teacher["latency_b1"]}
    assert arch["latency_b256"] <= arch["budget"] and arch["latency_b1"] <= arch["limits"]["latency_b1"]
    assert arch["costs_fingerprint"] == here["id"] and arch["teacher"]["latency_b256"] == teacher["latency_b256"]
    assert arch["search"] == {"metric": "latency_b256", "budget": 0.5, "limits": {"latency_b1": 0.8}, "relative": True}
    front = list(csv.DictReader(open(stage_root / "artifacts" / "search" / "pareto.csv")))
    assert front and float(front[-1]["cost"]) <= arch["budget"]  # the front in latency, within the limits

    elsewhere = {**here, "device_name": "Some Other CPU"}
    elsewhere.pop("id")
    _latency_costs(stage_root, space.build_space(params.space, teacher_blocks()), elsewhere)
    with pytest.raises(ArtifactError, match=r"was measured on <.*costs.accept_fingerprint=") as err:
        stage.run(load_params(search, root=stage_root))
    assert "Some Other CPU" in str(err.value) and "\n" not in str(err.value)
    table_id = str(err.value).rsplit("=", 1)[1]
    stage.run(load_params([*search, f"costs.accept_fingerprint={table_id}"], root=stage_root))  # accepted by its id
    with pytest.raises(AssemblyError, match=r"^search.budget=0.01 \(x the teacher's latency_b256 180\) is infeasible: "
                                            r"the cheapest architecture costs [0-9.]+x the teacher's; set search.budget >="):
        stage.run(load_params([*search[:2], "search.budget=0.01", f"costs.accept_fingerprint={table_id}"],
                              root=stage_root))
