"""Cost metrics and the costs stage: the registry, exact counted costs, tables covering the space, the fingerprint
check, ONNX Runtime timing, additivity on the tiny space (1x16x16 images, 3 blocks: tests/fakes.py)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import costs, latency, space
from pipeline.checkpoint import ArtifactError
from pipeline.config import ConfigError, Costs, load_params
from tests.fakes import TEACHER, load_stage, params_at, teacher_blocks, tiny_params, tiny_yaml

FAST = ["costs.batch_sizes=[1,2]", "costs.repeats=2", "costs.warmup=1", "costs.calibrate=2",
        "teacher.kwargs.channels=[8,16,16,16]", "teacher.kwargs.stem_width=8"]


@pytest.fixture(scope="module")
def costs_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny workspace (params.yaml, blocks.json) after one run of the costs stage; copy before changing it."""
    root = tmp_path_factory.mktemp("costs") / "root"
    (root / "artifacts/teacher").mkdir(parents=True)
    (root / "params.yaml").write_text(OmegaConf.to_yaml(tiny_yaml(FAST)))
    (root / "artifacts/teacher/blocks.json").write_text(json.dumps(teacher_blocks()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        torch.set_num_threads(1)
        load_stage("costs").run(params_at(root))
    yield root


def _spec(overrides=()) -> space.SpaceSpec:
    return space.build_space(tiny_params([*FAST, *overrides]).space, teacher_blocks())


def _copy(costs_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(costs_root / "artifacts/costs", tmp_path / "costs"))


# -------------------------------------------------------------------------------------------- registry
def test_registry_names_measured_and_unknown_metrics() -> None:
    cfg = Costs()
    assert costs.metric_names(cfg) == ["params", "flops", "flops_dna", "latency_b1", "latency_b256"]
    assert costs.check_metric("flops", cfg).exact and costs.check_metric("flops", cfg).tolerance == 0
    latency = costs.check_metric("latency_b256", cfg)
    assert latency.measured and latency.batch == 256 and latency.unit == "ms" and latency.tolerance == cfg.tolerance
    with pytest.raises(ConfigError) as err:
        costs.check_metric("energy", cfg)
    assert "\n" not in str(err.value)
    assert "'search.metric' = 'energy'" in str(err.value) and "params, flops, flops_dna, latency_b1, latency_b256" in str(err.value)
    with pytest.raises(ConfigError, match=r"batch 64 is not measured: add it to costs.batch_sizes=\[1, 256\]"):
        costs.check_metric("latency_b64", cfg)


@pytest.mark.parametrize("override, words", [
    ("costs.backend=tensorrt", ["costs.backend", "torch or onnxruntime"]),
    ("costs.batch_sizes=[]", ["costs.batch_sizes"]),
    ("costs.batch_sizes=[4,4]", ["costs.batch_sizes", "distinct"]),
    ("costs.repeats=0", ["costs.repeats"]),
    ("costs.device=tpu", ["costs.device"]),
    ("costs.tolerance=0", ["costs.tolerance"]),
])
def test_bad_costs_params_name_key(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_params([override])
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_onnxruntime_needs_the_cpu() -> None:
    with pytest.raises(ConfigError, match="costs.backend=onnxruntime times on the CPU: set costs.device=cpu"):
        tiny_params(["costs.backend=onnxruntime", "costs.device=cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_missing_cuda_fails_before_timing() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        costs.fingerprint(replace(Costs(), device="cuda"), True)


# -------------------------------------------------------------------------------------------- tables
def test_tables_count_exactly_and_sum_their_layers() -> None:
    spec = _spec(["space.identity=true"])  # a skip op inside b1's 3-layer cell: it adds nothing
    cfg = tiny_params(FAST).costs
    teacher = latency.teacher_item(TEACHER, teacher_blocks())
    tables, _ = latency.measure_space(spec, cfg, True, teacher=teacher)
    assert tables.metrics == ["params", "flops", "flops_dna", "latency_b1", "latency_b2"]
    for block in spec.blocks:
        rows = tables.blocks[block.name]
        assert list(rows) == list(block.candidates())
        for cid, row in rows.items():
            cost = space.candidate_cost(block, cid)
            assert {m: row[m] for m in cost.counted()} == cost.counted()
            assert row["latency_b1"] > 0 and row["latency_b2"] > 0
    b1 = spec.block("b1")
    with_skip = tables.blocks["b1"]["d3w8:k3e3-skip-k5e6"]["latency_b1"]
    cell = b1.cells[0]
    parts = [tables.blocks["b1"][f"d3w8:{a}-{b}-{c}"]["latency_b1"] for a, b, c in
             (("k3e3", "k3e3", "k5e6"), ("k3e3", "k5e6", "k5e6"))]
    assert with_skip < min(parts) and len(cell.layers) == 3
    fixed = space.fixed_parts_cost(spec)
    assert {m: tables.fixed[m] for m in fixed.counted()} == fixed.counted()
    assert tables.fixed["latency_b1"] == pytest.approx(sum(p["latency_b1"] for p in tables.parts.values()))
    assert tables.calibration["students"] == 2 and tables.calibration["latency_b2"] > 0
    teacher_cost = space.module_cost(teacher.module, teacher.shape)
    assert tables.teacher["params"] == teacher_cost.params and tables.teacher["latency_b2"] > 0


def test_stage_writes_the_costs_contract(costs_root: Path) -> None:
    out = costs_root / "artifacts/costs"
    spec = _spec()
    assert sorted(p.name for p in out.iterdir()) == ["b0.csv", "b1.csv", "b2.csv", "fingerprint.json",
                                                     "fixed.json", "teacher.json"]
    for block in spec.blocks:
        with open(costs.table_path(out, block), newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["candidate", "params", "flops", "flops_dna", "latency_b1", "latency_b2"]
        assert [r["candidate"] for r in rows] == list(block.candidates())
        assert all(int(r["params"]) == space.candidate_cost(block, r["candidate"]).params for r in rows)
    fp = json.loads((out / costs.FINGERPRINT).read_text())
    cfg = params_at(costs_root).costs
    assert fp == costs.fingerprint(cfg, True)
    assert {"backend", "device_name", "threads", "batch_sizes", "torch", "timm", "clock", "id"} <= set(fp)
    assert fp["threads"] == 1 and fp["clock"] == "thread_cpu" and fp["batch_sizes"] == [1, 2]
    assert set(json.loads((out / costs.TEACHER).read_text())) == {"params", "flops", "flops_dna", "latency_b1", "latency_b2"}
    read = costs.read_costs(out, spec, "latency_b2", fp)
    assert read.metric.measured and list(read.blocks) == ["b0", "b1", "b2"] and read.fixed > 0
    fixed = json.loads((out / costs.FIXED).read_text())
    assert fixed["calibration"]["students"] == 2 and read.calibration == fixed["calibration"]["latency_b2"]
    assert read.fixed == fixed["latency_b2"] == pytest.approx(sum(p["latency_b2"] for p in fixed["parts"].values()),
                                                              abs=1e-5)  # each rounded to 6 decimals
    assert costs.predict(read, {b.name: next(b.candidates()) for b in spec.blocks}) > read.fixed
    assert costs.read_costs(out, spec, "params").fixed == space.fixed_parts_cost(spec).params


def test_table_from_another_machine_fails_in_one_line(costs_root: Path, tmp_path: Path) -> None:
    out = _copy(costs_root, tmp_path)
    spec, here = _spec(), costs.fingerprint(params_at(costs_root).costs, True)
    other = dict(here, device_name="Intel(R) Xeon(R) Platinum 8375C", torch="2.99.0")
    other["id"] = costs._fingerprint_id(other)
    (out / costs.FINGERPRINT).write_text(json.dumps(other))
    with pytest.raises(ArtifactError) as err:
        costs.read_costs(out, spec, "latency_b1", here)
    message = str(err.value)
    assert "\n" not in message
    assert f"{out} was measured on <Intel(R) Xeon(R) Platinum 8375C, torch 2.99.0, 1 thread" in message
    assert f"this machine is <{here['device_name']}, torch {torch.__version__}" in message
    assert message.endswith(f"re-measure with `dvc repro -f costs` or accept it with "
                            f"costs.accept_fingerprint={other['id']}")
    with pytest.raises(ArtifactError, match="accept it with"):
        costs.read_costs(out, spec, "latency_b1", here, accept="not-its-id")
    assert costs.read_costs(out, spec, "latency_b1", here, accept=other["id"]).fingerprint["id"] == other["id"]
    assert costs.read_costs(out, spec, "flops").metric.exact  # counted costs do not depend on the machine


def test_table_missing_a_candidate_fails_in_one_line(costs_root: Path, tmp_path: Path) -> None:
    out, spec = _copy(costs_root, tmp_path), _spec()
    table = costs.table_path(out, spec.block("b1"))
    lines = table.read_text().splitlines()
    dropped = lines.pop(3).split(",")[0]
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError) as err:
        costs.read_costs(out, spec, "params")
    assert "\n" not in str(err.value)
    assert f"lacks 1 of the 10 candidates of block b1 (e.g. {dropped!r})" in str(err.value)
    assert str(err.value).endswith("rebuild it with `dvc repro costs`")
    with pytest.raises(ArtifactError, match=r"no latency_b8 \(measured at batch sizes \[1, 2\]\)"):
        costs.read_costs(out, spec, "latency_b8", costs.fingerprint(params_at(costs_root).costs, True))
    with pytest.raises(ConfigError, match="'energy' is not registered"):
        costs.read_costs(out, spec, "energy")
    (out / costs.FINGERPRINT).unlink()
    with pytest.raises(ArtifactError, match="fingerprint.json is missing: rebuild it with `dvc repro costs`"):
        costs.read_costs(out, spec, "params")


# -------------------------------------------------------------------------------------------- backends, additivity
def test_onnxruntime_backend_times_a_tiny_block() -> None:
    ort = pytest.importorskip("onnxruntime")
    spec = _spec()
    block = spec.block("b0")
    layer = block.cells[0].layers[0]
    module = space.build_layer(block, layer, "k5e6", student=True).eval()
    x = torch.randn(3, layer.student_in, *layer.in_size)
    session = ort.InferenceSession(latency.export_onnx(module, (layer.student_in, *layer.in_size)),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], module(x).numpy(), atol=1e-5)
    cfg = replace(tiny_params(FAST).costs, backend="onnxruntime", batch_sizes=[1], repeats=1, calibrate=0)
    tables, _ = latency.measure_space(spec, cfg, True)
    assert tables.fingerprint["backend"] == "onnxruntime" and tables.fingerprint["onnxruntime"] == ort.__version__
    assert tables.calibration == {"students": 0, "latency_b1": 1.0} and costs.CALL in tables.parts
    assert tables.fingerprint["channels_last"] is False  # a torch layout: not part of an ONNX Runtime table
    assert all(row["latency_b1"] > 0 for rows in tables.blocks.values() for row in rows.values())


def test_additivity_compares_whole_students() -> None:
    spec = _spec()
    cfg = replace(tiny_params(FAST).costs, batch_sizes=[1])
    results, tables, choices = latency.additivity(spec, cfg, True, students=3, seed=1)
    assert len(choices) == 3 and all(set(c) == {"b0", "b1", "b2"} for c in choices)
    result = results[1]
    assert len(result.errors) == 3 and all(m > 0 for m in result.measured)
    assert result.predicted[0] == pytest.approx(costs.predict(tables.metric("latency_b1"), choices[0]))
    assert 0 <= result.median <= result.p90 < 10
    assert result.uncalibrated.predicted[0] == pytest.approx(result.predicted[0] / tables.calibration["latency_b1"])
    calibration = latency.random_choices(spec, 3, seed=1, stream=costs.CALIBRATION)
    assert calibration != choices  # the students checked are not those the tables were calibrated on


def test_additivity_stage_writes_both_predictions(costs_root: Path, tmp_path: Path, monkeypatch) -> None:
    root = Path(shutil.copytree(costs_root, tmp_path / "root"))
    monkeypatch.chdir(root)
    params = load_params(["costs.additivity=3"], root=root)
    result = load_stage("additivity").run(params)
    written = json.loads((root / "metrics/additivity.json").read_text())
    assert written == json.loads(json.dumps(result)) and written["students"] == 3
    for name in ("same_rounds", "stage_tables"):
        assert set(written[name]) == {"latency_b1", "latency_b2"}
        for s in written[name].values():
            assert s["students"] == 3 and 0 <= s["median"] <= s["p90"] <= s["max"] and s["measured_median_ms"] > 0
    # the same measured students: only the prediction differs between the two rows
    assert written["same_rounds"]["latency_b2"]["measured_median_ms"] == \
        written["stage_tables"]["latency_b2"]["measured_median_ms"]
    assert isinstance(written["met"], bool)
    skipped = load_stage("additivity").run(load_params(["costs.additivity=0"], root=root))
    assert skipped["students"] == 0 and "same_rounds" not in skipped


def test_additivity_of_one_student_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"costs\.additivity.*>= 2 students"):
        tiny_params(["costs.additivity=1"])
