"""Typed schema of ``params.yaml`` and the one way to load it.

``params.yaml`` is the single source of truth. Every stage loads it through Hydra's compose
API, so ``key=value`` overrides work on any entry point, and through the dataclasses below,
so a wrong key, type or value fails before any computation with a message naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
DEVICES_HINT = "auto, cpu, cuda or cuda:N"


class ConfigError(PipelineError):
    """A params value that cannot work; the message names the key and the fix."""


@dataclass
class Runtime:
    device: str = "auto"  # auto picks cuda when available
    amp: bool = False  # autocast: bfloat16; float16 + GradScaler on GPUs without bfloat16
    threads: int = 0  # 0 = OMP_NUM_THREADS where set, else one per core (runtime.cpu_threads)
    channels_last: bool = True  # 2-2.5x faster convolutions on CPU
    progress: bool = True  # bars only appear on a terminal either way
    workers: int = 0  # image I/O: prepare's decoding processes, the training loops' reader threads (0 = in process)


@dataclass
class Data:
    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    download: bool = False  # torchvision download, only for users with internet
    image_size: int = 28
    val_fraction: float = 0.1  # held out of train: scoring and model selection
    limit: int = 0  # 0 = all; else N images of the train pool, every class in proportion (seeded; smoke runs)
    test_limit: int = 0
    bad_images: str = "fail"  # fail | skip: unreadable image files stop prepare, or are left out (meta.json)


@dataclass
class Augment:
    hflip: bool = True
    pad_crop: int = 2  # random translation by up to this many pixels
    erase_prob: float = 0.0  # timm RandomErasing, pixel mode


@dataclass
class Recipe:
    """A classification training recipe, shared by the teacher and the retrained student."""

    epochs: int = 10
    batch_size: int = 128
    opt: str = "adamw"  # any timm optimizer name
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd / rmsprop only
    sched: str = "cosine"  # any timm scheduler name
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    eval_batch_size: int = 1024
    augment: Augment = field(default_factory=Augment)


@dataclass
class Teacher:
    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    stem_stride: int = 0  # 0 = the model's own; N = set the first conv's stride (small images)
    stem_pool: bool = False  # False replaces the stem max-pool by identity (small images)
    checkpoint: str = ""  # local safetensors or torch file: load instead of training
    pretrained: bool = False  # timm hub weights, needs internet
    # feature_info indices, or module names for stages feature_info skips (EfficientNet's stride-1 stages)
    boundaries: list[Any] = field(default_factory=lambda: [1, 2, 3, 4])
    train: Recipe = field(default_factory=Recipe)


CACHE_MODES = ("auto", "cache", "online")


@dataclass
class Cache:
    mode: str = "auto"  # auto | cache | online: where the supernet and score stages get teacher features
    max_gb: float = 100.0  # auto caches only an estimated size up to this (and within the free disk); 0 = no cap
    dtype: str = "float16"  # float16 | float32 storage of inputs and teacher features
    views: int = 1  # augmented views of the train split; 1 = the plain images
    batch_size: int = 1024  # images per teacher forward
    chunk_size: int = 8192  # samples per fsync: the resume granularity of an interrupted build


@dataclass
class Cell:
    """A depth/width variant of a block (DNA's cells): its layers and their width."""

    layers: int = 2
    width: int = 0  # width of every layer but the last (which writes the block's width); 0 = the block's width
    out: int = 0  # width the last layer writes; 0 = the block's (several: the next block's cells read each)


@dataclass
class BlockSpace:
    width: int = 0  # student channels at the block output (multiple of 8)
    cells: list[Cell] = field(default_factory=lambda: [Cell()])
    lr: float = 0.0  # 0 = supernet.lr
    epochs: int = 0  # 0 = supernet.epochs; a block whose widest ops stay under-trained gets more (block_supernet)
    train_samples: int = 0  # 0 = supernet.train_samples; more than the cache holds = all of it


@dataclass
class Space:
    ops: list[str] = field(default_factory=lambda: ["er_k3e3", "er_k3e6", "k3e3_nose", "k3e6_nose", "k5e3_nose",
                                                    "k5e6_nose"])
    identity: bool = True  # allow skipping layers strictly inside a cell (searchable depth)
    se_ratio: float = 0.25
    act: str = "swish"
    stem: int = 16
    stem_layer: str = ""  # a fixed timm block after the stem conv, e.g. DNA's ds_r1_k3_s1_c16_se0.25; "" = none
    head: int = 256
    blocks: dict[str, BlockSpace] = field(default_factory=dict)


@dataclass
class Supernet:
    epochs: int = 10  # with the fair sampler: block-level tau 0.63 vs 0.56 at 5 uniform (results/ranking.md)
    batch_size: int = 128
    opt: str = "adam"  # any timm optimizer name
    lr: float = 5e-3  # with 24k samples per epoch: block-level tau 0.90/0.80/0.78 in b0-b2 (results/ranking.md)
    lr_decay: float = 0.9  # per epoch, as in DNA
    weight_decay: float = 1e-4
    sampler: str = "fair"  # fair (each op once per layer every len(ops) steps) | uniform
    target_norm: bool = True  # standardise teacher targets per channel (raw MSE: early blocks learn ~a constant)
    train_samples: int = 24000  # train samples per epoch, drawn afresh each epoch; 0 = the whole split
    val_samples: int = 2048  # val samples for the per-epoch val loss
    val_paths: int = 4  # fixed random paths averaged for the val loss (their spread is logged)


@dataclass
class Score:
    batches: int = 8  # rating batches taken from the val split
    batch_size: int = 256
    bn_batch_size: int = 256  # the fixed train batch that recalibrates BN for every candidate
    units: str = "teacher"  # teacher | target: relative L1 in the teacher's units or the supernet's training units


@dataclass
class Costs:
    """The ``costs`` stage: every candidate's counted and measured costs on a named target (``pipeline.costs``)."""

    backend: str = "torch"  # torch | onnxruntime (CPU execution provider)
    device: str = "cpu"  # the target: cpu | cuda | cuda:N | auto (cuda when present)
    threads: int = 1  # intra-op threads while timing; 0 = one per core
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256])  # one latency_b<N> metric each
    warmup: int = 2  # untimed rounds first
    repeats: int = 30  # timed rounds (each module once per round and batch size, shuffled); the median is kept
    calibrate: int = 5  # whole random students timed with the tables: measured / summed scales them; 0 = raw sums
    tolerance: float = 0.1  # relative error a measured cost may have against a built model
    additivity: int = 30  # random whole students the additivity stage times against the summed tables (0 = skip)
    out_dir: str = "artifacts/costs"
    accept_fingerprint: str = ""  # id of a table measured on another machine to use anyway ("" = none)


