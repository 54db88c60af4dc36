"""A tiny repository root for the retrain and report stages, in the real on-disk formats, built in about a second.

The teacher is a real timm resnet18 (8/16/16 channels, random weights) cut like ``tests.blockfakes``' stand-in
(1x16x16 images -> 8x8x8, 16x4x4, 16x2x2), so the tiny search space of ``blockfakes`` fits it. The architecture
comes out of the real assembly, run on score tables that hold every candidate with its cost from the space's cost
model, so the retrain stage sees exactly what the assemble stage writes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import assembly, space
from pipeline.config import Params, Teacher, as_dict, validate
from pipeline.teacher import block_split, create_teacher, save_teacher
from tests.blockfakes import SIZES, _tiny_yaml

SPLIT_SIZES = {"train": 96, "val": 32, "test": 32}
TEACHER = Teacher(name="resnet18", kwargs={"channels": [8, 16, 16, 16], "stem_width": 8}, stem_pool=False,
                  boundaries=[1, 2, 3])
RETRAIN = [
    "runtime.progress=false", "runtime.threads=1",
    "retrain.train.epochs=2", "retrain.train.batch_size=32", "retrain.train.eval_batch_size=64",
    "retrain.train.warmup_epochs=0", "retrain.train.augment.erase_prob=0.25",
    "retrain.init=scratch", "retrain.kd_weight=0.5", "retrain.ema=0.9", "retrain.registry_name=tiny-student",
    "report.latency_batches=[1,4]", "report.latency_repeats=2",
    "search.metric=params",
]


def write_prepared(out: Path, seed: int = 0) -> dict:
    """``data/prepared`` of 16x16 one-channel images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 64, (n, 1, SIZES[0], SIZES[0])) + labels[:, None, None, None] * 18
        arrays[split] = images.astype(np.uint8)
        np.save(out / f"{split}_images.npy", arrays[split])
        np.save(out / f"{split}_labels.npy", labels.astype(np.int64))
    train = arrays["train"] / 255
    meta = {"name": "tiny", "num_classes": 10, "in_chans": 1, "image_size": SIZES[0], "mean": [float(train.mean())],
            "std": [float(train.std())], "classes": [f"c{i}" for i in range(10)], "sizes": SPLIT_SIZES}
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "splits.json").write_text(json.dumps({"seed": seed}))  # the split record prepare writes
    return meta


def write_teacher(out: Path) -> dict:
    """A real timm teacher (untrained) and its blocks.json, as the teacher stage writes them."""
    model = create_teacher(TEACHER, 1, 10)
    blocks = block_split(model, TEACHER.boundaries, 1, SIZES[0])
    split = {"teacher": TEACHER.name, "config": as_dict(TEACHER), "image_size": SIZES[0], "in_chans": 1,
             "num_classes": 10, "blocks": blocks}
    save_teacher(model, split, out)
    return split


def write_scores(out: Path, spec: space.SpaceSpec, seed: int = 0) -> None:
    """One table per block: every candidate, a score that favours bigger ones, its cost from the space."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for block in spec.blocks:
        with open(out / f"block_{block.index}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(assembly.COLUMNS)
            for cid in block.candidates():
                cost = space.candidate_cost(block, cid)
                writer.writerow([cid, 1.0 / (1 + cost.params / 1000) + rng.normal(0, 0.01), cost.params, cost.flops])


def assemble(root: Path, params: Params) -> dict:
    """The assemble stage's architecture.json and pareto.csv (its figure and MLflow run left out: seconds here)."""
    tables, fixed, arch = assembly.link_space(params, assembly.read_tables(root / params.search.scores_dir), root)
    result = assembly.assemble(tables, params.search, fixed)
    content = assembly.summary(result, arch)
    out = root / params.search.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "architecture.json").write_text(json.dumps(content, indent=2))
    assembly.write_front(out / "pareto.csv", result.front, result.tables)
    return content


def params_at(root: Path) -> Params:
    return validate(OmegaConf.load(root / "params.yaml"))


def make_root(root: Path, overrides: Sequence[str] = (), budget_fraction: float = 0.6) -> Path:
    """params.yaml, data/prepared, artifacts/teacher, artifacts/scores, artifacts/search (budget between the cheapest
    and the largest architecture), metrics/teacher.json and plots/teacher.csv."""
    root.mkdir(parents=True, exist_ok=True)
    write_prepared(root / "data/prepared")
    split = write_teacher(root / "artifacts/teacher")
    (root / "params.yaml").write_text(OmegaConf.to_yaml(_tiny_yaml([*RETRAIN, *overrides])))
    params = params_at(root)
    spec = space.build_space(params.space, split)
    write_scores(root / params.search.scores_dir, spec)
    tables = assembly.read_tables(root / params.search.scores_dir)
    fixed = space.fixed_parts_cost(spec).params
    exact = assembly.ExactSearch([t.params for t in tables], [t.score for t in tables], fixed)
    budget = int(exact.cheapest + budget_fraction * (exact.front().cost[-1] - exact.cheapest))
    (root / "params.yaml").write_text(OmegaConf.to_yaml(_tiny_yaml([*RETRAIN, *overrides, f"search.budget={budget}"])))
    assemble(root, params_at(root))
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/teacher.json").write_text(json.dumps({"val/acc": 0.5, "test/acc": 0.5, "params": 1}))
    (root / "plots").mkdir(exist_ok=True)
    (root / "plots/teacher.csv").write_text("epoch,val/acc\n0,0.3\n1,0.5\n")
    return root
