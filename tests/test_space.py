"""Search space: op registry, config-time errors, candidate ids, timm arch strings, and the one cost model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from pipeline import space
from pipeline.checkpoint import ArtifactError
from pipeline.config import ConfigError, load_params
from tests.fakes import EVERY_OP, OP_EXAMPLES, REPO, resnet18_blocks, rotating_choice, teacher_blocks, tiny_params


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
    assert space.op_arch("skip", 8, 1, 0.25) is None


@pytest.mark.parametrize("kind", list(space.OP_TYPES))
def test_every_op_type_owns_its_example_and_only_it(kind: str) -> None:
    """The example parses back to its type, its fields rebuild the name, and no other type claims it."""
    op_type = space.OP_TYPES[kind]
    parsed, fields = space.parse_op(op_type.example)
    assert parsed == kind and op_type.grammar.format(**fields) == op_type.example
    assert [k for k, t in space.OP_TYPES.items() if t.pattern.fullmatch(op_type.example)] == [kind]
    assert not set("-:.") & set(op_type.example)  # candidate ids join ops with '-', ':'; ModuleDict keys bar '.'


@pytest.mark.parametrize("in_chs, out_chs, stride", [(16, 24, 2), (24, 24, 1)])
@pytest.mark.parametrize("name", OP_EXAMPLES)
def test_op_is_the_timm_block_its_arch_string_decodes_to(name: str, in_chs: int, out_chs: int, stride: int) -> None:
    """build_op and timm's EfficientNetBuilder (from op_arch's string) make the same module, so costs agree."""
    op = space.build_op(name, in_chs, out_chs, stride, 0.25, "swish")
    arch = space.op_arch(name, out_chs, stride, 0.25)
    timm_block = EfficientNet(decode_arch_def([[arch]]), stem_size=in_chs, fix_stem=True, num_features=0,
                              in_chans=1, act_layer=get_act_layer("swish")).blocks[0][0]
    assert type(op) is type(timm_block) and str(op) == str(timm_block)
    assert {k: v.shape for k, v in op.state_dict().items()} == {k: v.shape for k, v in timm_block.state_dict().items()}
    assert space.module_cost(op, (in_chs, 8, 8)) == space.module_cost(timm_block, (in_chs, 8, 8))
    kind, _ = space.parse_op(name)
    assert any(isinstance(m, SqueezeExcite) for m in op.modules()) == space.OP_TYPES[kind].se
    assert op(torch.randn(2, in_chs, 8, 8)).shape == (2, out_chs, 8 // stride, 8 // stride)


@pytest.mark.parametrize("bad", ["er_k4e3", "k3e0", "foo", "k4e3_nose", "k3e3_se", "er_k3e3_nose", "k03e3", "er_k3"])
def test_unknown_op_fails_in_one_line_listing_every_type(bad: str) -> None:
    with pytest.raises(ConfigError, match=f"'space.ops' has unknown op '{bad}'") as err:
        load_params([f"space.ops=[k3e3,{bad}]"], root=REPO)
    assert all(example in str(err.value) for example in OP_EXAMPLES) and "\n" not in str(err.value)
    assert "space.identity=true" in str(err.value)


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
    (lambda s: s["blocks"].pop(), r"but the teacher \(teacher.boundaries\) has 3 blocks"),
])
def test_teacher_blocks_the_space_cannot_fit_are_a_config_error(damage, words: str) -> None:
    blocks = resnet18_blocks()
    damage(blocks)
    with pytest.raises(ConfigError, match=words):
        space.build_space(load_params(root=REPO).space, blocks)


def test_default_geometry_matches_channel_matching_rule() -> None:
    spec = space.build_space(load_params(root=REPO).space, resnet18_blocks())
    b0, b1 = spec.blocks[0], spec.blocks[1]
    assert spec.stem.stride == 2 and b0.stem is not None and b1.stem is None
    assert [(la.in_chs, la.out_chs, la.stride) for la in b1.cells[0].layers] == [(32, 32, 2), (32, 32, 1), (32, 64, 1)]
    assert [(la.student_in, la.student_out) for la in b1.cells[0].layers] == [(16, 32), (32, 32), (32, 32)]
    assert b0.cells[0].layers[-1].out_chs == 32 and b0.cells[0].layers[0].in_chs == 16  # stem width in


def test_candidate_ids_are_readable_complete_and_round_trip() -> None:
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_blocks())
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
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_blocks())
    choices = [la.choices for la in spec.block("b1").cells[0].layers]
    assert "skip" not in choices[0] and "skip" in choices[1] and "skip" not in choices[2]


def test_candidate_arch_strings_decode_in_timm() -> None:
    spec = space.build_space(tiny_params(["space.identity=true"]).space, teacher_blocks())
    arch = space.candidate_arch(spec.block("b1"), "d3w8:k5e6-skip-k3e3")
    assert arch == ["ir_r1_k5_s2_e6_c8_se0.25", "ir_r1_k3_s1_e3_c16_se0.25"]
    assert decode_arch_def([arch])[0][0]["dw_kernel_size"] == 5
    mixed = space.build_space(tiny_params(["space.ops=[k3e3,k5e6_nose,er_k3e4]"]).space, teacher_blocks())
    arch = space.candidate_arch(mixed.block("b1"), "d3w8:er_k3e4-k5e6_nose-k3e3")
    assert arch == ["er_r1_k3_s2_e4_c8", "ir_r1_k5_s1_e6_c8", "ir_r1_k3_s1_e3_c16_se0.25"]


def _timm_student(spec: space.SpaceSpec, choice: dict[str, str]) -> torch.nn.Module:
    return EfficientNet(decode_arch_def(space.arch_def(spec, choice)), **space.student_kwargs(spec))


@pytest.mark.parametrize("overrides, split", [
    ([], "resnet18"),
    ([EVERY_OP], "resnet18"),
    (["space.identity=true", "space.head=0"], "tiny"),
    ([EVERY_OP, "space.identity=true"], "tiny"),
])
def test_cost_model_equals_a_count_of_the_timm_student(overrides: list[str], split: str) -> None:
    """Params and MACs of the timm EfficientNet built from the arch strings = fixed cost + sum of candidate costs."""
    if split == "resnet18":
        params, tsplit = load_params(overrides, root=REPO), resnet18_blocks()
    else:
        params, tsplit = tiny_params(overrides), teacher_blocks()
    spec = space.build_space(params.space, tsplit)
    rng = random.Random(0)
    drawn = [{b.name: rng.choice(list(b.candidates())) for b in spec.blocks} for _ in range(2)]
    for choice in [*drawn, rotating_choice(spec)]:
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
    (tmp_path / "artifacts/teacher/blocks.json").write_text(json.dumps(teacher_blocks()))
    assert space.fixed_cost(params, "flops") == space.fixed_cost(params, "flops", teacher_blocks()) > 0
    with pytest.raises(ConfigError, match="params or flops"):
        space.fixed_cost(params, "latency")
