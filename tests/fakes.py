"""Tiny stand-ins in the real on-disk formats, built in about a second: the helpers every test module shares.

Block side (supernet, score): 1x16x16 images; a fixed random conv teacher cut into three blocks gives 8x8x8,
16x4x4 and 16x2x2 maps. ``make_block_root`` lays out a workspace (params.yaml, blocks.json, the feature cache).

Student side (retrain, report): a real timm resnet18 (8/16/16 channels, random weights) cut like that stand-in, so
the same tiny search space fits it. ``make_student_root`` adds prepared data, the teacher, score tables holding
every candidate with its cost from the space's cost model, and the real assembly's architecture.json.

The fixtures built on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import assembly, costs, space
from pipeline.cli import load_stage  # noqa: F401  (re-exported: tests import it from here)
from pipeline.config import COUNTED_METRICS, Params, Teacher, as_dict, validate
from pipeline.data import Split
from pipeline.features import FeatureCache, write_features
from pipeline.smoke import OVERLAY as SMOKE_OVERLAY
from pipeline.teacher import create_teacher, cut_blocks, save_teacher

REPO = Path(__file__).resolve().parents[1]
CHANNELS, SIZES = (1, 8, 16, 16), (16, 8, 4, 2)
BLOCKS = ["b0", "b1", "b2"]
TINY = {
    "teacher": {"boundaries": [1, 2, 3]},
    "runtime": {"progress": False, "channels_last": True, "threads": 1},
    "space": {"ops": ["k3e3", "k5e6"], "identity": False, "stem": 8, "head": 32,
              "blocks": {"b0": {"width": 8, "cells": [{"layers": 2}]},
                         "b1": {"width": 16, "cells": [{"layers": 3, "width": 8}, {"layers": 1}]},
                         "b2": {"width": 16, "cells": [{"layers": 2}]}}},
    "supernet": {"epochs": 2, "batch_size": 16, "val_samples": 32, "val_paths": 2},
    "score": {"batches": 4, "batch_size": 16, "bn_batch_size": 16},
    "search": {"metric": "params", "budget": 650000, "relative": False},  # counted: tables need no timing
}


class TinyTeacher(torch.nn.Module):
    """Three conv stages (stride 2) standing in for a timm teacher cut at its feature stages."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stages = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, 2, 1)
                                          for i, o in zip(CHANNELS[:-1], CHANNELS[1:], strict=True))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = torch.relu(stage(x))
            outs.append(x)
        return outs


def teacher_blocks() -> dict:
    """blocks.json of the tiny teacher, in the teacher stage's format."""
    return {"teacher": "tiny", "image_size": SIZES[0], "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": name, "boundary": i + 1, "modules": [f"stages.{i}"], "in_channels": CHANNELS[i],
                        "out_channels": CHANNELS[i + 1], "stride": 2, "in_size": [SIZES[i]] * 2,
                        "out_size": [SIZES[i + 1]] * 2} for i, name in enumerate(BLOCKS)]}


def tiny_yaml(overrides: Sequence[str] = ()) -> DictConfig:
    """params.yaml under the smoke overlay (configs/smoke.yaml), then the tiny space (its block dict replaced, not
    merged), a params search without limits (tests that time latency say so) and ``overrides``: the settings
    `make smoke` runs, shrunk to the stand-in teacher."""
    base = OmegaConf.merge(OmegaConf.load(REPO / "params.yaml"), OmegaConf.load(REPO / SMOKE_OVERLAY))
    base.space.blocks = {}
    base.search.limits = {}
    return OmegaConf.merge(base, TINY, OmegaConf.from_dotlist(list(overrides)))


def tiny_params(overrides: Sequence[str] = ()) -> Params:
    return validate(tiny_yaml(overrides))


# One name per searchable op type: tests parametrised over these cover a newly registered type unchanged.
OP_EXAMPLES = [op_type.example for kind, op_type in space.OP_TYPES.items() if kind != space.SKIP]
EVERY_OP = f"space.ops=[{','.join(OP_EXAMPLES)}]"  # a tiny-params override mixing every op type


def rotating_choice(spec: space.SpaceSpec) -> dict[str, str]:
    """One candidate per block (its first cell) whose layers take ``space.ops`` in turn across the network, so the
    network holds every op once it has as many layers as there are ops."""
    ops = itertools.cycle(spec.blocks[0].cells[0].layers[0].choices)  # a cell's first layer never offers a skip
    return {b.name: space.candidate_id(b.cells[0], [next(ops) for _ in b.cells[0].layers]) for b in spec.blocks}


