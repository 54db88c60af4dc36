"""Cost metrics of the search space, one registry: counted (params, FLOPs) and measured (latency on a named device).

Every cost comes from the search space alone (no supernet, no score table), so a table can be measured on the
target machine and the search run elsewhere. Counted metrics are exact (``pipeline.space``'s one counter);
measured ones, ``latency_b<N>`` in milliseconds for each N in ``costs.batch_sizes``, are timed on the target
(``costs.backend`` on ``costs.device``) and hold within ``costs.tolerance`` of a built model.

How a latency is measured (``benchmarks/results/costs.md``: how well the sums predict whole students):

- Each op at each layer position is timed at student widths in its real context: its input size, channels and
  stride, ``runtime.channels_last`` as in the student, eval mode, no autograd (layers of equal geometry once). A
  candidate costs the sum of its layers (a skip adds nothing: the student omits it); the fixed parts are the
  student's own stem and head (conv, BN-act, pooling, classifier) modules, timed the same way.
- Everything is timed in rounds: a round times every item once per batch size, in a shuffled order, so a change
  of machine load hits all items alike; the median over ``costs.repeats`` rounds (after ``costs.warmup``) is
  kept. A sample is one forward on an input rewritten just before it (as the previous layer would have left
  it), with the weights as cold as the other items leave them (as the other layers of a student do; warming a
  layer by an untimed forward first under-predicts students by 20-30% at batch 1).
- ``costs.calibrate`` whole random students (timm ``dna_student`` models) are timed in the same rounds; per batch
  size the median of their measured / summed latency scales all parts. It is about 1 for torch; ONNX Runtime runs
  a layer alone dearer than inside one whole graph (+20% at batch 1), and pays a call per layer that a model pays
  once (a trivial graph's time is taken off each part and added to the fixed parts once).
- With one CPU thread the clock is the thread's CPU time (torch and ONNX Runtime then compute in the calling
  thread): time descheduled by other processes on a shared machine is left out, which wall-time medians do not
  survive. Otherwise wall time, on CUDA with synchronisation around each forward.

Each table carries the fingerprint of the machine and libraries it was measured with; ``read_costs`` refuses a
measured metric from another fingerprint unless ``costs.accept_fingerprint`` names it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import platform
import random
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import space, student
from pipeline.checkpoint import ArtifactError
from pipeline.config import (
    COUNTED_METRICS,
    LATENCY_METRIC,
    ConfigError,
    Costs,
    Metric,
    Teacher,
    check_metric,
    metric_registry,
)

__all__ = ["Metric", "check_metric", "metric_names", "metrics", "read_costs", "measure_space", "additivity"]
from pipeline.teacher import create_teacher

log = logging.getLogger(__name__)

REBUILD = "dvc repro costs"
FINGERPRINT, FIXED, TEACHER = "fingerprint.json", "fixed.json", "teacher.json"
BACKENDS = ("torch", "onnxruntime")


# ---------------------------------------------------------------------------------------------------- registry
# The registry itself lives in pipeline.config (config validation checks search.metric with it); here its uses.
COUNTED, LATENCY = COUNTED_METRICS, LATENCY_METRIC


def metrics(cfg: Costs) -> dict[str, Metric]:
    """The registered metrics: the counted ones, and ``latency_b<N>`` for each N in ``costs.batch_sizes``."""
    return metric_registry(cfg.batch_sizes, cfg.tolerance)


def metrics_of(fp: Mapping[str, Any], tolerance: float = 0.0) -> dict[str, Metric]:
    """The metrics a table with fingerprint ``fp`` holds (its batch sizes)."""
    return metric_registry(fp.get("batch_sizes", []), tolerance)


def metric_names(cfg: Costs) -> list[str]:
    return list(metrics(cfg))


# ---------------------------------------------------------------------------------------------------- target
@dataclass(frozen=True)
class Target:
    """Where latencies are measured: backend, device, threads, memory layout."""

    backend: str
    device: torch.device
    threads: int  # resolved: 0 became the number of cores
    channels_last: bool

    @property
    def clock(self) -> str:
        """``thread_cpu`` when one CPU thread computes in the calling thread, else ``wall``."""
        return "thread_cpu" if self.device.type == "cpu" and self.threads == 1 else "wall"


def target(cfg: Costs, channels_last: bool) -> Target:
    """The measuring target of the ``costs`` params; a device or backend this machine lacks is a ConfigError."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"params key 'costs.backend' = {cfg.backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params key 'costs.device' = {cfg.device!r} but CUDA is not available here: "
                          "use costs.device=cpu, or measure on a machine with the GPU")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.backend == "onnxruntime":
        if device.type != "cpu":
            raise ConfigError("params key 'costs.backend' = 'onnxruntime' times on the CPU (CPUExecutionProvider): "
                              "set costs.device=cpu")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError("params key 'costs.backend' = 'onnxruntime' needs onnxruntime: "
                              "pip install -e . (it is a default dependency)") from None
    threads = cfg.threads or len(os.sched_getaffinity(0))
    return Target(cfg.backend, device, threads, channels_last and cfg.backend == "torch")


