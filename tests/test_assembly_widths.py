"""Assembly over cells that write their own widths: only networks whose widths join count, in the exact search
(against brute force, and on configs/paper.yaml's space) and in Optuna's trials."""

from __future__ import annotations

import csv
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import assembly, cli, describe, space
from pipeline.assembly import AssemblyError, BlockTable, ExactSearch, optuna_search, synthetic_tables
from pipeline.config import load_params
from pipeline.smoke import make_workspace
from tests.fakes import REPO, tiny_params, write_counted_costs
from tests.fakes import teacher_blocks as tiny_blocks
from tests.test_assembly import brute_force, brute_front, cost_values, place, ranked, values

# ---------------------------------------------------------------------------------------------- brute force


def joins(widths, choices: np.ndarray) -> np.ndarray:
    """Which rows of ``choices`` (architectures x blocks) are networks: block i writes what block i+1 reads."""
    ok = np.ones(len(choices), dtype=bool)
    for b in range(len(widths) - 1):
        ok &= widths[b][choices[:, b], 1] == widths[b + 1][choices[:, b + 1], 0]
    return ok


@st.composite
def chained_instances(draw):
    """Up to 4 blocks x 7 candidates, each reading and writing one of two or three widths, one more metric;
    budget and limit from infeasible to loose, often exactly at a total."""
    blocks = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 7)) for _ in range(blocks)]
    palette = draw(st.sampled_from([(8, 16), (8, 16, 24)]))

    def arrays(elements):
        return [np.array(draw(st.lists(elements, min_size=n, max_size=n))) for n in sizes]

    widths = [np.column_stack([draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n)) for _ in range(2)])
              for n in sizes]
    costs, scores, other = arrays(cost_values), arrays(values), arrays(cost_values)
    where = st.one_of(st.floats(-0.2, 1.0), st.integers(0, 10_000))
    positions = {name: draw(where) for name in ("cost", "latency") if draw(st.booleans())}
    return costs, scores, draw(st.sampled_from([0.0, 3.0])), other, widths, positions, draw(st.integers(1, 8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chained_instances())
def test_exact_equals_brute_force_over_joining_networks(instance):
    costs, scores, fixed, other, widths, positions, k = instance
    cost, score, choices = brute_force(costs, scores, fixed)
    latency = brute_force(other, scores, 0.5)[0]
    networks = joins(widths, choices)
    if not networks.any():
        with pytest.raises(AssemblyError, match="no network's widths join") as err:
            ExactSearch(costs, scores, fixed, widths=widths)
        assert "\n" not in str(err.value)
        return
    search = ExactSearch(costs, scores, fixed, others={"latency": (other, 0.5)}, widths=widths)
    joined = {tuple(c) for c in choices[networks].tolist()}

    front = search.front()
    assert set(zip(front.cost.tolist(), front.score.tolist(), strict=True)) == brute_front(cost[networks],
                                                                                           score[networks])
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.score) < 0)
    for c, s, choice in zip(front.cost, front.score, front.choice, strict=True):
        arch = assembly.summed(costs, scores, fixed, choice)
        assert arch.choice in joined and (arch.cost, arch.score) == (c, s)
    assert search.cheapest == cost[networks].min()

    totals = {"cost": cost, "latency": latency}
    caps = {name: place(totals[name][networks], where) for name, where in positions.items()}
    budget, limits = caps.get("cost"), {n: c for n, c in caps.items() if n != "cost"}
    feasible = networks.copy()
    for name, c in caps.items():
        feasible &= totals[name] <= c
    if not feasible.any():
        with pytest.raises(AssemblyError, match="infeasible") as err:
            search.top_k(k, budget, limits)
        assert "\n" not in str(err.value)
        return
    best = search.best(budget, limits)
    assert (best.score, best.cost) == ranked(score[feasible], cost[feasible])[0] and best.choice in joined
    top = search.top_k(k, budget, limits)
    assert [(a.score, a.cost) for a in top] == ranked(score[feasible], cost[feasible])[:k]
    assert len({a.choice for a in top}) == len(top) and all(a.choice in joined for a in top)
    if caps:
        limited = search.front(caps)
        assert set(zip(limited.cost.tolist(), limited.score.tolist(), strict=True)) == brute_front(cost[feasible],
                                                                                               score[feasible])
        assert all(tuple(c) in joined for c in limited.choice.tolist())