# The cost metric registry (pipeline.costs measures them). Here, not there: validating search.metric must not make
# every stage import the timing code.
COUNTED_METRICS = {"params": "parameters", "flops": "multiply-accumulates",  # pipeline.space.Cost's fields
                   "flops_dna": "FLOPs by DNA's counter (convs, BN, linear, pooling: its Table 1)"}
LATENCY_METRIC = re.compile(r"^latency_b(?P<batch>[1-9][0-9]*)$")  # milliseconds at batch size N


@dataclass(frozen=True)
class Metric:
    """A cost metric: counted ones are exact, measured ones hold within ``tolerance`` (relative) of a built model."""

    name: str
    exact: bool
    unit: str
    batch: int = 0  # measured: the batch size timed
    tolerance: float = 0.0

    @property
    def measured(self) -> bool:
        return not self.exact


def metric_registry(batch_sizes: Iterable[int], tolerance: float = 0.0) -> dict[str, Metric]:
    """The counted metrics, and ``latency_b<N>`` for each batch size N."""
    out = {name: Metric(name, exact=True, unit=unit) for name, unit in COUNTED_METRICS.items()}
    for batch in batch_sizes:
        name = f"latency_b{int(batch)}"
        out[name] = Metric(name, exact=False, unit="ms", batch=int(batch), tolerance=tolerance)
    return out


def check_metric(name: str, cfg: Costs, key: str = "search.metric") -> Metric:
    """The metric called ``name``; anything unregistered is a ConfigError naming ``key`` and the registered names."""
    registered = metric_registry(cfg.batch_sizes, cfg.tolerance)
    if name in registered:
        return registered[name]
    match = LATENCY_METRIC.match(name)
    hint = (f"batch {match['batch']} is not measured: add it to costs.batch_sizes={list(cfg.batch_sizes)}"
            if match else f"choose one of {', '.join(registered)} (latency_b<N> for each N in costs.batch_sizes)")
    raise ConfigError(f"params key '{key}' = {name!r} is not a registered cost metric: {hint}")


