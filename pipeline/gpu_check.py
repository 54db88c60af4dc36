"""``python -m pipeline.gpu_check [DIR]`` (``make gpu-check``): does the pipeline run on a GPU and agree with the CPU?

On a CUDA machine, three smoke workspaces under DIR (default ``.gpu-check``; ``pipeline.smoke.make_workspace``:
params.yaml + configs/smoke.yaml + overrides) run the whole DAG: ``cpu``, ``cuda`` (amp off) and ``cuda-amp``
(bfloat16, or float16 with a GradScaler on GPUs without bfloat16); the CPU run goes alongside the CUDA ones. Then
supernet block b0 is retrained in ``cuda`` by a 1-GPU ``torchrun`` (DDP over NCCL), the pinned, prefetched feature
batches on the GPU are compared with the CPU reader's, the score tables (``artifacts/scores/<block>.csv``) of both
CUDA runs are compared with the CPU run's (Kendall tau per block) and images/s per stage are read from the plots
and metrics the stages write. About 3-4 minutes on one GPU.

Without CUDA it says so and dry-runs everything but the device, then exits 0: the workspaces are built (which
validates the params with the CUDA overrides), their params load as the stages load them, ``dvc repro --dry
--force`` lists every stage in each, and the torchrun command is composed and its entry points found.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.report import read_rows
from pipeline.smoke import make_workspace

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent  # dvc and torchrun installed beside this interpreter
SCORES = Path("artifacts/scores")
TORCHRUN_BLOCK = "b0"
MIN_TAU = 0.5  # below it a CUDA run ranks candidates unlike the CPU run: worth a look, not a failure
TIMEOUT_S = 900  # one workspace's DAG; a hang fails the check instead of blocking it


def runs(cores: int) -> dict[str, list[str]]:
    """Workspace name -> params overrides. The CPU run gets half the cores: the CUDA runs need the others."""
    return {"cpu": ["runtime.device=cpu", f"runtime.threads={max(1, cores // 2)}"],
            "cuda": ["runtime.device=cuda", "runtime.amp=false"],
            "cuda-amp": ["runtime.device=cuda", "runtime.amp=true"]}


def torchrun_command(block: str = TORCHRUN_BLOCK) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1", "stages/supernet.py", f"block={block}"]


def build(dest: Path, src: Path, overrides: Mapping[str, Sequence[str]]) -> dict[str, Path]:
    """A fresh smoke workspace per run (outputs of an earlier check would make ``dvc repro`` skip stages)."""
    roots = {}
    for name, extra in overrides.items():
        shutil.rmtree(dest / name, ignore_errors=True)
        roots[name] = make_workspace(src, dest / name, extra)
    return roots


def dry_run(roots: Mapping[str, Path]) -> dict[str, list[str]]:
    """Everything but the device: params load in each workspace, DVC plans every stage, torchrun's parts exist.

    Returns the stages ``dvc repro --dry --force`` would run (all: the workspaces are fresh), per workspace.
    """
    for root in roots.values():
        load_params(root=root)
    missing = [str(p) for p in (BIN / "dvc", BIN / "torchrun") if not p.is_file()]
    missing += [str(r / "stages/supernet.py") for r in roots.values() if not (r / "stages/supernet.py").is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: run `make setup`")
    procs = {name: subprocess.Popen([str(BIN / "dvc"), "repro", "--dry", "--force"], cwd=root, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=_env())
             for name, root in roots.items()}
    planned = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        if proc.returncode:
            raise RuntimeError(f"`dvc repro --dry --force` failed in {roots[name]}: {out.strip().splitlines()[-1:]}")
        planned[name] = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    return planned


def score_taus(reference: Path, other: Path) -> dict[str, float]:
    """Kendall tau per block between two workspaces' score tables, candidates matched by id."""
    taus = {}
    for path in sorted((reference / SCORES).glob("*.csv")):
        a, b = _scores(path), _scores(other / SCORES / path.name)
        if set(a) != set(b):
            raise RuntimeError(f"{path.name}: the two runs rated different candidates")
        cids = sorted(a)
        taus[path.stem] = float(kendalltau([a[c] for c in cids], [b[c] for c in cids]).statistic)
    return taus


def _scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["candidate"]: float(row["score"]) for row in csv.DictReader(f)}


RATES = {"run/train_images_per_s": "images/s", "run/images_per_s": "images/s", "run/candidates_per_s": "candidates/s"}


