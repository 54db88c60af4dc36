"""The paper-scale overlay (configs/paper.yaml) and DNA-a..d (configs/architectures/): the space holds them, the
student builder rebuilds them, and DNA's counter gives the paper's Table 1 (Li et al., CVPR 2020)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import describe, space, student
from pipeline.config import ConfigError, load_params
from pipeline.smoke import make_workspace
from pipeline.teacher import TeacherError, create_teacher, cut_blocks
from tests.fakes import REPO, TEACHER, tiny_params

OVERLAY = Path("configs/paper.yaml")
ARCHS = REPO / "configs/architectures"
# params, FLOPs by DNA's counter (the paper's table rounds them), plain MACs (millions): the recount in the DNA notes
DNA = {"dna_a": (4_243_318, 348_161_054, 335.1), "dna_b": (4_918_180, 405_784_844, 392.5),
       "dna_c": (5_273_896, 465_920_048, 450.1), "dna_d": (6_409_486, 611_198_918, 592.8)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace made as `python -m pipeline.overlay configs/paper.yaml DIR` makes it, with the teacher's split
    (B7 with random weights, cut now) where the teacher stage writes it."""
    root = make_workspace(REPO, tmp_path_factory.mktemp("paper") / "ws", overlay=OVERLAY)
    split = describe.teacher_split(load_params(root=root), root)
    (root / space.TEACHER_BLOCKS).parent.mkdir(parents=True)
    (root / space.TEACHER_BLOCKS).write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def spec(workspace: Path) -> space.SpaceSpec:
    params = load_params(root=workspace)
    return space.build_space(params.space, space.load_teacher_blocks(workspace / space.TEACHER_BLOCKS))


def test_overlay_loads_through_the_normal_loader(workspace):
    params = load_params(root=workspace)  # what every stage of that workspace loads, validated
    assert (params.teacher.name, params.data.image_size, params.data.name) == ("tf_efficientnet_b7", 224, "imagefolder")
    assert params.space.ops == ["k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6"]
    assert params.search.metric == "flops_dna" and params.teacher.kwargs == {"channels": None, "stem_width": None}


def test_overlay_blocks_replace_the_defaults(workspace):
    """params.yaml's per-block settings (b3's own supernet epochs) belong to its teacher's split, not B7's."""
    params, default = load_params(root=workspace), load_params(root=REPO)
    assert default.space.blocks["b3"].epochs > 0, "the default must set one for this test to mean something"
    assert [b.epochs for b in params.space.blocks.values()] == [0] * 6
    assert params.space.blocks["b3"].lr == 0.005, "the overlay's own per-block settings stay"


def test_blocks_are_b7_stages_2_to_7(workspace):
    split = space.load_teacher_blocks(workspace / space.TEACHER_BLOCKS)
    assert (split["num_classes"], split["in_chans"]) == (1000, 3)
    assert [b["module"] for b in split["blocks"]] == [f"blocks.{i}" for i in range(1, 7)]
    assert [b["out_channels"] for b in split["blocks"]] == [48, 80, 160, 224, 384, 640]
    assert [b["out_size"][0] for b in split["blocks"]] == [56, 28, 14, 14, 7, 7]


@pytest.mark.parametrize("name", sorted(DNA))
def test_dna_nets_are_members_and_cost_the_papers_figures(name, spec):
    path = ARCHS / f"{name}.json"
    choice = student.choice_of(student.read_architecture(path), spec, str(path))
    for block in spec.blocks:
        assert choice[block.name] in set(block.candidates()), f"{name} {block.name} is not in the space"
    model = describe.latency.build_student(spec, choice)
    assert (model.num_classes, model.conv_stem.in_channels) == (1000, 3)
    built = describe.architecture_cost(path, spec)
    params, flops_dna, macs_m = DNA[name]
    assert built.params == params
    assert built.flops_dna == pytest.approx(flops_dna, rel=1e-3)
    assert built.flops / 1e6 == pytest.approx(macs_m, abs=0.05)
    predicted = sum((space.candidate_cost(b, choice[b.name]) for b in spec.blocks), space.fixed_parts_cost(spec))
    assert predicted == built, "the cost tables' sum must equal the built network in every counted metric"


