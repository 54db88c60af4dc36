"""Training images/s of retrained students of the default space vs the default teacher, and the cost of distillation.

    .venv/bin/python benchmarks/bench_retrain.py [--rounds 3] [--steps 8] [--threads 1]

One process, one training step recipe (AdamW via timm, batch 128, 28x28, channels_last, label-smoothed CE): the
teacher and students whose blocks all use one op (the cheapest k3e3, k5e6, the largest k7e6) take turns every
round, so load from other processes hits them alike and the ratios hold even when the absolute numbers drift.
"+KD" adds the teacher's forward pass for the distillation loss (retrain.kd_weight > 0). Writes
benchmarks/results/retrain.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from pipeline import retrain, space, student
from pipeline.config import load_params
from pipeline.teacher import create_teacher

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/retrain.md"
TEACHER_QUIET = 674  # teacher train images/s alone on this machine, benchmarks/results/teacher.md
BATCH, TRAIN_IMAGES, OPS = 128, 54_000, ("k3e3", "k5e6", "k7e6")


def _split(params) -> dict:
    """The default teacher's block split at 28 px (what artifacts/teacher/blocks.json holds)."""
    chans, sizes = [1, *params.teacher.kwargs["channels"]], [28, 14, 7, 4, 2]
    return {"teacher": "resnet18", "image_size": 28, "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": f"b{i}", "in_channels": chans[i], "out_channels": chans[i + 1], "stride": 2,
                        "in_size": [sizes[i]] * 2, "out_size": [sizes[i + 1]] * 2} for i in range(4)]}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _stepper(model: torch.nn.Module, loss_fn: Callable | None = None) -> Callable[[], None]:
    model = model.train().to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), generator=gen)

    def step() -> None:
        logits = model(x)
        loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model and round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = load_params(root=REPO)
    spec = space.build_space(params.space, _split(params))
    meta = {"num_classes": 10, "in_chans": 1, "image_size": 28, "mean": [0.286], "std": [0.353]}
    teacher = create_teacher(params.teacher, 1, 10).to(memory_format=torch.channels_last)
    steppers, costs = {"teacher": _stepper(teacher)}, {"teacher": space.module_cost(teacher, (1, 28, 28))}
    for op in OPS:
        choice = {b.name: "-".join([op] * len(b.cells[0].layers)) for b in spec.blocks}
        model = student.create(student.model_args(spec, choice), meta)
        costs[f"student {op}"] = costs[f"student {op} +KD"] = space.module_cost(model, (1, 28, 28))
        steppers[f"student {op}"] = _stepper(model)
        kd = retrain.distillation_loss(teacher.eval(), 0.5, 2.0, 0.1)
        steppers[f"student {op} +KD"] = _stepper(student.create(student.model_args(spec, choice), meta), kd)
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if round_:
                rates[name].append(args.steps * BATCH / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = ["# Retrain stage: training speed of searched students vs the teacher", "",
             f"Command: `.venv/bin/python benchmarks/bench_retrain.py --rounds {args.rounds} --steps {args.steps} "
             f"--threads {args.threads}`, {_cpu()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}. The machine is shared, so absolute numbers drift; the ratio column was "
             f"measured in one run with the models taking turns.", "",
             "| model | params | MACs | train images/s (median) | vs teacher | projected epoch s | projected 10 epochs min |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rate in median.items():
        ratio = rate / median["teacher"]
        epoch = TRAIN_IMAGES / (ratio * TEACHER_QUIET)
        lines.append(f"| {name} | {costs[name].params:,} | {costs[name].flops:,} | {rate:.0f} | {ratio:.2f} | "
                     f"{epoch:.0f} | {10 * epoch / 60:.1f} |")
    lines += ["", f"Projection: the ratio times the teacher's {TEACHER_QUIET} images/s measured alone on this machine "
              "(benchmarks/results/teacher.md, 2 threads), 54,000 train images per epoch, validation excluded "
              "(a few seconds per epoch)."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