def throughput(root: Path) -> dict[str, float]:
    """Last-epoch images/s of the training stages and candidates/s of scoring, from the workspace's MLflow store
    (``run/`` metrics stay out of the DVC-tracked files: they differ from run to run)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = {}
    for run in client.search_runs(experiments, order_by=["attributes.start_time ASC"]):  # a rerun's figures win
        name = run.data.tags.get("dvc.stage") or run.data.tags.get("stage", "?")
        for key, unit in RATES.items():
            if key in run.data.metrics:  # the last logged value: the last epoch
                out[f"{name} {unit}"] = run.data.metrics[key]
    return out


def same_batches(root: Path, device: torch.device, batches: int = 8) -> bool:
    """Pinned, prefetched feature batches on ``device`` hold exactly what the CPU reader gives, in order."""
    from pipeline.features import FeatureCache
    from pipeline.supernet import BlockData, feature_keys

    cache = FeatureCache(root / "artifacts/features", verify=False)
    names = cache.keys[1:]
    data = BlockData(cache, *feature_keys(names, names[-1]))
    rng = np.random.default_rng(0)
    indices = [rng.permutation(cache.num_samples("train"))[:64] for _ in range(batches)]
    for index, (x, t) in zip(indices, data.batches("train", indices, device, channels_last=True), strict=True):
        cpu_x, cpu_t = data.batch("train", index, torch.device("cpu"), channels_last=True)
        if not (torch.equal(x.cpu(), cpu_x) and torch.equal(t.cpu(), cpu_t)):
            return False
    return True


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), DVC_NO_ANALYTICS="1")


def _repro(root: Path) -> subprocess.Popen:
    """``python -m pipeline.repro`` in ``root``, output to ``root/gpu_check.log`` (the child keeps its own handle)."""
    with open(root / "gpu_check.log", "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.repro"], cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, env=_env())


def _wait(name: str, proc: subprocess.Popen, root: Path, started: float) -> float:
    code = proc.wait(timeout=TIMEOUT_S)
    seconds = time.perf_counter() - started
    if code:
        raise RuntimeError(f"the {name} run failed (exit {code}) after {seconds:.0f} s: see {root / 'gpu_check.log'}")
    log.info("%s: whole DAG in %.0f s", name, seconds)
    return seconds


def on_device(roots: Mapping[str, Path]) -> list[str]:
    """The CUDA runs, the torchrun block and the comparisons; returns the report's lines."""
    started = time.perf_counter()
    cpu = _repro(roots["cpu"])
    wall = {}
    for name in ("cuda", "cuda-amp"):
        tick = time.perf_counter()
        wall[name] = _wait(name, _repro(roots[name]), roots[name], tick)
    dvc_b0 = read_rows(roots["cuda"] / f"plots/supernet/{TORCHRUN_BLOCK}.csv")
    (roots["cuda"] / f"artifacts/supernet/{TORCHRUN_BLOCK}.pt").unlink()  # train again, now under DDP
    tick = time.perf_counter()
    ddp = subprocess.run(torchrun_command(), cwd=roots["cuda"], capture_output=True, text=True, env=_env(),
                         timeout=TIMEOUT_S)
    if ddp.returncode:
        raise RuntimeError(f"`{' '.join(torchrun_command())}` failed: {ddp.stderr.strip().splitlines()[-1:]}")
    ddp_b0 = read_rows(roots["cuda"] / f"plots/supernet/{TORCHRUN_BLOCK}.csv")
    ddp_s = time.perf_counter() - tick
    wall["cpu"] = _wait("cpu", cpu, roots["cpu"], started)
    device = torch.device("cuda")
    lines = [f"GPU: {torch.cuda.get_device_name(device)}, bfloat16 supported: {torch.cuda.is_bf16_supported()}, "
             f"torch {torch.__version__}", "",
             "| run | whole DAG s |", "|---|---:|", *(f"| {name} | {s:.0f} |" for name, s in wall.items()), "",
             f"torchrun 1 GPU, supernet@{TORCHRUN_BLOCK}: {ddp_s:.0f} s, final val loss {ddp_b0[-1]['val_loss']:.5f} "
             f"(dvc run on the same GPU: {dvc_b0[-1]['val_loss']:.5f})",
             f"pinned prefetched batches on the GPU equal the CPU reader's: {same_batches(roots['cuda'], device)}", ""]
    taus = {name: score_taus(roots["cpu"], roots[name]) for name in ("cuda", "cuda-amp")}
    lines += ["| score table | " + " | ".join(f"tau cpu vs {n}" for n in taus) + " |",
              "|---|" + "---:|" * len(taus)]
    for block in taus["cuda"]:
        cells = [f"{t[block]:.3f}" + ("" if t[block] >= MIN_TAU else " (low)") for t in taus.values()]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    rates = {name: throughput(root) for name, root in roots.items()}
    lines += ["", "| stage | " + " | ".join(rates) + " |", "|---|" + "---:|" * len(rates)]
    for key in rates["cpu"]:
        lines.append(f"| {key} | " + " | ".join(f"{r.get(key, float('nan')):.4g}" for r in rates.values()) + " |")
    return lines


def run(dest: Path, src: Path) -> int:
    """The check on CUDA, else the dry run; 0 when everything ran (taus and rates are for reading), else 1."""
    overrides = runs(len(os.sched_getaffinity(0)))
    try:
        roots = build(dest.resolve(), src.resolve(), overrides)
        if torch.cuda.is_available():
            print("\n".join(on_device(roots)))
            return 0
        planned = dry_run(roots)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, PipelineError) as err:
        print(f"gpu check failed: {err}", file=sys.stderr)
        return 1
    for name, stages in planned.items():
        log.info("%s (%s): dvc would run %d stages: %s", name, " ".join(overrides[name]), len(stages),
                 ", ".join(stages))
    print(f"no CUDA device here: dry run only (workspaces in {dest}, params validated with the CUDA overrides, "
          f"`dvc repro --dry --force` in each, torchrun composed: `{' '.join(torchrun_command())}`); "
          "run `make gpu-check` on a CUDA machine for the real check")
    return 0


if __name__ == "__main__":
    from pipeline.runtime import setup_logging

    setup_logging()
    args = sys.argv[1:]
    sys.exit(run(Path(args[0] if args else ".gpu-check"), Path.cwd()))