def test_one_width_per_boundary_is_the_search_without_widths():
    """Widths that are one pair per block (a space without out widths) change nothing, bit for bit."""
    tables = synthetic_tables(layers=(2, 3, 2), widths=(16, 32, 64), sizes=(14, 7, 4), seed=3)
    costs, scores = [t.params for t in tables], [t.score for t in tables]
    latency = assembly.synthetic_latency(tables, seed=3)
    pairs = [np.tile([w_in, w_out], (len(t.score), 1)) for t, w_in, w_out in zip(tables, (8, 16, 32), (16, 32, 64),
                                                                                  strict=True)]
    plain = ExactSearch(costs, scores, 10.0, others={"ms": (latency, 0.5)})
    chained = ExactSearch(costs, scores, 10.0, others={"ms": (latency, 0.5)}, widths=pairs)
    for a, b in ((plain.front(), chained.front()), (plain.front({"ms": 40.0}), chained.front({"ms": 40.0}))):
        for x, y in ((a.cost, b.cost), (a.score, b.score), (a.choice, b.choice)):
            np.testing.assert_array_equal(x, y)
    budget = float(np.median(plain.front().cost))
    assert plain.top_k(7, budget, {"ms": 40.0}) == chained.top_k(7, budget, {"ms": 40.0})
    assert plain.best(budget) == chained.best(budget)


def small_chain() -> list[BlockTable]:
    """3 blocks whose cheapest candidates do not join (b0's cheapest writes 8, b1's cheapest reads 16), and a b2
    candidate reading a width nothing writes (on no network)."""
    def table(name, cost, score, pairs):
        return BlockTable(name, tuple(f"{name}c{i}" for i in range(len(cost))), np.array(score, dtype=float),
                          {"params": np.array(cost, dtype=float)}, widths=np.array(pairs, dtype=np.int64))

    return [table("b0", [1, 6, 5, 9], [0.9, 0.5, 0.7, 0.2], [(3, 8), (3, 16), (3, 16), (3, 8)]),
            table("b1", [4, 1, 6, 2, 8], [0.6, 0.8, 0.3, 0.7, 0.1], [(8, 24), (16, 24), (8, 32), (16, 32), (8, 24)]),
            table("b2", [1, 2, 3, 0], [0.5, 0.4, 0.1, 0.0], [(24, 64), (32, 64), (24, 64), (40, 64)])]