def write_cache(out: Path, n_train: int = 256, n_val: int = 64) -> FeatureCache:
    rng = np.random.default_rng(0)
    splits = {s: Split(rng.integers(0, 256, (n, 1, SIZES[0], SIZES[0]), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (("train", n_train), ("val", n_val))}
    write_features(out, splits, TinyTeacher().eval(), BLOCKS, lambda u8: u8.float() / 64 - 2, dtype="float16",
                   batch_size=64, chunk_size=256, teacher_sha256="t" * 64, show_progress=False)
    return FeatureCache(out)


def make_block_root(root: Path, n_train: int = 256, n_val: int = 64, overrides: Sequence[str] = ()) -> Path:
    """A workspace for the supernet and score stages: params.yaml, the teacher split, the feature cache."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml(overrides)))
    teacher = root / "artifacts/teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    (teacher / "blocks.json").write_text(json.dumps(teacher_blocks()))
    write_cache(root / "artifacts/features", n_train, n_val)
    return root


def copy_root(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("mlflow.db*", "mlruns"))
    return dest


def resnet18_blocks() -> dict:
    """The default teacher's split: narrow resnet18 at 28 px, layer1..layer4 (32/64/128/256 channels)."""
    chans, sizes = [1, 32, 64, 128, 256], [28, 14, 7, 4, 2]
    return {"teacher": "resnet18", "image_size": 28, "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": f"b{i}", "boundary": i + 1, "modules": [f"layer{i + 1}"], "in_channels": chans[i],
                        "out_channels": chans[i + 1], "stride": 2, "in_size": [sizes[i]] * 2,
                        "out_size": [sizes[i + 1]] * 2} for i in range(4)]}


# ---------------------------------------------------------------------------------------------------- student side

SPLIT_SIZES = {"train": 96, "val": 32, "test": 32}
TEACHER = Teacher(name="resnet18", kwargs={"channels": [8, 16, 16, 16], "stem_width": 8}, stem_pool=False,
                  boundaries=[1, 2, 3])
RETRAIN = [
    "runtime.progress=false", "runtime.threads=1",
    "retrain.train.epochs=2", "retrain.train.batch_size=32", "retrain.train.eval_batch_size=64",
    "retrain.train.warmup_epochs=0", "retrain.train.augment.erase_prob=0.25",
    "retrain.init=scratch", "retrain.kd_weight=0.5", "retrain.ema=0.9", "retrain.registry_name=tiny-student",
    "costs.batch_sizes=[1,4]", "report.latency_repeats=2",
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
    blocks = cut_blocks(model, TEACHER.boundaries, 1, SIZES[0])
    split = {"teacher": TEACHER.name, "config": as_dict(TEACHER), "image_size": SIZES[0], "in_chans": 1,
             "num_classes": 10, "blocks": blocks}
    save_teacher(model, split, out)
    return split


def write_scores(out: Path, spec: space.SpaceSpec, seed: int = 0) -> None:
    """One score table per block, as the score stage writes it: every candidate, a score that favours bigger ones."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for block in spec.blocks:
        with open(out / f"{block.name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["candidate", "score", "mse"])
            for cid in block.candidates():
                score = 1.0 / (1 + space.candidate_cost(block, cid).params / 1000) + rng.normal(0, 0.01)
                writer.writerow([cid, score, score / 2])


def write_counted_costs(out: Path, spec: space.SpaceSpec) -> None:
    """The costs stage's folder with the counted metrics only (params, FLOPs): nothing timed, seconds to build."""
    blocks = {b.name: {cid: space.candidate_cost(b, cid).counted() for cid in b.candidates()} for b in spec.blocks}
    tables = costs.CostTables(list(COUNTED_METRICS), blocks, space.fixed_parts_cost(spec).counted(),
                              {}, {"batch_sizes": [], "id": "counted"})
    costs.write_costs(out, spec, tables)


def assemble(root: Path, params: Params) -> dict:
    """The assemble stage's architecture.json and pareto.csv (its figure and MLflow run left out: seconds here)."""
    result = assembly.assemble(assembly.problem(params, assembly.read_tables(root / params.search.scores_dir), root),
                               params.search)
    content = assembly.summary(result, params.search)
    out = root / params.search.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "architecture.json").write_text(json.dumps(content, indent=2))
    assembly.write_front(out / "pareto.csv", result.front, result.tables)
    return content


def params_at(root: Path) -> Params:
    return validate(OmegaConf.load(root / "params.yaml"))


def make_student_root(root: Path, overrides: Sequence[str] = (), budget_fraction: float = 0.6) -> Path:
    """params.yaml, data/prepared, artifacts/teacher, artifacts/scores, artifacts/costs (counted), artifacts/search
    (budget between the cheapest
    and the largest architecture), metrics/teacher.json and plots/teacher.csv."""
    root.mkdir(parents=True, exist_ok=True)
    write_prepared(root / "data/prepared")
    split = write_teacher(root / "artifacts/teacher")
    (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml([*RETRAIN, *overrides])))
    params = params_at(root)
    spec = space.build_space(params.space, split)
    write_scores(root / params.search.scores_dir, spec)
    write_counted_costs(root / params.costs.out_dir, spec)
    tables = assembly.problem(params, assembly.read_tables(root / params.search.scores_dir), root).tables
    fixed = space.fixed_parts_cost(spec).params
    exact = assembly.ExactSearch([t.params for t in tables], [t.score for t in tables], fixed)
    budget = int(exact.cheapest + budget_fraction * (exact.front().cost[-1] - exact.cheapest))
    (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml([*RETRAIN, *overrides, f"search.budget={budget}"])))
    assemble(root, params_at(root))
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/teacher.json").write_text(json.dumps({"val/acc": 0.5, "test/acc": 0.5, "params": 1}))
    (root / "plots").mkdir(exist_ok=True)
    (root / "plots/teacher.csv").write_text("epoch,val/acc\n0,0.3\n1,0.5\n")
    return root
