"""A tiny stand-in for the teacher and its feature cache: real on-disk formats, learnable targets, seconds to build.

Images are 1x16x16; a fixed random conv teacher cut into three blocks gives 8x8x8, 16x4x4 and 16x2x2 maps.
``make_root`` lays out a repository root (params.yaml, blocks.json, the feature cache) that the stages run in.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Params, validate
from pipeline.data import Split
from pipeline.features import FeatureCache, write_features

REPO = Path(__file__).resolve().parents[1]
CHANNELS, SIZES = (1, 8, 16, 16), (16, 8, 4, 2)
BLOCKS = ["b0", "b1", "b2"]
TINY = {
    "teacher": {"boundaries": [1, 2, 3]},
    "runtime": {"progress": False, "channels_last": True, "threads": 1},
    "space": {"ops": ["k3e3", "k5e6"], "stem": 8, "head": 32,
              "blocks": {"b0": {"index": 0, "width": 8, "cells": [{"layers": 2}]},
                         "b1": {"index": 1, "width": 16, "cells": [{"layers": 3, "width": 8}, {"layers": 1}]},
                         "b2": {"index": 2, "width": 16, "cells": [{"layers": 2}]}}},
    "supernet": {"epochs": 2, "batch_size": 16, "val_samples": 32, "val_paths": 2},
    "score": {"batches": 4, "batch_size": 16, "bn_batch_size": 16},
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


def teacher_split() -> dict:
    """blocks.json of the tiny teacher, in the teacher stage's format."""
    return {"teacher": "tiny", "image_size": SIZES[0], "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": name, "boundary": i + 1, "modules": [f"stages.{i}"], "in_channels": CHANNELS[i],
                        "out_channels": CHANNELS[i + 1], "stride": 2, "in_size": [SIZES[i]] * 2,
                        "out_size": [SIZES[i + 1]] * 2} for i, name in enumerate(BLOCKS)]}


def _tiny_yaml(overrides: Sequence[str] = ()) -> DictConfig:
    """The repository's params.yaml with the tiny space (its block dict replaced, not merged) and overrides."""
    base = OmegaConf.load(REPO / "params.yaml")
    base.space.blocks = {}
    return OmegaConf.merge(base, TINY, OmegaConf.from_dotlist(list(overrides)))


def tiny_params(overrides: Sequence[str] = ()) -> Params:
    return validate(_tiny_yaml(overrides))


def write_cache(out: Path, n_train: int = 256, n_val: int = 64) -> FeatureCache:
    rng = np.random.default_rng(0)
    splits = {s: Split(rng.integers(0, 256, (n, 1, SIZES[0], SIZES[0]), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (("train", n_train), ("val", n_val))}
    write_features(out, splits, TinyTeacher().eval(), BLOCKS, lambda u8: u8.float() / 64 - 2, dtype="float16",
                   batch_size=64, chunk_size=256, teacher_sha256="t" * 64, show_progress=False)
    return FeatureCache(out)


def make_root(root: Path, n_train: int = 256, n_val: int = 64, overrides: Sequence[str] = ()) -> Path:
    """A repository root for the supernet and score stages: params.yaml, the teacher split, the feature cache."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(OmegaConf.to_yaml(_tiny_yaml(overrides)))
    teacher = root / "artifacts/teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    (teacher / "blocks.json").write_text(json.dumps(teacher_split()))
    write_cache(root / "artifacts/features", n_train, n_val)
    return root


def load_stage(name: str) -> ModuleType:
    """A stage script (stages/<name>.py) as a module, for in-process calls of its ``run``."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_root(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("mlflow.db*", "mlruns"))
    return dest


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on this shared 2-core machine two threads spin against other jobs (5-25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
