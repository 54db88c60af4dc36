"""Does the search work? Architectures drawn from the searched space, their stand-alone accuracy, and how well
the summed block scores rank them (BossNAS, Li et al. 2021, Sec. 5: Kendall tau over trained networks).

The parts, one per stage of ``validate/dvc.yaml``: ``draw`` picks M architectures spread evenly over the
space's cost range plus R random ones at the search budget (so size cannot explain the comparison with the
searched network); ``train_unit`` trains one of them (one seed) with a short fixed recipe, resumable per
epoch, and ``shard`` deals the units to machines (``gather`` collects them again); ``zero_cost`` rates them with
the NASWOT proxy at initialisation (the SPOS baseline is ``pipeline.spos``); ``rank_quality`` and ``at_budget``
turn the accuracies into Kendall tau / Spearman rho for the DNA score, SPOS, NASWOT and the "bigger is better"
proxies, with bootstrap intervals, paired intervals of DNA's lead over each, and the seed-to-seed noise ceiling
(a predictor cannot agree with its ground truth better than the ground truth agrees with
itself, and with ~10 networks tau's standard error is ~0.25).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pipeline import records
from pipeline.assembly import BlockTable, summed
from pipeline.checkpoint import ArtifactError, atomic, read_json
from pipeline.errors import PipelineError

KINDS = ("stratified", "random", "searched")
TILTS = np.linspace(-8.0, 8.0, 33)  # exponential tilts towards cheap (<0) or costly (>0) candidates


class ValidationError(PipelineError):
    """A validation setting the searched space cannot satisfy; the message names the fix."""


@dataclass(frozen=True)
class Sampled:
    """One architecture to train: its candidates per block, its cost and its predicted score (the sum of its blocks'
    scores, kept one by one so the report can tell which block ranks well)."""

    name: str
    kind: str  # stratified | random | searched
    candidates: tuple[str, ...]
    params: float
    flops: float
    score: float
    block_scores: tuple[float, ...]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "candidates": list(self.candidates), "block_scores": list(self.block_scores)}


# ---------------------------------------------------------------------------------------------------- drawing
def _describe(name: str, kind: str, tables: Sequence[BlockTable], fixed: Mapping[str, float],
              rows: Sequence[int]) -> Sampled:
    scores = [t.score for t in tables]
    cost = {m: summed([t.cost(m) for t in tables], scores, fixed[m], rows) for m in ("params", "flops")}
    return Sampled(name, kind, tuple(t.candidates[r] for t, r in zip(tables, rows, strict=True)),
                   cost["params"].cost, cost["flops"].cost, cost["params"].score,
                   tuple(float(t.score[r]) for t, r in zip(tables, rows, strict=True)))


def _pool(tables: Sequence[BlockTable], metric: str, rng: np.random.Generator, per_tilt: int) -> np.ndarray:
    """Random row choices, (n, blocks): uniform ones plus exponentially tilted ones that reach both ends of the
    cost range (uniform draws of a sum of many layers cluster in the middle)."""
    draws = []
    for tilt in TILTS:
        cols = []
        for t in tables:
            cost = t.cost(metric)
            spread = max(float(cost.max() - cost.min()), 1e-12)
            weight = np.exp(tilt * (cost - cost.min()) / spread)
            cols.append(rng.choice(len(cost), size=per_tilt, p=weight / weight.sum()))
        draws.append(np.stack(cols, 1))
    ends = [[int(np.argmin(t.cost(metric))) for t in tables], [int(np.argmax(t.cost(metric))) for t in tables]]
    pool = np.unique(np.concatenate([np.asarray(ends), *draws]), axis=0)
    if all(t.widths is not None for t in tables):  # cells with out widths: only networks whose widths join
        joins = np.ones(len(pool), dtype=bool)
        for b in range(len(tables) - 1):
            joins &= tables[b].widths[pool[:, b], 1] == tables[b + 1].widths[pool[:, b + 1], 0]
        pool = pool[joins]
        if not len(pool):
            raise ValidationError("no drawn architecture's widths join: raise the draws (per_tilt) or check the "
                                  "cells' out widths in space.blocks")
    return pool


def _rows_of(tables: Sequence[BlockTable], candidates: Sequence[str]) -> tuple[int, ...]:
    """Row indices of the searched architecture's candidates; a stale architecture fails with the fix."""
    fix = "rebuild it with `dvc repro assemble`"
    if len(candidates) != len(tables):
        raise ValidationError(f"the searched architecture has {len(candidates)} blocks, the score tables "
                              f"{len(tables)}: {fix}")
    rows = []
    for t, cid in zip(tables, candidates, strict=True):
        if cid not in t.candidates:
            raise ValidationError(f"the searched architecture's candidate {cid!r} is not in {t.source or t.name}: {fix}")
        rows.append(t.candidates.index(cid))
    return tuple(rows)


