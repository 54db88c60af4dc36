"""Ranking experiments (issue 16): supernet and scoring settings judged by the block-level fidelity check.

The check's stand-alone ground truth (``plots/fidelity/<block>.csv`` of ``dvc repro validate/dvc.yaml``) stays
fixed; each variant retrains the supernets and rescores every candidate in a scratch copy of the workspace (feature
cache, teacher and prepared data linked, not copied) and is ranked against the same candidates' stand-alone errors.
A DVC experiment per variant would instead redraw the check's candidates from the variant's scores and retrain
their stand-alone units (hours here), and the variants could not be compared on one set of candidates.

    python benchmarks/ranking_experiments.py WORKSPACE                    # every variant, 2 blocks at a time
    python benchmarks/ranking_experiments.py WORKSPACE base fair --jobs 1
    python benchmarks/ranking_experiments.py WORKSPACE fair_epochs30 --blocks b3    # one block only
    python benchmarks/ranking_experiments.py WORKSPACE base --blocks b2 --truth-epochs 48  # a longer-trained truth
    python benchmarks/ranking_experiments.py WORKSPACE base --blocks b3 --truth-epochs 48 --truth-samples 12000

Writes WORKSPACE/artifacts/ranking_experiments/<variant>/ (its supernets, scores, metrics.json) and prints one
markdown row per variant: per-block Kendall tau with its bootstrap interval, and the supernet stage's minutes
(``--by-epoch``: also which epoch of stand-alone training the scores rank like). Rerunning a variant under the
same code retrains nothing (the supernet stage finds its checkpoint finished under the same fingerprint); only its
scoring runs again. A code change retrains it, to the same scores (checked on one b2 variant).

``--truth-epochs N`` ranks against the same candidates' stand-alone units trained N epochs instead (missing units
are trained first, ``--jobs`` at a time, each resumable: ``artifacts/fidelity/runs_eN/``, table
``plots/fidelity_eN/``). Same seeds, data order and per-epoch lr decay, so their first epochs are the fixed truth's
units exactly: the same training, continued. ``--truth-samples S`` also trains them on S fresh samples per epoch
(``fidelity.train_samples``; ``runs_eN_sS/``, ``plots/fidelity_eN_sS/``): more steps at every lr of the schedule,
for a block whose units are still improving when the decayed lr stops them (b3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import fidelity  # noqa: E402
from pipeline.assembly import read_table  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402


def _fair(epochs: int, *more: str) -> list[str]:
    """Overrides of a fair-sampler variant: the sampler, the epochs, then the rest."""
    return ["supernet.sampler=fair", f"supernet.epochs={epochs}", *more]


SETTINGS: dict[str, list[str]] = {
    "base": [],                                   # the default
    "epochs10": ["supernet.epochs=10"],           # twice the supernet training
    "fair": ["supernet.sampler=fair"],            # each op once per layer every len(ops) steps
    "raw_mse": ["supernet.target_norm=false"],    # the paper's plain MSE on the teacher's units
    "target_units": ["score.units=target"],       # scores in the training loss's (standardised) units
    "fair_epochs10": _fair(10),
    "fair_epochs15": _fair(15),
    "fair_epochs30": _fair(30),                   # b3's widest ops under-trained?
    "fair_epochs60": _fair(60),                   # lr at 0.9^60: little past 30
    "fair_epochs30_decay95": _fair(30, "supernet.lr_decay=0.95"),
    "fair_epochs30_lr02": _fair(30, "supernet.lr=0.02"),
    "fair_epochs30_samples24k": _fair(30, "supernet.train_samples=24000"),
    "fair_epochs10_samples24k": _fair(10, "supernet.train_samples=24000"),
    "fair_epochs30_lr04": _fair(30, "supernet.lr=0.04"),
    "fair_epochs30_lr08": _fair(30, "supernet.lr=0.08"),
    "fair_epochs30_lr02_decay95": _fair(30, "supernet.lr=0.02", "supernet.lr_decay=0.95"),
    "fair_epochs30_lr02_samples24k": _fair(30, "supernet.lr=0.02", "supernet.train_samples=24000"),
    "fair_epochs30_lr04_samples24k": _fair(30, "supernet.lr=0.04", "supernet.train_samples=24000"),
    "fair_epochs10_lr02": _fair(10, "supernet.lr=0.02"),
    "fair_epochs10_lr04": _fair(10, "supernet.lr=0.04"),
    "fair_epochs10_lr005": _fair(10, "supernet.lr=0.005"),
    "fair_epochs10_decay80": _fair(10, "supernet.lr_decay=0.8"),  # settled weights
    "fair_epochs10_lr0075": _fair(10, "supernet.lr=0.0075"),
    "fair_epochs10_lr005_samples24k": _fair(10, "supernet.lr=0.005", "supernet.train_samples=24000"),  # b0-b2 now
    "fair_epochs10_lr005_samples48k": _fair(10, "supernet.lr=0.005", "supernet.train_samples=48000"),
    "fair_epochs10_lr0075_samples24k": _fair(10, "supernet.lr=0.0075", "supernet.train_samples=24000"),
    "fair_epochs15_lr005_samples24k": _fair(15, "supernet.lr=0.005", "supernet.train_samples=24000"),
    "fair_epochs10_lr005_samples24k_decay80": _fair(10, "supernet.lr=0.005", "supernet.train_samples=24000",
                                                    "supernet.lr_decay=0.8"),
    "fair_epochs10_lr005_samples24k_wd0": _fair(10, "supernet.lr=0.005", "supernet.train_samples=24000",
                                                "supernet.weight_decay=0"),
    "fair_epochs10_lr005_samples24k_batch64": _fair(10, "supernet.lr=0.005", "supernet.train_samples=24000",
                                                    "supernet.batch_size=64"),  # twice the steps per op
    "fair_epochs30_lr01_samples24k": _fair(30, "supernet.lr=0.01", "supernet.train_samples=24000"),
    "uniform_epochs10_lr005_samples24k": ["supernet.sampler=uniform", "supernet.epochs=10", "supernet.lr=0.005",
                                          "supernet.train_samples=24000"],
}
SETTINGS |= {  # scoring only: the same supernets (their twin's, trained_twin), rated with more data
    f"{name}_bigscore": [*SETTINGS[name], "score.bn_batch_size=2048", "score.batches=20"]
    for name in ("fair_epochs30", "fair_epochs30_lr04")
}
VARIANTS: dict[str, list[str]] = {**SETTINGS, **{f"{name}_seed{k}": [*o, f"seed={k}"] for k in (1, 2, 3)
                                                 for name, o in SETTINGS.items()}}
LINKED = ("artifacts/features", "artifacts/teacher", "data/prepared")


def scratch(workspace: Path, name: str) -> Path:
    """The variant's workspace: params.yaml and configs copied, the inputs linked."""
    root = workspace / "artifacts/ranking_experiments" / name
    root.mkdir(parents=True, exist_ok=True)
    for rel in LINKED:
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((workspace / rel).resolve())
    (root / "params.yaml").write_text((workspace / "params.yaml").read_text())
    return root


