"""The paper setting in miniature, every stage of dvc.yaml in one process: CPU time, wall time and memory per stage.

    .venv/bin/python benchmarks/paper_scale.py [--dir /tmp/paper-mini]

configs/paper.yaml merged with configs/paper_mini.yaml (a tinynet_e teacher with random weights cut at
blocks.1..blocks.6 as B7 is, 64 px ImageFolder PNGs written here, cache.mode online, two SE-MBConv ops, six blocks
with depth and width cells, the flops_dna search) in a workspace made as ``python -m pipeline.overlay`` makes one.
Each stage's ``run`` is called in DAG order (what ``dvc repro`` would start as 20 processes). The time the teacher
spends inside ``block_outputs`` (the online reader's forwards) is measured apart, because at ImageNet scale it scales
with B7, the rest with the student. tests/test_paper_mini.py runs the same miniature; this script also counts B7's
and the miniature's MACs and writes benchmarks/results/paper_scale.md: the measured table and the ImageNet estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from pipeline import space
from pipeline.cli import load_stage

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = (Path("configs/paper.yaml"), Path("configs/paper_mini.yaml"))
RESULTS = REPO / "benchmarks/results/paper_scale.md"
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 48, 8


def stage_order(blocks: Sequence[str]) -> list[tuple[str, str | None]]:
    """dvc.yaml's stages in an order its DAG allows: (stage script, block or None)."""
    return [("prepare", None), ("teacher", None), ("cache_features", None),
            *[("supernet", b) for b in blocks], *[("score", b) for b in blocks],
            ("costs", None), ("additivity", None), ("assemble", None), ("retrain", None), ("report", None)]


def write_images(root: Path, seed: int = 0) -> int:
    """An ImageFolder of PNGs, ``CLASSES`` classes told apart by colour and stripe direction, sizes around 64 px
    (prepare resizes them). Returns the number of files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    count = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(56, 88, 2)
                yy, xx = np.mgrid[:h, :w]
                stripes = np.sin((xx if c % 2 else yy) * (0.3 + 0.1 * c))[..., None]
                colour = np.array([60 + 60 * c, 200 - 40 * c, 120]) * (0.7 + 0.3 * stripes)
                pixels = np.clip(colour + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                count += 1
    return count


def make_miniature(dest: Path, overrides: Sequence[str] = ()) -> Path:
    """A workspace with params = params.yaml + paper.yaml + paper_mini.yaml + ``overrides``, and its images."""
    from omegaconf import OmegaConf

    from pipeline.smoke import make_workspace

    root = make_workspace(REPO, dest, overrides, OVERLAYS)
    write_images(root / OmegaConf.load(root / "params.yaml").data.root)
    return root


@dataclass
class StageTime:
    """One stage's measured cost in the miniature."""

    stage: str
    cpu_s: float  # this process's user + system CPU time (every thread)
    wall_s: float
    teacher_s: float  # thread CPU time inside the teacher's block_outputs (the online reader)
    teacher_images: int  # images those teacher forwards took
    rss_mb: float  # resident memory after the stage
    peak_mb: float  # the process's peak resident memory so far


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> tuple[float, float]:
    import psutil

    return psutil.Process().memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _teacher_meter() -> Iterator[list[float]]:
    """Counts [seconds, images] of the online reader's teacher forwards (``pipeline.features.block_outputs``)."""
    from pipeline import features

    original, totals = features.block_outputs, [0.0, 0]

    def timed(model, blocks, x):
        start = time.thread_time()
        try:
            return original(model, blocks, x)
        finally:
            totals[0] += time.thread_time() - start
            totals[1] += len(x)

    features.block_outputs = timed
    try:
        yield totals
    finally:
        features.block_outputs = original