def device_name(device: torch.device) -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, else the platform's) or the CUDA device's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def fingerprint(cfg: Costs, channels_last: bool) -> dict[str, Any]:
    """This machine as a table's measurements depend on it, with a short ``id`` hash over the rest."""
    import timm

    tgt = target(cfg, channels_last)
    fp: dict[str, Any] = {"backend": tgt.backend, "device": tgt.device.type, "device_name": device_name(tgt.device),
                          "threads": tgt.threads, "batch_sizes": [int(b) for b in cfg.batch_sizes],
                          "channels_last": tgt.channels_last, "clock": tgt.clock,
                          "torch": torch.__version__, "timm": timm.__version__}
    if tgt.device.type == "cuda":
        fp["cuda"] = torch.version.cuda
    if tgt.backend == "onnxruntime":
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
    fp["id"] = _fingerprint_id(fp)
    return fp


def _fingerprint_id(fp: Mapping[str, Any]) -> str:
    body = {k: v for k, v in fp.items() if k != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def describe(fp: Mapping[str, Any], also: Sequence[str] = ()) -> str:
    """``AMD EPYC, torch 2.14.1, 1 thread, batch 1/256`` (plus the fields named in ``also``)."""
    backend = fp.get("backend", "?")
    threads = fp.get("threads", "?")
    parts = [f"{fp.get('device_name', '?')}" + (f" ({fp['device']})" if fp.get("device") not in (None, "cpu") else ""),
             f"{backend} {fp.get(backend, fp.get('torch', '?'))}",
             f"{threads} thread{'' if threads == 1 else 's'}",
             f"batch {'/'.join(map(str, fp.get('batch_sizes', [])))}"]
    shown = {"device_name", "device", "backend", backend, "threads", "batch_sizes", "id"}
    parts += [f"{k} {fp.get(k)}" for k in also if k not in shown]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Item:
    """One module to time and the shape of its input without the batch dimension."""

    module: nn.Module
    shape: tuple[int, ...]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def export_onnx(module: nn.Module, shape: Sequence[int]) -> bytes:
    """The module as ONNX bytes with a dynamic batch axis (torch's TorchScript exporter: milliseconds per module,
    where the torch.export-based one takes seconds; ONNX Runtime optimises either graph the same way)."""
    example = torch.zeros(2, *shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), (example,), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buffer.getvalue()


class _Runner:
    """A backend's way to run one item: ``prepare`` once, then ``inputs`` per batch size and ``call``."""

    def __init__(self, tgt: Target) -> None:
        self.tgt = tgt
        self.layout = torch.channels_last if tgt.channels_last else torch.contiguous_format
        if tgt.backend == "onnxruntime":
            import onnxruntime

            self.options = onnxruntime.SessionOptions()
            self.options.intra_op_num_threads = tgt.threads
            self.options.inter_op_num_threads = 1
            self.options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            self.options.log_severity_level = 3
            self.ort = onnxruntime

    def prepare(self, item: Item) -> Callable[[Any], Any]:
        if self.tgt.backend == "onnxruntime":
            return self._session(item)
        return item.module.eval().to(self.tgt.device, memory_format=self.layout)

    def _session(self, item: Item) -> Callable[[np.ndarray], None]:
        """An ONNX Runtime session run through IO bindings: the input array is bound once (no copy per run) and
        the output lands in the session's arena, as the intermediate maps of a whole model do."""
        session = self.ort.InferenceSession(export_onnx(item.module, item.shape), self.options,
                                            providers=["CPUExecutionProvider"])
        bindings: dict[int, tuple[Any, Any]] = {}

        def call(x: np.ndarray) -> None:
            if id(x) not in bindings:
                value = self.ort.OrtValue.ortvalue_from_numpy(x)  # shares the array's memory
                binding = session.io_binding()
                binding.bind_ortvalue_input("x", value)
                binding.bind_output("y")
                bindings[id(x)] = (binding, value)
            session.run_with_iobinding(bindings[id(x)][0])

        return call

    def inputs(self, shape: Sequence[int], batch: int, generator: torch.Generator) -> tuple[Any, Any]:
        """(source, buffer): the buffer is rewritten from the source before every timed forward."""
        source = torch.randn(batch, *shape, generator=generator)
        if self.tgt.backend == "onnxruntime":
            return source.numpy(), np.empty_like(source.numpy())
        source = source.to(self.tgt.device).contiguous(memory_format=self.layout)
        return source, torch.empty_like(source)

    def refresh(self, source: Any, buffer: Any) -> None:
        if self.tgt.backend == "onnxruntime":
            np.copyto(buffer, source)
        else:
            buffer.copy_(source)

    def sample(self, call: Callable[[Any], Any], x: Any) -> float:
        """Milliseconds of one forward by the target's clock."""
        if self.tgt.device.type == "cuda":
            torch.cuda.synchronize(self.tgt.device)
            start = time.perf_counter()
            call(x)
            torch.cuda.synchronize(self.tgt.device)
            return 1e3 * (time.perf_counter() - start)
        clock = time.thread_time if self.tgt.clock == "thread_cpu" else time.perf_counter
        start = clock()
        call(x)
        return 1e3 * (clock() - start)


def time_items(items: Mapping[Hashable, Item], tgt: Target, batches: Sequence[int], warmup: int, repeats: int,
               seed: int = 0) -> dict[Hashable, dict[int, float]]:
    """Median milliseconds of one forward per item and batch size, timed in shuffled rounds (see module doc).

    A round passes over every item once per batch size, so the samples of every item and batch size spread over
    the whole measurement alike and a change of machine load during it shifts them all the same way.
    """
    runner, rng = _Runner(tgt), random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    calls = {key: runner.prepare(item) for key, item in items.items()}
    # one source and one buffer per input shape and batch size (every op at one layer position shares them)
    shapes = dict.fromkeys(item.shape for item in items.values())
    inputs = {(batch, shape): runner.inputs(shape, batch, generator) for batch in batches for shape in shapes}
    samples: dict[tuple[Hashable, int], list[float]] = {(key, batch): [] for key in items for batch in batches}
    order = list(items)
    threads = _torch_threads(tgt.threads) if tgt.device.type == "cpu" else contextlib.nullcontext()
    with threads, torch.inference_mode():
        for round_ in range(warmup + repeats):
            for batch in batches:
                rng.shuffle(order)
                for key in order:
                    source, buffer = inputs[batch, items[key].shape]
                    runner.refresh(source, buffer)
                    ms = runner.sample(calls[key], buffer)
                    if round_ >= warmup:
                        samples[key, batch].append(ms)
    return {key: {batch: statistics.median(samples[key, batch]) for batch in batches} for key in items}


# ---------------------------------------------------------------------------------------------------- the space
def layer_key(block: space.BlockSpec, layer: space.Layer, op: str) -> tuple:
    """Layers of equal geometry (op, student channels, stride, input size) are one module to time."""
    return ("layer", op, layer.student_in, layer.student_out, layer.stride, layer.in_size, block.se_ratio, block.act)


def build_student(spec: space.SpaceSpec, choice: Mapping[str, str]) -> nn.Module:
    """The real timm student (``pipeline.student``'s ``dna_student``) for one candidate per block, untrained."""
    from timm.models import create_model

    return create_model(student.MODEL_NAME, **student.model_args(spec, choice)).eval()


def fixed_parts(spec: space.SpaceSpec) -> dict[str, Item]:
    """The student's own stem (conv + BN-act) and head (conv + BN-act, pooling, classifier), as timm builds them."""
    model = build_student(spec, {block.name: next(block.candidates()) for block in spec.blocks})
    last = spec.blocks[-1]
    return {"stem": Item(nn.Sequential(model.conv_stem, model.bn1), (spec.stem.in_chs, *spec.stem.in_size)),
            "head": Item(nn.Sequential(model.conv_head, model.bn2, model.global_pool, model.classifier),
                         (last.width, *last.out_size))}


class _Trivial(nn.Module):
    """A graph that does nothing worth timing: what one backend call costs around a model (``CALL``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


CALL = "call"


def call_overhead(tgt: Target) -> bool:
    """Whether the table pays a backend call per layer that a whole model pays once: ONNX Runtime runs a student in
    one call, the table its layers one call each (torch calls every layer as a module in the student too)."""
    return tgt.backend == "onnxruntime"


def space_items(spec: space.SpaceSpec) -> dict[Hashable, Item]:
    """Every distinct layer module of the space at student widths, and the fixed parts."""
    items: dict[Hashable, Item] = {}
    for block in spec.blocks:
        for cell in block.cells:
            for layer in cell.layers:
                for op in layer.choices:
                    key = layer_key(block, layer, op)
                    if op != space.SKIP and key not in items:
                        items[key] = Item(space.build_layer(block, layer, op, student=True),
                                          (layer.student_in, *layer.in_size))
    return {**items, **fixed_parts(spec)}


def teacher_item(cfg: Teacher, teacher_split: Mapping[str, Any]) -> Item:
    """The teacher as configured (random weights: the time does not depend on them) at the split's image size."""
    model = create_teacher(replace(cfg, pretrained=False, checkpoint=""), int(teacher_split["in_chans"]),
                           int(teacher_split["num_classes"]))
    size = int(teacher_split["image_size"])
    return Item(model.eval(), (int(teacher_split["in_chans"]), size, size))


def candidate_latency(block: space.BlockSpec, cid: str, layers: Mapping[Hashable, Mapping[int, float]],
                      batch: int) -> float:
    cell, ops = block.parse(cid)
    return sum(layers[layer_key(block, layer, op)][batch] for layer, op in zip(cell.layers, ops, strict=True)
               if op != space.SKIP)


@dataclass
class CostTables:
    """Every candidate's costs per block, the fixed parts', the teacher's, and where the latencies were measured."""

    metrics: list[str]
    blocks: dict[str, dict[str, dict[str, float]]]  # block -> candidate -> metric -> value
    fixed: dict[str, float]
    teacher: dict[str, float]
    fingerprint: dict[str, Any]
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # measured metrics of stem and head
    seconds: float = 0.0
    tolerance: float = Costs.tolerance
    calibration: dict[str, float] = field(default_factory=dict)  # students, and the factor per measured metric

    def metric(self, name: str) -> BlockCosts:
        """One metric of these tables, as ``read_costs`` returns it from disk."""
        kind = metrics_of(self.fingerprint, self.tolerance)[name]
        return BlockCosts(kind, {b: {cid: row[name] for cid, row in rows.items()} for b, rows in self.blocks.items()},
                          self.fixed[name], self.teacher.get(name), dict(self.fingerprint),
                          self.calibration.get(name, 1.0))


CALIBRATION = "calibration"


def measure_space(spec: space.SpaceSpec, cfg: Costs, channels_last: bool, teacher: Item | None = None,
                  extra: Mapping[Hashable, Item] | None = None, seed: int = 0) -> tuple[CostTables, dict]:
    """Count and time every candidate of every block, the fixed parts and (optionally) the teacher.

    ``costs.calibrate`` whole random students (their own seed stream) are timed in the same rounds; per batch size
    the median of measured / summed latency scales every layer and fixed part (1 = the sums add up as they are).
    ``extra`` items are timed in the same rounds too (the additivity check's students); their medians are
    returned beside the tables, ``{key: {batch: ms}}``.
    """
    start = time.perf_counter()
    tgt = target(cfg, channels_last)
    fp = fingerprint(cfg, channels_last)
    names = metric_names(cfg)
    measured = [metrics(cfg)[n] for n in names if metrics(cfg)[n].measured]
    items = space_items(spec)
    if call_overhead(tgt):
        items[CALL] = Item(_Trivial(), (1,))
    parts_of_students = set(items)  # what a whole student is predicted from
    if teacher is not None:
        items["teacher"] = teacher
    calibration = random_choices(spec, cfg.calibrate, seed, stream=CALIBRATION)
    shape = (spec.stem.in_chs, *spec.stem.in_size)
    items.update({(CALIBRATION, i): Item(build_student(spec, c), shape) for i, c in enumerate(calibration)})
    items.update(extra or {})
    log.info("timing %d modules at batch sizes %s on %s (%d rounds after %d warm-up)", len(items),
             list(cfg.batch_sizes), describe(fp), cfg.repeats, cfg.warmup)
    timed = time_items(items, tgt, cfg.batch_sizes, cfg.warmup, cfg.repeats, seed)
    call = {b: timed[CALL][b] if CALL in timed else 0.0 for b in cfg.batch_sizes}
    for key in parts_of_students - {CALL}:  # each layer, stem and head without its own call: a model pays one
        timed[key] = {b: max(ms - call[b], 0.0) for b, ms in timed[key].items()}
    raw = [{b: timed["stem"][b] + timed["head"][b] + call[b] + sum(
        candidate_latency(block, c[block.name], timed, b) for block in spec.blocks) for b in cfg.batch_sizes}
        for c in calibration]
    factor = {b: statistics.median(timed[CALIBRATION, i][b] / raw[i][b] for i in range(len(calibration)))
              if calibration else 1.0 for b in cfg.batch_sizes}
    for key in parts_of_students:
        timed[key] = {b: ms * factor[b] for b, ms in timed[key].items()}
    call = {b: ms * factor[b] for b, ms in call.items()}
    blocks: dict[str, dict[str, dict[str, float]]] = {}
    for block in spec.blocks:
        rows = {}
        for cid in block.candidates():
            cost = space.candidate_cost(block, cid)
            row = {"params": float(cost.params), "flops": float(cost.flops)}
            row.update({m.name: candidate_latency(block, cid, timed, m.batch) for m in measured})
            rows[cid] = row
        blocks[block.name] = rows
    fixed_cost = space.fixed_parts_cost(spec)
    parts = {part: {m.name: timed[part][m.batch] for m in measured} for part in ("stem", "head")}
    if CALL in timed:
        parts[CALL] = {m.name: call[m.batch] for m in measured}
    fixed = {"params": float(fixed_cost.params), "flops": float(fixed_cost.flops),
             **{m.name: sum(row[m.name] for row in parts.values()) for m in measured}}
    teacher_row: dict[str, float] = {}
    if teacher is not None:
        cost = space.module_cost(teacher.module, teacher.shape)
        teacher_row = {"params": float(cost.params), "flops": float(cost.flops),
                       **{m.name: timed["teacher"][m.batch] for m in measured}}
    tables = CostTables(names, blocks, fixed, teacher_row, fp, parts, time.perf_counter() - start, cfg.tolerance,
                        {"students": len(calibration), **{m.name: factor[m.batch] for m in measured}})
    log.info("timed in %.1f s; calibration factors %s", tables.seconds,
             {k: round(v, 3) for k, v in tables.calibration.items() if k != "students"})
    return tables, {key: timed[key] for key in (extra or {})}


# ---------------------------------------------------------------------------------------------------- the artifact
def table_path(directory: Path | str, block: space.BlockSpec) -> Path:
    return Path(directory) / f"{block.name}.csv"


def _value(name: str, value: float) -> int | float:
    return int(value) if name in COUNTED else round(float(value), 6)


def write_costs(directory: Path | str, spec: space.SpaceSpec, tables: CostTables) -> list[Path]:
    """``<block>.csv`` per block (candidate, then one column per metric), ``fixed.json``, ``teacher.json`` and
    ``fingerprint.json``, swapped in as a whole folder."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for block in spec.blocks:
        with open(table_path(tmp, block), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["candidate", *tables.metrics])
            for cid, row in tables.blocks[block.name].items():
                writer.writerow([cid, *(_value(m, row[m]) for m in tables.metrics)])
    fixed = {m: _value(m, v) for m, v in tables.fixed.items()}
    fixed["parts"] = {part: {m: _value(m, v) for m, v in row.items()} for part, row in tables.parts.items()}
    fixed[CALIBRATION] = {m: v if m == "students" else round(v, 6) for m, v in tables.calibration.items()}
    (tmp / FIXED).write_text(json.dumps(fixed, indent=2) + "\n")
    (tmp / TEACHER).write_text(json.dumps({m: _value(m, v) for m, v in tables.teacher.items()}, indent=2) + "\n")
    (tmp / FINGERPRINT).write_text(json.dumps(tables.fingerprint, indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return sorted(directory.iterdir())


@dataclass(frozen=True)
class BlockCosts:
    """One metric of a costs folder, checked against the space (and, for a measured metric, this machine)."""

    metric: Metric
    blocks: dict[str, dict[str, float]]  # block -> candidate -> value, in BlockSpec.candidates() order
    fixed: float
    teacher: float | None
    fingerprint: dict[str, Any]
    calibration: float = 1.0  # the factor the measured sums were scaled by (1 for counted metrics)


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: rebuild it with `{REBUILD}`") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is unreadable ({type(err).__name__}): rebuild it with `{REBUILD}`") from None
    if not isinstance(content, dict):
        raise ArtifactError(f"{path} is not a JSON object: rebuild it with `{REBUILD}`")
    return content


def check_fingerprint(directory: Path | str, found: Mapping[str, Any], expected: Mapping[str, Any],
                      accept: str = "") -> None:
    """A measured table is used only on the machine it describes, or when ``accept`` names its id."""
    body = {k: v for k, v in found.items() if k != "id"}
    if body == {k: v for k, v in expected.items() if k != "id"}:
        return
    table_id = found.get("id") or _fingerprint_id(found)
    if accept and accept == table_id:
        log.warning("using %s measured on <%s> on this machine <%s> (costs.accept_fingerprint=%s)", directory,
                    describe(found), describe(expected), accept)
        return
    differ = sorted(k for k in set(body) | set(expected) if k != "id" and body.get(k) != expected.get(k))
    raise ArtifactError(f"{directory} was measured on <{describe(found, differ)}>, this machine is "
                        f"<{describe(expected, differ)}> (differs in {', '.join(differ)}): re-measure with "
                        f"`dvc repro -f costs` or accept it with costs.accept_fingerprint={table_id}")


def read_costs(directory: Path | str, spec: space.SpaceSpec, metric: str,
               expected_fingerprint: Mapping[str, Any] | None = None, accept: str = "",
               tolerance: float = Costs.tolerance) -> BlockCosts:
    """One metric of the ``costs`` stage's folder for every candidate of the space.

    Every candidate of every block must be in its table; a measured metric needs ``expected_fingerprint`` (this
    machine's, ``fingerprint(cfg, channels_last)``) to equal the table's, or ``accept`` (``costs.accept_fingerprint``)
    to be the table's id. ``tolerance`` (``costs.tolerance``) is the measured metric's stated tolerance.
    """
    directory = Path(directory)
    fp = _read_json(directory / FINGERPRINT)
    measured = LATENCY.match(metric) is not None
    if metric not in COUNTED and not measured:
        raise ConfigError(f"cost metric {metric!r} is not registered: choose one of "
                          f"{', '.join(metrics_of(fp))} (latency_b<N> for each N in costs.batch_sizes)")
    batches = [int(b) for b in fp.get("batch_sizes", [])]
    if measured:
        if int(LATENCY.match(metric)["batch"]) not in batches:
            raise ArtifactError(f"{directory} has no {metric} (measured at batch sizes {batches}): add the batch "
                                f"size to costs.batch_sizes and run `{REBUILD}`")
        if expected_fingerprint is None:
            raise ValueError("a measured metric needs the expected fingerprint of this machine")
        check_fingerprint(directory, fp, expected_fingerprint, accept)
    blocks = {block.name: _read_table(table_path(directory, block), block, metric) for block in spec.blocks}
    fixed = _read_json(directory / FIXED)
    teacher = _read_json(directory / TEACHER) if (directory / TEACHER).is_file() else {}
    if metric not in fixed:
        raise ArtifactError(f"{directory / FIXED} has no {metric!r}: rebuild it with `{REBUILD}`")
    factor = float(fixed.get(CALIBRATION, {}).get(metric, 1.0)) if measured else 1.0
    return BlockCosts(metrics_of(fp, tolerance)[metric], blocks, float(fixed[metric]),
                      float(teacher[metric]) if metric in teacher else None, dict(fp), factor)


def _read_table(path: Path, block: space.BlockSpec, metric: str) -> dict[str, float]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: rebuild it with `{REBUILD}`") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ArtifactError(f"{path} is unreadable ({type(err).__name__}): rebuild it with `{REBUILD}`") from None
    if "candidate" not in columns or metric not in columns:
        raise ArtifactError(f"{path} has columns {columns}, not candidate and {metric}: rebuild it with `{REBUILD}`")
    try:
        values = {row["candidate"]: float(row[metric]) for row in rows}
    except (TypeError, ValueError):
        raise ArtifactError(f"{path} has a non-numeric {metric} value: rebuild it with `{REBUILD}`") from None
    wanted = list(block.candidates())
    missing = [cid for cid in wanted if cid not in values]
    extra = sorted(set(values) - set(wanted))
    if missing or extra:
        what = (f"lacks {len(missing)} of the {len(wanted)} candidates of block {block.name} (e.g. {missing[0]!r})"
                if missing else f"has {len(extra)} candidates that are not in block {block.name} (e.g. {extra[0]!r})")
        raise ArtifactError(f"{path} {what}: the search space changed since it was measured; "
                            f"rebuild it with `{REBUILD}`")
    return {cid: values[cid] for cid in wanted}


# ---------------------------------------------------------------------------------------------------- additivity
@dataclass(frozen=True)
class Additivity:
    """Predicted (block tables + fixed parts) vs measured latency of whole random students at one batch size."""

    batch: int
    predicted: list[float]
    measured: list[float]
    calibration: float = 1.0  # the tables' factor: predicted / calibration is the plain sum of the parts

    @property
    def uncalibrated(self) -> Additivity:
        return Additivity(self.batch, [p / self.calibration for p in self.predicted], self.measured)

    @property
    def errors(self) -> list[float]:
        """Relative errors (predicted - measured) / measured."""
        return [(p - m) / m for p, m in zip(self.predicted, self.measured, strict=True)]

    @property
    def median(self) -> float:
        return float(np.median(np.abs(self.errors)))

    @property
    def p90(self) -> float:
        return float(np.percentile(np.abs(self.errors), 90))


def random_choices(spec: space.SpaceSpec, n: int, seed: int = 0, stream: str = "students") -> list[dict[str, str]]:
    """``n`` whole students, one uniformly random candidate per block; each ``stream`` draws its own (seeded)."""
    rng = random.Random(f"{stream}:{seed}")
    candidates = {block.name: list(block.candidates()) for block in spec.blocks}
    return [{name: rng.choice(ids) for name, ids in candidates.items()} for _ in range(n)]


def predict(costs: BlockCosts, choice: Mapping[str, str]) -> float:
    """A whole student's cost: its candidates' table entries plus the fixed parts."""
    return costs.fixed + sum(costs.blocks[block][cid] for block, cid in choice.items())


def additivity(spec: space.SpaceSpec, cfg: Costs, channels_last: bool, students: int = 30, seed: int = 0,
               tables: Mapping[str, BlockCosts] | None = None
               ) -> tuple[dict[int, Additivity], CostTables | None, list[dict[str, str]]]:
    """Build ``students`` random students as real timm models, time them as the tables are timed, and compare
    with the prediction from the tables (``{latency_b<N>: read_costs(...)}``), per batch size.

    Without ``tables`` the space's modules are timed in the same rounds as the students (the tables so made are
    returned): the error then measures additivity alone, not how much the machine drifted between two runs.
    """
    choices = random_choices(spec, students, seed)
    shape = (spec.stem.in_chs, *spec.stem.in_size)
    models = {("student", i): Item(build_student(spec, choice), shape) for i, choice in enumerate(choices)}
    made = None
    if tables is None:
        made, timed = measure_space(spec, cfg, channels_last, extra=models, seed=seed)
        tables = {f"latency_b{b}": made.metric(f"latency_b{b}") for b in cfg.batch_sizes}
    else:
        timed = time_items(models, target(cfg, channels_last), cfg.batch_sizes, cfg.warmup, cfg.repeats, seed)
    out = {}
    for batch in cfg.batch_sizes:
        table = tables[f"latency_b{batch}"]
        out[int(batch)] = Additivity(int(batch), [predict(table, c) for c in choices],
                                     [timed[("student", i)][batch] for i in range(len(choices))], table.calibration)
    return out, made, choices
