"""``python -m pipeline.describe [ARCHITECTURE.json ...] [key=value ...]``: the search space in numbers.

Prints every block's cells and candidate count, the number of whole networks the space holds
(``space.num_architectures``), and for each architecture file (``architecture.json`` format: one candidate id per
block) its membership and its params, FLOPs and DNA-counted FLOPs as built by the student builder. The geometry is
the teacher stage's ``blocks.json`` when the workspace has one, else the configured teacher cut now with random
weights (no download), with the timm model's own input channels and classes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import latency, space, student
from pipeline.config import ConfigError, Params, as_dict, load_params, repo_root
from pipeline.errors import PipelineError
from pipeline.teacher import create_teacher, cut_blocks

log = logging.getLogger(__name__)


def teacher_split(params: Params, root: Path) -> dict[str, Any]:
    """The workspace's ``blocks.json``, else the configured teacher's split at ``data.image_size``."""
    path = root / space.TEACHER_BLOCKS
    if path.is_file():
        return space.load_teacher_blocks(path)
    import timm

    default = timm.create_model(params.teacher.name, pretrained=False).pretrained_cfg  # the model's own classes
    in_chans, classes = int(default.get("input_size", (3,))[0]), int(default.get("num_classes", 1000))
    model = create_teacher(replace(params.teacher, pretrained=False, checkpoint=""), in_chans, classes)
    return {"teacher": params.teacher.name, "config": as_dict(params.teacher), "image_size": params.data.image_size,
            "in_chans": in_chans, "num_classes": classes,
            "blocks": cut_blocks(model, list(params.teacher.boundaries), in_chans, params.data.image_size)}


def space_summary(spec: space.SpaceSpec) -> dict[str, Any]:
    """Per block: its cells (name, layers, widths read and written) and candidates; the architecture count."""
    blocks = {b.name: {"candidates": b.num_candidates(),
                       "cells": [{"name": c.name, "layers": len(c.layers), "reads": c.layers[0].student_in,
                                  "writes": c.layers[-1].student_out} for c in b.cells]} for b in spec.blocks}
    return {"blocks": blocks, "architectures": space.num_architectures(spec)}


def architecture_cost(path: Path | str, spec: space.SpaceSpec) -> space.Cost:
    """An architecture file built by the student builder and counted; one line naming the file if it does not fit."""
    choice = student.choice_of(student.read_architecture(path), spec, str(path), rebuild=f"edit {path}")
    return space.module_cost(latency.build_student(spec, choice), (spec.stem.in_chs, *spec.stem.in_size))


def report(spec: space.SpaceSpec, paths: Sequence[str]) -> str:
    summary = space_summary(spec)
    lines = [f"{name}: {b['candidates']:,} candidates in {len(b['cells'])} cell(s): "
             + ", ".join(f"{c['name'] or 'cell'} ({c['layers']} layers, {c['reads']}->{c['writes']} ch)"
                         for c in b["cells"]) for name, b in summary["blocks"].items()]
    lines.append(f"architectures: {summary['architectures']:,} ({summary['architectures']:.3g})")
    lines += [f"{path}: {_costs(architecture_cost(path, spec).counted())}" for path in paths]
    return "\n".join(lines)


def _costs(counted: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:,.0f}" for name, value in counted.items())


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    paths, overrides = [a for a in argv if "=" not in a], [a for a in argv if "=" in a]
    try:
        params = load_params(overrides)
        print(report(space.build_space(params.space, teacher_split(params, repo_root())), paths))
    except (PipelineError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