def test_no_joining_network_within_budget_is_one_line():
    tables = small_chain()
    search = ExactSearch([t.params for t in tables], [t.score for t in tables], 2.0,
                         widths=[t.widths for t in tables])
    # per-block minima: 1 + 1 + 0 (+ 2) = 4, but they do not join; the cheapest network is b0c0-b1c0-b2c0: 1+4+1+2
    assert search.cheapest == 8.0 and search.best(8.0).choice == (0, 0, 0)
    for call in (lambda: search.best(7.5), lambda: search.top_k(3, 7.5), lambda: search.best(7.5, {"cost": 9.0})):
        with pytest.raises(AssemblyError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "infeasible" in message and " 8 " in f"{message} ", message
        assert "among the networks whose widths join" in message
    broken = [tables[0], replace(tables[1], widths=tables[1].widths + 1), tables[2]]  # b1 reads 9 | 17
    with pytest.raises(AssemblyError, match=r"^no network's widths join: the candidates of block 1 \(from 0\) "
                                            r"read \[9, 17\], the block before writes \[8, 16\]$"):
        ExactSearch([t.params for t in broken], [t.score for t in broken], widths=[t.widths for t in broken])


# ---------------------------------------------------------------------------------------------- Optuna


def decoded(tables: list[BlockTable], params: dict[str, str]) -> list[int]:
    """A trial's rows, read from its parameter names alone: block b's is ``b`` or ``b@<width b-1 wrote>``."""
    rows, written = [], None
    for t in tables:
        (name,) = [n for n in params if n == t.name or n.startswith(f"{t.name}@")]
        assert name == t.name or name == f"{t.name}@{written}", (name, written)
        rows.append(t.candidates.index(params[name]))
        written = int(t.widths[rows[-1], 1])
    return rows


@pytest.mark.parametrize("sampler, trials", [("tpe", 40), ("nsga2", 30)])
def test_optuna_trials_are_joining_networks(sampler, trials, monkeypatch):
    tables = small_chain()
    widths = [t.widths for t in tables]
    seen: list[dict[str, str]] = []
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(assembly, "log_metrics", lambda metrics, step: logged.append(metrics))
    logger = assembly.MlflowTrialLogger([t.name for t in tables], [t.candidates for t in tables])
    found = optuna_search(tables, "params", 12.0, 2.0, trials, sampler, seed=0,
                          callbacks=[lambda study, trial: seen.append(dict(trial.params)), logger])
    exact = ExactSearch([t.params for t in tables], [t.score for t in tables], 2.0, widths=widths)
    assert found.trials == len(seen) == trials and found.history[0, 0] == exact.cheapest  # the cheapest network first
    for params, log in zip(seen, logged, strict=True):
        rows = decoded(tables, params)
        assert joins(widths, np.array([rows]))[0] and rows[2] != 3  # b2c3 reads 40: on no network, never drawn
        assert [log[f"optuna/choice/{t.name}"] for t in tables] == rows
    assert found.best.cost <= 12.0 and found.best.score >= exact.best(12.0).score
    assert joins(widths, np.array([found.best.choice]))[0]


# ---------------------------------------------------------------------------------------------- the paper's space

OVERLAY = Path("configs/paper.yaml")
SEARCH = ["~search.limits.latency_b1", "search.top_k=4"]  # counted costs only: nothing timed here


def paper_scores(spec: space.SpaceSpec, seed: int = 0) -> list[BlockTable]:
    """Score tables for every block: bigger is better plus noise, and b3's cells writing 96 and b4's reading 112
    much better, so each block's favourite does not join the next block's."""
    rng = np.random.default_rng(seed)
    tables = []
    for block in spec.blocks:
        ids = tuple(block.candidates())
        flops = np.array([space.candidate_cost(block, c).flops_dna for c in ids], dtype=np.float64)
        size = np.log(flops / flops.min()) / max(np.log(flops.max() / flops.min()), 1e-12)
        score = 0.5 * (1 - 0.15 * size) + rng.normal(0, 0.015, len(ids))
        cells = [block.parse(c)[0] for c in ids]
        score -= 0.2 * np.array([c.layers[-1].student_out == 96 for c in cells])
        score -= 0.2 * np.array([block.name == "b4" and c.layers[0].student_in == 112 for c in cells])
        tables.append(BlockTable(block.name, ids, score, {}))
    return tables


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory):
    """configs/paper.yaml's workspace (as tests/test_paper.py makes it), its counted costs and synthetic scores,
    searched on DNA-a's constraint (flops_dna <= 350M) without the latency limit, and the problem built from them."""
    root = make_workspace(REPO, tmp_path_factory.mktemp("paper") / "ws", overlay=OVERLAY)
    params = load_params(SEARCH, root=root)
    split = describe.teacher_split(params, root)
    (root / space.TEACHER_BLOCKS).parent.mkdir(parents=True)
    (root / space.TEACHER_BLOCKS).write_text(json.dumps(split))
    spec = space.build_space(params.space, split)
    write_counted_costs(root / params.costs.out_dir, spec)
    tables = paper_scores(spec)
    return root, params, spec, assembly.problem(params, tables, root)


