"""The closing report: teacher vs searched student (accuracy, params, FLOPs, CPU latency), the Pareto front with the
chosen point, the per-block supernet loss curves and both training curves, as ``metrics/summary.json`` for
``dvc metrics show/diff`` and a Markdown page with PNG figures that reads offline.

Costs of both models come from the search space's one counter (``pipeline.space.module_cost``: parameters and
multiply-accumulates), the counter the budget was enforced with, so the report's costs and the search's never
disagree.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.assembly import Architecture, Front, plot_front
from pipeline.checkpoint import ArtifactError

FIGURES = {"pareto": "pareto.png", "supernet": "supernet_loss.png", "training": "training.png"}


def read_rows(path: Path) -> list[dict[str, float]]:
    """A per-epoch CSV (DVC plots format) as float rows; a missing file reads as no rows."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def summarize(teacher: Mapping[str, float], student: Mapping[str, float], architecture: Mapping[str, Any],
              front_points: int) -> dict[str, Any]:
    """``metrics/summary.json``: both models side by side, the student/teacher ratios, the search result.

    ``teacher`` and ``student`` hold test_acc, val_acc, params and flops: results, identical on a rerun (the
    measured latency is ``latency_summary``'s, in its own file).
    """
    ratio = {"params": student["params"] / teacher["params"], "flops": student["flops"] / teacher["flops"],
             "test_acc_delta": student["test_acc"] - teacher["test_acc"]}
    search = {"metric": architecture.get("metric"), "budget": architecture.get("budget") or 0,
              "limits": architecture.get("limits") or {}, "score": architecture.get("score"),
              "front_points": front_points}
    return {"teacher": dict(teacher), "student": dict(student), "student_vs_teacher": ratio, "search": search}


def latency_summary(measured: Mapping[str, Mapping[int, float]], architecture: Mapping[str, Any],
                    tolerance: float) -> dict[str, Any]:
    """``metrics/latency.json``: the measured latency of teacher and student (ms), the student / teacher ratio, and
    the assembly's prediction from the cost tables beside the measurement: within ``costs.tolerance`` or not."""
    out: dict[str, Any] = {name: {f"latency_b{b}": ms for b, ms in rows.items()} for name, rows in measured.items()}
    out["student_vs_teacher"] = {k: out["student"][k] / v for k, v in out["teacher"].items()}
    predicted = {k: float(architecture[k]) for k in out["student"] if k in architecture}
    if predicted:
        errors = {k: (v - out["student"][k]) / out["student"][k] for k, v in predicted.items()}
        out["predicted"] = {"student": predicted, "relative_error": errors, "tolerance": tolerance,
                            "within_tolerance": all(abs(e) <= tolerance for e in errors.values()),
                            "fingerprint": architecture.get("costs_fingerprint", "")}
    return out


# ---------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_front(path: Path) -> Front:
    """The assemble stage's ``pareto.csv`` (cost, score, one candidate column per block) as a front to plot."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: build it with `dvc repro assemble` (or point search.out_dir at it)")
    with open(path, newline="") as f:
        rows = [(float(r["cost"]), float(r["score"])) for r in csv.DictReader(f)]
    cost, score = (np.array(c, dtype=np.float64) for c in zip(*rows, strict=True)) if rows else (np.zeros(0),) * 2
    return Front(cost, score, np.zeros((len(rows), 0), dtype=np.int64))


def plot_pareto(path: Path, front: Front, architecture: Mapping[str, Any]) -> None:
    """The assembly's own figure, redrawn from pareto.csv, with the chosen architecture as a star."""
    metric = architecture.get("metric", "params")
    chosen = Architecture((), float(architecture.get("score", 0.0)), float(architecture.get(metric, 0.0)))
    plot_front(path, front, chosen, metric, architecture.get("budget"))