@dataclass
class Search:
    method: str = "exact"  # exact | optuna
    metric: str = "latency_b256"  # a registered cost metric (pipeline.costs): params | flops | latency_b<N>
    budget: float = 0.33
    limits: dict[str, float] = field(default_factory=dict)  # more ceilings: metric -> limit (same units as budget)
    relative: bool = True  # budget and limits as fractions of the teacher's cost (the costs stage measures it)
    fixed_cost: float | None = None  # None = computed from the search space
    top_k: int = 1
    scores_dir: str = "artifacts/scores"
    out_dir: str = "artifacts/search"
    trials: int = 500
    sampler: str = "tpe"  # tpe | nsga2
    storage: str = ""  # optuna storage: sqlite URL or journal file path
    worker: int = 0  # this process's index among workers sharing storage: its sampler seed (assembly.worker_seed)


@dataclass
class Retrain:
    """Retraining the searched student (DNA Sec. 4), its export and its registry entry."""

    train: Recipe = field(default_factory=lambda: Recipe(epochs=12))
    kd_weight: float = 0.0  # loss = (1 - w) * CE + w * T^2 * KL(teacher || student); 0 = no teacher
    kd_temperature: float = 2.0
    init: str = "supernet"  # scratch | supernet (the chosen paths' supernet weights where shapes match)
    ema: float = 0.0  # decay of a timm ModelEmaV3 of the weights, selected on val; 0 = off
    drop_path: float = 0.0  # stochastic depth over the MBConv blocks
    drop_rate: float = 0.0  # dropout before the classifier
    onnx: bool = False  # also export model.onnx, checked against onnxruntime
    registry_name: str = "dna-student"  # MLflow registered model; "" = neither log nor register the model


@dataclass
class Report:
    latency_repeats: int = 20  # timed rounds of teacher and student (median), as costs times (costs.batch_sizes)


def _short_recipe() -> Recipe:
    return Recipe(epochs=2, lr=3e-3, warmup_epochs=0, eval_batch_size=1024)


@dataclass
class Spos:
    """The ranking check's SPOS baseline (Guo et al., ECCV 2020; ``pipeline.spos``): one weight-sharing supernet over
    the whole student, trained on labels with one uniformly random path per step, candidates rated by val accuracy."""

    compute: float = 1.0  # training MACs as a multiple of the DNA supernets' (every block, supernet.epochs each)
    epochs: int = 5  # the matched images spread over this many epochs, a checkpoint after each
    batch_size: int = 128
    opt: str = "adamw"  # any timm optimizer name
    lr: float = 3e-3
    lr_decay: float = 0.9  # per epoch, as the DNA supernets
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: Augment = field(default_factory=Augment)
    bn_samples: int = 1024  # fixed train images (one batch) that recalibrate BN for every rated candidate
    val_samples: int = 0  # val images each candidate is rated on (0 = the whole val split)
    eval_batch_size: int = 1024


SHARD = re.compile(r"(?P<index>\d+)/(?P<count>[1-9]\d*)")  # validate.shard: machine i of n


def parse_shard(value: str) -> tuple[int, int] | None:
    """``validate.shard``: None for "" (every unit), else (i, n); anything else is a ConfigError."""
    match = SHARD.fullmatch(value)
    if value and (match is None or int(match["index"]) >= int(match["count"])):
        raise ConfigError(f"params key 'validate.shard' = {value!r} is invalid: \"\" (every unit) or \"i/n\" with "
                          f"0 <= i < n (machine i of n trains the units whose index % n == i), e.g. 0/2 and 1/2")
    return (int(match["index"]), int(match["count"])) if value else None


@dataclass
class Validate:
    """The ranking check (``dvc repro validate/dvc.yaml``): stand-alone accuracy of architectures drawn from the
    searched space against their predicted scores; not part of the default pipeline."""

    stratified: int = 12  # M architectures, one per equal-width bin of the space's cost range
    random: int = 5  # R random architectures at the search budget
    window: float = 0.1  # "at the budget" = cost within this fraction below it
    seeds: int = 2  # training seeds per architecture (averaged; >= 2 also gives the seed-to-seed noise ceiling)
    workers: int = 2  # architectures trained at once (CPU: threads split between them)
    train_limit: int = 30000  # train images per unit (0 = the whole train split)
    train: Recipe = field(default_factory=_short_recipe)
    bootstrap: int = 2000  # resamples for the 95% intervals of tau
    shard: str = ""  # "i/n": train only units whose index % n == i (machine i of n); "" = every unit
    proxy_batch: int = 128  # train images of the zero-cost proxy (NASWOT) at initialisation
    spos: Spos = field(default_factory=Spos)