def by_block(prob: assembly.Problem, choice) -> dict[str, str]:
    return {t.name: t.candidates[r] for t, r in zip(prob.tables, choice, strict=True)}


def test_paper_space_result_joins_and_is_the_best_width_path(paper):
    root, params, spec, prob = paper
    assert prob.metric == "flops_dna" and prob.budget == 350e6 and not prob.limits
    result = assembly.assemble(prob, params.search)
    content = assembly.summary(result, params.search)  # builds the arch strings: check_chain passes
    assert content["flops_dna"] <= 350e6 and len(content["arch"]) == 1 + len(spec.blocks)
    for choice in [result.exact.choice, *(a.choice for a in result.top), *result.front.choice.tolist()]:
        space.check_chain(spec, by_block(prob, choice))
    assert len(result.top) == 4 and result.top[0] == result.exact

    # the same optimum, found without widths: one plain search per width path (b3 writes 96|112, b4 160|192)
    costs = [t.cost("flops_dna") for t in prob.tables]
    best = np.inf
    for b3, b4 in itertools.product((96, 112), (160, 192)):
        path = [np.ones(len(t.score), dtype=bool) for t in prob.tables]
        path[3] &= prob.tables[3].widths[:, 1] == b3
        path[4] &= (prob.tables[4].widths[:, 0] == b3) & (prob.tables[4].widths[:, 1] == b4)
        path[5] &= prob.tables[5].widths[:, 0] == b4
        plain = ExactSearch([c[p] for c, p in zip(costs, path, strict=True)],
                            [t.score[p] for t, p in zip(prob.tables, path, strict=True)], prob.fixed["flops_dna"])
        best = min(best, plain.best(prob.budget).score)
    assert result.exact.score == best

    # without widths the favourites are picked and do not join: the scores above make the chain bind
    free = ExactSearch(costs, [t.score for t in prob.tables], prob.fixed["flops_dna"]).best(prob.budget)
    assert free.score < result.exact.score
    with pytest.raises(ValueError, match="reads 112 channels but block b3's .* writes 96"):
        space.check_chain(spec, by_block(prob, free.choice))


def test_paper_space_dna_a_is_feasible_and_no_better(paper):
    root, params, spec, prob = paper
    dna_a = json.loads((REPO / "configs/architectures/dna_a.json").read_text())["candidates"]
    rows = [t.candidates.index(c) for t, c in zip(prob.tables, dna_a, strict=True)]
    search = ExactSearch([t.cost("flops_dna") for t in prob.tables], [t.score for t in prob.tables],
                         prob.fixed["flops_dna"], metric="flops_dna",
                         others={"params": ([t.params for t in prob.tables], prob.fixed["params"])},
                         widths=[t.widths for t in prob.tables])
    totals = search.totals(rows)
    assert totals["flops_dna"] == pytest.approx(348_161_054, rel=1e-3) and totals["params"] == 4_243_318
    dna_score = assembly.summed(search.costs, search.scores, 0.0, rows).score
    assert search.best(prob.budget).score <= dna_score
    at_dna_a = search.best(totals["flops_dna"], {"params": totals["params"]})  # a limit exactly at DNA-a's params
    assert at_dna_a.score <= dna_score and search.totals(at_dna_a.choice)["params"] <= totals["params"]
    space.check_chain(spec, by_block(prob, at_dna_a.choice))


def test_paper_space_optuna_chooses_a_network(paper):
    root, params, spec, prob = paper
    seen: list[dict[str, str]] = []
    result = assembly.add_optuna(assembly.assemble(prob, params.search), replace(params.search, trials=12),
                                 params.seed, [lambda study, trial: seen.append(dict(trial.params))])
    assert result.optuna.trials == len(seen) == 12 and result.optuna.feasible >= 1
    for trial in seen:  # b4 and b5 have one categorical per width they read
        space.check_chain(spec, by_block(prob, decoded(prob.tables, trial)))
    assert assembly.summary(result, params.search)["method"] == "optuna"  # its arch strings: widths join
    space.check_chain(spec, by_block(prob, result.chosen.choice))
    assert result.chosen.score >= result.exact.score


