"""Measuring the latency tables of ``pipeline.costs``: every candidate of the space on the target, and how well
the sums predict whole students (``additivity``).

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
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import space, student
from pipeline.config import ConfigError, Costs, Teacher
from pipeline.costs import (
    CALIBRATION,
    CALL,
    BlockCosts,
    CostTables,
    Target,
    describe,
    fingerprint,
    metric_names,
    metrics,
    predict,
    target,
)
from pipeline.teacher import create_teacher

log = logging.getLogger(__name__)


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


def teacher_item(cfg: Teacher, teacher_blocks: Mapping[str, Any]) -> Item:
    """The teacher as configured (random weights: the time does not depend on them) at the split's image size."""
    model = create_teacher(replace(cfg, pretrained=False, checkpoint=""), int(teacher_blocks["in_chans"]),
                           int(teacher_blocks["num_classes"]))
    size = int(teacher_blocks["image_size"])
    return Item(model.eval(), (int(teacher_blocks["in_chans"]), size, size))


def candidate_latency(block: space.BlockSpec, cid: str, layers: Mapping[Hashable, Mapping[int, float]],
                      batch: int) -> float:
    cell, ops = block.parse(cid)
    return sum(layers[layer_key(block, layer, op)][batch] for layer, op in zip(cell.layers, ops, strict=True)
               if op != space.SKIP)


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
            row = cost.counted()
            row.update({m.name: candidate_latency(block, cid, timed, m.batch) for m in measured})
            rows[cid] = row
        blocks[block.name] = rows
    fixed_cost = space.fixed_parts_cost(spec)
    parts = {part: {m.name: timed[part][m.batch] for m in measured} for part in ("stem", "head")}
    if CALL in timed:
        parts[CALL] = {m.name: call[m.batch] for m in measured}
    fixed = {**fixed_cost.counted(),
             **{m.name: sum(row[m.name] for row in parts.values()) for m in measured}}
    teacher_row: dict[str, float] = {}
    if teacher is not None:
        cost = space.module_cost(teacher.module, teacher.shape)
        teacher_row = {**cost.counted(),
                       **{m.name: timed["teacher"][m.batch] for m in measured}}
    tables = CostTables(names, blocks, fixed, teacher_row, fp, parts, time.perf_counter() - start, cfg.tolerance,
                        {"students": len(calibration), **{m.name: factor[m.batch] for m in measured}})
    log.info("timed in %.1f s; calibration factors %s", tables.seconds,
             {k: round(v, 3) for k, v in tables.calibration.items() if k != "students"})
    return tables, {key: timed[key] for key in (extra or {})}


# ---------------------------------------------------------------------------------------------------- additivity
ADDITIVITY_GOAL = {"median": 0.05, "p90": 0.10}  # relative error over random whole students: median, 90th percentile
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

    def summary(self) -> dict[str, float]:
        """The figures the additivity stage tracks: absolute-error median, 90th percentile and max, signed median."""
        errors = np.asarray(self.errors)
        return {"students": len(errors), "median": self.median, "p90": self.p90,
                "max": float(np.abs(errors).max()), "median_signed": float(np.median(errors)),
                "measured_median_ms": float(np.median(self.measured))}


def random_choices(spec: space.SpaceSpec, n: int, seed: int = 0, stream: str = "students",
                   tries: int = 10_000) -> list[dict[str, str]]:
    """``n`` whole students, uniform over the networks whose widths join: one uniformly random candidate per block,
    drawn again until block i writes what block i+1 reads (rejection keeps the draw uniform; a space without out
    widths joins at the first draw, so its students are as before). Each ``stream`` draws its own (seeded)."""
    rng = random.Random(f"{stream}:{seed}")
    candidates = {block.name: list(block.candidates()) for block in spec.blocks}
    students = []
    for _ in range(n):
        for _ in range(tries):
            choice = {name: rng.choice(ids) for name, ids in candidates.items()}
            try:
                space.check_chain(spec, choice)
            except ValueError:
                continue
            students.append(choice)
            break
        else:
            raise ConfigError(f"no network whose widths join in {tries} random draws: check the cells' out widths "
                             "in space.blocks (block i's must be a width block i+1's cells read)")
    return students


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
