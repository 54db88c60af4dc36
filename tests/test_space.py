"""Search space: op registry, config-time errors, candidate ids, timm arch strings, and the one cost model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from pipeline import space
from pipeline.checkpoint import ArtifactError
from pipeline.config import ConfigError, load_params
from tests.blockfakes import REPO, one_thread, teacher_split, tiny_params  # noqa: F401


def resnet18_split() -> dict:
    """The default teacher's split: narrow resnet18 at 28 px, layer1..layer4 (32/64/128/256 channels)."""
    chans, sizes = [1, 32, 64, 128, 256], [28, 14, 7, 4, 2]
    return {"teacher": "resnet18", "image_size": 28, "in_chans": 1, "num_classes": 10,
            "blocks": [{"name": f"b{i}", "boundary": i + 1, "modules": [f"layer{i + 1}"], "in_channels": chans[i],
                        "out_channels": chans[i + 1], "stride": 2, "in_size": [sizes[i]] * 2,
                        "out_size": [sizes[i + 1]] * 2} for i in range(4)]}


@pytest.mark.parametrize("name", ["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6", "k9e1"])
def test_every_mbconv_op_is_timms_inverted_residual_with_se(name: str) -> None:
    kind, args = space.parse_op(name)
    op = space.build_op(name, 16, 24, 2, 0.25, "swish")
    assert kind == "ir" and isinstance(op, InvertedResidual) and isinstance(op.se, SqueezeExcite)
    assert op.conv_dw.kernel_size == (args["kernel"],) * 2 and op.conv_dw.stride == (2, 2)
    assert op.conv_pw.out_channels == 16 * args["exp"] and op.conv_pwl.out_channels == 24
    assert op.se.conv_reduce.out_channels == 4  # SE width = 0.25 x the block input, as EfficientNet's builder
    assert op(torch.randn(2, 16, 8, 8)).shape == (2, 24, 4, 4)


def test_skip_op_is_identity_and_omitted_from_arch() -> None:
    assert isinstance(space.build_op("skip", 8, 8, 1, 0.25, "swish"), torch.nn.Identity)
    assert space.OP_TYPES["skip"].arch(8, 1, 0.25) is None


@pytest.mark.parametrize("override, key", [
    ("space.ops=[k3e3,conv3]", "space.ops"),
    ("space.ops=[k4e3]", "space.ops"),
    ("space.ops=[k3e3,k3e3]", "space.ops"),
    ("space.ops=[k3e3,skip]", "space.ops"),
    ("space.blocks.b1.cells=[{layers:0}]", "space.blocks.b1.cells.0.layers"),
    ("space.blocks.b1.cells=[]", "space.blocks.b1.cells"),
    ("space.blocks.b2.width=60", "space.blocks.b2.width"),
    ("space.blocks.b0.cells=[{layers:2,width:12}]", "space.blocks.b0.cells.0.width"),
    ("space.blocks.b1.cells=[{layers:2},{layers:2,width:32}]", "space.blocks.b1.cells"),
    ("space.blocks.b3.index=2", "space.blocks.b3.index"),
    ("space.stem=0", "space.stem"),
    ("space.act=nosuchact", "space.act"),
    ("teacher.boundaries=[1,2,3]", "space.blocks"),
    ("supernet.sampler=greedy", "supernet.sampler"),
    ("supernet.lr_decay=0", "supernet.lr_decay"),
    ("supernet.opt=adamm", "supernet.opt"),
    ("score.batches=0", "score.batches"),
])
def test_bad_space_fails_at_config_time_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_params([override], root=REPO)


@pytest.mark.parametrize("damage, words", [
    (lambda s: s["blocks"][1].update(in_size=[14, 14], out_size=[4, 4]), "no student layer stride"),
    (lambda s: s["blocks"][0].update(out_size=[3, 3]), "no student layer stride"),
    (lambda s: s["blocks"][2].update(name="c2"), "dvc repro teacher"),
    (lambda s: s["blocks"].pop(), "teacher split"),
])
def test_teacher_split_the_space_cannot_fit_is_a_config_error(damage, words: str) -> None:
    split = resnet18_split()
    damage(split)
    with pytest.raises(ConfigError, match=words):
        space.build_space(load_params(root=REPO).space, split)


