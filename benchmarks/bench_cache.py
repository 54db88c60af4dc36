"""Benchmark of the teacher feature cache (issue 3), measured in one run on the default config.

(a) supernet-style training throughput per block: reading the cache vs running the teacher online up to the
    block's boundary, and the projected whole supernet stage (all blocks, ``supernet.epochs`` epochs);
(b) the cache reader's overhead: the same loop fed from float32 tensors already in memory;
(c) cache size on disk and write throughput vs this machine's raw sequential write speed (same byte count,
    fsync), measured now on the same filesystem;
(d) float16 vs float32 cache: Kendall tau between the candidate scores of one block computed from each, with
    the pipeline's own supernet training and scoring.

In (a, b) the trained module is a representative student block built from timm's InvertedResidual (DNA's MBConv
ops, one random op per layer per step, widths from ``space.blocks``, channels matched to the teacher), so the
timing does not depend on the supernet code. Modes are measured in interleaved rounds, so load from other
processes on a shared machine hits every mode alike; on a busy 2-core machine pass ``runtime.threads=1``, since
OpenMP threads waiting on a descheduled sibling make every 2-thread timing erratic.

    .venv/bin/python benchmarks/bench_cache.py [--steps 6 --rounds 5 --teacher artifacts/teacher] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline.config import Params, load_params, repo_root
from pipeline.data import Split, load_meta, load_split, normalize
from pipeline.features import SPLITS, FeatureCache, write_features
from pipeline.runtime import Loop, select_device, setup_logging, to_device_model
from pipeline.scoring import load_rating_data, score_prefix
from pipeline.space import build_space
from pipeline.supernet import BlockCheckpoint, BlockData, SupernetBlock, feature_keys, feature_moments, train_block
from pipeline.teacher import block_outputs, load_teacher, weights_hash

log = logging.getLogger("bench_cache")
MODES = ("online", "cache", "memory")
SCORE_BLOCK = "b2"


# ---------------------------------------------------------------------------------------------- student block
def student_block(block: dict, params: Params) -> nn.ModuleList:
    """Per layer, every op of ``space.ops`` (a single-path supernet block of the block's first cell); block 0
    gets a stem first. Inner layers have the student width, the first reads and the last writes the teacher's."""
    space, act = params.space, get_act_layer(params.space.act)
    cell = space.blocks[block["name"]].cells[0]
    layers, width = cell.layers, cell.width or space.blocks[block["name"]].width
    parts = nn.ModuleList()
    in_chs, stride = block["in_channels"], block["stride"]
    if block["name"] == "b0":
        parts.append(nn.ModuleDict({"stem": nn.Sequential(nn.Conv2d(in_chs, space.stem, 3, stride, 1, bias=False),
                                                          nn.BatchNorm2d(space.stem), act())}))
        in_chs, stride = space.stem, 1
    for i in range(layers):
        out_chs = block["out_channels"] if i == layers - 1 else width
        parts.append(nn.ModuleDict({op: _mbconv(op, in_chs, out_chs, stride, space.se_ratio, act)
                                    for op in space.ops}))
        in_chs, stride = out_chs, 1
    return parts


def _mbconv(op: str, in_chs: int, out_chs: int, stride: int, se_ratio: float, act: type) -> nn.Module:
    kernel, exp = int(op[1:op.index("e")]), int(op[op.index("e") + 1:])
    return InvertedResidual(in_chs, out_chs, dw_kernel_size=kernel, stride=stride, exp_ratio=exp, act_layer=act,
                            se_layer=partial(SqueezeExcite, rd_ratio=se_ratio / exp))


def run_path(net: nn.ModuleList, path: list[str], x: torch.Tensor) -> torch.Tensor:
    for layer, op in zip(net, path, strict=True):
        x = layer[op](x)
    return x


def random_paths(net: nn.ModuleList, steps: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[str(rng.choice(list(layer.keys()))) for layer in net] for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- batch sources
Fetch = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def online_fetch(images: np.ndarray, meta: dict, teacher: nn.Module, blocks: dict, b: int, device: torch.device,
                 layout: torch.memory_format) -> Fetch:
    """Images -> teacher forward up to block b's boundary (stops there) -> (block input, block target)."""
    upto = {"blocks": blocks["blocks"][:b + 1]}

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(torch.from_numpy(images[idx]), meta).to(device).contiguous(memory_format=layout)
        with torch.no_grad():
            outs = block_outputs(teacher, upto, x)
        return (x if b == 0 else outs[b - 1]), outs[b]

    return fetch


def cache_fetch(cache: FeatureCache, in_key: str, key: str, device: torch.device) -> Fetch:
    return lambda idx: (cache.get("train", in_key, idx).to(device), cache.get("train", key, idx).to(device))


def memory_fetch(cache: FeatureCache, in_key: str, key: str, used: np.ndarray, device: torch.device) -> Fetch:
    """The same samples preloaded as float32 tensors: the fastest a loop over these features can be fed."""
    pos = np.full(cache.num_samples("train"), -1)
    pos[used] = np.arange(len(used))
    xs, ts = cache.get("train", in_key, used).to(device), cache.get("train", key, used).to(device)
    return lambda idx: (xs[pos[idx]], ts[pos[idx]])


def train_steps(net: nn.ModuleList, opt: torch.optim.Optimizer, fetch: Fetch, batches: list[np.ndarray],
                paths: list[list[str]], layout: torch.memory_format) -> tuple[float, float]:
    """Supernet steps (fetch, one path forward, MSE, backward, Adam); returns (wall, process CPU) seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    for idx, path in zip(batches, paths, strict=True):
        x, t = fetch(idx)
        loss = F.mse_loss(run_path(net, path, x.contiguous(memory_format=layout)), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------- measurements
def measure_raw_write(directory: Path, nbytes: int) -> float:
    """dd-like sequential write of ``nbytes`` in 8 MiB blocks then fsync (dd conv=fsync); returns MB/s."""
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    path = directory / "raw_write.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, nbytes, len(block)):
            os.write(fd, block[:min(len(block), nbytes - offset)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / 1e6 / seconds


def disk_bytes(root: Path) -> tuple[int, int]:
    """(logical bytes, allocated bytes) of every file under root."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def bench_block(b: int, block: dict, params: Params, cache: FeatureCache, images: np.ndarray, meta: dict,
                teacher: nn.Module, blocks: dict, device: torch.device, steps: int, rounds: int
                ) -> dict[str, float]:
    """Samples/s of the three modes on identical batches and paths, interleaved round by round."""
    bs, n = params.supernet.batch_size, cache.num_samples("train")
    layout = torch.channels_last if params.runtime.channels_last else torch.contiguous_format
    rng = np.random.default_rng(params.seed + b)
    warm = len(params.space.ops)
    batches = [np.sort(rng.choice(n, bs, replace=False)) for _ in range(warm + steps * rounds)]
    in_key = "input" if b == 0 else blocks["blocks"][b - 1]["name"]
    fetches = {"online": online_fetch(images, meta, teacher, blocks, b, device, layout),
               "cache": cache_fetch(cache, in_key, block["name"], device),
               "memory": memory_fetch(cache, in_key, block["name"], np.unique(np.concatenate(batches)), device)}
    torch.manual_seed(params.seed)
    net = to_device_model(student_block(block, params), device, params.runtime.channels_last)
    opt = create_optimizer_v2(net, opt=params.supernet.opt, lr=params.supernet.lr,
                              weight_decay=params.supernet.weight_decay)
    paths = random_paths(net, len(batches), params.seed + b)
    paths[:warm] = [[list(layer.keys())[i % len(layer)] for layer in net] for i in range(warm)]
    for mode in MODES:  # warm-up: allocator, page cache, thread pools, one step per op
        train_steps(net, opt, fetches[mode], batches[:warm], paths[:warm], layout)
    seconds = {mode: [] for mode in MODES}
    for r in range(rounds):
        chunk = slice(warm + r * steps, warm + (r + 1) * steps)
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            seconds[mode].append(train_steps(net, opt, fetches[mode], batches[chunk], paths[chunk], layout))
    out = {}
    for clock, i in (("", 0), ("cpu ", 1)):
        out.update({clock + mode: steps * rounds * bs / sum(t[i] for t in s) for mode, s in seconds.items()})
        for a, b in (("cache", "online"), ("cache", "memory")):  # per-round ratios: robust to bursts of load
            out[f"{clock}{a}/{b}"] = float(np.median([tb[i] / ta[i] for ta, tb in zip(seconds[a], seconds[b],
                                                                                        strict=True)]))
    return out


def ranking_agreement(caches: dict[str, FeatureCache], teacher_blocks: dict, params: Params, device: torch.device,
                      epochs: int, scratch: Path) -> dict[str, object]:
    """Kendall tau between float16 and float32 scores of every candidate of ``SCORE_BLOCK``, from the pipeline's
    own supernet training (``train_block``) and scoring (``score_prefix``: BN recalibrated per candidate).

    score-only: the float32-trained supernet rated on each cache's val features; end-to-end: a supernet trained
    and rated on each cache (same seed, init, batches and paths), as the pipeline runs with either dtype.
    """
    spec = build_space(params.space, teacher_blocks).block(SCORE_BLOCK)
    in_key, target_key = feature_keys(list(params.space.blocks), SCORE_BLOCK)
    cfg = replace(params.supernet, epochs=epochs, train_samples=0)
    nets = {}
    for dtype, cache in caches.items():
        torch.manual_seed(params.seed)
        net = SupernetBlock(spec)
        if cfg.target_norm:
            stats = feature_moments(cache, "train", target_key)
            net.set_target_stats(stats["channel_mean"], stats["channel_std"])
        loop = Loop(device, params.seed, channels_last=params.runtime.channels_last, progress=False)
        train_block(net, BlockData(cache, in_key, target_key), cfg, loop,
                    BlockCheckpoint(scratch / f"supernet_{dtype}.pt", fingerprint=dtype))
        nets[dtype] = net

    def scores(net: SupernetBlock, cache: FeatureCache) -> dict[str, float]:
        rating = load_rating_data(BlockData(cache, in_key, target_key), params.score, params.seed, device,
                                  params.runtime.channels_last)
        return {cid: float(errors[0].mean()) for cid, errors in score_prefix(net, rating).items()}

    table = {"score-only": {d: scores(nets["float32"], c) for d, c in caches.items()},
             "end-to-end": {d: scores(nets[d], c) for d, c in caches.items()}}
    cids = sorted(table["end-to-end"]["float32"])
    values = {k: {d: [v[d][c] for c in cids] for d in v} for k, v in table.items()}
    return {"candidates": cids, "scores": values,
            "tau": {k: float(kendalltau(v["float16"], v["float32"]).statistic) for k, v in values.items()}}


# ---------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB RAM, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), Python {platform.python_version()}")


def report(args: argparse.Namespace, params: Params, blocks: dict, teacher_hash: str, write: dict, raw_mb_s: float,
           sizes: tuple[int, int], n_samples: dict[str, int], per_block: dict[str, dict[str, float]],
           ranking: dict, load: tuple[str, str], wall: float) -> str:
    epochs, per_epoch = params.supernet.epochs, params.supernet.train_samples or n_samples["train"]
    stage = {c + m: sum(epochs * per_epoch / per_block[name][c + m] for name in per_block) for c in ("", "cpu ")
             for m in MODES}
    rows = "\n".join(
        f"| {name} | {r['online']:.0f} | {r['cache']:.0f} | {r['memory']:.0f} | **{r['cache/online']:.2f}x** "
        f"({r['cpu cache/online']:.2f}x) | {r['memory'] / r['online']:.2f}x | **{r['cache/memory']:.1%}** "
        f"({r['cpu cache/memory']:.1%}) |" for name, r in per_block.items())
    cmd = " ".join(["$ .venv/bin/python benchmarks/bench_cache.py", *sys.argv[1:]])
    return f"""# Feature cache benchmark (issue 3)

```
{cmd}
```

Machine: {machine()}. Load average at start / end: {load[0]} / {load[1]} (the machine is shared; modes are
interleaved round by round so load hits them alike). Whole run: {wall:.0f} s.
Config: default `params.yaml`{' + ' + ' '.join(args.overrides) if args.overrides else ''}; teacher
`{blocks['teacher']}` from `{args.teacher}` (sha256 {teacher_hash[:12]}), blocks
{', '.join(f"{b['name']} {b['in_channels']}->{b['out_channels']}ch {b['out_size'][0]}px" for b in blocks['blocks'])};
train {n_samples['train']} / val {n_samples['val']} samples; supernet batch {params.supernet.batch_size},
{args.steps} x {args.rounds} timed steps per mode and block.

## (a, b) Supernet-style training throughput (samples/s)

Student: per block a single-path supernet block of timm `InvertedResidual` ops ({', '.join(params.space.ops)}, SE
{params.space.se_ratio}, {params.space.act}; `space.blocks` depths and widths; block 0 with its stem), Adam, MSE,
one random path per step, identical batches and paths in every mode. *online*: uint8 images -> normalise ->
teacher forward up to the block's boundary (hooks stop it there) -> student step. *cache*: `FeatureCache.get`
of the block's input and target ({write['dtype']}, random sorted batches over the whole train split).
*memory*: the same samples preloaded as float32 tensors.

Rates are wall-clock samples/s over all timed rounds; ratios are medians of the per-round ratios (each round
runs the three modes back to back on the same batches and paths, so a burst of load from other processes skews
one round, not the median). In brackets: the same ratio from this process's CPU time, which other processes on
the shared cores do not inflate. *bound* = memory vs online, the most any cache could gain.

| block | online | cache | memory | cache vs online (CPU) | bound | cache / memory, >= 90% (CPU) |
|---|---|---|---|---|---|---|
{rows}

Whole supernet stage ({len(per_block)} blocks x {epochs} epochs x {per_epoch} samples; per-epoch validation left out),
projected from the rates above:
online {stage['online'] / 60:.1f} min, cache {stage['cache'] / 60:.1f} min, in-memory {stage['memory'] / 60:.1f} min.
The bound is the most that removing the teacher can gain, (teacher forward + student step) / student step; a
cache read as fast as memory reaches it.

- **cache vs online: {stage['online'] / stage['cache']:.2f}x** (CPU time {stage['cpu online'] / stage['cpu cache']:.2f}x;
  target >= 2x; bound {stage['online'] / stage['memory']:.2f}x); {stage['online'] / (stage['cache'] + write['cache/wall_s']):.2f}x
  when the one-off cache build ({write['cache/wall_s']:.0f} s) is charged to the stage.
- **cache / in-memory: {stage['memory'] / stage['cache']:.1%}** (CPU time {stage['cpu memory'] / stage['cpu cache']:.1%};
  target >= 90%).

## (c) Cache size and write speed

| | value |
|---|---|
| cache on disk ({write['dtype']}, train + val, inputs + {len(per_block)} block outputs + labels) | {sizes[0] / 1e6:.1f} MB logical, {sizes[1] / 1e6:.1f} MB allocated |
| build wall time | {write['cache/wall_s']:.1f} s ({write['cache/samples_per_s']:.0f} samples/s, {sizes[0] / 1e6 / write['cache/wall_s']:.0f} MB/s) |
| - teacher forward and cast to {write['dtype']} | {write['cache/teacher_s']:.1f} s ({write['cache/teacher_s'] / write['cache/wall_s']:.0%}) |
| - write + fsync calls (fsync every {params.cache.chunk_size} samples) | {write['cache/write_s']:.1f} s ({write['cache/write_s'] / write['cache/wall_s']:.0%}): {write['cache/write_mb_s']:.0f} MB/s |
| - sha256 of every file for the manifest | {write['cache/checksum_s']:.1f} s |
| raw sequential write of the same bytes (8 MiB blocks, then fsync, like `dd conv=fsync`) | {sizes[0] / 1e6 / raw_mb_s:.1f} s: {raw_mb_s:.0f} MB/s |
| build throughput / raw write speed | {sizes[0] / 1e6 / write['cache/wall_s'] / raw_mb_s:.0%} |

The writer's own calls take {write['cache/write_s']:.1f} s against {sizes[0] / 1e6 / raw_mb_s:.1f} s for the raw write
of the same bytes ({write['cache/write_mb_s'] / raw_mb_s:.0%} of raw speed: above 100% means the kernel wrote dirty
pages back while the teacher computed the next batches, so the per-chunk fsyncs found them already on disk).
The build is bound by the teacher: the disk would keep up with a teacher
{raw_mb_s / (sizes[0] / 1e6 / write['cache/wall_s']):.0f}x faster.

## (d) float16 vs float32 cache: candidate ranking

Scores from the pipeline's own code: for block {SCORE_BLOCK}, a supernet block (`pipeline.supernet.train_block`,
`supernet` params, {args.score_epochs} epoch(s) over the first {args.score_train} train samples) and every one of its
{len(ranking['candidates'])} candidates rated by `pipeline.scoring.score_prefix` (BN recalibrated per candidate, DNA's
relative L1 over {params.score.batches} x {params.score.batch_size} val samples). float16 and float32 caches of the
same samples are built by the same writer from the same teacher.
*score-only*: the float32-trained supernet rated on each cache. *end-to-end*: a supernet trained and rated on each
cache (same seed, init, batches and paths), as the pipeline runs with either `cache.dtype`.

| | Kendall tau over {len(ranking['candidates'])} candidates (target >= 0.95) | largest relative score difference |
|---|---|---|
{chr(10).join(f"| {k} | **{ranking['tau'][k]:.3f}** | {_max_rel(v):.2e} |" for k, v in ranking['scores'].items())}
"""


def _max_rel(scores: dict[str, list[float]]) -> float:
    return max(abs(a - b) / b for a, b in zip(scores["float16"], scores["float32"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode, block and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teacher", default="artifacts/teacher")
    parser.add_argument("--score-epochs", type=int, default=2, help="(d) supernet epochs over the subset")
    parser.add_argument("--score-train", type=int, default=8192, help="(d) train samples of the (d) caches")
    parser.add_argument("--scratch", default=None, help="folder for the caches written here (default: system tmp)")
    parser.add_argument("--out", default="benchmarks/results/cache.md")
    parser.add_argument("overrides", nargs="*", help="params.yaml key=value overrides")
    args = parser.parse_args()
    setup_logging()
    started, load_start = time.perf_counter(), "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    root = repo_root()
    params = load_params(args.overrides)
    params.runtime.progress = False
    device = select_device(params.runtime)
    meta = load_meta(root / "data/prepared")
    splits = {s: load_split(root / "data/prepared", s) for s in SPLITS}
    teacher, blocks = load_teacher(root / args.teacher, device)
    teacher = to_device_model(teacher, device, params.runtime.channels_last)
    layout = torch.channels_last if params.runtime.channels_last else torch.contiguous_format
    teacher_hash = weights_hash(root / args.teacher)
    names = [b["name"] for b in blocks["blocks"]]

    def extract(x: torch.Tensor) -> list[torch.Tensor]:
        return block_outputs(teacher, blocks, x.contiguous(memory_format=layout))

    def build(out: Path, dtype: str, sources: dict[str, Split]) -> dict:
        return write_features(out, sources, extract, names, lambda u8: normalize(u8, meta), dtype=dtype,
                              batch_size=params.cache.batch_size, chunk_size=params.cache.chunk_size,
                              seed=params.seed, teacher_sha256=teacher_hash, device=device, show_progress=False)

    scratch = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.scratch))
    try:
        log.info("(c) building the %s cache in %s", params.cache.dtype, scratch)
        write = {**build(scratch / "features", params.cache.dtype, splits), "dtype": params.cache.dtype}
        sizes = disk_bytes(scratch / "features")
        raw_mb_s = measure_raw_write(scratch, sizes[0])
        cache = FeatureCache(scratch / "features", teacher_dir=root / args.teacher)
        n_samples = {s: cache.num_samples(s) for s in SPLITS}
        per_block = {}
        for b, block in enumerate(blocks["blocks"]):
            log.info("(a, b) block %s", block["name"])
            per_block[block["name"]] = bench_block(b, block, params, cache, splits["train"].images, meta, teacher,
                                                   blocks, device, args.steps, args.rounds)
            log.info("%s: %s", block["name"], {m: round(v) for m, v in per_block[block["name"]].items()})
        log.info("(d) float16 and float32 caches of %d train samples, ranking block %s", args.score_train,
                 SCORE_BLOCK)
        subset = {"train": Split(splits["train"].images[:args.score_train], splits["train"].labels[:args.score_train]),
                  "val": splits["val"]}
        caches = {}
        for dtype in ("float16", "float32"):
            build(scratch / dtype, dtype, subset)
            caches[dtype] = FeatureCache(scratch / dtype, teacher_dir=root / args.teacher)
        ranking = ranking_agreement(caches, blocks, params, device, args.score_epochs, scratch)
        log.info("(d) tau %s", ranking["tau"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    text = report(args, params, blocks, teacher_hash, write, raw_mb_s, sizes, n_samples, per_block, ranking,
                  (load_start, load_end), time.perf_counter() - started)
    out = root / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log.info("wrote %s", out)
    print(text)


if __name__ == "__main__":
    main()