def test_paper_stage_budget_below_every_joining_network_is_one_line(paper, monkeypatch, capsys):
    from stages import assemble as stage

    root, params, spec, prob = paper
    scores = root / params.search.scores_dir
    scores.mkdir(parents=True, exist_ok=True)
    for table in prob.tables:
        with open(scores / f"{table.name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("candidate", "score"), *zip(table.candidates, map(repr, table.score.tolist()),
                                                                  strict=True)])
    cheapest = ExactSearch([t.cost("flops_dna") for t in prob.tables], [t.score for t in prob.tables],
                           prob.fixed["flops_dna"], widths=[t.widths for t in prob.tables]).cheapest
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(stage.run, [*SEARCH, f"search.budget={int(cheapest) - 1}"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1, err
    assert cheapest.is_integer() and cheapest > 1e6 and "widths join" in errors[0]
    assert errors[0].endswith(f"set search.budget >= {int(cheapest)}, or 0 for no budget")  # in full, not 3.4e+08
    assert not (root / params.search.out_dir).exists()


def test_widths_come_from_the_space_only_where_cells_write_their_own():
    default = space.build_space(tiny_params().space, tiny_blocks())
    tables = [BlockTable(b.name, tuple(b.candidates()), np.zeros(b.num_candidates()), {}) for b in default.blocks]
    assert assembly.chain_widths(default, tables) is None  # one width per boundary: the search as it was
    spec = space.build_space(tiny_params(["space.blocks.b0.cells=[{layers: 1}, {layers: 2, out: 16}]"]).space,
                             tiny_blocks())
    tables = [BlockTable(b.name, tuple(b.candidates()), np.zeros(b.num_candidates()), {}) for b in spec.blocks]
    widths = assembly.chain_widths(spec, tables)
    for block, table, pairs in zip(spec.blocks, tables, widths, strict=True):
        for cid, (reads, writes) in zip(table.candidates, pairs.tolist(), strict=True):
            cell = block.parse(cid)[0]
            assert (reads, writes) == (cell.layers[0].student_in, cell.layers[-1].student_out)
    assert set(widths[0][:, 1].tolist()) == {16, spec.blocks[0].width} != {16} and len(set(widths[1][:, 0])) == 2


def test_random_students_and_the_ranking_check_draw_only_joining_networks(paper):
    """The additivity stage's random students and the ranking check's architectures on the paper space: every one
    joins (independent draws per block mostly do not), the students stay uniform draws, the default space's as
    before."""
    from pipeline import latency, validation

    root, params, spec, prob = paper
    students = latency.random_choices(spec, 20, seed=3)
    for choice in students:
        space.check_chain(spec, choice)  # raises on a network whose widths do not join
    assert len({tuple(c.values()) for c in students}) == 20
    default = space.build_space(tiny_params().space, tiny_blocks())
    rng = random.Random("students:1")  # without out widths: the draws of independent uniform choices, as before
    before = [{b.name: rng.choice(list(b.candidates())) for b in default.blocks} for _ in range(5)]
    assert latency.random_choices(default, 5, seed=1) == before
    searched = [t.candidates[r] for t, r in zip(prob.tables, prob_best(prob), strict=True)]
    drawn = validation.draw(prob.tables, prob.fixed, "flops_dna", None, searched, stratified=6, random=3,
                            window=0.1, seed=0, per_tilt=500)
    for arch in drawn:
        space.check_chain(spec, dict(zip((t.name for t in prob.tables), arch.candidates, strict=True)))


def prob_best(prob: assembly.Problem) -> tuple[int, ...]:
    """The exact optimum's rows without a budget (a joining network)."""
    exact = ExactSearch([t.cost("flops_dna") for t in prob.tables], [t.score for t in prob.tables],
                        prob.fixed["flops_dna"], metric="flops_dna", widths=[t.widths for t in prob.tables])
    return exact.best(None).choice