def test_dna_counter_per_part(spec):
    """DNA-a's parts by DNA's rule, as the notes list them (params exact, K-FLOPs to 0.1K); the fixed parts derived
    by hand: stem conv 928 / 11,640,832, ds block 1,448 / 11,239,976, head (conv, BN, pool, FC) 1,693,160 / 21,538,560."""
    fixed = space.fixed_parts_cost(spec)
    assert (fixed.params, fixed.flops_dna) == (928 + 1_448 + 1_693_160, 11_640_832 + 11_239_976 + 21_538_560)
    choice = student.read_architecture(ARCHS / "dna_a.json")["candidates"]
    parts = [(19_888, 60_289.7), (63_476, 45_514.4), (256_550, 47_539.2), (429_980, 69_413.2), (1_226_168, 57_685.3),
             (551_720, 23_299.9)]
    for block, cid, (params, kflops) in zip(spec.blocks, choice, parts, strict=True):
        cost = space.candidate_cost(block, cid)
        assert cost.params == params and cost.flops_dna / 1e3 == pytest.approx(kflops, abs=0.06), block.name


def test_space_size_is_printed(workspace, spec, monkeypatch, capsys):
    # cells: b0 depth 2|3, b1 3|4, b2 4, b3 4 at width 96|112, b4 depth 4|5 at 160|192 (reading either b3 width), b5 1
    ops = 6
    expected = ((ops**2 + ops**3) * (ops**3 + ops**4) * ops**4 * (2 * ops**4) * (2 * ops**4 + 2 * ops**5) * ops)
    assert space.num_architectures(spec) == expected
    monkeypatch.chdir(workspace)
    assert describe.main([str(ARCHS / "dna_a.json")]) == 0
    out = capsys.readouterr().out
    assert f"architectures: {expected:,}" in out and "params 4,243,318" in out and "flops_dna 348,161,054" in out


def _edited(tmp_path: Path, edit) -> Path:
    content = json.loads((ARCHS / "dna_a.json").read_text())
    edit(content)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(("edit", "words"), [
    (lambda a: a["candidates"].__setitem__(5, "d1w320i160:k9e6"), ["op 'k9e6'", "not in the search space"]),
    (lambda a: (a["candidates"].pop(), a["blocks"].pop()), ["has 5 blocks", "search space has 6"]),
    (lambda a: a["candidates"].__setitem__(4, "d5w160o160i112:k5e6-k5e3-k5e3-k5e3-k5e6"),
     ["reads 112 channels", "writes 96", "d5w160o160i96"]),
])
def test_bad_architecture_file_is_one_line(edit, words, tmp_path, workspace, monkeypatch, capsys):
    path = _edited(tmp_path, edit)
    monkeypatch.chdir(workspace)
    assert describe.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and all(w in err for w in words), err


def test_boundaries_by_module_name():
    model = create_teacher(TEACHER, 1, 10)
    by_name = cut_blocks(model, ["layer1", "layer2", "layer3"], 1, 16)
    assert [b["out_channels"] for b in by_name] == [b["out_channels"] for b in cut_blocks(model, [1, 2, 3], 1, 16)]
    with pytest.raises(TeacherError, match="'layer9', which is not a module"):
        cut_blocks(model, ["layer1", "layer9"], 1, 16)
    with pytest.raises(TeacherError, match="not in the model's order"):
        cut_blocks(model, ["layer2", "layer1"], 1, 16)
    with pytest.raises(ConfigError, match="teacher.boundaries"):
        tiny_params(["teacher.boundaries=[layer1,2,3]"])


@pytest.mark.parametrize(("override", "words"), [
    ("space.stem_layer=ds_r1_k3_s2_c16", "use s1"),
    ("space.stem_layer=nonsense", "not one timm block string"),
    ("space.blocks.b2.cells=[{layers: 2, out: 24}]", "head reads the last block"),
])
def test_bad_space_keys(override, words):
    with pytest.raises(ConfigError, match=words):
        tiny_params([override])


def test_architecture_count_matches_enumeration():
    """On the tiny space with out widths: the count equals the width-joined product enumerated outright."""
    from tests.fakes import teacher_blocks

    params = tiny_params(["space.blocks.b0.cells=[{layers: 1}, {layers: 2, out: 16}]"])
    spec = space.build_space(params.space, teacher_blocks())
    networks = 0
    for c0 in spec.blocks[0].candidates():
        for c1 in spec.blocks[1].candidates():
            for c2 in spec.blocks[2].candidates():
                try:
                    space.check_chain(spec, dict(zip(["b0", "b1", "b2"], [c0, c1, c2], strict=True)))
                except ValueError:
                    continue
                networks += 1
    assert space.num_architectures(spec) == networks < math.prod(b.num_candidates() for b in spec.blocks)