def draw(tables: Sequence[BlockTable], fixed: Mapping[str, float], metric: str, budget: float | None,
         searched: Sequence[str], stratified: int, random: int, window: float, seed: int,
         per_tilt: int = 4000) -> list[Sampled]:
    """``stratified`` architectures, one per equal-width cost bin from the cheapest to the costliest; ``random``
    architectures uniform among those costing within ``window`` below the budget (the searched network's cost when
    there is none); and the searched one. Seeded; no architecture appears twice."""
    rng = np.random.default_rng(seed)
    searched_rows = _rows_of(tables, searched)
    pool = _pool(tables, metric, rng, per_tilt)
    costs = fixed[metric] + sum(t.cost(metric)[pool[:, b]] for b, t in enumerate(tables))
    taken = {searched_rows}
    picked: list[Sampled] = []
    edges = np.linspace(costs.min(), costs.max(), stratified + 1)
    for i in range(stratified):
        inside = np.flatnonzero((costs >= edges[i]) & (costs <= edges[i + 1]))
        free = [j for j in inside if tuple(pool[j]) not in taken]
        if not free:  # a bin no draw reached: the unused draw nearest its middle
            middle = (edges[i] + edges[i + 1]) / 2
            free = [min((j for j in range(len(pool)) if tuple(pool[j]) not in taken),
                        key=lambda j: abs(costs[j] - middle))]
        j = int(rng.choice(free))
        taken.add(tuple(pool[j]))
        picked.append(_describe(f"s{i:02d}", "stratified", tables, fixed, pool[j]))
    target = budget or fixed[metric] + sum(float(t.cost(metric)[r]) for t, r in zip(tables, searched_rows, strict=True))
    uniform = pool[(costs <= target) & (costs >= (1 - window) * target)]
    uniform = [tuple(r) for r in np.unique(uniform, axis=0) if tuple(r) not in taken]
    if len(uniform) < random:
        raise ValidationError(f"only {len(uniform)} architectures of the space cost {metric} in "
                              f"[{(1 - window) * target:g}, {target:g}] (validate.window={window} below the budget), "
                              f"validate.random={random} needed: widen validate.window or lower validate.random")
    for k, i in enumerate(rng.choice(len(uniform), size=random, replace=False)):
        picked.append(_describe(f"r{k:02d}", "random", tables, fixed, uniform[int(i)]))
    picked.append(_describe("searched", "searched", tables, fixed, searched_rows))
    return picked


def read_sampled(path: Path | str) -> list[Sampled]:
    """``archs.json`` written by the sample stage."""
    rebuild = "dvc repro validate/dvc.yaml:validate_sample"
    content = read_json(path, rebuild)
    try:
        sampled = [Sampled(**{**a, "candidates": tuple(a["candidates"]), "block_scores": tuple(a["block_scores"])})
                   for a in content["architectures"]]
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path} holds a malformed architecture list ({type(err).__name__}: {err}): rebuild it "
                            f"with `{rebuild}`") from None
    uneven = [a.name for a in sampled if len(a.block_scores) != len(a.candidates)]
    if uneven:
        raise ArtifactError(f"{path}: {', '.join(uneven)} have a block score count unlike their block count: "
                            f"rebuild it with `{rebuild}`")
    return sampled


