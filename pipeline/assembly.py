"""Assembly: one candidate per block, minimising the summed block score under a params or FLOPs budget.

DNA (Li et al., CVPR 2020, Sec. 3.4) ranks an architecture by the sum of its blocks' scores and
searches the combinations with a depth-first traversal whose index-limit pruning is not exact
(changlin31/DNA, ``searching/process_potential.py``). Because the objective and the cost are both sums over
blocks, the problem is a multiple-choice knapsack, solved here exactly and for every budget at once:

* each block is first reduced to its own Pareto set (cost vs score): a candidate that another one of
  the same block beats on both cannot be part of any Pareto-optimal architecture;
* the blocks' sets are merged one at a time (all pairwise sums, then the Pareto filter), so the last
  merge is the complete front of the whole space, with no cost discretisation. Sums are formed in
  block order, exactly as brute force forms them, so the front matches brute force bit for bit;
* a budget is answered from the front by binary search; the k best architectures come from a
  best-first search whose bound, the prefix fronts, is exact;
* limits on further metrics (latency, FLOPs) next to the budget make it a multi-constraint knapsack: the same
  best-first search bounds each partial assignment by every metric's prefix front and keeps the largest bound,
  after dropping candidates that another one of the block beats on the score and every limited cost;
* where cells write their own width (``space`` cells with ``out``), a network is one whose block i writes the
  width block i+1 reads: the widths are part of the state. Each prefix front is kept per width written, merged
  only with the candidates reading that width; the Pareto filters compare candidates of one (read, written) pair;
  the best-first search extends a partial assignment only by candidates writing what it reads, and bounds it by
  the prefix front of that width. A space without such cells has one width per boundary: one state, the search
  as it was.

Optuna (one categorical per block, TPE with the budget as a constraint, or NSGA-II on score and cost)
is the alternative the product offers; its gap to the exact optimum is reported. With out widths, a block whose
candidates read several widths has one categorical per width, drawn after the block before chose what it writes,
so every trial is a network (none is spent on, or has to be marked infeasible for, widths that do not join).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint import atomic
from pipeline.config import COUNTED_METRICS, Params, Search
from pipeline.errors import PipelineError
from pipeline.tracking import log_metrics

log = logging.getLogger(__name__)

COLUMNS = ("candidate", "score")  # a table's other columns are cost metrics, but for SCORE_EXTRAS
SCORE_EXTRAS = ("mse",)  # written by the score stage beside the score, not a cost
TABLE_GLOB = "*.csv"
REBUILD = "dvc repro score"
_MAX_PAIRS = 1 << 21  # pairwise sums formed per merge chunk: bounds memory to a few tens of MB


class AssemblyError(PipelineError):
    """Unusable score tables or an unreachable budget; the message names the file, row or fix."""


# ---------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class BlockTable:
    """One block's candidates, their scores and their costs (metric -> one value per candidate)."""

    name: str  # the file name's stem, the space's block name (b0..) in the pipeline
    candidates: tuple[str, ...]
    score: np.ndarray
    costs: Mapping[str, np.ndarray]
    source: str = ""  # the file it was read from, for error messages
    # (candidates, 2): the student width each candidate reads and writes, where cells write their own widths
    # (``problem``); None: the space has one width per boundary, every network joins
    widths: np.ndarray | None = None

    def cost(self, metric: str) -> np.ndarray:
        if metric not in self.costs:
            raise AssemblyError(f"{self.source or self.name} has no cost {metric!r} (it has "
                                f"{', '.join(self.costs) or 'none'}): choose another search.metric or add the column")
        return self.costs[metric]

    @property
    def params(self) -> np.ndarray:
        return self.cost("params")

    @property
    def flops(self) -> np.ndarray:
        return self.cost("flops")


