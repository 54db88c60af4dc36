"""The student as a timm model: built from architecture.json, costs what the assembly predicted, rejects
architectures and budgets that do not fit, exports and reloads (fresh process, timm, ONNX)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.efficientnet import EfficientNet

from pipeline import space, student
from pipeline.checkpoint import ArtifactError
from pipeline.config import Search, load_params
from tests.fakes import (
    EVERY_OP,
    REPO,
    resnet18_blocks,
    rotating_choice,
    teacher_blocks,
    tiny_params,
    write_counted_costs,
    write_scores,
)

META = {"num_classes": 10, "in_chans": 1, "image_size": 16, "mean": [0.3], "std": [0.2],
        "classes": [f"c{i}" for i in range(10)]}


def _assemble(tmp_path: Path, overrides: list[str], split: dict) -> tuple[dict, space.SpaceSpec]:
    """architecture.json from the real assembly over score tables holding every candidate at its modelled cost."""
    from pipeline import assembly

    params = tiny_params(overrides)
    (tmp_path / "artifacts/teacher").mkdir(parents=True, exist_ok=True)
    (tmp_path / "artifacts/teacher/blocks.json").write_text(json.dumps(split))
    spec = space.build_space(params.space, split)
    write_scores(tmp_path / params.search.scores_dir, spec)
    write_counted_costs(tmp_path / params.costs.out_dir, spec)
    prob = assembly.problem(params, assembly.read_tables(tmp_path / params.search.scores_dir), tmp_path)
    return assembly.summary(assembly.assemble(prob, params.search), params.search), spec


def _stride1_blocks() -> dict:
    """The tiny split with a first block that keeps the image size: the student's stem must get stride 1."""
    split = teacher_blocks()
    sizes = [16, 16, 8, 4]
    for i, block in enumerate(split["blocks"]):
        block.update(in_size=[sizes[i]] * 2, out_size=[sizes[i + 1]] * 2, stride=1 if i == 0 else 2)
    return split


@pytest.mark.parametrize("overrides, split", [
    (["search.metric=params", "search.budget=15000"], teacher_blocks()),
    (["search.metric=flops", "search.budget=250000", "space.identity=true", "space.head=0"], teacher_blocks()),
    (["search.metric=params"], _stride1_blocks()),
])
def test_student_costs_exactly_what_the_assembly_predicted(tmp_path: Path, overrides: list[str], split: dict) -> None:
    architecture, spec = _assemble(tmp_path, overrides, split)
    params = tiny_params(overrides)
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(architecture))
    built = student.from_architecture(path, spec, {**META, "image_size": split["image_size"]}, params.search)
    model = built.model
    assert isinstance(model, EfficientNet) and len(model.blocks) == len(spec.blocks)
    assert (built.cost.params, built.cost.flops) == (architecture["params"], architecture["flops"])
    assert built.cost.params == sum(p.numel() for p in model.parameters())
    if params.search.budget:
        assert built.cost.metric(params.search.metric) <= params.search.budget
    size = split["blocks"][-1]["out_size"]
    features = model.eval().forward_features(torch.randn(2, 1, split["image_size"], split["image_size"]))
    assert list(features.shape[-2:]) == size and model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_default_space_student_matches_the_cost_model() -> None:
    """The default config's geometry (28 px, stem stride 2, four blocks) through the same path."""
    params, split = load_params(root=REPO), resnet18_blocks()
    spec = space.build_space(params.space, split)
    choice = {b.name: list(b.candidates())[-1] for b in spec.blocks}
    model = student.create(student.model_args(spec, choice), {**META, "image_size": 28})
    modelled = sum((space.candidate_cost(b, choice[b.name]) for b in spec.blocks), space.fixed_parts_cost(spec))
    assert space.module_cost(model, (1, 28, 28)) == modelled
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.pretrained_cfg["mean"] == (0.3,)


def test_every_op_type_builds_the_searched_layers_exports_and_reloads(tmp_path: Path) -> None:
    """A student mixing every op type: each timm block is the space's layer at student widths (module, params,
    cost), and the export reloads to the same outputs."""
    spec = space.build_space(tiny_params([EVERY_OP]).space, teacher_blocks())
    choice = rotating_choice(spec)
    model = student.create(student.model_args(spec, choice), META).eval()
    for stage, block in enumerate(spec.blocks):
        cell, ops = block.parse(choice[block.name])
        layers = [space.build_layer(block, la, op, student=True) for la, op in zip(cell.layers, ops, strict=True)]
        assert [str(m) for m in model.blocks[stage]] == [str(m) for m in layers]
        assert [m.state_dict().keys() for m in model.blocks[stage]] == [m.state_dict().keys() for m in layers]
    kinds = {space.parse_op(op)[0] for cid in choice.values() for op in cid.rpartition(":")[2].split("-")}
    assert kinds == set(space.OP_TYPES) - {space.SKIP}
    modelled = sum((space.candidate_cost(b, choice[b.name]) for b in spec.blocks), space.fixed_parts_cost(spec))
    assert space.module_cost(model, (1, 16, 16)) == modelled
    out = student.save(model, tmp_path / "student", {"candidates": list(choice.values())})
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student.load(out)(x), model(x), rtol=0, atol=0)