# ---------------------------------------------------------------------------------------------------- statistics
def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0  # a resample with one distinct value ranks nothing


def _tau(x: np.ndarray, y: np.ndarray) -> float:
    return _finite(stats.kendalltau(x, y).statistic)


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    return _finite(stats.spearmanr(x, y).statistic)


def _interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def rank_quality(truth: np.ndarray, predictors: Mapping[str, np.ndarray], resamples: int, seed: int,
                 reference: str = "params", against: str = "dna_score") -> dict[str, float]:
    """Kendall tau (exact p-value from scipy) and Spearman rho of each predictor against ``truth`` (higher = better
    for both) with bootstrap 95% intervals, plus PAIRED intervals of differences over the same resamples: each
    predictor minus ``reference`` and ``against`` minus each other predictor (``<a>/minus_<b>_lo|hi`` for tau,
    ``<a>/minus_<b>_rho_lo|hi`` for rho). With ~20 points tau's standard error is ~0.15, so only a paired interval
    that excludes 0 says "better"."""
    truth = np.asarray(truth, dtype=float)
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, len(truth), size=(resamples, len(truth)))
    with warnings.catch_warnings():  # resamples of one distinct value: counted as 0 by _finite
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        boot = {(name, stat): np.array([fn(p[b], truth[b]) for b in boots])
                for name, p in predictors.items() for stat, fn in (("tau", _tau), ("rho", _rho))}
    out: dict[str, float] = {"n": float(len(truth))}
    for name, p in predictors.items():
        tau = stats.kendalltau(p, truth)
        out.update({f"{name}/tau": float(tau.statistic), f"{name}/tau_p": float(tau.pvalue),
                    f"{name}/rho": float(stats.spearmanr(p, truth).statistic)})
        for stat in ("tau", "rho"):
            out[f"{name}/{stat}_lo"], out[f"{name}/{stat}_hi"] = _interval(boot[name, stat])
    pairs = [(name, reference) for name in predictors if name != reference and reference in predictors]
    pairs += [(against, name) for name in predictors if name != against and against in predictors]
    for a, b in dict.fromkeys(pairs):
        out[f"{a}/minus_{b}_lo"], out[f"{a}/minus_{b}_hi"] = _interval(boot[a, "tau"] - boot[b, "tau"])
        out[f"{a}/minus_{b}_rho_lo"], out[f"{a}/minus_{b}_rho_hi"] = _interval(boot[a, "rho"] - boot[b, "rho"])
    return out


def at_budget(accuracy: Mapping[str, float], kinds: Mapping[str, str]) -> dict[str, float]:
    """The searched network against the random ones of the same budget: their mean and std, its rank (1 = best)."""
    randoms = np.array([acc for name, acc in accuracy.items() if kinds[name] == "random"])
    searched = accuracy["searched"]
    return {"searched/acc": searched, "random/mean": float(randoms.mean()),
            "random/std": float(randoms.std(ddof=1)) if len(randoms) > 1 else 0.0,
            "random/max": float(randoms.max()), "searched/rank": float(1 + (randoms > searched).sum()),
            "searched/minus_random_mean": searched - float(randoms.mean()), "random/n": float(len(randoms))}