@dataclass
class Fidelity:
    """The block-level check (``validate/dvc.yaml``: fidelity_train@bN, fidelity_report): K candidates per block
    trained stand-alone with the supernet's loss and recipe, their errors ranked against their block scores."""

    candidates: int = 16  # K per block, one per equal-count bin of the block's score order (seeded)
    seeds: int = 2  # stand-alone trainings per candidate (averaged; >= 2 gives the seed-to-seed tau)
    epochs: int = 48  # per unit (the supernet's per-epoch lr decay applies); at 16 the val loss still fell 30% more
    train_samples: int = 6000  # fresh random train samples per epoch (0 = the whole split)
    lr: float = 0.01  # the units' lr (0 = the block's supernet lr): fixed, so tuning the supernet keeps the truth
    bootstrap: int = 2000  # resamples for the 95% intervals of tau


@dataclass
class Tracking:
    experiment: str = "dna"


@dataclass
class Params:
    seed: int = 0
    runtime: Runtime = field(default_factory=Runtime)
    data: Data = field(default_factory=Data)
    teacher: Teacher = field(default_factory=Teacher)
    cache: Cache = field(default_factory=Cache)
    space: Space = field(default_factory=Space)
    supernet: Supernet = field(default_factory=Supernet)
    score: Score = field(default_factory=Score)
    costs: Costs = field(default_factory=Costs)
    search: Search = field(default_factory=Search)
    retrain: Retrain = field(default_factory=Retrain)
    report: Report = field(default_factory=Report)
    validate: Validate = field(default_factory=Validate)
    fidelity: Fidelity = field(default_factory=Fidelity)
    tracking: Tracking = field(default_factory=Tracking)


def block_supernet(params: Params, block: str) -> Supernet:
    """One block's supernet recipe: ``supernet.*`` with the block's own lr, epochs and train samples where
    ``space.blocks`` sets them (the one place that merges them: the supernet stage, the fidelity check and SPOS's
    compute match)."""
    own, base = params.space.blocks[block], params.supernet
    return replace(base, lr=own.lr or base.lr, epochs=own.epochs or base.epochs,
                   train_samples=own.train_samples or base.train_samples)


def repo_root() -> Path:
    """The workspace a stage runs in (params.yaml, inputs, outputs): the working directory.

    DVC starts every stage in its ``wdir``, the repository root for all stages here. ``DVC_ROOT`` is not the
    workspace: for ``dvc exp run --temp`` and queued experiments DVC points it at the parent repository while the
    stage runs in a temporary clone (``dvc/repo/experiments/queue/base.py``), so following it would overwrite the
    main workspace's outputs. It names where the MLflow store lives instead (``pipeline.tracking``).
    """
    return Path.cwd().resolve()


def load_params(overrides: Sequence[str] = (), root: Path | None = None) -> Params:
    """Compose ``params.yaml`` with Hydra, apply ``key=value`` overrides, validate, return dataclasses."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    root = Path(root or repo_root()).resolve()
    if not (root / PARAMS_FILE).is_file():
        raise ConfigError(f"{root / PARAMS_FILE} not found: run from the repository root")
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            raw = compose(config_name=Path(PARAMS_FILE).stem, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"bad override: {_first_line(err)} (use key=value with a key from params.yaml)") from None
    return validate(raw)


def validate(raw: DictConfig | dict) -> Params:
    """Merge into the typed schema (unknown keys, wrong types fail), then check value ranges."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Params), raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"params key '{key}': {_first_line(err)}") from None
    params: Params = OmegaConf.to_object(merged)
    _check(params)
    return params