def test_default_geometry_matches_channel_matching_rule() -> None:
    spec = space.build_space(load_params(root=REPO).space, resnet18_split())
    b0, b1 = spec.blocks[0], spec.blocks[1]
    assert spec.stem.stride == 2 and b0.stem is not None and b1.stem is None
    assert [(la.in_chs, la.out_chs, la.stride) for la in b1.cells[0].layers] == [(32, 32, 2), (32, 32, 1), (32, 64, 1)]
    assert [(la.student_in, la.student_out) for la in b1.cells[0].layers] == [(16, 32), (32, 32), (32, 32)]
    assert b0.cells[0].layers[-1].out_chs == 32 and b0.cells[0].layers[0].in_chs == 16  # stem width in


def test_candidate_ids_are_readable_complete_and_round_trip() -> None:
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_split())
    b1 = spec.block("b1")
    ids = list(b1.candidates())
    assert len(ids) == len(set(ids)) == b1.num_candidates() == 2 * 3 * 2 + 2
    assert ids[0] == "d3w8:k3e3-k3e3-k3e3" and "d3w8:k5e6-skip-k3e3" in ids and ids[-1] == "d1w16:k5e6"
    for cid in ids:
        cell, ops = b1.parse(cid)
        assert space.candidate_id(cell, ops) == cid
    assert list(spec.block("b0").candidates())[:2] == ["k3e3-k3e3", "k3e3-k5e6"]  # one cell: no prefix
    for bad in ("k3e3-k3e3", "d3w8:skip-k3e3-k3e3", "d3w8:k3e3-k3e3-skip", "d9w8:k3e3"):
        with pytest.raises(ValueError, match="not a candidate of block b1"):
            b1.parse(bad)


def test_identity_is_offered_only_strictly_inside_a_cell() -> None:
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_split())
    choices = [la.choices for la in spec.block("b1").cells[0].layers]
    assert "skip" not in choices[0] and "skip" in choices[1] and "skip" not in choices[2]


def test_candidate_arch_strings_decode_in_timm() -> None:
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_split())
    arch = space.candidate_arch(spec.block("b1"), "d3w8:k5e6-skip-k3e3")
    assert arch == ["ir_r1_k5_s2_e6_c8_se0.25", "ir_r1_k3_s1_e3_c16_se0.25"]
    assert decode_arch_def([arch])[0][0]["dw_kernel_size"] == 5


def _timm_student(spec: space.SpaceSpec, choice: dict[str, str]) -> torch.nn.Module:
    return EfficientNet(decode_arch_def(space.arch_def(spec, choice)), **space.student_kwargs(spec))


@pytest.mark.parametrize("overrides, split", [
    ([], "resnet18"),
    (["space.identity=true", "space.head=0"], "tiny"),
])
def test_cost_model_equals_a_count_of_the_timm_student(overrides: list[str], split: str) -> None:
    """Params and MACs of the timm EfficientNet built from the arch strings = fixed cost + sum of candidate costs."""
    if split == "resnet18":
        params, tsplit = load_params(overrides, root=REPO), resnet18_split()
    else:
        params, tsplit = tiny_params(overrides), teacher_split()
    spec = space.build_space(params.space, tsplit)
    rng = random.Random(0)
    for _ in range(2):
        choice = {b.name: rng.choice(list(b.candidates())) for b in spec.blocks}
        model = _timm_student(spec, choice)
        counted = space.module_cost(model, (tsplit["in_chans"], tsplit["image_size"], tsplit["image_size"]))
        modelled = sum((space.candidate_cost(b, choice[b.name]) for b in spec.blocks), space.fixed_parts_cost(spec))
        assert modelled == counted and counted.params == sum(p.numel() for p in model.parameters())
    for metric in ("params", "flops"):
        assert space.fixed_cost(params, metric, tsplit) == space.fixed_parts_cost(spec).metric(metric)


def test_fixed_cost_reads_the_teacher_split_or_says_how_to_build_it(tmp_path, monkeypatch) -> None:
    params = tiny_params()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="dvc repro teacher"):
        space.fixed_cost(params, "params")
    (tmp_path / "artifacts/teacher").mkdir(parents=True)
    (tmp_path / "artifacts/teacher/blocks.json").write_text(json.dumps(teacher_split()))
    assert space.fixed_cost(params, "flops") == space.fixed_cost(params, "flops", teacher_split()) > 0
    with pytest.raises(ConfigError, match="params or flops"):
        space.fixed_cost(params, "latency")