def test_dna_student_is_a_timm_registry_model() -> None:
    assert timm.is_model(student.MODEL_NAME)
    model = timm.create_model(student.MODEL_NAME, arch=[["ir_r1_k3_s1_e3_c8_se0.25"], ["ir_r1_k5_s2_e6_c16_se0.25"]],
                              stem_size=8, num_features=32, in_chans=1, num_classes=3, stem_stride=1)
    assert model.conv_stem.stride == (1, 1) and model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model.blocks[1][0].conv_dw.kernel_size == (5, 5) and model.blocks[1][0].conv_dw.stride == (2, 2)


# -------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def good(tmp_path: Path) -> tuple[dict, space.SpaceSpec]:
    return _assemble(tmp_path, ["search.metric=params", "search.budget=15000"], teacher_blocks())


@pytest.mark.parametrize("damage, words", [
    (lambda a: a["candidates"].__setitem__(0, "k9e9-k3e3"), "uses op 'k9e9', which is not in the search space"),
    (lambda a: a["candidates"].__setitem__(2, "k3e3-conv1x1"), "uses op 'conv1x1'"),
    (lambda a: (a["candidates"].pop(), a["blocks"].pop()), "has 2 blocks ['b0', 'b1'] but the search space has 3"),
    (lambda a: a.update(blocks=["b0", "b2", "b1"]), "the search space has 3 ['b0', 'b1', 'b2']"),
    (lambda a: a["candidates"].__setitem__(0, "k3e3"), "'k3e3' is not a candidate of block b0"),
    (lambda a: a["arch"][0].__setitem__(0, "ir_r1_k7_s1_e6_c8_se0.25"), "space params changed"),
    (lambda a: a.update(params=a["params"] + 1), "the assembly predicted"),
    (lambda a: a["search"].update(budget=999), "searched for params budget 999"),
])
def test_architecture_that_does_not_fit_fails_naming_the_fix(tmp_path: Path, good, damage, words: str) -> None:
    architecture, spec = good
    damage(architecture)
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(architecture))
    with pytest.raises(student.StudentError, match="dvc repro assemble") as err:
        student.from_architecture(path, spec, META, Search(metric="params", budget=15000, relative=False))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_budget_the_real_student_cannot_meet_fails_before_training(tmp_path: Path, good) -> None:
    """Tables searched without the fixed parts (search.fixed_cost=0) fit a budget the built student overshoots."""
    architecture, spec = good
    for key in ("arch", "fixed_cost", "search"):
        architecture.pop(key)
    over = architecture["params"] - 10
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(architecture))
    with pytest.raises(student.StudentError, match=f"over its ceiling {over} .*: raise it or shrink"):
        student.from_architecture(path, spec, META, Search(metric="params", budget=over, relative=False))


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"blocks": ["b0"]})])
def test_missing_or_unreadable_architecture_names_the_assemble_stage(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "architecture.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ArtifactError, match="`dvc repro assemble`"):
        student.read_architecture(path)


# -------------------------------------------------------------------------------------------- export
@pytest.fixture
def exported(tmp_path: Path, good) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    architecture, spec = good
    model = student.create(student.model_args(spec, dict(zip(architecture["blocks"], architecture["candidates"],
                                                                 strict=True))), META, drop_path_rate=0.1)
    with torch.no_grad():  # non-trivial BN statistics, so a reload that dropped buffers would show
        model.train()(torch.randn(8, 1, 16, 16) * 3 + 1)
    out = student.save(model.eval(), tmp_path / "student", architecture, META["classes"])
    return out, model, torch.randn(3, 1, 16, 16)


def test_export_reloads_in_a_fresh_process_through_the_loader_and_timm(exported, tmp_path: Path) -> None:
    out, model, x = exported
    assert sorted(p.name for p in out.iterdir()) == [student.ARCHITECTURE, student.CONFIG, student.WEIGHTS]
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, torch, timm; from pipeline import student; d, x = sys.argv[1], "
            "torch.from_numpy(np.load(sys.argv[2])); a = student.load(d); "
            "b = timm.create_model('local-dir:' + d, pretrained=True).eval(); "
            "np.save(sys.argv[3], np.stack([a(x).detach().numpy(), b(x).detach().numpy()]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    loaded, via_timm = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_array_equal(via_timm, expected)
    assert json.loads((out / student.CONFIG).read_text())["label_names"] == META["classes"]


def test_load_rejects_missing_and_corrupt_exports(exported, tmp_path: Path) -> None:
    out, _, _ = exported
    with pytest.raises(ArtifactError, match="no exported student .*`dvc repro retrain`"):
        student.load(tmp_path / "nowhere")
    weights = out / student.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupt student export .*`dvc repro retrain`"):
        student.load(out)


def test_onnx_export_matches_torch_within_tolerance(exported, tmp_path: Path) -> None:
    out, model, x = exported
    diff = student.export_onnx(model, out / student.ONNX, x[:2])
    assert diff <= student.ONNX_TOLERANCE
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / student.ONNX), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 1, 16, 16)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": batch.numpy()})[0], model(batch).numpy(), atol=1e-4)