def trained_twin(name: str) -> str | None:
    """The variant that trains the same supernets as ``name`` (its overrides less the ``score.*`` ones)."""
    training = [o for o in VARIANTS[name] if not o.startswith("score.")]
    return next((v for v, o in VARIANTS.items() if o == training and v != name), None)


def run_block(root: Path, block: str, overrides: list[str]) -> float:
    """The block's supernet and score stages, one thread; the supernet's seconds. A variant that changes only
    scoring starts from its twin's trained supernet (same fingerprint: the supernet stage finds it finished)."""
    twin = trained_twin(root.name)
    theirs = root.parent / str(twin) / "artifacts/supernet" / f"{block}.pt"
    mine = root / "artifacts/supernet" / f"{block}.pt"
    if twin and theirs.is_file() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(theirs, mine)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    seconds = 0.0
    for stage in ("supernet", "score"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), f"block={block}",
                               "runtime.threads=1", *overrides], cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{root.name} {stage}@{block} failed:\n{proc.stderr[-3000:]}")
        seconds += (time.perf_counter() - start) if stage == "supernet" else 0.0
    return seconds


@dataclass(frozen=True)
class Truth:
    """Where a ground truth lives in the workspace: the fixed one (``epochs`` 0) or its units trained longer
    (and on ``samples`` per epoch, 0 = the check's ``fidelity.train_samples``)."""

    workspace: Path
    epochs: int = 0
    samples: int = 0

    def table(self, block: str) -> Path:
        return self.workspace / ("plots/fidelity" + self._suffix) / f"{block}.csv"

    def runs(self, block: str) -> Path:
        return self.workspace / ("artifacts/fidelity/runs" + self._suffix) / block

    @property
    def overrides(self) -> list[str]:
        """The check's settings that train this truth's units."""
        return [f"fidelity.epochs={self.epochs}"] + ([f"fidelity.train_samples={self.samples}"] if self.samples else [])

    @property
    def _suffix(self) -> str:
        return (f"_e{self.epochs}" + (f"_s{self.samples}" if self.samples else "")) if self.epochs else ""