def report_metrics(archs: Sequence[Sampled], by_seed: Mapping[str, Mapping[str, list[float]]], seeds: int,
                   resamples: int, seed: int, rated: Mapping[str, Mapping[str, float]]
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every figure of the ranking check (flat ``metrics/validate.json`` keys) and one row per architecture.

    ``rated``: the other predictors, {name: {architecture: value}} with higher = better (SPOS accuracy, the
    zero-cost proxy); they sit beside the DNA score and the size proxies in every figure."""
    rows = [{**a.as_json(), "val_acc": float(np.mean(by_seed[a.name]["val_acc"])),
             "val_loss": float(np.mean(by_seed[a.name]["val_loss"])), **{k: v[a.name] for k, v in rated.items()}}
            for a in archs]
    truth = np.array([r["val_acc"] for r in rows])
    predictors = {"dna_score": -np.array([a.score for a in archs]),  # lower error = better
                  **{name: np.array([r[name] for r in rows]) for name in rated},
                  "params": np.array([a.params for a in archs]), "flops": np.array([a.flops for a in archs])}
    metrics = {f"all/{k}": x for k, x in rank_quality(truth, predictors, resamples, seed).items()}
    loss_truth = -np.array([r["val_loss"] for r in rows])  # a smoother ground truth than accuracy (lower = better)
    metrics.update({f"loss/{name}/tau": float(stats.kendalltau(p, loss_truth).statistic)
                    for name, p in predictors.items()})
    block_scores = -np.array([a.block_scores for a in archs])  # which block's score carries the ranking
    metrics.update({f"block/{i}/dna_score/tau": float(stats.kendalltau(column, truth).statistic)
                    for i, column in enumerate(block_scores.T)})
    subsets = {"stratified": ("stratified",), "at_budget": ("random", "searched")}
    for subset, kinds in subsets.items():
        keep = np.array([a.kind in kinds for a in archs])
        for name, p in predictors.items():
            metrics[f"{subset}/{name}/tau"] = float(stats.kendalltau(p[keep], truth[keep]).statistic)
    if seeds >= 2:  # the noise ceiling: a ranking cannot agree with the ground truth better than it agrees with itself
        first, second = (np.array([by_seed[a.name]["val_acc"][k] for a in archs]) for k in (0, 1))
        metrics["noise/seed_tau"] = float(stats.kendalltau(first, second).statistic)
        metrics["noise/mean_abs_diff"] = float(np.abs(first - second).mean())
    metrics.update({f"budget/{k}": x for k, x in at_budget(
        {r["name"]: r["val_acc"] for r in rows}, {a.name: a.kind for a in archs}).items()})
    return {k: float(np.nan_to_num(x)) for k, x in metrics.items()}, rows


# ---------------------------------------------------------------------------------------------------- outputs
def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A CSV of ``columns`` (other keys left out), whole or not at all."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rated(path: Path, archs: Sequence[Sampled], column: str, rebuild: str) -> dict[str, float]:
    """{architecture: value} of one predictor's CSV (``name`` + ``column``); every drawn architecture needs a row."""
    try:
        with open(path, newline="") as f:
            values = {row["name"]: float(row[column]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as err:
        raise ArtifactError(f"{path} is missing or unreadable ({type(err).__name__}: {err}): rebuild it with "
                            f"`{rebuild}`") from None
    absent = [a.name for a in archs if a.name not in values]
    if absent:
        raise ArtifactError(f"{path} has no {column} for {', '.join(absent)} (drawn after it was written): rebuild "
                            f"it with `{rebuild}`")
    return {a.name: values[a.name] for a in archs}


PREDICTORS = {"dna_score": "DNA score (sum of block scores)", "spos": "SPOS accuracy (shared weights, BN recalibrated)",
              "naswot": "NASWOT at initialisation (zero-cost)", "params": "params count", "flops": "FLOPs"}


def report_markdown(m: Mapping[str, float], rows: Sequence[Mapping[str, Any]], v: Any, metric: str) -> str:
    """The ranking check's page: ``v`` is the ``validate`` params group, ``metric`` the search's cost metric."""
    r, names = v.train, [n for n in PREDICTORS if f"all/{n}/tau" in m]
    lines = [
        "# Does the search work? Block scores vs stand-alone accuracy", "",
        f"{len(rows)} architectures from the searched space ({v.stratified} spread over the {metric} range, "
        f"{v.random} random within {v.window:.0%} below the budget, the searched one), each trained stand-alone "
        f"{v.seeds} time(s) for {r.epochs} epoch(s) ({r.opt}, lr {r.lr}, {v.train_limit or 'all'} train images); "
        "ground truth = best-epoch val accuracy (mean over seeds).", ""]
    if "spos/compute_ratio" in m:
        lines += [f"SPOS baseline: one supernet over the whole student, {m['spos/images']:,.0f} train images with a "
                  f"uniformly random path each = {m['spos/compute_ratio']:.2f}x the DNA supernets' training MACs "
                  "(images x forward MACs); rated by val accuracy after per-candidate BN recalibration.", ""]
    lines += ["## Ranking quality (all architectures)", "",
              "| predictor | Kendall tau | 95% bootstrap | p | Spearman rho | 95% bootstrap |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        a = f"all/{name}"
        lines.append(f"| {PREDICTORS[name]} | {m[f'{a}/tau']:.3f} | [{m[f'{a}/tau_lo']:.2f}, {m[f'{a}/tau_hi']:.2f}] | "
                     f"{m[f'{a}/tau_p']:.3g} | {m[f'{a}/rho']:.3f} | [{m[f'{a}/rho_lo']:.2f}, {m[f'{a}/rho_hi']:.2f}] |")
    lines += ["", "DNA score minus each other predictor, paired over the same bootstrap resamples (an interval above 0 "
              "= the DNA score ranks better):", "", "| minus | tau difference 95% | rho difference 95% |",
              "|---|---:|---:|"]
    for name in names[1:]:
        d = f"all/dna_score/minus_{name}"
        lines.append(f"| {PREDICTORS[name]} | [{m[f'{d}_lo']:.2f}, {m[f'{d}_hi']:.2f}] | "
                     f"[{m[f'{d}_rho_lo']:.2f}, {m[f'{d}_rho_hi']:.2f}] |")
    lines += ["", "Against val loss instead of accuracy (smoother), tau: "
              + ", ".join(f"{n} {m[f'loss/{n}/tau']:.3f}" for n in names) + "."]
    blocks = sorted(int(k.split("/")[1]) for k in m if k.startswith("block/"))
    lines += ["", "Each block's score alone against accuracy (block index: tau): "
              + ", ".join(f"{i}: {m[f'block/{i}/dna_score/tau']:.2f}" for i in blocks) + "."]
    lines += ["", "Within the stratified set, tau: " + ", ".join(f"{n} {m[f'stratified/{n}/tau']:.3f}" for n in names)
              + "; at the budget (random + searched, size held ~fixed): "
              + ", ".join(f"{n} {m[f'at_budget/{n}/tau']:.3f}" for n in names) + "."]
    if "noise/seed_tau" in m:
        lines += ["", f"Noise ceiling: two training seeds agree at tau {m['noise/seed_tau']:.3f} (mean |difference| "
                  f"{100 * m['noise/mean_abs_diff']:.2f} points)."]
    lines += ["", "## Searched network vs random ones at the same budget", "",
              f"searched {100 * m['budget/searched/acc']:.2f}% vs random {100 * m['budget/random/mean']:.2f} "
              f"+- {100 * m['budget/random/std']:.2f}% (best {100 * m['budget/random/max']:.2f}%); the searched "
              f"network ranks {m['budget/searched/rank']:.0f} of {m['budget/random/n'] + 1:.0f}.", "",
              "![predictors vs accuracy](scatter.png)", "", "## Architectures", "",
              "| name | kind | params | FLOPs | score | SPOS acc | NASWOT | val acc | candidates |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda x: x["score"]):
        lines.append(f"| {row['name']} | {row['kind']} | {row['params']:,.0f} | {row['flops']:,.0f} | "
                     f"{row['score']:.4f} | {100 * row.get('spos', float('nan')):.2f} | "
                     f"{row.get('naswot', float('nan')):.1f} | {100 * row['val_acc']:.2f} | "
                     f"{' '.join(row['candidates'])} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, content: Any) -> None:
    """Whole or not at all: a killed writer never leaves half a file behind."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def plot(path: Path, rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Each predictor the rows hold (DNA score, SPOS accuracy, NASWOT, the size proxy) against stand-alone accuracy,
    one colour per kind of architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in (
        ("score", "DNA predicted score (sum of block scores, lower = better)"), ("spos", "SPOS accuracy (shared weights)"),
        ("naswot", "NASWOT score at initialisation"), (metric, f"{metric} (the 'bigger is better' proxy)"))
        if all(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for kind, colour in zip(KINDS, ("tab:blue", "tab:orange", "tab:red"), strict=True):
        chosen = [r for r in rows if r["kind"] == kind]
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            ax.scatter([r[key] for r in chosen], [100 * r["val_acc"] for r in chosen], c=colour, label=kind,
                       marker="*" if kind == "searched" else "o", s=120 if kind == "searched" else 30)
    for ax, (_, label) in zip(axes[0], panels, strict=True):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].invert_xaxis()
    axes[0][0].set_ylabel("stand-alone val accuracy (%)")
    axes[0][0].legend()
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- training
RESULT, CHECKPOINT, EPOCHS = "result.json", "checkpoint.pt", "epochs.csv"


@dataclass(frozen=True)
class Job:
    """One architecture trained with one seed, in its own folder (its resumable unit)."""

    arch: Sampled
    seed: int
    out_dir: Path
    root: Path
    params: Any  # pipeline.config.Params
    threads: int


def jobs(archs: Sequence[Sampled], params: Any, root: Path, threads: int = 1) -> list[Job]:
    """Every unit (architecture x seed) in one fixed order, costliest first: unit ``j`` is the j-th of this list,
    the order ``shard`` deals from (round robin, so every machine gets cheap and costly units alike)."""
    out = root / "artifacts/validate/runs"
    return [Job(a, params.seed + k, out / a.name / f"seed{k}", root, params, threads)
            for a in sorted(archs, key=lambda a: -a.flops) for k in range(params.validate.seeds)]


def shard(units: Sequence[Job], value: str) -> list[Job]:
    """The units machine i of n trains (``validate.shard`` = "i/n": index % n == i); all of them for ""."""
    from pipeline.config import parse_shard

    part = parse_shard(value)
    return list(units) if part is None else list(units[part[0]::part[1]])


def gather(units: Sequence[Job], value: str, rebuild: str) -> dict[str, dict[str, list[float]]]:
    """{name: {"val_acc": [per seed], "val_loss": [per seed]}} from every unit's result file, wherever it was
    trained; a unit missing here (or trained under other settings) fails in one line naming it (and its shard)."""
    from pipeline.config import parse_shard

    results = [(j, job, finished(job)) for j, job in enumerate(units)]
    missing = [(j, job) for j, job, result in results if result is None]
    if missing:
        part = parse_shard(value)
        owner = (lambda j: f" (shard {j % part[1]}/{part[1]})") if part else (lambda j: "")
        names = ", ".join(f"{job.arch.name}/{job.out_dir.name}{owner(j)}" for j, job in missing)
        raise ArtifactError(f"{len(missing)} of {len(units)} ranking units have no result under the current settings "
                            f"in {missing[0][1].out_dir.parents[1]}: {names}; train them with `{rebuild}` (or "
                            f"`python stages/validate_train.py validate.shard=i/n` on machine i) and copy their "
                            f"folders here")
    by_seed: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"val_acc": [], "val_loss": []})
    for _, job, result in sorted(results, key=lambda x: x[1].seed):
        for key in ("val_acc", "val_loss"):
            by_seed[job.arch.name][key].append(float(result[key]))
    return dict(by_seed)


def job_fingerprint(job: Job) -> str:
    """What a unit's result depends on: architecture, seed, recipe, the prepared data and how much of it, precision."""
    from pipeline.config import as_dict
    from pipeline.data import prepared_identity
    from pipeline.retrain import fingerprint

    cfg = job.params.validate
    return fingerprint(candidates=job.arch.candidates, seed=job.seed, recipe=as_dict(cfg.train),
                       train_limit=cfg.train_limit, space=as_dict(job.params.space), amp=job.params.runtime.amp,
                       data=prepared_identity(job.root / "data/prepared"))


def finished(job: Job) -> dict[str, Any] | None:
    """The unit's result if it was trained under the same fingerprint (a changed setting retrains it)."""
    path = job.out_dir / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("fingerprint") == job_fingerprint(job) else None


def train_unit(job: Job) -> dict[str, Any]:
    """Train one architecture stand-alone with ``validate.train`` (resuming its per-epoch checkpoint) and return
    its best-epoch val accuracy; runs in a worker process, so it loads everything itself."""
    import time

    import torch

    from pipeline import runtime, student
    from pipeline.data import Split, load_meta, load_split
    from pipeline.retrain import record_epoch
    from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks
    from pipeline.train import evaluate, fit

    done = finished(job)
    if done is not None:
        return done
    params, cfg, rt = job.params, job.params.validate, job.params.runtime
    prepared = job.root / "data/prepared"
    meta = load_meta(prepared)
    spec = build_space(params.space, load_teacher_blocks(job.root / TEACHER_BLOCKS))
    choice = dict(zip([b.name for b in spec.blocks], job.arch.candidates, strict=True))
    device = runtime.select_device(rt)
    if device.type == "cpu":
        torch.set_num_threads(job.threads)
    runtime.seed_everything(job.seed)
    model = runtime.to_device_model(student.create(student.model_args(spec, choice), meta), device, rt.channels_last)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    if cfg.train_limit:
        train = Split(train.images[:cfg.train_limit], train.labels[:cfg.train_limit])
    loop = runtime.loop_for(rt, device, job.seed, progress=False)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = fit(model, train, val, meta, cfg.train, loop, job.out_dir / CHECKPOINT, identity={"unit": job_fingerprint(job)},
                on_epoch=lambda epoch, m: record_epoch(job.out_dir / EPOCHS, {"epoch": epoch, **m}))
    best = evaluate(model, val, meta, loop, cfg.train.eval_batch_size)
    result = {"name": job.arch.name, "kind": job.arch.kind, "seed": job.seed, "fingerprint": job_fingerprint(job),
              "val_acc": best["acc"], "val_loss": best["loss"], "run/seconds": time.perf_counter() - start}
    write_json(job.out_dir / RESULT, records.results(result))
    (job.out_dir / CHECKPOINT).unlink(missing_ok=True)  # the result is what later stages need
    return result


# ---------------------------------------------------------------------------------------------------- zero-cost proxy
def naswot(model: Any, images: Any, act: type) -> float:
    """NASWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021, Sec. 3): log|K| for the
    untrained ``model`` on one batch, where K[i, j] counts the units at the input of every ``act`` module on whose
    side of 0 images i and j agree (the same linear region). Higher = the network tells the images apart before any
    training; train-mode BN, as in the paper's code."""
    import torch

    kernel = torch.zeros(len(images), len(images), dtype=torch.float64, device=images.device)

    def count(module: Any, inputs: tuple) -> None:
        code = (inputs[0].flatten(1) > 0).float()
        ones = code.sum(1, dtype=torch.float64)
        # c c^T + (1 - c)(1 - c)^T, the units where two codes agree, in one matrix product
        kernel.add_(2 * (code @ code.T).double() - ones[:, None] - ones[None, :] + code.shape[1])

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, act)]
    try:
        model.train()
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return float(torch.linalg.slogdet(kernel).logabsdet)


def zero_cost(archs: Sequence[Sampled], params: Any, spec: Any, meta: Mapping[str, Any], train: Any, device: Any
              ) -> dict[str, float]:
    """NASWOT of each architecture's timm student initialised under ``params.seed`` (the same seed for all, so only
    the architecture differs), on the same ``validate.proxy_batch`` train images (seeded, not augmented)."""
    import torch
    from timm.layers import get_act_layer

    from pipeline import runtime, student
    from pipeline.data import normalize

    rt = params.runtime
    index = np.sort(np.random.default_rng(params.seed).permutation(len(train.labels))[:params.validate.proxy_batch])
    images = normalize(torch.from_numpy(np.asarray(train.images[index])).to(device), meta)
    if rt.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    scores = {}
    for a in archs:
        runtime.seed_everything(params.seed)
        choice = dict(zip([b.name for b in spec.blocks], a.candidates, strict=True))
        model = runtime.to_device_model(student.create(student.model_args(spec, choice), meta), device,
                                        rt.channels_last)
        scores[a.name] = naswot(model, images, get_act_layer(params.space.act))
    return scores
