"""Cost metrics of the search space as an artifact: counted (params, FLOPs) and measured (latency on a named device).

Every cost comes from the search space alone (no supernet, no score table), so a table can be measured on the
target machine and the search run elsewhere. The metric registry is ``pipeline.config``'s (``check_metric``,
``metric_registry``: config validation uses it); counted metrics are exact (``pipeline.space``'s one counter),
measured ones, ``latency_b<N>`` in milliseconds for each N in ``costs.batch_sizes``, are timed on the target
(``costs.backend`` on ``costs.device``) by ``pipeline.latency`` and hold within ``costs.tolerance`` of a built model.

The ``costs`` stage writes ``costs.out_dir``: ``block_<index>.csv`` (candidate, then one column per metric, one row
per candidate in ``BlockSpec.candidates()`` order), ``fixed.json`` (stem, head, classifier; the measured parts and the
calibration), ``teacher.json`` and ``fingerprint.json``: the machine and libraries the latencies were measured with
(backend, device, CPU model, threads, batch sizes, layout, clock, versions; ``id`` hashes them). ``read_costs``
checks a table against the space and refuses a measured metric from another fingerprint unless
``costs.accept_fingerprint`` names it. This module imports no model code, so a stage that only reads costs
depends on it alone.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import space
from pipeline.checkpoint import ArtifactError
from pipeline.config import COUNTED_METRICS, LATENCY_METRIC, ConfigError, Costs, metric_registry
from pipeline.config import Metric as Metric  # the registry, re-exported
from pipeline.config import check_metric as check_metric

log = logging.getLogger(__name__)

REBUILD = "dvc repro costs"
FINGERPRINT, FIXED, TEACHER = "fingerprint.json", "fixed.json", "teacher.json"
CALL, CALIBRATION = "call", "calibration"  # fixed.json: one backend call per model; the calibration factors


# ---------------------------------------------------------------------------------------------------- registry
# The registry itself lives in pipeline.config (config validation checks search.metric with it); here its uses.
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
    name = cfg.device  # backend and device names are checked when params load (pipeline.config)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params key 'costs.device' = {cfg.device!r} but CUDA is not available here: "
                          "use costs.device=cpu, or measure on a machine with the GPU")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.backend == "onnxruntime":
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


# ---------------------------------------------------------------------------------------------------- the artifact
def table_path(directory: Path | str, block: space.BlockSpec) -> Path:
    return Path(directory) / f"{block.name}.csv"


def _value(name: str, value: float) -> int | float:
    return int(value) if name in COUNTED_METRICS else round(float(value), 6)


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
    measured = LATENCY_METRIC.match(metric) is not None
    if metric not in COUNTED_METRICS and not measured:
        raise ConfigError(f"cost metric {metric!r} is not registered: choose one of "
                          f"{', '.join(metrics_of(fp))} (latency_b<N> for each N in costs.batch_sizes)")
    batches = [int(b) for b in fp.get("batch_sizes", [])]
    if measured:
        if int(LATENCY_METRIC.match(metric)["batch"]) not in batches:
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


# ---------------------------------------------------------------------------------------------------- prediction
def predict(costs: BlockCosts, choice: Mapping[str, str]) -> float:
    """A whole student's cost: its candidates' table entries plus the fixed parts."""
    return costs.fixed + sum(costs.blocks[block][cid] for block, cid in choice.items())
