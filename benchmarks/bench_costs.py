"""The costs stage on the default space: its wall time, and how well its tables predict whole students' latency.

    .venv/bin/python benchmarks/bench_costs.py [--students 30] [--seed 0] [--onnx] [key=value ...]

1. Runs `python stages/costs.py` (timed, a fresh process as DVC starts it) in a scratch workspace holding
   params.yaml (with the default `space.ops` of pipeline.config, whatever params.yaml lists) and the teacher's
   blocks.json (the repository's when the teacher stage has run, else made by the teacher stage's own
   cut_blocks on an untrained default teacher: the same geometry).
2. Stage tables: reads them back (`read_costs`, fingerprint checked), then builds `--students` random whole
   students as real timm models, times them the way the tables were timed, and compares predicted (block tables +
   fixed parts) with measured latency per batch size.
3. Same rounds: the space's modules and the students timed together, so machine drift between two runs drops out.

`--onnx` repeats 1-3 with costs.backend=onnxruntime. Writes benchmarks/results/costs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import costs, latency, space
from pipeline.config import Space, as_dict, load_params
from pipeline.teacher import create_teacher, cut_blocks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/costs.md"
TARGETS = latency.ADDITIVITY_GOAL


def _workspace(root: Path, overrides: list[str]) -> list[str]:
    """params.yaml + artifacts/teacher/blocks.json in ``root``; returns the overrides the stage runs with."""
    overrides = [f"space.ops=[{','.join(Space().ops)}]", *overrides]
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    teacher = root / space.TEACHER_BLOCKS
    teacher.parent.mkdir(parents=True, exist_ok=True)
    if (REPO / space.TEACHER_BLOCKS).is_file():
        shutil.copy(REPO / space.TEACHER_BLOCKS, teacher)
    else:
        params = load_params(overrides, root=root)
        model = create_teacher(params.teacher, 1, 10)
        blocks = cut_blocks(model, params.teacher.boundaries, 1, params.data.image_size)
        teacher.write_text(json.dumps({"teacher": params.teacher.name, "config": as_dict(params.teacher),
                                       "image_size": params.data.image_size, "in_chans": 1, "num_classes": 10,
                                       "blocks": blocks}, indent=2))
    return overrides


def _stage(root: Path, overrides: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "stages/costs.py"), *overrides], cwd=root, env=env, check=True)
    return time.perf_counter() - start


def _row(label: str, result: latency.Additivity) -> str:
    s = result.summary()
    ok = s["median"] <= TARGETS["median"] and s["p90"] <= TARGETS["p90"]
    return (f"| {label} | {result.batch} | {s['students']} | {100 * s['median']:.1f}% | {100 * s['p90']:.1f}% | "
            f"{100 * s['median_signed']:+.1f}% | {100 * s['max']:.1f}% | "
            f"{s['measured_median_ms']:.2f} | {'yes' if ok else '**no**'} |")


def _run(root: Path, overrides: list[str], students: int, seed: int) -> dict:
    seconds = _stage(root, overrides)
    params = load_params(overrides, root=root)
    spec = space.build_space(params.space, space.load_teacher_blocks(root / space.TEACHER_BLOCKS))
    cfg, channels_last = params.costs, params.runtime.channels_last
    fp = costs.fingerprint(cfg, channels_last)
    out = root / cfg.out_dir
    tables = {f"latency_b{b}": costs.read_costs(out, spec, f"latency_b{b}", fp) for b in cfg.batch_sizes}
    start = time.perf_counter()
    stage_tables, _, _ = latency.additivity(spec, cfg, channels_last, students, seed, tables=tables)
    stage_seconds = time.perf_counter() - start
    teacher = {"teacher": latency.teacher_item(params.teacher, space.load_teacher_blocks(root / space.TEACHER_BLOCKS))}
    teacher_now = latency.time_items(teacher, costs.target(cfg, channels_last), cfg.batch_sizes, cfg.warmup,
                                     cfg.repeats, seed)["teacher"]
    start = time.perf_counter()
    same, _, _ = latency.additivity(spec, cfg, channels_last, students, seed)
    same_seconds = time.perf_counter() - start
    return {"cfg": cfg, "spec": spec, "fingerprint": json.loads((out / costs.FINGERPRINT).read_text()),
            "stage_seconds": seconds, "stage": stage_tables, "same": same,
            "fixed": json.loads((out / costs.FIXED).read_text()), "teacher": json.loads((out / costs.TEACHER).read_text()),
            "seconds": (stage_seconds, same_seconds), "teacher_now": teacher_now}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", action="store_true", help="also measure with costs.backend=onnxruntime")
    parser.add_argument("overrides", nargs="*", help="params overrides for the stage, e.g. costs.repeats=40")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-costs-") as tmp:
        overrides = _workspace(Path(tmp), list(args.overrides))
        runs["torch"] = _run(Path(tmp), overrides, args.students, args.seed)
        if args.onnx:
            runs["onnxruntime"] = _run(Path(tmp), [*overrides, "costs.backend=onnxruntime"], args.students, args.seed)
    load = os.getloadavg()
    first = runs["torch"]
    spec, cfg = first["spec"], first["cfg"]
    counts = "+".join(str(b.num_candidates()) for b in spec.blocks)
    lines = ["# Costs: stage time and additivity of the latency tables", "",
             f"Command: `.venv/bin/python benchmarks/bench_costs.py{''.join(' ' + a for a in sys.argv[1:])}`",
             "", f"Default space ({len(spec.blocks)} blocks, ops {', '.join(Space().ops)}, {counts} = "
             f"{sum(b.num_candidates() for b in spec.blocks)} candidates), costs params "
             f"`{json.dumps(as_dict(cfg))}`; "
             f"load average at the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (2 cores shared with other jobs).", ""]
    for backend, run in runs.items():
        fp = run["fingerprint"]
        lines += [f"## {backend}", "",
                  f"Fingerprint `{fp['id']}`: {costs.describe(fp)}; clock {fp['clock']}, channels_last "
                  f"{fp['channels_last']}, torch {fp['torch']}, timm {fp['timm']}"
                  + (f", onnxruntime {fp['onnxruntime']}" if "onnxruntime" in fp else "") + ".", "",
                  f"**Stage wall time** (`python stages/costs.py`, a fresh process: imports, MLflow run, teacher): "
                  f"**{run['stage_seconds']:.1f} s** (limit 180 s).", "",
                  f"Fixed parts {json.dumps({k: v for k, v in run['fixed'].items() if k != 'parts'})}; teacher "
                  f"{json.dumps(run['teacher'])}.", "",
                  f"{args.students} random whole students (one uniform candidate per block, seed {args.seed}), built "
                  f"as timm `dna_student` models; error = (predicted - measured) / measured; target median <= 5%, "
                  f"p90 <= 10%. Stage tables: the stage's tables, the students timed after it ({run['seconds'][0]:.0f} "
                  f"s); same rounds: `latency.measure_space` (the stage's code) with the students timed in its rounds "
                  f"({run['seconds'][1]:.0f} s); uncalibrated: the same without the calibration factor.", "",
                  "| prediction from | batch | students | median abs | p90 abs | median signed | max abs | "
                  "measured median ms | target met |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for label, key in (("stage tables", "stage"), ("same rounds", "same")):
            lines += [_row(label, result) for result in run[key].values()]
        lines += [_row("same rounds, uncalibrated", result.uncalibrated) for result in run["same"].values()]
        drift = {b: np.median(np.asarray(run["stage"][b].measured) / np.asarray(run["same"][b].measured) - 1)
                 for b in run["same"]}
        teacher = {b: run["teacher_now"][b] / run["teacher"][f"latency_b{b}"] - 1 for b in run["teacher_now"]}
        factors = {k: round(v, 3) for k, v in run["fixed"]["calibration"].items() if k != "students"}
        lines += ["", f"Calibration factors of the stage tables (measured / summed, median of "
                      f"{run['fixed']['calibration']['students']} other students): {factors}.", "",
                  "The machine's own drift (same modules, same code, another minute): the teacher timed right after "
                  "the stage-table students vs in the stage: "
                  + ", ".join(f"{100 * d:+.1f}% (batch {b})" for b, d in teacher.items())
                  + "; the same students in the stage-table run vs the same-rounds run: "
                  + ", ".join(f"{100 * d:+.1f}% (batch {b})" for b, d in drift.items())
                  + ". Stage-table errors include this drift; same-rounds errors are the method's.", ""]
    lines += ["## How the tables are measured", "",
              "Each distinct layer module (op x geometry) at student widths on its real input size, the student's "
              "own stem and head modules, the teacher and `costs.calibrate` whole random students are timed in "
              "shuffled rounds (every module once per round and batch size; median of `costs.repeats`); each sample "
              "is one forward on an input rewritten just before it. A candidate is the sum of its layers, scaled "
              "by the batch size's calibration factor (measured / summed latency of the calibration students, "
              "median). ONNX Runtime: each layer's time less one trivial graph's call (IO-bound inputs); the fixed "
              "parts pay one call. With one thread the clock is the thread's CPU time. The additivity students "
              "are drawn from another seed stream than the calibration students.", "",
              "What was tried before on this machine (2026-12-02, load average 2-3.5; 30 students):", "",
              "- Wall clock, each module timed in a tight loop of >= 5-20 ms: median errors 21-24% (batch 1) and "
              "13-21% (batch 256), mostly under-predicting. Under load from other jobs a whole student (3-300 ms) is "
              "preempted more often than one layer (0.1-30 ms), and a wall-time median does not drop that.",
              "- Thread CPU clock, one forward per sample, without rewriting the input: batch 1 median 5.4%, p90 "
              "10.8% (over-predicting by 5%: a layer reads an input the previous layer would have left in the cache).",
              "- Thread CPU clock, input rewritten before each sample, no calibration: torch batch 1 median 1.8%, p90 "
              "4.1%; batch 256 median 3.6%, p90 6.8%. ONNX Runtime batch 1 (same rounds, 20 students): +17-22% "
              "in three runs: a layer's graph run alone costs more than inside one whole graph.",
              "- Layers warmed by an untimed forward right before each sample (weights in the core's cache): torch "
              "batch 1 under-predicts by 22-30%: in a whole student the other layers evict a layer's weights.",
              "- The machine's speed drifts: an idle guest timed the same modules 2x apart within minutes (host "
              "contention), so stage tables and a later measurement of students agree only as well as the machine "
              "holds still; the same-rounds rows are the additivity of the method.", "",
              "Earlier runs of this benchmark with the method above (2026-12-02, `--onnx`, 30 students; median / "
              "p90 abs error, batch 1 and batch 256):", "",
              "| run | load | torch same rounds | torch stage tables | ONNX RT same rounds | ONNX RT stage tables |",
              "|---|---|---|---|---|---|",
              "| 15:19 | 2.4-3 | 1.4/2.9%, 3.3/8.4% | 13.9/23.4%, 48.0/69.5% (stage under heavier load) | "
              "1.6/4.7%, 0.5/1.8% | 3.4/6.7%, 2.7/4.5% |",
              "| 14:44 (no calibration; ONNX RT without IO binding) | 1-2.5 | 3.0/7.1%, 1.8/3.8% | 4.2/7.6%, 6.5/8.3% | "
              "- | - |", ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