def run_dag(root: Path, report: Callable[[StageTime], None] | None = None) -> list[StageTime]:
    """Every stage's ``run`` in DAG order in ``root`` (the working directory: stages read and write it), with one
    torch thread; returns each stage's measured cost."""
    from pipeline.config import load_params

    if Path.cwd().resolve() != root.resolve():
        raise RuntimeError(f"run_dag works in the stages' working directory: chdir to {root} first")
    from pipeline import tracking

    params = load_params(root=root)
    tracking.init_store(tracking.tracking_uri(root))  # the store's one-time schema (seconds) is no stage's cost
    modules: dict[str, ModuleType] = {}
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _teacher_meter() as teacher:
            for name, block in stage_order(list(params.space.blocks)):
                module = modules.setdefault(name, load_stage(name))
                cpu, wall, before = _cpu(), time.perf_counter(), list(teacher)
                module.run(params, block) if block else module.run(params)
                rss, peak = _rss_mb()
                times.append(StageTime(f"{name}@{block}" if block else name, _cpu() - cpu, time.perf_counter() - wall,
                                       teacher[0] - before[0], teacher[1] - before[1], rss, peak))
                if report:
                    report(times[-1])
    finally:
        torch.set_num_threads(threads)
    return times


# ---------------------------------------------------------------------------------------------------- estimate
# ASSUMED sustained MAC/s of one A100/H100-class GPU on EfficientNet layers in bf16 (depthwise convs are
# memory-bound: a few % of the tensor-core peak). Training: ~1e12 per forward-equivalent MAC is what a 450-500 epoch
# EfficientNet-B0 ImageNet run taking ~1.5 days on 8 such GPUs implies (an order of magnitude, not a measurement);
# no-grad forwards (the teacher, scoring) a few times more.
GPU_TRAIN_MACS, GPU_INFER_MACS = 1e12, 4e12
GPUS = 8  # the paper's 8 GPUs; the stages are data-parallel (torchrun) except prepare (CPU workers) and costs
IMAGENET = {"train": 1_281_167, "test": 50_000}


@dataclass
class Work:
    """What a stage computes: teacher forward MACs (the online reader or the teacher's evaluation) and student
    MACs (training counts forward + backward as 3 forwards)."""

    teacher_macs: float = 0.0
    student_macs: float = 0.0


def _prefix_macs(model: torch.nn.Module, blocks: dict, size: int) -> list[float]:
    """MACs of the teacher's forward up to each boundary (one image): what the online reader runs per block."""
    from torch.utils.flop_counter import FlopCounterMode

    marks: list[float] = []
    with FlopCounterMode(display=False) as counter:
        hooks = [model.get_submodule(b["module"]).register_forward_hook(
            lambda *_: marks.append(counter.get_total_flops() / 2)) for b in blocks["blocks"]]
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
    return marks


def stage_work(params, spec: space.SpaceSpec, prefix: Sequence[float], sizes: dict[str, int], teacher_macs: float,
               student_macs: float) -> dict[str, Work]:
    """Each stage's MACs from its recipe, the space's counted costs and the split sizes (the same formulas for the
    miniature and ImageNet; the miniature's measured teacher images check them)."""
    s, sc, r = params.supernet, params.score, params.retrain.train
    work = {"teacher": Work(teacher_macs=(sizes["val"] + sizes["test"]) * teacher_macs)}
    for i, block in enumerate(spec.blocks):
        costs = [space.candidate_cost(block, cid).flops for cid in block.candidates()]
        mean = sum(costs) / len(costs)
        train = s.train_samples or sizes["train"]
        work[f"supernet@{block.name}"] = Work(
            s.epochs * (train + s.batch_size + min(s.val_samples, sizes["val"])) * prefix[i],
            s.epochs * (3 * train * mean + s.val_paths * (min(s.val_samples, sizes["val"]) + s.batch_size) * mean))
        rated = min(sc.batches * sc.batch_size, sizes["val"])
        work[f"score@{block.name}"] = Work((sizes["train"] + rated + sc.bn_batch_size) * prefix[i],
                                           (rated + sc.bn_batch_size) * sum(costs))
    work["retrain"] = Work(student_macs=r.epochs * (3 * sizes["train"] + sizes["val"]) * student_macs
                           + (sizes["val"] + sizes["test"]) * student_macs)
    return work