def plot_supernet(path: Path, curves: Mapping[str, list[dict[str, float]]]) -> None:
    """Per block: train (dashed) and val (solid) MSE of the supernet per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (block, rows) in enumerate(sorted(curves.items())):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["val_loss"] for r in rows], c=color, marker="o", ms=3, label=f"{block} val")
        if all("train_loss" in r for r in rows):
            ax.plot(epochs, [r["train_loss"] for r in rows], c=color, ls="--", lw=1, label=f"{block} train")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("block MSE to the teacher's features")
    ax.set_title("Supernet training per block")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(path: Path, curves: Mapping[str, list[dict[str, float]]]) -> None:
    """Val accuracy per epoch of the teacher and the retrained student."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        if rows:
            ax.plot([r["epoch"] + 1 for r in rows], [r["val/acc"] for r in rows], marker="o", ms=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def additivity_lines(additivity: Mapping[str, Any]) -> list[str]:
    """The additivity stage's table: how well summed tables predict whole random students (``same_rounds``: the
    method; ``stage_tables``: what the search used, with the machine's drift since the costs stage)."""
    if not additivity.get("same_rounds"):
        return ["", "Additivity not measured (costs.additivity=0)."]
    goal = additivity["targets"]
    lines = ["", f"## Additivity: {additivity['students']} random whole students, predicted vs measured", "",
             f"Goal: median relative error <= {100 * goal['median']:.0f}%, 90th percentile <= "
             f"{100 * goal['p90']:.0f}%.", "",
             "| prediction from | metric | median | p90 | max | median signed |", "|---|---|---:|---:|---:|---:|"]
    for name, label in (("same_rounds", "tables timed in the same rounds"), ("stage_tables", "the costs stage's")):
        for metric, s in additivity.get(name, {}).items():
            lines.append(f"| {label} | {metric} | {100 * s['median']:.1f}% | {100 * s['p90']:.1f}% | "
                         f"{100 * s['max']:.1f}% | {100 * s['median_signed']:+.1f}% |")
    return lines


def markdown(summary: Mapping[str, Any], latency: Mapping[str, Any], architecture: Mapping[str, Any],
             names: Mapping[str, str], figures: Mapping[str, bool], additivity: Mapping[str, Any] | None = None) -> str:
    """The report page; figures are linked by relative path, so the folder reads offline as it is."""
    t = {**summary["teacher"], **latency["teacher"]}
    s = {**summary["student"], **latency["student"]}
    r = summary["student_vs_teacher"]
    keys = ["test_acc", "val_acc", "params", "flops", *latency["teacher"]]
    lines = ["# DNA report: teacher vs searched student", "",
             f"Teacher `{names['teacher']}`; student `{names['student']}` (timm EfficientNet built from the searched "
             f"arch strings). FLOPs are multiply-accumulates; latency_b<N> is the median CPU time (ms) of one forward "
             f"at batch N, both models timed in turns in this run.", "",
             "| | teacher | student | student / teacher |", "|---|---:|---:|---:|"]
    ratios = {"params": r["params"], "flops": r["flops"], "test_acc": r["test_acc_delta"],
              **latency["student_vs_teacher"]}
    for key in keys:
        rel = ratios.get(key)
        rel_text = "" if rel is None else (f"{rel:+.4f} (delta)" if key == "test_acc" else f"{rel:.3f}")
        lines.append(f"| {key} | {_fmt(t.get(key, ''))} | {_fmt(s.get(key, ''))} | {rel_text} |")
    if "predicted" in latency:
        pred = latency["predicted"]
        lines += ["", "Predicted from the cost tables (fingerprint " + f"`{pred['fingerprint']}`): " + ", ".join(
            f"{k} {v:.3f} ms ({100 * pred['relative_error'][k]:+.1f}%)" for k, v in pred["student"].items())
            + f"; tolerance {100 * pred['tolerance']:.0f}%: " + ("met" if pred["within_tolerance"] else "**missed**")]
    lines += additivity_lines(additivity or {})
    search = summary["search"]
    limits = "".join(f", {m} <= {_fmt(v)}" for m, v in search.get("limits", {}).items())
    lines += ["", "## Searched architecture", "",
              f"Summed block score {_fmt(search['score'])}, {search['metric']} budget "
              f"{_fmt(search['budget']) if search['budget'] else 'none'}{limits}, {search['front_points']} Pareto "
              "points.", "",
              "| block | candidate | timm arch strings |", "|---|---|---|"]
    arch = architecture.get("arch") or [[] for _ in architecture.get("candidates", [])]
    blocks = architecture.get("blocks") or [f"b{i}" for i in range(len(arch))]
    for block, cid, strings in zip(blocks, architecture.get("candidates", []), arch, strict=False):
        lines.append(f"| {block} | `{cid}` | {', '.join(f'`{a}`' for a in strings)} |")
    captions = {"pareto": "Pareto front of the search (total cost vs summed block score); the star is the chosen "
                          "architecture", "supernet": "Supernet loss per block (train dashed, val solid)",
                "training": "Val accuracy per epoch, teacher and retrained student"}
    for key, file in FIGURES.items():
        lines += ["", f"## {captions[key]}", ""]
        lines.append(f"![{captions[key]}]({file})" if figures.get(key) else "_no data for this figure_")
    return "\n".join(lines) + "\n"
