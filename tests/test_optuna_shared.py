"""One Optuna study filled by two worker processes at once (a journal file, the storage the README recommends),
against one process and the exact optimum.

Problem: 3 blocks x 6 candidates (216 architectures), budget midway along the Pareto front, 80 trials. Gap: 3% of
the exact optimum for both, and between them. Measured: one worker, Optuna seeds 0-3 on table seeds 0-5: at most
2.4%, 0 in 20 of 24 runs; this table, one worker: 0; two workers, 6 repeats: 0 every time, 81 trials in the study
(the trial running when the other worker reached 80 finishes; the result takes the first 80). The interleaving of
two processes is not reproducible; their seeds are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.assembly import ExactSearch, optuna_search, relative_gap, synthetic_tables, worker_seed
from pipeline.config import ConfigError, load_params
from tests.fakes import REPO

TRIALS, GAP, SEED = 80, 0.03, 0
# Each worker says it is ready, then waits for "go": both start on the study together, as a shared start would.
# A trial here takes a millisecond, so a worker sleeps 50 ms after each (as if it trained something): without
# that, on a loaded machine one process can run all the trials before the other is scheduled.
WORKER = """
import sys, time
from pathlib import Path
import optuna
from pipeline.assembly import optuna_search, synthetic_tables
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage, budget, trials, worker, gate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
tables = synthetic_tables(layers=(1, 1, 1), widths=(16, 32, 64), sizes=(14, 7, 4), seed=0)
(gate / f"ready{worker}").touch()
while not (gate / "go").exists():
    time.sleep(0.01)
optuna_search(tables, "params", budget, 0.0, trials, "tpe", seed=0, storage=storage, worker=worker,
              callbacks=[lambda study, trial: time.sleep(0.05)])
"""


@pytest.fixture(scope="module")
def problem():
    tables = synthetic_tables(layers=(1, 1, 1), widths=(16, 32, 64), sizes=(14, 7, 4), seed=0)
    exact = ExactSearch([t.params for t in tables], [t.score for t in tables])
    budget = float((exact.cheapest + exact.front().cost[-1]) / 2)
    return tables, budget, exact.best(budget)


def run_workers(storage: str, budget: float, gate: Path, workers: int = 2) -> None:
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, storage, str(budget), str(TRIALS), str(k), str(gate)],
                              env=env, stderr=subprocess.PIPE, text=True) for k in range(workers)]
    deadline = time.monotonic() + 120
    while not all((gate / f"ready{k}").exists() for k in range(workers)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.01)
    (gate / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]


def test_worker_seeds_are_distinct_reproducible_and_worker_0_keeps_the_single_process_seed() -> None:
    assert worker_seed(7, 0, 100, 0) == 7 and worker_seed(7, 0, 100, 15) == 22  # one process: seed + trials there
    seeds = {(k, d): worker_seed(7, k, 100, d) for k in range(4) for d in range(100)}
    assert len(set(seeds.values())) == len(seeds)  # no two (worker, trials there) pairs share a seed


def test_two_workers_fill_one_study_with_distinct_seeds_and_find_what_one_finds(problem, tmp_path: Path) -> None:
    """Journal only: a two-worker sqlite study takes 8.5 s of CPU per worker here (journal: 0.9 s)."""
    import optuna

    tables, budget, optimum = problem
    storage = str(tmp_path / "study.journal")
    run_workers(storage, budget, tmp_path / "gate")
    opened = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    study = optuna.load_study(study_name=optuna.get_all_study_names(opened)[0], storage=opened)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert TRIALS <= len(finished) <= TRIALS + 1  # the other worker may finish the trial it was running
    by_worker = {k: {t.user_attrs["seed"] for t in finished if t.user_attrs["worker"] == k} for k in (0, 1)}
    assert all(by_worker.values()), "both workers ran trials"
    assert len(by_worker[0]) == len(by_worker[1]) == 1 and by_worker[0] != by_worker[1]
    for k, (seed,) in by_worker.items():
        assert SEED + k * TRIALS <= seed < SEED + (k + 1) * TRIALS  # worker_seed(SEED, k, TRIALS, trials there)

    shared = optuna_search(tables, "params", budget, 0.0, TRIALS, "tpe", seed=SEED, storage=storage)  # reads only
    alone = optuna_search(tables, "params", budget, 0.0, TRIALS, "tpe", seed=SEED)
    assert shared.trials == alone.trials == TRIALS
    assert len(study.get_trials()) == len(finished), "reading the finished study added no trial"
    assert shared.best.cost <= budget and alone.best.cost <= budget
    for found in (shared, alone):
        assert 0 <= relative_gap(found.best.score, optimum.score) <= GAP
    assert abs(relative_gap(shared.best.score, alone.best.score)) <= GAP


def test_search_worker_is_validated_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"search.worker.*-1.*must be >= 0"):
        load_params(["search.worker=-1"], root=REPO)