def space_of(root: Path):
    from pipeline import describe
    from pipeline.config import load_params

    params = load_params(root=root)
    split = describe.teacher_split(params, root)
    return params, space.build_space(params.space, split), split


def _decode_ms(n: int = 40) -> float:
    """CPU ms to decode one ImageNet-sized JPEG (500x375, quality 90, textured) and resize it as prepare does."""
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 4, (375, 500, 3)), 0), 1)
    pixels = np.clip(128 + (smooth - smooth.mean()) / smooth.std() * 60 + rng.normal(0, 8, smooth.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    start = time.thread_time()
    for _ in range(n):
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    return 1e3 * (time.thread_time() - start) / n


def _activation_bytes(model: torch.nn.Module, shape: Sequence[int], keep: str) -> int:
    """float32 bytes per image: ``sum`` of every leaf module's output (what training keeps for backward) or the
    ``peak`` of three consecutive outputs (a no-grad forward holds little more)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return 4 * (sum(sizes) if keep == "sum" else max(sum(sizes[i:i + 3]) for i in range(len(sizes))))


def _mini_rates(small: list[StageTime], large: list[StageTime], work_small: dict[str, Work],
                work_large: dict[str, Work]) -> dict[str, float]:
    """CPU seconds per MAC: the teacher's from the metered online forwards, the students' per stage kind from the
    two miniature runs' difference (their fixed costs, model building and tracking, cancel)."""
    metered = [(t, work_small if i < len(small) else work_large) for i, t in enumerate(small + large) if t.teacher_images]
    rates = {"teacher": sum(t.teacher_s for t, _ in metered) / sum(w[t.stage].teacher_macs for t, w in metered)}
    for kind in ("supernet", "retrain"):
        pairs = [(a, b) for a, b in zip(small, large, strict=True) if a.stage.split("@")[0] == kind]
        rest = sum((b.cpu_s - b.teacher_s) - (a.cpu_s - a.teacher_s) for a, b in pairs)
        rates[kind] = rest / sum(work_large[a.stage].student_macs - work_small[a.stage].student_macs for a, _ in pairs)
    rates["score"] = rates["supernet"]  # scoring's student work is milliseconds here, below the runs' noise
    return rates


def _fmt_s(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def main() -> None:
    from pipeline import describe, features, student
    from pipeline.smoke import make_workspace
    from pipeline.supernet import SupernetBlock
    from pipeline.teacher import create_teacher, load_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/paper-mini"))
    args = parser.parse_args()
    base = args.dir.resolve()
    shutil.rmtree(base, ignore_errors=True)
    runs: dict[str, tuple[Path, list[StageTime]]] = {}
    for name, overrides in (("small", []), ("large", ["supernet.epochs=3", "retrain.train.epochs=3"])):
        root = make_miniature(base / name, overrides)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)
        runs[name] = (root, run_dag(root, lambda t, run=name: print(
            f"{run} {t.stage:15s} cpu {t.cpu_s:6.2f} s  teacher {t.teacher_s:5.2f} s / {t.teacher_images:4d} img  "
            f"peak {t.peak_mb:5.0f} MB", flush=True)))
    os.chdir(REPO)
    torch.set_num_threads(1)
    # the miniature's work, by the formulas the ImageNet estimate uses (checked against the metered images)
    works = {}
    for name, (root, _) in runs.items():
        params, spec, split = space_of(root)
        teacher, _ = load_teacher(root / "artifacts/teacher")
        sizes = json.loads((root / "data/prepared/meta.json").read_text())["sizes"]
        arch = json.loads((root / params.search.out_dir / "architecture.json").read_text())
        works[name] = stage_work(params, spec, _prefix_macs(teacher, split, 64), sizes,
                                 space.module_cost(teacher, (3, 64, 64)).flops, arch["flops"])
    rates = _mini_rates(runs["small"][1], runs["large"][1], works["small"], works["large"])
    # the ImageNet setting: the paper overlay's own params, B7 (random weights) cut at 224 px, DNA-a as the student
    paper_root = make_workspace(REPO, base / "paper", overlay=OVERLAYS[0])
    params, spec, split = space_of(paper_root)
    b7 = create_teacher(replace(params.teacher, pretrained=False), 3, 1000)
    b7_macs, b7_params = space.module_cost(b7, (3, 224, 224)).flops, sum(p.numel() for p in b7.parameters())
    prefix = _prefix_macs(b7, split, 224)
    val = round(IMAGENET["train"] * params.data.val_fraction)
    sizes = {"train": IMAGENET["train"] - val, "val": val, "test": IMAGENET["test"]}
    dna_a = REPO / "configs/architectures/dna_a.json"
    dna_cost = describe.architecture_cost(dna_a, spec)
    work = stage_work(params, spec, prefix, sizes, b7_macs, dna_cost.flops)
    decode = _decode_ms()
    b7_direct = _b7_seconds_per_mac(b7)
    # disk and memory
    images = (sizes["train"] + sizes["val"] + sizes["test"]) * 3 * 224 * 224
    cache_bytes = features.estimate_bytes(features.boundary_shapes(split), sizes | {"test": 0}, "float16")
    supernet_bytes = {b.name: 3 * 4 * sum(p.numel() for p in SupernetBlock(b).parameters()) for b in spec.blocks}
    dna_model = describe.latency.build_student(spec, student.choice_of(student.read_architecture(dna_a), spec, "a"))
    act_student = _activation_bytes(dna_model, (3, 224, 224), "sum")
    act_teacher = _activation_bytes(b7, (3, 224, 224), "peak")
    small = runs["small"][1]
    lines = _results(small, rates, work, params, spec, split, sizes, decode, b7_direct, b7_macs, b7_params, dna_cost,
                     images, cache_bytes, supernet_bytes, act_student, act_teacher)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _results(small, rates, work, params, spec, split, sizes, decode_ms, b7_rate, b7_macs, b7_params, dna_cost,
             image_bytes, cache_bytes, supernet_bytes, act_student, act_teacher) -> list[str]:
    """benchmarks/results/paper_scale.md: the miniature as measured, then the ImageNet estimate and its method."""
    gb, n_images = 1e9, sizes["train"] + sizes["val"] + sizes["test"]
    lines = ["# The paper setting: a miniature measured, full ImageNet estimated", "",
             f"`.venv/bin/python benchmarks/paper_scale.py` on {_cpu_model()}, one torch thread, torch "
             f"{torch.__version__}. Miniature: configs/paper.yaml + configs/paper_mini.yaml (tinynet_e teacher with "
             f"random weights, 64 px, {CLASSES} classes, every stage once in one process, the teacher online); the "
             "machine was shared with other jobs (CPU times hold, wall times are inflated).", "",
             "## Measured: the miniature (one core; CPU = user + system time of the process)", "",
             "| stage | CPU s | wall s | teacher CPU s (online reader) | teacher images | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in small:
        lines.append(f"| {t.stage} | {t.cpu_s:.2f} | {t.wall_s:.2f} | {t.teacher_s:.2f} | {t.teacher_images} | "
                     f"{t.peak_mb:.0f} |")
    lines.append(f"| total | {sum(t.cpu_s for t in small):.1f} | {sum(t.wall_s for t in small):.1f} | "
                 f"{sum(t.teacher_s for t in small):.2f} | {sum(t.teacher_images for t in small)} | |")
    lines += ["", "Per-MAC rates derived from it (CPU s per 1e9 MACs): teacher forward "
              f"{1e9 * rates['teacher']:.2f} (metered in the online reader); student work (the difference of a second "
              "run with supernet.epochs=3, retrain.train.epochs=3) supernet "
              f"{1e9 * rates['supernet']:.2f} (scoring uses it too: its student work here is milliseconds, below the "
              f"noise), retrain {1e9 * rates['retrain']:.2f}. "
              f"A real B7 forward at 224 px on this core: {1e9 * b7_rate:.2f} s per 1e9 MACs, so the miniature's "
              f"teacher rate is {rates['teacher'] / b7_rate:.1f}x the real one (small maps, narrow layers): the CPU "
              "column below is pessimistic by about that factor.", "",
              "## Estimated: full ImageNet (configs/paper.yaml as written)", "",
              f"Splits: {sizes['train']:,} train, {sizes['val']:,} val (data.val_fraction), {sizes['test']:,} test "
              f"at 224 px. Teacher tf_efficientnet_b7: {b7_params / 1e6:.1f}M params, {b7_macs / 1e9:.2f} GMACs per "
              f"image (counted). Student: DNA-a, {dna_cost.params / 1e6:.2f}M params, {dna_cost.flops / 1e6:.0f}M "
              "MACs (counted). Candidates per block: " + ", ".join(
                  f"{b.name} {b.num_candidates():,}" for b in spec.blocks) + ".", "",
              "| stage | teacher MACs | student MACs | CPU, one core (est.) | 8 GPUs (est.) | memory per process "
              "(est.) | disk written |", "|---|---:|---:|---:|---:|---|---|"]
    lines.append(f"| prepare | | | {_fmt_s(n_images * decode_ms / 1e3)} ({decode_ms:.1f} ms per JPEG, measured) | "
                 f"{_fmt_s(n_images * decode_ms / 1e3 / params.runtime.workers)} wall on {params.runtime.workers} "
                 f"CPU workers | a chunk of images | data/prepared {image_bytes / gb:.0f} GB (uint8 3x224x224) |")
    rows = {"teacher": f"eval batch {params.teacher.train.eval_batch_size}: "
                       f"{params.teacher.train.eval_batch_size * act_teacher / gb:.1f} GB activations",
            "cache_features": "", "retrain": ""}
    for name, w in work.items():
        kind = name.split("@")[0]
        cpu = w.teacher_macs * rates["teacher"] + w.student_macs * rates.get(kind, rates["teacher"])
        per_gpu = params.supernet.batch_size // GPUS
        if kind == "supernet":
            mem = (f"{per_gpu} img/GPU: teacher {per_gpu * act_teacher / gb:.1f} GB + block <= "
                   f"{per_gpu * act_student / gb:.1f} GB")
            disk = f"checkpoint {supernet_bytes[name.split('@')[1]] / 1e6:.0f} MB"
        elif kind == "score":
            mem = f"rating data on the device: {_rating_bytes(params, split, name.split('@')[1], sizes) / gb:.1f} GB"
            disk = "table (KB)"
        elif kind == "retrain":
            batch = params.retrain.train.batch_size // GPUS
            mem = f"{batch} img/GPU: {batch * act_student / gb:.1f} GB activations (fp32; bf16 about half)"
            disk = f"student {dna_cost.params * 4 / 1e6:.0f} MB, checkpoint {dna_cost.params * 16 / 1e6:.0f} MB"
        else:
            mem, disk = rows.get(kind, ""), f"safetensors {b7_params * 4 / 1e6:.0f} MB"
        lines.append(f"| {name} | {w.teacher_macs:.3g} | {w.student_macs:.3g} | {_fmt_s(cpu)} | {_fmt_s(_gpu_s(name, w))} | "
                     f"{mem} | {disk} |")
        if name == "teacher":
            lines.append(f"| cache_features | | | seconds (hashes the teacher) | | | manifest only; a float16 "
                         f"cache would be {cache_bytes / gb:.0f} GB |")
    total_cpu = sum(w.teacher_macs * rates["teacher"] + w.student_macs * rates.get(n.split("@")[0], rates["teacher"])
                    for n, w in work.items())
    lines += [f"| costs, additivity, assemble, report | | | minutes | minutes | one model at batch "
              f"{max(params.costs.batch_sizes)} | tables, figures (MB) |",
              f"| **total** | {sum(w.teacher_macs for w in work.values()):.3g} | "
              f"{sum(w.student_macs for w in work.values()):.3g} | {_fmt_s(total_cpu)} | "
              f"{_fmt_s(sum(_gpu_s(n, w) for n, w in work.items()))} | | "
              f"{(image_bytes + b7_params * 4 + sum(supernet_bytes.values()) + dna_cost.params * 20) / gb:.0f} GB |",
              "", "Method (what is measured, what is assumed):", "",
              "- MACs are counted, not assumed: per stage, the recipe's image counts (the same formulas give the "
              "miniature's teacher images, which tests/test_paper_mini.py checks against the metered ones) times the "
              "teacher's MACs up to the block's boundary (the online reader stops there) or the student's (the mean "
              "candidate of the block for supernet training, every candidate for scoring, DNA-a for retraining; "
              "training = 3 forwards).",
              "- CPU column: those MACs times the miniature's measured CPU seconds per MAC (above); prepare: the "
              "measured decode of a 500x375 JPEG resized to 224 px, per image.",
              f"- GPU column: ASSUMED sustained rates per GPU (bf16, EfficientNet layers; no GPU measured here): "
              f"{GPU_TRAIN_MACS:.0e} MAC/s for training (supernet, retrain: student MACs already count 3 forwards), "
              f"{GPU_INFER_MACS:.0e} for no-grad forwards (the teacher, scoring); {GPUS} GPUs data-parallel. Replace "
              "them by measured rates when a GPU run exists. Input pipeline: prepared uint8 arrays read "
              "memory-mapped (no JPEG decoding per epoch), assumed not to bound. Fixed costs (imports, model "
              "building, tracking: ~0.2-0.5 s a stage in the miniature) are left out.",
              "- Memory: float32 activations per image from forward hooks at 224 px (training: every leaf output "
              "kept, DNA-a as a bound for one block; no-grad teacher: three consecutive outputs) times the per-GPU "
              "batch; score: the val batches it rates (inputs and targets) held on the device for the whole block.",
              "- Disk: prepared uint8 arrays; the cache's own estimate (pipeline.features.estimate_bytes, not "
              "written: cache.mode online); checkpoints = weights + Adam's two moments (supernet), weights + EMA + "
              "RMSprop's two buffers (retrain)."]
    return lines


def _gpu_s(stage: str, w: Work) -> float:
    train = stage.split("@")[0] in ("supernet", "retrain")
    return (w.teacher_macs / GPU_INFER_MACS + w.student_macs / (GPU_TRAIN_MACS if train else GPU_INFER_MACS)) / GPUS


def _rating_bytes(params, split: dict, block: str, sizes: dict[str, int]) -> float:
    """float32 bytes of what the score stage holds on the device: the rated val batches' inputs and targets."""
    names = [b["name"] for b in split["blocks"]]
    i = names.index(block)
    out = split["blocks"][i]
    inp = (3, split["image_size"], split["image_size"]) if i == 0 else (
        split["blocks"][i - 1]["out_channels"], *split["blocks"][i - 1]["out_size"])
    rated = min(params.score.batches * params.score.batch_size, sizes["val"])
    return 4 * rated * (np.prod(inp) + out["out_channels"] * np.prod(out["out_size"]))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _b7_seconds_per_mac(b7: torch.nn.Module) -> float:
    """One core's CPU seconds per MAC of a real B7 forward at 224 px (batch 2): the miniature's rate, checked."""
    x = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        b7.eval()(x[:1])
        start = time.thread_time()
        b7(x)
        seconds = time.thread_time() - start
    return seconds / (2 * space.module_cost(b7, (3, 224, 224)).flops)


if __name__ == "__main__":
    main()