def train_truth_part(truth: Truth, block: str, part: int, parts: int) -> list[tuple[str, tuple[str, int], dict]]:
    """Units ``part::parts`` of the fixed truth's candidates x seeds, trained as ``truth`` says (a pool worker);
    (block, unit, result) each, a finished unit's result as it was saved."""
    import torch

    from pipeline import runtime
    from pipeline.features import open_features
    from pipeline.space import TEACHER_BLOCKS, build_space, load_teacher_blocks

    torch.set_num_threads(1)
    workspace = truth.workspace
    params = load_params(truth.overrides, root=workspace)
    spec = build_space(params.space, load_teacher_blocks(workspace / TEACHER_BLOCKS)).block(block)
    device = runtime.select_device(params.runtime)
    cache = open_features(workspace / "artifacts/features", teacher_dir=workspace / "artifacts/teacher",
                          prepared_dir=workspace / "data/prepared", device=device, upto=block)
    setup = fidelity.setup_block(params, spec, cache, device, truth.runs(block), "--truth-epochs")
    fixed = fidelity.read_rows(Truth(workspace).table(block), params.fidelity.seeds, "dvc repro validate/dvc.yaml")
    units = [(r["candidate"], k) for r in fixed for k in range(params.fidelity.seeds)]
    return [(block, (cid, k), fidelity.train_unit(setup, cid, k)) for cid, k in units[part::parts]]


def build_truth(truth: Truth, blocks: list[str], seeds: int, jobs: int) -> None:
    """The longer-trained truth's tables: train the missing units (resumable), then one row per candidate with
    the fixed table's score beside the new mean error."""
    from pipeline import runtime

    with runtime.worker_pool(jobs, "spawn") as pool:
        parts = pool.starmap(train_truth_part, [(truth, b, i, jobs) for b in blocks for i in range(jobs)])
    results = [unit for part in parts for unit in part]
    for block in blocks:
        fixed = fidelity.read_rows(Truth(truth.workspace).table(block), seeds, "dvc repro validate/dvc.yaml")
        units = {unit: result for b, unit, result in results if b == block}
        rows = fidelity.block_rows([r["candidate"] for r in fixed], {r["candidate"]: r["score"] for r in fixed},
                                   units, seeds)
        truth.table(block).parent.mkdir(parents=True, exist_ok=True)
        fidelity.write_rows(truth.table(block), rows)


def rank(truth: Truth, root: Path, blocks: list[str], seeds: int, resamples: int, seed: int,
         curves: dict[str, np.ndarray]) -> dict:
    """Per block: the variant's scores of the check's candidates against their stand-alone errors (and against
    their val loss after each epoch, for the blocks in ``curves``)."""
    from scipy.stats import kendalltau

    out = {}
    for block in blocks:
        rows = fidelity.read_rows(truth.table(block), seeds, "dvc repro validate/dvc.yaml")
        table = read_table(root / f"artifacts/scores/{block}.csv")
        scores = dict(zip(table.candidates, table.score.tolist(), strict=True))
        rows = [{**r, "score": scores[r["candidate"]]} for r in rows]
        out[block] = fidelity.block_metrics(rows, seeds, resamples, seed)
        if block in curves:
            score = [r["score"] for r in rows]
            out[block]["tau_by_epoch"] = [float(kendalltau(epoch, score).statistic) for epoch in curves[block].T]
    return out