def as_dict(obj: Any) -> Any:
    """Plain containers (for JSON, MLflow params and weights-only checkpoints)."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_dict(v) for v in obj]
    return obj


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"params key '{key}' = {value!r} is invalid: {allowed}")


def _check_recipe(prefix: str, r: Recipe) -> None:
    _require(r.epochs >= 0, f"{prefix}.epochs", r.epochs, "must be >= 0")
    _require(r.batch_size > 0, f"{prefix}.batch_size", r.batch_size, "must be > 0")
    _require(r.eval_batch_size > 0, f"{prefix}.eval_batch_size", r.eval_batch_size, "must be > 0")
    _require(r.lr > 0, f"{prefix}.lr", r.lr, "must be > 0")
    _require(r.weight_decay >= 0, f"{prefix}.weight_decay", r.weight_decay, "must be >= 0")
    _require(0 <= r.label_smoothing < 1, f"{prefix}.label_smoothing", r.label_smoothing, "must be in [0, 1)")
    _require(0 <= r.warmup_epochs <= max(r.epochs, 0) or r.epochs == 0, f"{prefix}.warmup_epochs",
             r.warmup_epochs, f"must be in [0, epochs={r.epochs}]")
    _check_augment(f"{prefix}.augment", r.augment)


def _check_augment(prefix: str, a: Augment) -> None:
    _require(a.pad_crop >= 0, f"{prefix}.pad_crop", a.pad_crop, "must be >= 0")
    _require(0 <= a.erase_prob <= 1, f"{prefix}.erase_prob", a.erase_prob, "must be in [0, 1]")


def _boundaries_ok(b: list[Any]) -> bool:
    if all(isinstance(x, int) and not isinstance(x, bool) for x in b):
        return len(b) >= 1 and b == sorted(set(b)) and min(b) >= 0
    return len(b) >= 1 and all(isinstance(x, str) and x for x in b) and len(set(b)) == len(b)


def _check(p: Params) -> None:
    rt, d, t = p.runtime, p.data, p.teacher
    _require(rt.device in ("auto", "cpu", "cuda") or rt.device.startswith("cuda:"), "runtime.device", rt.device,
             f"use {DEVICES_HINT}")
    _require(rt.threads >= 0, "runtime.threads", rt.threads, "must be >= 0 (0 = all cores)")
    _require(d.name in DATASETS, "data.name", d.name, f"choose one of {', '.join(DATASETS)}")
    _require(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8 pixels")
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _require(d.limit >= 0, "data.limit", d.limit, "must be >= 0 (0 = all images)")
    _require(d.test_limit >= 0, "data.test_limit", d.test_limit, "must be >= 0 (0 = all images)")
    _require(d.bad_images in ("fail", "skip"), "data.bad_images", d.bad_images, "fail or skip")
    _require(rt.workers >= 0, "runtime.workers", rt.workers, "must be >= 0 (0 = read and decode images in process)")
    _require(t.stem_stride >= 0, "teacher.stem_stride", t.stem_stride, "0 (model default) or a stride >= 1")
    _require(_boundaries_ok(list(t.boundaries)), "teacher.boundaries", list(t.boundaries),
             "a strictly increasing list of feature_info indices, or distinct module names (e.g. [blocks.1, blocks.3])")
    _check_recipe("teacher.train", t.train)
    _require(p.cache.mode in CACHE_MODES, "cache.mode", p.cache.mode, "auto (cache when it fits cache.max_gb and the "
             "free disk, else online), cache (always write it) or online (the teacher runs in the supernet and score stages)")
    _require(p.cache.max_gb >= 0, "cache.max_gb", p.cache.max_gb, "must be >= 0 GB (0 = no cap: the free disk decides)")
    _require(p.cache.dtype in ("float16", "float32"), "cache.dtype", p.cache.dtype, "float16 or float32")
    _require(p.cache.views >= 1, "cache.views", p.cache.views, "must be >= 1")
    _require(p.cache.batch_size > 0, "cache.batch_size", p.cache.batch_size, "must be > 0")
    _require(p.cache.chunk_size > 0, "cache.chunk_size", p.cache.chunk_size, "must be > 0")
    _require(p.search.method in ("exact", "optuna"), "search.method", p.search.method, "exact or optuna")
    _require(p.search.sampler in ("tpe", "nsga2"), "search.sampler", p.search.sampler, "tpe or nsga2")
    _require(p.search.top_k >= 1, "search.top_k", p.search.top_k, "must be >= 1")
    _require(p.search.budget >= 0, "search.budget", p.search.budget, "must be >= 0 (0 = no budget)")
    _require(p.search.fixed_cost is None or p.search.fixed_cost >= 0, "search.fixed_cost", p.search.fixed_cost,
             "null (from the search space) or a cost >= 0")
    _require(p.search.trials >= 1, "search.trials", p.search.trials, "must be >= 1")
    _require(p.search.worker >= 0, "search.worker", p.search.worker, "must be >= 0 (one index per worker)")
    _check_search_space(p)
    _check_costs(p.costs)
    _check_search_metrics(p)
    _check_retrain(p)
    _check_validate(p)
    _check_fidelity(p.fidelity)


def _check_search_space(p: Params) -> None:
    from timm.optim import list_optimizers

    from pipeline.space import check_space  # lazy: the op registry imports torch and timm

    check_space(p.space, len(p.teacher.boundaries))
    s, c = p.supernet, p.score
    _require(s.epochs >= 1, "supernet.epochs", s.epochs, "must be >= 1")
    for name, block in p.space.blocks.items():
        _require(block.epochs >= 0, f"space.blocks.{name}.epochs", block.epochs, "must be >= 0 (0 = supernet.epochs)")
        _require(block.train_samples >= 0, f"space.blocks.{name}.train_samples", block.train_samples,
                 "must be >= 0 (0 = supernet.train_samples)")
    _require(s.batch_size > 0, "supernet.batch_size", s.batch_size, "must be > 0")
    _require(s.lr > 0, "supernet.lr", s.lr, "must be > 0")
    _require(0 < s.lr_decay <= 1, "supernet.lr_decay", s.lr_decay, "must be in (0, 1] (1 = constant lr)")
    _require(s.weight_decay >= 0, "supernet.weight_decay", s.weight_decay, "must be >= 0")
    _require(s.sampler in ("uniform", "fair"), "supernet.sampler", s.sampler, "uniform or fair")
    _require(s.opt in list_optimizers(), "supernet.opt", s.opt, "a timm optimizer name, e.g. adam, adamw, sgd")
    _require(s.train_samples >= 0, "supernet.train_samples", s.train_samples, "must be >= 0 (0 = all)")
    _require(s.val_samples > 0, "supernet.val_samples", s.val_samples, "must be > 0")
    _require(s.val_paths > 0, "supernet.val_paths", s.val_paths, "must be > 0")
    for key in ("batches", "batch_size", "bn_batch_size"):
        _require(getattr(c, key) > 0, f"score.{key}", getattr(c, key), "must be > 0")
    _require(c.units in ("teacher", "target"), "score.units", c.units, "teacher or target")


def _check_costs(c: Costs) -> None:
    _require(c.backend in ("torch", "onnxruntime"), "costs.backend", c.backend, "torch or onnxruntime")
    _require(c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:"), "costs.device", c.device,
             f"use {DEVICES_HINT}")
    _require(c.backend == "torch" or c.device == "cpu", "costs.device", c.device,
             "costs.backend=onnxruntime times on the CPU: set costs.device=cpu")
    _require(c.threads >= 0, "costs.threads", c.threads, "must be >= 0 (0 = all cores)")
    _require(bool(c.batch_sizes) and min(c.batch_sizes) >= 1 and len(set(c.batch_sizes)) == len(c.batch_sizes),
             "costs.batch_sizes", list(c.batch_sizes), "a non-empty list of distinct batch sizes >= 1")
    _require(c.warmup >= 0, "costs.warmup", c.warmup, "must be >= 0")
    _require(c.repeats >= 1, "costs.repeats", c.repeats, "must be >= 1")
    _require(c.calibrate >= 0, "costs.calibrate", c.calibrate, "must be >= 0 (0 = the plain sums)")
    _require(0 < c.tolerance < 1, "costs.tolerance", c.tolerance, "must be in (0, 1), e.g. 0.1 = within 10%")
    _require(c.additivity == 0 or c.additivity >= 2, "costs.additivity", c.additivity,
             "0 (skip) or >= 2 students (a median and a 90th percentile need several; 30 is the check's size)")
    _require(bool(c.out_dir), "costs.out_dir", c.out_dir, "a folder, e.g. artifacts/costs")


def _check_search_metrics(p: Params) -> None:
    s = p.search
    check_metric(s.metric, p.costs)
    for name, limit in s.limits.items():
        check_metric(name, p.costs, key=f"search.limits.{name}")
        _require(limit == limit and limit > 0, f"search.limits.{name}", limit, "a ceiling > 0 in the metric's units")
    _require(not s.relative or s.fixed_cost is None, "search.relative", s.relative,
             "relative budgets need the teacher's cost from the costs stage: set search.fixed_cost=null")


def _check_retrain(p: Params) -> None:
    r, rep = p.retrain, p.report
    _check_recipe("retrain.train", r.train)
    _require(0 <= r.kd_weight <= 1, "retrain.kd_weight", r.kd_weight, "must be in [0, 1] (0 = no distillation)")
    _require(r.kd_temperature > 0, "retrain.kd_temperature", r.kd_temperature, "must be > 0")
    _require(r.init in ("scratch", "supernet"), "retrain.init", r.init, "scratch or supernet")
    _require(0 <= r.ema < 1, "retrain.ema", r.ema, "must be in [0, 1) (0 = off, e.g. 0.999)")
    _require(0 <= r.drop_path < 1, "retrain.drop_path", r.drop_path, "must be in [0, 1)")
    _require(0 <= r.drop_rate < 1, "retrain.drop_rate", r.drop_rate, "must be in [0, 1)")
    _require(rep.latency_repeats >= 1, "report.latency_repeats", rep.latency_repeats, "must be >= 1")


def _check_validate(p: Params) -> None:
    v = p.validate
    _require(v.stratified >= 2, "validate.stratified", v.stratified, "must be >= 2 (a ranking needs two points)")
    _require(v.random >= 1, "validate.random", v.random, "must be >= 1")
    _require(0 < v.window < 1, "validate.window", v.window, "must be in (0, 1), e.g. 0.1 = within 10% below the budget")
    _require(v.seeds >= 1, "validate.seeds", v.seeds, "must be >= 1")
    _require(v.workers >= 1, "validate.workers", v.workers, "must be >= 1")
    _require(v.train_limit >= 0, "validate.train_limit", v.train_limit, "must be >= 0 (0 = the whole train split)")
    _require(v.bootstrap >= 100, "validate.bootstrap", v.bootstrap, "must be >= 100 resamples")
    _require(v.train.epochs >= 1, "validate.train.epochs", v.train.epochs, "must be >= 1 (accuracy needs training)")
    _check_recipe("validate.train", v.train)
    parse_shard(v.shard)
    _require(v.proxy_batch >= 2, "validate.proxy_batch", v.proxy_batch, "must be >= 2 (NASWOT compares images)")
    _check_spos(v.spos)


def _check_spos(s: Spos) -> None:
    from timm.optim import list_optimizers

    _require(s.compute > 0, "validate.spos.compute", s.compute, "must be > 0 (1 = the DNA supernets' training MACs)")
    for key in ("epochs", "batch_size", "bn_samples", "eval_batch_size"):
        _require(getattr(s, key) >= 1, f"validate.spos.{key}", getattr(s, key), "must be >= 1")
    _require(s.opt in list_optimizers(), "validate.spos.opt", s.opt, "a timm optimizer name, e.g. adamw, sgd")
    _require(s.lr > 0, "validate.spos.lr", s.lr, "must be > 0")
    _require(0 < s.lr_decay <= 1, "validate.spos.lr_decay", s.lr_decay, "must be in (0, 1] (1 = constant lr)")
    _require(s.weight_decay >= 0, "validate.spos.weight_decay", s.weight_decay, "must be >= 0")
    _require(0 <= s.label_smoothing < 1, "validate.spos.label_smoothing", s.label_smoothing, "must be in [0, 1)")
    _require(s.val_samples >= 0, "validate.spos.val_samples", s.val_samples, "must be >= 0 (0 = the whole val split)")
    _check_augment("validate.spos.augment", s.augment)


def _check_fidelity(f: Fidelity) -> None:
    _require(f.candidates >= 2, "fidelity.candidates", f.candidates, "must be >= 2 (a ranking needs two points)")
    _require(f.seeds >= 1, "fidelity.seeds", f.seeds, "must be >= 1 (2 also gives the seed-to-seed tau)")
    _require(f.epochs >= 2, "fidelity.epochs", f.epochs, "must be >= 2 (convergence is read off the last epoch's gain)")
    _require(f.train_samples >= 0, "fidelity.train_samples", f.train_samples, "must be >= 0 (0 = the whole split)")
    _require(f.lr >= 0, "fidelity.lr", f.lr, "must be >= 0 (0 = the block's supernet lr)")
    _require(f.bootstrap >= 100, "fidelity.bootstrap", f.bootstrap, "must be >= 100 resamples")