def _natural_key(path: Path) -> list[Any]:
    """block_2 before block_10; equal to plain file-name order while numbers have the same width."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_tables(scores_dir: Path | str) -> list[BlockTable]:
    """Every ``*.csv`` of ``scores_dir`` (the pipeline's: one per block, b0.csv ..), in natural file-name order,
    validated row by row."""
    scores_dir = Path(scores_dir)
    if not scores_dir.is_dir():
        raise AssemblyError(f"score tables folder {scores_dir} does not exist: build it with `{REBUILD}` "
                            "or pass search.scores_dir=DIR")
    paths = sorted(scores_dir.glob(TABLE_GLOB), key=_natural_key)
    if not paths:
        raise AssemblyError(f"{scores_dir} holds no {TABLE_GLOB} score tables: build them with `{REBUILD}` "
                            "or pass search.scores_dir=DIR")
    return [read_table(path) for path in paths]


def read_table(path: Path | str) -> BlockTable:
    """Parse one table; any bad cell raises one line naming the file and the line."""
    path = Path(path)
    fix = f"fix the file or rebuild it with `{REBUILD}`"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise AssemblyError(f"{path} is empty (no header line {','.join(COLUMNS)}): {fix}")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise AssemblyError(f"{path} line 1: missing column(s) {', '.join(missing)} (header is "
                                f"{','.join(header)}; needs {','.join(COLUMNS)}): {fix}")
        ids: dict[str, int] = {}
        values: dict[str, list[float]] = {c: [] for c in header if c != "candidate" and c not in SCORE_EXTRAS}
        for row in reader:
            line = reader.line_num
            if None in row or None in row.values():
                raise AssemblyError(f"{path} line {line}: expected {len(header)} fields like the header: {fix}")
            cid = row["candidate"].strip()
            if not cid:
                raise AssemblyError(f"{path} line {line}: empty candidate id: {fix}")
            if cid in ids:
                raise AssemblyError(f"{path} line {line}: duplicate candidate id {cid!r} (first on line "
                                    f"{ids[cid]}): {fix}")
            ids[cid] = line
            for column, column_values in values.items():
                column_values.append(_number(path, line, column, row[column], fix))
    if not ids:
        raise AssemblyError(f"{path} has a header but no candidate rows (empty block): {fix}")
    arrays = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    return BlockTable(name=path.stem, candidates=tuple(ids), score=arrays.pop("score"), costs=arrays,
                      source=str(path))


def _number(path: Path, line: int, column: str, text: str, fix: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AssemblyError(f"{path} line {line}: {column} = {text!r} is not a finite number: {fix}")
    if column != "score" and value < 0:
        raise AssemblyError(f"{path} line {line}: {column} = {text!r} is negative: {fix}")
    return value


# ---------------------------------------------------------------------------------------------- exact search


@dataclass(frozen=True)
class Architecture:
    """One candidate per block: row indices into the blocks' tables, summed score, total cost."""

    choice: tuple[int, ...]
    score: float
    cost: float


@dataclass(frozen=True)
class Front:
    """The Pareto front: cost ascending, score strictly descending; ``choice[i]`` realises point i."""

    cost: np.ndarray
    score: np.ndarray
    choice: np.ndarray  # (points, blocks) row indices


@dataclass(frozen=True)
class _Level:
    """The Pareto front of the fixed parts plus blocks 0..j-1 (those writing one width), with back-pointers to
    rebuild its points."""

    cost: np.ndarray
    score: np.ndarray
    parent: np.ndarray  # index into the previous level's front of the width ``pick`` reads
    pick: np.ndarray  # row of block j-1


def summed(costs: Sequence[np.ndarray], scores: Sequence[np.ndarray], fixed_cost: float,
             choice: Sequence[int]) -> Architecture:
    """Score and cost of one architecture, summed in block order (the order every method here uses)."""
    score, cost = 0.0, float(fixed_cost)
    for block, row in enumerate(choice):
        score += float(scores[block][row])
        cost += float(costs[block][row])
    return Architecture(tuple(int(r) for r in choice), score, cost)


def pareto_indices(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points, cost ascending; of equal points the first one is kept."""
    order = np.lexsort((score, cost))  # stable: ties keep their input order
    ordered = score[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(ordered)[:-1]))
    return order[ordered < best_before]


def _merge(parts: Sequence[tuple[_Level, np.ndarray, np.ndarray, np.ndarray]]) -> _Level:
    """Pareto front of the union of (a front) + (one block's points: cost, score, rows), in chunks to bound memory.
    One part per width the block's points read; their pairs keep their order, so one part merges as it always has."""
    pieces = []
    for level, cost, score, rows in parts:
        step = max(1, _MAX_PAIRS // len(level.cost))
        for start in range(0, len(cost), step):
            chunk = slice(start, start + step)
            pair_cost = (level.cost[:, None] + cost[None, chunk]).ravel()
            pair_score = (level.score[:, None] + score[None, chunk]).ravel()
            keep = pareto_indices(pair_cost, pair_score)
            parent, col = np.divmod(keep, len(cost[chunk]))
            pieces.append((pair_cost[keep], pair_score[keep], parent, rows[chunk][col]))
    merged = [np.concatenate(p) for p in zip(*pieces, strict=True)]
    keep = pareto_indices(merged[0], merged[1])
    return _Level(*(m[keep] for m in merged))


def _by_value(values: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
    """Each distinct value with its positions; one slice when all are equal (a space without out widths)."""
    if not len(values):
        return []
    if (values == values[0]).all():
        return [(int(values[0]), slice(None))]
    return [(int(v), np.flatnonzero(values == v)) for v in np.unique(values)]


@dataclass(frozen=True)
class _Joins:
    """Per block, the width each candidate reads and writes, and its candidates grouped by that pair: a network is
    one whose block i writes what block i+1 reads. Without widths, every block is one group (all read and write 0)."""

    reads: list[np.ndarray]
    writes: list[np.ndarray]
    groups: list[list[tuple[int, int, np.ndarray]]]  # per block: (read, written, rows ascending), pairs ascending

    @property
    def chained(self) -> bool:
        """Whether the widths restrict anything (some block's candidates read or write several widths)."""
        return any(len(g) > 1 for g in self.groups)


def _joins(widths: Sequence[np.ndarray] | None, scores: Sequence[np.ndarray]) -> _Joins:
    if widths is None:  # every block one group: all read and write width 0
        zeros = [np.zeros(len(s), dtype=np.int64) for s in scores]
        return _Joins(zeros, zeros, [[(0, 0, np.arange(len(s)))] for s in scores])
    if len(widths) != len(scores):
        raise ValueError(f"need one widths array per block ({len(scores)} blocks), got {len(widths)}")
    reads, writes, groups = [], [], []
    for pairs, score in zip(widths, scores, strict=True):
        pairs = np.asarray(pairs, dtype=np.int64)
        if pairs.shape != (len(score), 2):
            raise ValueError("every block needs one (read, written) width pair per candidate")
        reads.append(pairs[:, 0])
        writes.append(pairs[:, 1])
        if (pairs == pairs[0]).all():  # one pair, as in every block of a space without out widths
            groups.append([(int(pairs[0, 0]), int(pairs[0, 1]), np.arange(len(score)))])
            continue
        distinct, inverse = np.unique(pairs, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        groups.append([(int(r), int(w), np.flatnonzero(inverse == g)) for g, (r, w) in enumerate(distinct)])
    return _Joins(reads, writes, groups)


@dataclass(frozen=True)
class _Metric:
    """One cost metric: per-block costs, the fixed parts' cost, and its prefix fronts (the exact one-metric bounds)."""

    costs: list[np.ndarray]
    fixed: float
    levels: list[dict[int, _Level]]  # levels[j][w]: front of the fixed parts and blocks 0..j-1 writing w, cost vs score
    scale: float  # no total can exceed it in size: the yardstick of rounding slack

    @property
    def cheapest(self) -> float:
        return min(float(level.cost[0]) for level in self.levels[-1].values())


@dataclass(frozen=True)
class _Children:
    """The children of a partial assignment that fit the caps, in bound order; one heap entry stands for the
    child at its rank and the siblings after it."""

    block: int
    suffix: tuple[int, ...]  # the rows chosen for the blocks after `block`
    rows: np.ndarray  # each child's row of `block`
    key_score: np.ndarray  # bounds: (score, cost) of every complete architecture below is at least these
    key_cost: np.ndarray
    cost: np.ndarray  # (metrics, children): totals so far, fixed parts excluded
    score: np.ndarray
    cap: float  # the searched metric's cap the bounds assume


def _metric(costs: Sequence[np.ndarray], scores: Sequence[np.ndarray], fixed: float, joins: _Joins) -> _Metric:
    """Check one metric's arrays against the scores and merge its prefix fronts, one per width written."""
    costs = [np.asarray(c, dtype=np.float64) for c in costs]
    if len(costs) != len(scores):
        raise ValueError(f"need one cost array per block ({len(scores)} blocks), got {len(costs)}")
    zero = np.zeros(1, dtype=np.int64)
    start = _Level(np.array([float(fixed)]), np.zeros(1), zero, zero)
    levels = [{read: start for read, _, _ in joins.groups[0]}]  # block 0 reads the stem, whatever it reads
    for block, (cost, score) in enumerate(zip(costs, scores, strict=True)):
        if cost.shape != score.shape or cost.ndim != 1 or not len(cost):
            raise ValueError("every block needs matching, non-empty 1-d cost and score arrays")
        parts: dict[int, list[tuple[_Level, np.ndarray, np.ndarray, np.ndarray]]] = {}
        for read, written, rows in joins.groups[block]:
            if read in levels[-1]:
                keep = rows[pareto_indices(cost[rows], score[rows])]
                parts.setdefault(written, []).append((levels[-1][read], cost[keep], score[keep], keep))
        if not parts:
            raise AssemblyError(f"no network's widths join: the candidates of block {block} (from 0) read "
                                f"{sorted({r for r, _, _ in joins.groups[block]})}, the block before writes "
                                f"{sorted(levels[-1])}")
        levels.append({written: _merge(p) for written, p in parts.items()})
    return _Metric(costs, float(fixed), levels, abs(float(fixed)) + sum(float(np.abs(c).max()) for c in costs))


def _needed(points: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``points`` (candidates x (score, costs)) with fewer than k predecessors: rows at most as large in
    every column that sort before it lexicographically (of equal rows, the earlier). A candidate with k of them
    is needed by no top-k set: swapping in each gives k other architectures at least as good in every sum.

    Rows go in lexicographic order, a chunk at a time, compared with the rows kept so far and the earlier rows
    of their chunk: the first k predecessors of any row have fewer than k themselves, so they are kept, and a
    row counted from the chunk that is not kept brings its own k predecessors along.
    """
    order = np.lexsort(points.T[::-1])
    ordered = points[order]
    kept = np.zeros(len(points), dtype=bool)  # by position in `ordered`
    step = 64  # small chunks: the rows kept so far are few, so the comparisons stay near linear
    for start in range(0, len(points), step):
        chunk = np.arange(start, min(start + step, len(points)))
        earlier = np.concatenate([np.flatnonzero(kept[:start]), chunk])
        below = np.ones((len(chunk), len(earlier)), dtype=bool)
        below[:, -len(chunk):] = np.tri(len(chunk), k=-1, dtype=bool)
        for column in ordered.T:
            below &= column[None, earlier] <= column[chunk, None]
        kept[chunk] = below.sum(axis=1) < k
    return np.sort(order[kept])


def _amount(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:.4g}"


class ExactSearch:
    """Exact multiple-choice knapsack over blocks: the whole Pareto front, any budget, the k best, also under
    limits on further cost metrics (latency, FLOPs), over the networks whose widths join.

    Args:
        costs: per block, each candidate's cost in the searched metric (params or FLOPs).
        scores: per block, each candidate's score (lower is better).
        fixed_cost: cost of the parts that are not searched (stem, head, fixed layers).
        metric: the searched metric's name, for messages, ``limits`` and ``totals``.
        others: metrics that ``limits`` can bound: name -> (per block, each candidate's cost, aligned with
            ``scores``; the fixed parts' cost in that metric).
        widths: per block, (candidates, 2): the width each candidate reads and writes; an architecture's block i
            must write what block i+1 reads (block 0's reads are free: the stem writes them). None: all join.
    """

    def __init__(self, costs: Sequence[np.ndarray], scores: Sequence[np.ndarray], fixed_cost: float = 0.0, *,
                 metric: str = "cost", others: Mapping[str, tuple[Sequence[np.ndarray], float]] | None = None,
                 widths: Sequence[np.ndarray] | None = None):
        if not costs or len(costs) != len(scores):
            raise ValueError("need one cost and one score array per block, at least one block")
        self.scores = [np.asarray(s, dtype=np.float64) for s in scores]
        self.metric = metric
        self._joins = _joins(widths, self.scores)
        self._metrics = {metric: _metric(costs, self.scores, fixed_cost, self._joins)}
        for name, (other_costs, other_fixed) in (others or {}).items():
            if name in self._metrics:
                raise ValueError(f"metric {name!r} is given twice")
            self._metrics[name] = _metric(other_costs, self.scores, other_fixed, self._joins)
        self.costs, self.fixed_cost = self._metrics[metric].costs, self._metrics[metric].fixed
        # a score bound formed back to front can exceed a block-order total in the last bits
        self._score_slack = 1e-9 * sum(float(np.abs(s).max()) for s in self.scores)
        self._among = ", among the networks whose widths join" if self._joins.chained else ""

    @property
    def cheapest(self) -> float:
        return self._metrics[self.metric].cheapest

    def smallest(self, metric: str) -> float:
        """The smallest total any architecture reaches in ``metric`` on its own (fixed parts included)."""
        return self._metrics[metric].cheapest

    def totals(self, choice: Sequence[int]) -> dict[str, float]:
        """Every metric's total for one architecture (fixed parts included), the searched metric first."""
        return {name: summed(m.costs, self.scores, m.fixed, choice).cost for name, m in self._metrics.items()}

    def front(self, limits: Mapping[str, float] | None = None) -> Front:
        """Every Pareto-optimal (cost, score) point with one architecture realising it.

        With ``limits`` (metric name -> ceiling), the front of the architectures that meet them: the optimum
        under the limits, then the optimum strictly cheaper than the last point found, and so on, in one search.
        """
        if not limits:
            levels = self._metrics[self.metric].levels
            ends = list(levels[-1].items())  # the last block's fronts, one per width it writes
            cost = np.concatenate([level.cost for _, level in ends])
            score = np.concatenate([level.score for _, level in ends])
            width = np.concatenate([np.full(len(level.cost), w) for w, level in ends])
            index = np.concatenate([np.arange(len(level.cost)) for _, level in ends])
            if len(ends) > 1:
                keep = pareto_indices(cost, score)
                cost, score, width, index = cost[keep], score[keep], width[keep], index[keep]
            choice = np.empty((len(cost), len(self.scores)), dtype=np.int64)
            for block in range(len(self.scores), 0, -1):
                for w, at in _by_value(width):
                    level = levels[block][w]
                    choice[at, block - 1] = level.pick[index[at]]
                    index[at] = level.parent[index[at]]
                width = self._joins.reads[block - 1][choice[:, block - 1]]
            return Front(cost, score, choice)
        points = self._found(self._caps(None, limits), 1, front=True)[::-1]
        return Front(np.array([a.cost for a in points]), np.array([a.score for a in points]),
                     np.array([a.choice for a in points], dtype=np.int64))

    def best(self, budget: float | None = None, limits: Mapping[str, float] | None = None) -> Architecture:
        """The minimum summed score with total cost <= budget (None: no budget) and each limited metric's total
        <= its limit (``limits``: metric name -> ceiling); ties go to the cheaper in the searched metric."""
        if limits:
            return self._found(self._caps(budget, limits), 1)[0]
        self._check_budget(budget)
        front = self.front()
        point = len(front.cost) - 1 if budget is None else int(np.searchsorted(front.cost, budget, "right")) - 1
        return summed(self.costs, self.scores, self.fixed_cost, front.choice[point])

    def top_k(self, k: int, budget: float | None = None,
              limits: Mapping[str, float] | None = None) -> list[Architecture]:
        """The k lowest-score architectures within budget and limits, best first, ties cheaper first (fewer if
        fewer are feasible)."""
        return self._found(self._caps(budget, limits), k)

    def _found(self, caps: Mapping[str, float], k: int, front: bool = False) -> list[Architecture]:
        """``_search``, failing in one line when nothing meets the caps."""
        found = self._search(caps, k, front)
        if k >= 1 and not found:
            raise self._infeasible(caps)
        return found

    def _search(self, caps: Mapping[str, float], k: int, front: bool = False) -> list[Architecture]:
        """The k best architectures with every total <= its cap (``caps``: the searched metric first). With
        ``front``, each one found lowers the searched metric's cap below its cost, so those found (all of them,
        not k) are the front's points, dearest first.

        Best-first search assigning blocks from the last to the first. A partial assignment is dropped when, in
        some metric, its cost plus the cheapest completion exceeds the cap; its bound is its score plus the best
        completion within every cap: the largest of the metrics' prefix-front answers, each exact for its metric
        alone. Complete architectures enter the heap with their block-order totals, so they leave it exactly
        in (score, cost) order. Children are pushed lazily in bound order (one sibling at a time), so the work
        grows with k, not with the space; candidates with k predecessors in their block (``_needed``) are
        never tried. A bound computed before the cap was lowered is recomputed when it leaves the heap.
        Widths: a partial assignment's children are the candidates writing the width its first block reads, and
        its completions are the prefix fronts of that width, so only joining networks are formed or bounded.
        """
        metrics = [self._metrics[name] for name in caps]
        cap = np.array(list(caps.values()), dtype=np.float64)
        # Sums formed back to front can differ from block-order totals in the last bits: bounds get a little
        # slack, and each complete architecture is checked by its block-order totals.
        slack = 1e-9 * np.array([m.scale + (abs(c) if math.isfinite(c) else 0.0)
                                 for m, c in zip(metrics, cap, strict=True)])
        reads, last = self._joins.reads, len(self.scores) - 1
        # per block, the width all its candidates read (None: several): their children need no grouping
        one_read = [g[0][0] if all(r == g[0][0] for r, _, _ in g) else None for g in self._joins.groups]
        # per block, the rows a top-k set may need, by the width they write (the last block's: all, under None)
        options: list[dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        for b, rows in enumerate(self._rows(tuple(caps), 1 if front else k)):
            by_width = [(None, slice(None))] if b == last else _by_value(self._joins.writes[b][rows])
            options.append({w: (rows[at], np.stack([m.costs[b][rows[at]] for m in metrics]), self.scores[b][rows[at]])
                            for w, at in by_width})
        # (score bound, cost bound, tie-breaker, an architecture or (siblings, rank))
        heap: list[tuple[float, float, int, Architecture | tuple[_Children, int]]] = []
        tie = itertools.count()

        def completions(block: int, width: int, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """For partial assignments down to ``block`` reading ``width`` there: whether they fit every cap, the
            best completion's score within the caps, their cost bound."""
            bound = np.full(cost.shape[1], -np.inf)
            fits = np.ones(cost.shape[1], dtype=bool)
            for m, metric in enumerate(metrics):
                prefix = metric.levels[block][width]  # front of the fixed parts and the blocks before `block`
                point = np.searchsorted(prefix.cost, cap[m] - cost[m] + slack[m], "right") - 1
                fits &= point >= 0
                bound = np.maximum(bound, prefix.score[point])
            return fits, bound, cost[0] + metrics[0].levels[block][width].cost[0] - slack[0]

        def bounds(block: int, rows: np.ndarray, cost: np.ndarray,
                   score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """For partial assignments down to ``block``: whether they fit every cap, and their bounds."""
            if one_read[block] in metrics[0].levels[block]:
                fits, bound, key_cost = completions(block, one_read[block], cost)
            else:  # children reading several widths, or one that no prefix writes (they do not fit)
                fits, bound, key_cost = (np.zeros(len(score), dtype=bool), np.full(len(score), -np.inf),
                                         np.full(len(score), np.inf))
                for width, at in _by_value(reads[block][rows]):
                    if width in metrics[0].levels[block]:
                        fits[at], bound[at], key_cost[at] = completions(block, width, cost[:, at])
            return fits, score + bound - self._score_slack, key_cost

        def push(block: int, suffix: tuple[int, ...], child_rows: np.ndarray, child_cost: np.ndarray,
                 child_score: np.ndarray) -> None:
            """Sort the children that fit by bound and push the first, standing for them all."""
            fits, key_score, key_cost = bounds(block, child_rows, child_cost, child_score)
            keep = np.flatnonzero(fits)
            if len(keep):
                order = keep[np.lexsort((key_cost[keep], key_score[keep]))]
                children = _Children(block, suffix, child_rows[order], key_score[order], key_cost[order],
                                     child_cost[:, order], child_score[order], float(cap[0]))
                heapq.heappush(heap, (children.key_score[0], children.key_cost[0], next(tie), (children, 0)))

        def expand(block: int, suffix: tuple[int, ...], cost: np.ndarray, score: float, width: int | None) -> None:
            if width in options[block]:  # else no needed candidate of `block` writes what the block after reads
                rows, block_cost, block_score = options[block][width]
                push(block, suffix, rows, cost[:, None] + block_cost, score + block_score)

        expand(last, (), np.zeros(len(metrics)), 0.0, None)
        found: list[Architecture] = []
        while heap and (front or len(found) < k):
            *_, item = heapq.heappop(heap)
            if isinstance(item, Architecture):
                if item.cost <= cap[0]:  # else found before the cap was lowered below it
                    found.append(item)
                    if front:
                        cap[0] = np.nextafter(item.cost, -np.inf)
                continue
            group, rank = item
            if cap[0] < group.cap:  # bounds from before the cap was lowered: sort these children again
                push(group.block, group.suffix, group.rows[rank:], group.cost[:, rank:], group.score[rank:])
                continue
            if rank + 1 < len(group.rows):
                heapq.heappush(heap, (group.key_score[rank + 1], group.key_cost[rank + 1], next(tie),
                                      (group, rank + 1)))
            choice = (int(group.rows[rank]), *group.suffix)
            if group.block == 0:
                totals = [summed(m.costs, self.scores, m.fixed, choice) for m in metrics]
                if all(t.cost <= limit for t, limit in zip(totals, cap, strict=True)):
                    heapq.heappush(heap, (totals[0].score, totals[0].cost, next(tie), totals[0]))
            else:
                expand(group.block - 1, choice, group.cost[:, rank], float(group.score[rank]),
                       int(reads[group.block][choice[0]]))
        return found

    def _rows(self, names: tuple[str, ...], k: int) -> list[np.ndarray]:
        """Per block, the candidates a top-k set under these metrics may need (``_needed`` within each pair of
        widths read and written: only a candidate of the same pair can replace another)."""
        needed = []
        for b, score in enumerate(self.scores):
            points = np.column_stack([score, *(self._metrics[n].costs[b] for n in names)])
            needed.append(np.sort(np.concatenate([rows[_needed(points[rows], k)]
                                                  for _, _, rows in self._joins.groups[b]])))
        return needed

    def _caps(self, budget: float | None, limits: Mapping[str, float] | None) -> dict[str, float]:
        """The ceiling of every limited metric, the searched metric first; an unreachable one fails here."""
        caps = {self.metric: math.inf if budget is None else float(budget)}
        if not limits:
            self._check_budget(budget)
            return caps
        for name, limit in limits.items():
            if name not in self._metrics:
                raise ValueError(f"limit on unknown metric {name!r}: this search has {', '.join(self._metrics)}")
            caps[name] = min(caps.get(name, math.inf), float(limit))
        if any(c < self._metrics[name].cheapest for name, c in caps.items()):
            raise self._infeasible(caps)
        return caps

    def _infeasible(self, caps: Mapping[str, float]) -> AssemblyError:
        named = [name for name, c in caps.items() if math.isfinite(c)]
        wanted = " and ".join(f"{name} <= {_amount(caps[name])}" for name in named)
        least = ", ".join(f"the smallest {name} is {_amount(self._metrics[name].cheapest)}" for name in named)
        return AssemblyError(f"limits {wanted} are infeasible together: {least} (fixed parts included, each "
                             f"metric on its own{self._among}); raise a limit")

    def _check_budget(self, budget: float | None) -> None:
        if budget is not None and budget < self.cheapest:
            # whole amounts in full: 348,262,304 FLOPs as :g (3.48262e+08) would suggest an infeasible budget
            raise AssemblyError(f"budget {_plain(budget)} is infeasible: the cheapest architecture costs "
                                f"{_plain(self.cheapest)} (fixed parts included{self._among}); set search.budget >= "
                                f"{_plain(self.cheapest)}, or 0 for no budget")


# ---------------------------------------------------------------------------------------------- Optuna


@dataclass(frozen=True)
class OptunaResult:
    best: Architecture | None  # best feasible trial; None if no trial met the budget
    trials: int  # finished trials in the study (all workers)
    feasible: int
    history: np.ndarray  # (trials, 3): cost, score, feasible (1/0), in trial order


class MlflowTrialLogger:
    """Optuna callback: each finished trial becomes one step of the active MLflow run (the stage's run).

    Our own few lines instead of optuna-integration's MLflowCallback (deprecated since 4.9, removal
    planned for 6.0); one step per trial rather than one nested run per trial keeps the UI readable.
    """

    def __init__(self, names: Sequence[str], choices: Sequence[Sequence[str]]):
        self._index = {name: {c: i for i, c in enumerate(ids)} for name, ids in zip(names, choices, strict=True)}
        self._best = math.inf

    def __call__(self, study: Any, trial: Any) -> None:
        if trial.values is None:
            return
        feasible = _feasible(trial)
        if feasible:
            self._best = min(self._best, trial.values[0])
        metrics = {"optuna/score": trial.values[0], "optuna/cost": trial.user_attrs["cost"],
                   "optuna/feasible": float(feasible)}
        if math.isfinite(self._best):
            metrics["optuna/best_score"] = self._best
        for name, value in trial.params.items():  # a block's categorical, or one of its per-width ones
            block = name if name in self._index else name.rpartition(_AT)[0]
            if block in self._index:
                metrics[f"optuna/choice/{block}"] = self._index[block][value]
        log_metrics(metrics, step=trial.number)


def _feasible(trial: Any) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


_AT = "@"  # the categorical of block b's candidates reading width w is named b@w


@dataclass(frozen=True)
class _Categoricals:
    """Optuna's view of the space: per block, one categorical per width the block before may write, over the
    candidates that read it and lie on a network whose widths join, so every trial is a network. A block whose
    candidates read one width (every block, in a space without out widths) is one categorical named after it."""

    names: list[dict[int | None, str]]  # per block: the width the block before wrote (None: block 0 or no widths)
    options: list[dict[int | None, list[str]]]  # per block, the same keys: candidate ids
    index: list[dict[str, int]]  # per block: candidate id -> row
    writes: list[np.ndarray | None]  # per block: the width each row writes (None: no widths)

    def choose(self, pick: Callable[[int, str, list[str]], str]) -> list[int]:
        """One row per block, in block order: ``pick(block, name, options)`` gives each block's candidate id."""
        rows, written = [], None
        for block, (names, options, index, writes) in enumerate(zip(self.names, self.options, self.index,
                                                                    self.writes, strict=True)):
            rows.append(index[pick(block, names[written], options[written])])
            written = None if writes is None else int(writes[rows[-1]])
        return rows


def _table_widths(tables: Sequence[BlockTable]) -> list[np.ndarray] | None:
    """The tables' widths, as ``ExactSearch`` takes them (None: no table has any)."""
    if all(t.widths is None for t in tables):
        return None
    missing = [t.name for t in tables if t.widths is None]
    if missing:
        raise ValueError(f"tables {missing} have no widths while the others have")
    return [t.widths for t in tables]


def _on_networks(widths: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per block, which candidates lie on a network whose widths join: forward, those reading what a reachable
    candidate of the block before writes; backward, of those, the ones writing what a kept one of the next reads."""
    ok = [np.ones(len(w), dtype=bool) for w in widths]
    for b in range(1, len(widths)):
        ok[b] &= np.isin(widths[b][:, 0], widths[b - 1][ok[b - 1], 1])
    for b in range(len(widths) - 2, -1, -1):
        ok[b] &= np.isin(widths[b][:, 1], widths[b + 1][ok[b + 1], 0])
    return ok


def _categoricals(blocks: Sequence[BlockTable]) -> _Categoricals:
    index = [{c: i for i, c in enumerate(b.candidates)} for b in blocks]
    widths = _table_widths(blocks)
    if widths is None:
        return _Categoricals([{None: b.name} for b in blocks], [{None: list(b.candidates)} for b in blocks], index,
                             [None] * len(blocks))
    names, options = [], []
    for b, (table, ok) in enumerate(zip(blocks, _on_networks(widths), strict=True)):
        by_read: dict[int | None, list[str]] = {}
        for row in np.flatnonzero(ok):
            by_read.setdefault(None if b == 0 else int(widths[b][row, 0]), []).append(table.candidates[row])
        names.append({w: table.name if len(by_read) == 1 else f"{table.name}{_AT}{w}" for w in by_read})
        options.append(by_read)
    return _Categoricals(names, options, index, [w[:, 1] for w in widths])


def _storage(storage: str) -> Any:
    """``""``: in memory; a URL (``sqlite:///abs/path.db``): RDB; anything else: a journal file path."""
    if not storage:
        return None
    if "://" in storage:
        return storage
    import optuna

    path = Path(storage)
    if not path.parent.is_dir():
        raise AssemblyError(f"search.storage={storage}: folder {path.parent} does not exist")
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def study_name(blocks: Sequence[BlockTable], metric: str, budget: float | None, fixed_cost: float,
               sampler: str, seed: int, limits: Mapping[str, tuple[float, float]] | None = None) -> str:
    """Workers sharing a storage join the same study only when they solve the same problem."""
    digest = hashlib.sha256(repr((metric, budget, fixed_cost, sampler, seed, sorted((limits or {}).items()))).encode())
    for b in blocks:
        digest.update(repr((b.name, b.candidates)).encode())
        for name, array in (("score", b.score), *sorted(b.costs.items())):
            digest.update(name.encode() + array.tobytes())
        if b.widths is not None:
            digest.update(b"widths" + np.asarray(b.widths, dtype=np.int64).tobytes())
    return f"dna-assemble-{digest.hexdigest()[:12]}"


def worker_seed(seed: int, worker: int, trials: int, done: int) -> int:
    """The sampler seed of worker ``worker`` joining a study that holds ``done`` of its ``trials`` finished trials.

    ``seed + worker * trials + done``: worker k's seeds lie in [seed + k * trials, seed + (k + 1) * trials), so
    workers started together never share one, a resumed worker does not replay its first session, and worker 0
    alone seeds as a single process always has (``seed`` plus the trials already there).
    """
    return seed + worker * trials + done


def optuna_search(blocks: Sequence[BlockTable], metric: str, budget: float | None, fixed_cost: float,
                  trials: int, sampler: str = "tpe", seed: int = 0, storage: str = "",
                  callbacks: Sequence[Callable[[Any, Any], None]] = (),
                  limits: Mapping[str, tuple[float, float]] | None = None, worker: int = 0) -> OptunaResult:
    """Search with Optuna until the study holds ``trials`` finished trials (resuming a stored study).

    ``tpe``: one objective, the summed score, with ``cost - budget <= 0`` as a constraint, and one more per
    ``limits`` entry (metric -> (ceiling, the fixed parts' cost in it)).
    ``nsga2``: two objectives, score and cost, with the same constraint. Tables with widths: each block's candidate
    is drawn among those reading what the block before wrote (``_Categoricals``), so every trial is a network
    whose widths join. The first trial is the cheapest architecture, so every study has a feasible trial whenever
    one exists. Workers sharing ``storage`` (each its
    own ``worker`` index) fill one study; each seeds its sampler by ``worker_seed`` and stamps its trials with
    its index and seed. A worker whose trial was running when the study reached ``trials`` still finishes it, so
    the study may hold a few more (at most workers - 1); the result is over the first ``trials`` in trial order.
    """
    import optuna

    costs = [b.cost(metric) for b in blocks]
    scores = [b.score for b in blocks]
    chain = _categoricals(blocks)
    state = optuna.trial.TrialState.COMPLETE

    def objective(trial: Any) -> Any:
        choice = chain.choose(lambda _, name, options: trial.suggest_categorical(name, options))
        arch = summed(costs, scores, fixed_cost, choice)
        trial.set_user_attr("cost", arch.cost)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("seed", sampler_seed)
        if budget is not None:
            trial.set_constraint("budget", arch.cost - budget)
        for name, (limit, fixed) in (limits or {}).items():
            trial.set_constraint(name, summed([b.cost(name) for b in blocks], scores, fixed, choice).cost - limit)
        return arch.score if sampler == "tpe" else (arch.score, arch.cost)

    study = optuna.create_study(storage=_storage(storage), load_if_exists=True,
                                study_name=study_name(blocks, metric, budget, fixed_cost, sampler, seed, limits),
                                directions=["minimize"] if sampler == "tpe" else ["minimize", "minimize"])
    done = len(study.get_trials(deepcopy=False, states=(state,)))
    sampler_seed = worker_seed(seed, worker, trials, done)
    study.sampler = (optuna.samplers.TPESampler(seed=sampler_seed) if sampler == "tpe"
                     else optuna.samplers.NSGAIISampler(seed=sampler_seed))
    if not study.get_trials(deepcopy=False):
        widths = _table_widths(blocks)  # without them, each block's cheapest candidate makes the cheapest network
        cheapest = ([int(np.argmin(c)) for c in costs] if widths is None
                    else ExactSearch(costs, scores, fixed_cost, widths=widths).front().choice[0])
        first: dict[str, str] = {}
        chain.choose(lambda block, name, _: first.setdefault(name, blocks[block].candidates[cheapest[block]]))
        study.enqueue_trial(first, skip_if_exists=True)  # workers starting together: one cheapest trial, mostly
    if done < trials:
        log.info("optuna worker %d: seed %d, %d of %d trials already in the study", worker, sampler_seed, done, trials)
        study.optimize(objective, n_trials=trials - done,
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=(state,)), *callbacks])
    finished = sorted(study.get_trials(deepcopy=False, states=(state,)), key=lambda t: t.number)[:trials]
    history = np.array([(t.user_attrs["cost"], t.values[0], _feasible(t)) for t in finished], dtype=np.float64)
    feasible = [t for t in finished if _feasible(t)]
    best = None
    if feasible:
        top = min(feasible, key=lambda t: (t.values[0], t.user_attrs["cost"], t.number))
        best = summed(costs, scores, fixed_cost, chain.choose(lambda _, name, __: top.params[name]))
    return OptunaResult(best, len(finished), len(feasible), history.reshape(-1, 3))


def relative_gap(found: float, optimum: float) -> float:
    """(found - optimum) / |optimum|: 0.02 means 2% worse than the exact optimum."""
    return (found - optimum) / abs(optimum) if optimum else found - optimum


# ---------------------------------------------------------------------------------------------- synthetic tables

_OPS = tuple((k, e) for k in (3, 5, 7) for e in (3, 6))  # DNA's MBConv ops: kernel x expansion


def synthetic_tables(layers: Sequence[int] = (2, 3, 3, 2), widths: Sequence[int] = (16, 32, 64, 128),
                     sizes: Sequence[int] = (14, 7, 4, 2), seed: int = 0) -> list[BlockTable]:
    """Score tables shaped like a search space, for tests and benchmarks (defaults: the default config).

    A candidate is one op per layer (6**layers per block, e.g. 36, 216, 216, 36). Costs follow an
    MBConv count (expand + depthwise + project, per layer at the block's width and map size); the
    score is a per-block base (0.3-0.8), about 15% lower for the largest candidate than for the
    smallest (log-cost trend), plus noise of 3% of the base, the pattern real block scores show
    (bigger candidates score better, as in the default run's tables).
    """
    rng = np.random.default_rng(seed)
    tables = []
    for b, (n_layers, width, size) in enumerate(zip(layers, widths, sizes, strict=True)):
        combos = np.array(np.meshgrid(*[np.arange(len(_OPS))] * n_layers, indexing="ij")).reshape(n_layers, -1).T
        op_params = np.array([width * width * e * 2 + width * e * k * k for k, e in _OPS], dtype=np.float64)
        params = op_params[combos].sum(axis=1)
        flops = params * size * size
        size_rank = (np.log(params) - np.log(params.min())) / max(np.log(params.max() / params.min()), 1e-12)
        base = rng.uniform(0.3, 0.8)
        score = base * (1 - 0.15 * size_rank) + rng.normal(0, 0.03 * base, len(params))
        names = tuple("-".join(f"k{_OPS[o][0]}e{_OPS[o][1]}" for o in combo) for combo in combos)
        tables.append(BlockTable(f"b{b}", names, score, {"params": params, "flops": flops}))
    return tables


def synthetic_latency(tables: Sequence[BlockTable], noise: float = 0.3, seed: int = 0) -> list[np.ndarray]:
    """Per block, each candidate's latency in ms for tests and benchmarks of limits: a compute term (FLOPs) plus
    a weight-read term (params), times log-normal noise, so it follows params loosely within a block and
    differently across blocks (early blocks: many FLOPs, few params)."""
    rng = np.random.default_rng(seed)
    return [(t.flops * 2e-9 + t.params * 1e-5) * rng.lognormal(0, noise, len(t.params)) for t in tables]


# ---------------------------------------------------------------------------------------------- the stage's work


@dataclass(frozen=True)
class Problem:
    """What the assembly solves: the tables with their costs, each metric's fixed parts, and absolute ceilings."""

    tables: list[BlockTable]
    fixed: dict[str, float]  # the fixed parts' cost per metric
    metric: str
    budget: float | None  # absolute (search.relative resolved); None = no budget
    limits: dict[str, float]  # absolute ceilings on further metrics
    teacher: dict[str, float] = field(default_factory=dict)  # the teacher's costs (pipeline mode)
    fingerprint: str = ""  # id of the machine the measured costs come from ("" = counted only)
    arch: Callable[[dict[str, str]], Any] | None = None  # {block: candidate} -> timm arch strings


@dataclass(frozen=True)
class Result:
    problem: Problem
    front: Front  # score vs the searched metric, among architectures within the limits
    exact: Architecture  # the exact optimum for the budget and limits
    top: list[Architecture]  # the search.top_k best, exact
    chosen: Architecture  # the exact optimum, or Optuna's best feasible trial
    optuna: OptunaResult | None
    exact_seconds: float

    @property
    def tables(self) -> list[BlockTable]:
        return self.problem.tables


def match_space(tables: Sequence[BlockTable], spec: Any) -> list[BlockTable]:
    """Check the score tables against the search space (``pipeline.space.SpaceSpec``): one ``<block>.csv`` for
    exactly the space's blocks, every candidate id one of the block's, every candidate rated."""
    expected = [b.name for b in spec.blocks]
    if [t.name for t in tables] != expected:
        raise AssemblyError(f"score tables {[t.name for t in tables]} do not match the search space's blocks "
                            f"{expected}: rebuild them with `{REBUILD}`")
    for table, block in zip(tables, spec.blocks, strict=True):
        for cid in table.candidates:
            try:
                block.parse(cid)
            except ValueError as err:
                raise AssemblyError(f"{table.source}: {err}: rebuild it with `{REBUILD}`") from None
        if len(table.candidates) != block.num_candidates():
            raise AssemblyError(f"{table.source} rates {len(table.candidates)} of the {block.num_candidates()} "
                                f"candidates of block {block.name}: rebuild it with `{REBUILD}`")
    return list(tables)


def problem(params: Params, tables: list[BlockTable], root: Path) -> Problem:
    """The assembly's problem for ``params.search``.

    Pipeline mode (``search.fixed_cost: null``): costs come from the ``costs`` stage's folder (counted ones from
    the space, measured ones only from this machine, ``pipeline.costs.read_costs``), with the fixed parts' and the
    teacher's, and, where cells write their own widths, each candidate's widths (``chain_widths``: the search then
    keeps to networks whose widths join). An explicit ``search.fixed_cost`` instead takes the tables' own cost
    columns as they are (raw tables: ``candidate,score,params,flops``); it is the searched metric's fixed cost, the
    other metrics count the blocks.
    """
    s = params.search
    wanted = list(dict.fromkeys([*COUNTED_METRICS, s.metric, *s.limits]))  # counted ones always reported
    if s.fixed_cost is not None:  # raw tables: the counted columns they have, and every metric searched
        wanted = [m for m in wanted if m in tables[0].costs or m == s.metric or m in s.limits]
        fixed = {m: s.fixed_cost if m == s.metric else 0.0 for m in wanted}
        for m in wanted:
            tables[0].cost(m)  # a missing column fails here, in one line
        return Problem(tables, fixed, s.metric, s.budget or None, dict(s.limits))
    from pipeline import costs, space  # torch and timm: only when the space is needed

    spec = space.build_space(params.space, space.load_teacher_blocks(root / space.TEACHER_BLOCKS))
    tables = match_space(tables, spec)
    here = costs.fingerprint(params.costs, params.runtime.channels_last)
    read = {m: costs.read_costs(root / params.costs.out_dir, spec, m, here, params.costs.accept_fingerprint,
                                params.costs.tolerance) for m in wanted}
    widths = chain_widths(spec, tables) or [None] * len(tables)
    linked = [replace(t, costs={m: np.array([read[m].blocks[t.name][c] for c in t.candidates]) for m in wanted},
                      widths=w) for t, w in zip(tables, widths, strict=True)]
    teacher = {m: c.teacher for m, c in read.items() if c.teacher is not None}
    scale = _relative_scale(s, teacher, root / params.costs.out_dir) if s.relative else {}
    measured = [c.fingerprint.get("id", "") for c in read.values() if c.metric.measured]
    return Problem(linked, {m: c.fixed for m, c in read.items()}, s.metric,
                   s.budget * scale.get(s.metric, 1.0) if s.budget else None,
                   {m: v * scale.get(m, 1.0) for m, v in s.limits.items()}, teacher, measured[0] if measured else "",
                   lambda choice: space.arch_def(spec, choice))


def chain_widths(spec: Any, tables: Sequence[BlockTable]) -> list[np.ndarray] | None:
    """Per table, the student width each candidate reads and writes (``BlockTable.widths``); None where every
    block's cells read and write one width each, as in a space without out widths (every network joins)."""
    ends = [{cell.name: (cell.layers[0].student_in, cell.layers[-1].student_out) for cell in block.cells}
            for block in spec.blocks]
    if all(len(set(e.values())) == 1 for e in ends):
        return None
    return [np.array([e[block.parse(c)[0].name] for c in t.candidates], dtype=np.int64).reshape(-1, 2)
            for t, block, e in zip(tables, spec.blocks, ends, strict=True)]


def _relative_scale(s: Search, teacher: Mapping[str, float], folder: Path) -> dict[str, float]:
    missing = [m for m in (s.metric, *s.limits) if m not in teacher]
    if missing:
        raise AssemblyError(f"search.relative=true needs the teacher's {', '.join(missing)}, which {folder} lacks: "
                            "rebuild it with `dvc repro costs`")
    return dict(teacher)


def assemble(prob: Problem, search: Search) -> Result:
    """The exact front, optimum and top-k under the budget and limits, in milliseconds: an unreachable budget
    fails here, before any tracking run or Optuna trial starts."""
    start = time.perf_counter()
    others = {m: ([t.cost(m) for t in prob.tables], prob.fixed[m]) for m in prob.fixed if m != prob.metric}
    exact = ExactSearch([t.cost(prob.metric) for t in prob.tables], [t.score for t in prob.tables],
                        prob.fixed[prob.metric], metric=prob.metric, others=others, widths=_table_widths(prob.tables))
    if search.relative:
        _check_relative(exact, prob, search)
    best = exact.best(prob.budget, prob.limits)
    front, top = exact.front(prob.limits), exact.top_k(search.top_k, prob.budget, prob.limits)
    seconds = time.perf_counter() - start
    log.info("exact search: %d Pareto points, optimum %.6f at %s %g, in %.3f s", len(front.cost), best.score,
             prob.metric, best.cost, seconds)
    return Result(prob, front, best, top, best, None, seconds)


def _check_relative(exact: ExactSearch, prob: Problem, search: Search) -> None:
    """An unreachable relative budget or limit, named in the fractions the user wrote."""
    ceilings = [("search.budget", prob.metric, search.budget)] if prob.budget else []
    ceilings += [(f"search.limits.{m}", m, v) for m, v in search.limits.items()]
    for key, metric, fraction in ceilings:
        teacher, cheapest = prob.teacher[metric], exact.smallest(metric)
        if fraction * teacher < cheapest:
            raise AssemblyError(f"{key}={fraction:g} (x the teacher's {metric} {teacher:g}) is infeasible: the "
                                f"cheapest architecture costs {cheapest / teacher:.4g}x the teacher's; set {key} >= "
                                f"{cheapest / teacher:.4g}, or drop it")


def add_optuna(result: Result, search: Search, seed: int,
               callbacks: Sequence[Callable[[Any, Any], None]] = ()) -> Result:
    """Run Optuna on the same problem; its best feasible trial becomes the chosen architecture."""
    prob = result.problem
    found = optuna_search(prob.tables, prob.metric, prob.budget, prob.fixed[prob.metric], search.trials,
                          search.sampler, seed, search.storage, callbacks,
                          limits={m: (v, prob.fixed[m]) for m, v in prob.limits.items()}, worker=search.worker)
    assert found.best is not None, "the cheapest architecture is always enqueued, so a feasible trial exists"
    log.info("optuna (%s, %d trials): %.6f, %.2f%% above the exact optimum", search.sampler, found.trials,
             found.best.score, 100 * relative_gap(found.best.score, result.exact.score))
    return replace(result, chosen=found.best, optuna=found)


def summary(result: Result, search: Search) -> dict[str, Any]:
    """The content of ``architecture.json``: the choice, its totals in every metric, what it was searched under."""
    prob = result.problem

    def describe(a: Architecture) -> dict[str, Any]:
        totals = {m: _plain(summed([t.cost(m) for t in prob.tables], [t.score for t in prob.tables],
                                     prob.fixed[m], a.choice).cost) for m in prob.fixed}
        return {"candidates": [t.candidates[r] for t, r in zip(prob.tables, a.choice, strict=True)],
                "score": a.score, **totals}

    out: dict[str, Any] = {**describe(result.chosen), "blocks": [t.name for t in prob.tables],
                           "metric": prob.metric, "budget": None if prob.budget is None else _plain(prob.budget),
                           "limits": {m: _plain(v) for m, v in prob.limits.items()},
                           "search": {"metric": search.metric, "budget": search.budget, "limits": dict(search.limits),
                                      "relative": search.relative},
                           "fixed_cost": {m: _plain(v) for m, v in prob.fixed.items()},
                           "method": "exact" if result.optuna is None else "optuna"}
    if prob.teacher:
        out["teacher"] = {m: _plain(v) for m, v in prob.teacher.items()}
    if prob.fingerprint:
        out["costs_fingerprint"] = prob.fingerprint
    if prob.arch is not None:
        out["arch"] = prob.arch(dict(zip(out["blocks"], out["candidates"], strict=True)))
    out["top_k"] = [describe(a) for a in result.top]
    if result.optuna is not None:
        out["exact"] = describe(result.exact)
        out["optuna"] = {"trials": result.optuna.trials, "feasible_trials": result.optuna.feasible,
                         "gap": relative_gap(result.chosen.score, result.exact.score)}
    return out


def write_outputs(out_dir: Path, result: Result, content: Mapping[str, Any]) -> list[Path]:
    """``architecture.json``, ``pareto.csv`` and ``pareto.png``, each written to a temporary name first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {
        "architecture.json": lambda p: p.write_text(json.dumps(content, indent=2) + "\n"),
        "pareto.csv": lambda p: write_front(p, result.front, result.tables),
        "pareto.png": lambda p: plot_front(p, result.front, result.chosen, result.problem.metric,
                                           result.problem.budget,
                                           None if result.optuna is None else result.optuna.history),
    }
    paths = []
    for name, write in writers.items():
        with atomic(out_dir / name) as tmp:
            write(tmp)
        paths.append(out_dir / name)
    return paths


# ---------------------------------------------------------------------------------------------- outputs


def write_front(path: Path, front: Front, blocks: Sequence[BlockTable]) -> None:
    """``cost,score,<block>...``: one row per Pareto point, the `dvc plots` source of the stage."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cost", "score", *[b.name for b in blocks]])
        for cost, score, choice in zip(front.cost, front.score, front.choice, strict=True):
            writer.writerow([_plain(cost), repr(float(score)), *[b.candidates[r] for b, r in zip(blocks, choice, strict=True)]])


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def plot_front(path: Path, front: Front, chosen: Architecture, metric: str, budget: float | None,
               trials: np.ndarray | None = None) -> None:
    """The front as a step line, Optuna's trials (if any) as dots, the chosen architecture as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if trials is not None and len(trials):
        ok = trials[:, 2] > 0
        ax.scatter(trials[ok, 0], trials[ok, 1], s=6, c="tab:gray", alpha=0.5, label="Optuna trials (feasible)")
        ax.scatter(trials[~ok, 0], trials[~ok, 1], s=6, c="tab:red", alpha=0.3, label="Optuna trials (over budget)")
    ax.step(front.cost, front.score, where="post", c="tab:blue", lw=1)
    ax.scatter(front.cost, front.score, s=8, c="tab:blue", label=f"Pareto front ({len(front.cost)} points)")
    if budget is not None:
        ax.axvline(budget, c="k", ls="--", lw=0.8, label=f"budget {budget:g}")
    ax.scatter([chosen.cost], [chosen.score], marker="*", s=220, c="tab:orange", edgecolors="k", zorder=5,
               label=f"chosen: score {chosen.score:.4f}, {metric} {chosen.cost:g}")
    ax.set_xlabel(f"total {metric}")
    ax.set_ylabel("summed block score (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