def stand_alone_curves(truth: Truth, rows: list[dict], block: str, seeds: int) -> np.ndarray:
    """(candidate, epoch) seed-mean val loss of the check's stand-alone units, in the order of ``rows``: which
    stage of stand-alone training the supernet ranks like (an under-trained one ranks like epoch 1)."""
    runs = truth.runs(block)
    try:
        return np.array([[[h["val_loss"] for h in json.loads((runs / r["candidate"].replace(":", ".") / f"seed{k}" /
                                                               fidelity.RESULT).read_text())["history"]]
                          for k in range(seeds)] for r in rows], dtype=float).mean(axis=1)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"--by-epoch needs every stand-alone unit's history under {runs} ({err}): rebuild them "
                            "with `dvc repro validate/dvc.yaml:fidelity_report`, or drop --by-epoch") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="blocks trained at once (one thread each), >= 1")
    parser.add_argument("--blocks", nargs="+", help="only these blocks (default: all of space.blocks)")
    parser.add_argument("--by-epoch", action="store_true",
                        help="also the scores' tau against the stand-alone val loss after each epoch")
    parser.add_argument("--truth-epochs", type=int, default=0,
                        help="rank against the fixed truth's units trained this many epochs (0 = the fixed truth)")
    parser.add_argument("--truth-samples", type=int, default=0,
                        help="with --truth-epochs: those units on this many train samples per epoch (0 = the check's)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    if args.truth_epochs < 0:
        parser.error(f"--truth-epochs {args.truth_epochs}: must be >= 0 (0 = the fixed truth)")
    if args.truth_samples and not args.truth_epochs:
        parser.error("--truth-samples needs --truth-epochs (the fixed truth's units are trained already)")
    workspace = args.workspace.resolve()
    truth = Truth(workspace, args.truth_epochs, args.truth_samples)
    curves = {}
    try:
        params = load_params(root=workspace)
        blocks = args.blocks or list(params.space.blocks)
        stray = [b for b in blocks if b not in params.space.blocks]
        if stray:
            raise SystemExit(f"error: unknown block(s) {', '.join(stray)}: choose from {', '.join(params.space.blocks)}")
        for block in blocks:  # the ground truth must be there before hours of supernet training, not after
            fidelity.read_rows(Truth(workspace).table(block), params.fidelity.seeds, "dvc repro validate/dvc.yaml")
        if args.truth_epochs:
            load_params(truth.overrides, root=workspace)  # a bad N or S: one line, before training
            build_truth(truth, blocks, params.fidelity.seeds, args.jobs)
        for block in blocks:
            rows = fidelity.read_rows(truth.table(block), params.fidelity.seeds, "dvc repro validate/dvc.yaml")
            if args.by_epoch:
                curves[block] = stand_alone_curves(truth, rows, block, params.fidelity.seeds)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    roots = {v: scratch(workspace, v) for v in args.variants}
    jobs = [(v, b) for v in args.variants for b in blocks]
    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = dict(zip(jobs, pool.map(lambda job: run_block(roots[job[0]], job[1], VARIANTS[job[0]]), jobs), strict=True))
    print("| variant | " + " | ".join(f"{b} tau [95%]" for b in blocks) + " | mean tau | supernet min (1 thread) |")
    print("|---|" + "---|" * (len(blocks) + 2))
    for v in args.variants:
        metrics = rank(truth, roots[v], blocks, params.fidelity.seeds, params.fidelity.bootstrap, params.seed,
                       curves)
        minutes = sum(seconds[(v, b)] for b in blocks) / 60
        (roots[v] / "metrics.json").write_text(json.dumps({"overrides": VARIANTS[v], "supernet_minutes": minutes,
                                                           "blocks": metrics}, indent=2) + "\n")
        cells = [f"{m['tau']:.2f} [{m['tau_lo']:.2f}, {m['tau_hi']:.2f}]" for m in metrics.values()]
        mean = sum(m["tau"] for m in metrics.values()) / len(metrics)
        print(f"| {v} | " + " | ".join(cells) + f" | {mean:.2f} | {minutes:.1f} |")
        if args.by_epoch:
            for b, m in metrics.items():
                print(f"|   {b} tau vs stand-alone val loss, epochs 1..{len(m['tau_by_epoch'])} | "
                      + " ".join(f"{t:.2f}" for t in m["tau_by_epoch"]) + " |")


if __name__ == "__main__":
    main()
