"""DNA's search space (Li et al., CVPR 2020, Sec. 3.2-3.3): ops, block geometry, candidate ids, arch strings, costs.

Every op is built from timm's own blocks through one registry, so the supernet, a standalone candidate and the
retrained timm ``EfficientNet`` (built from the arch strings below with ``decode_arch_def``) hold the same modules.

Channel matching (DNA, changlin31/DNA#12): during search a block's first layer reads the teacher's channels and
its last layer writes them, so the block can be trained on cached teacher features; the retrained student uses
the student widths. Costs are always counted at the student widths. Inside a cell, every layer but the last
writes the cell's width and the last writes the block's width, so a block's cost never depends on the candidate
chosen in another block and a network's cost is exactly the sum of its blocks' costs plus ``fixed_cost``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d, create_conv2d, get_act_layer, get_norm_act_layer
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from timm.models._efficientnet_blocks import EdgeResidual, InvertedResidual, SqueezeExcite
from timm.models._efficientnet_builder import EfficientNetBuilder, decode_arch_def
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.checkpoint import ArtifactError
from pipeline.config import COUNTED_METRICS, Cell, ConfigError, Params, Space, repo_root

SKIP = "skip"
TEACHER_BLOCKS = Path("artifacts/teacher/blocks.json")
CHANNEL_DIVISOR = 8  # timm's EfficientNet rounds every width to a multiple of 8 (round_channels)


# ---------------------------------------------------------------------------------------------------- op registry
_FIELDS = {"kernel": r"(?:[1-9]\d*)?[13579]", "exp": r"[1-9]\d*"}  # an odd kernel size, an expansion >= 1


@dataclass(frozen=True)
class OpType:
    """One kind of op: the names it owns, its module, and its layer in a timm arch string.

    ``grammar`` is a name with ``{kernel}``/``{exp}`` fields; ``parse_op`` matches it and hands the fields to
    ``build`` and ``arch`` as ints, so a new kind is one entry in ``OP_TYPES`` and no parser change.
    """

    grammar: str  # e.g. "er_k{kernel}e{exp}"
    build: Callable[..., nn.Module]  # (in_chs, out_chs, stride, se_ratio, act, **fields) -> module
    arch: Callable[..., str | None]  # (out_chs, stride, se_ratio, **fields) -> arch-string layer, None = no layer
    example: str  # a valid name, shown in errors and used by tests
    description: str
    se: bool = False  # whether the op carries a squeeze-excite of space.se_ratio

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", self.grammar)  # literal, field, literal, ...
        return re.compile("".join(f"(?P<{part}>{_FIELDS[part]})" if i % 2 else re.escape(part)
                                  for i, part in enumerate(parts)))


def _se_layer(se_ratio: float, exp: int) -> Callable[..., nn.Module] | None:
    # EfficientNetBuilder divides the SE ratio by the expansion (SE width from the block input): do the same.
    return partial(SqueezeExcite, rd_ratio=se_ratio / exp) if se_ratio > 0 else None


def _mbconv(in_chs: int, out_chs: int, stride: int, se_ratio: float, act: str, kernel: int, exp: int) -> nn.Module:
    return InvertedResidual(in_chs, out_chs, dw_kernel_size=kernel, stride=stride, exp_ratio=exp,
                            se_layer=_se_layer(se_ratio, exp), act_layer=get_act_layer(act))


def _fused_mbconv(in_chs: int, out_chs: int, stride: int, se_ratio: float, act: str, kernel: int,
                  exp: int) -> nn.Module:
    # the kxk conv widens to make_divisible(in_chs * exp), as timm's builder makes it without force_in_chs
    return EdgeResidual(in_chs, out_chs, exp_kernel_size=kernel, stride=stride, exp_ratio=exp,
                        se_layer=_se_layer(se_ratio, exp), act_layer=get_act_layer(act))


def _timm_layer(block_type: str, out_chs: int, stride: int, se_ratio: float, kernel: int, exp: int) -> str:
    se = f"_se{se_ratio:g}" if se_ratio > 0 else ""
    return f"{block_type}_r1_k{kernel}_s{stride}_e{exp}_c{out_chs}{se}"


# DNA's MBConv with SE, plus two kinds that run faster on CPUs and GPUs: MBConv without SE's global pool and gates,
# and FusedMBConv (EfficientNetV2, Tan & Le 2021), whose dense kxk conv replaces the 1x1 expansion + depthwise pair.
OP_TYPES: dict[str, OpType] = {
    "ir": OpType(grammar="k{kernel}e{exp}", build=_mbconv, arch=partial(_timm_layer, "ir"), example="k3e6",
                 description="MBConv + SE", se=True),
    "ir_nose": OpType(grammar="k{kernel}e{exp}_nose", build=_mbconv, arch=partial(_timm_layer, "ir"),
                      example="k3e6_nose", description="MBConv, no SE"),
    "er": OpType(grammar="er_k{kernel}e{exp}", build=_fused_mbconv, arch=partial(_timm_layer, "er"),
                 example="er_k3e4", description="FusedMBConv"),
    SKIP: OpType(grammar=SKIP, build=lambda *args, **kwargs: nn.Identity(), arch=lambda *args, **kwargs: None,
                 example=SKIP, description="identity"),
}


def parse_op(name: str) -> tuple[str, dict[str, int]]:
    """``k5e3`` -> ("ir", {"kernel": 5, "exp": 3}); ``skip`` -> ("skip", {}); a name no type owns is a ConfigError."""
    for kind, op_type in OP_TYPES.items():
        match = op_type.pattern.fullmatch(name)
        if match is not None:
            return kind, {field: int(value) for field, value in match.groupdict().items()}
    examples = ", ".join(f"{t.example} ({t.description})" for kind, t in OP_TYPES.items() if kind != SKIP)
    raise ConfigError(f"params key 'space.ops' has unknown op {name!r}: use one of {examples} with an odd kernel "
                      f"k and an expansion e >= 1, or enable skips with space.identity=true")


def _resolve(name: str, se_ratio: float) -> tuple[OpType, float, dict[str, int]]:
    """The op's type, the SE ratio it uses (0 for a type without SE) and the fields of its name."""
    kind, fields = parse_op(name)
    op_type = OP_TYPES[kind]
    return op_type, se_ratio if op_type.se else 0.0, fields


def build_op(name: str, in_chs: int, out_chs: int, stride: int, se_ratio: float, act: str) -> nn.Module:
    op_type, se_ratio, fields = _resolve(name, se_ratio)
    return op_type.build(in_chs, out_chs, stride, se_ratio, act, **fields)


def op_arch(name: str, out_chs: int, stride: int, se_ratio: float) -> str | None:
    """The op as one layer of a timm arch string (None for a skip, which is no timm block)."""
    op_type, se_ratio, fields = _resolve(name, se_ratio)
    return op_type.arch(out_chs, stride, se_ratio, **fields)


# ---------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Layer:
    """One searchable layer position: its op choices and its channels during search and in the student."""

    choices: tuple[str, ...]
    stride: int
    in_chs: int  # supernet channels (teacher channels at the block's ends)
    out_chs: int
    student_in: int  # retrained-student channels
    student_out: int
    in_size: tuple[int, int]  # spatial size of the layer's input


@dataclass(frozen=True)
class CellSpec:
    """A depth/width variant of a block; ``name`` prefixes candidate ids when a block has several cells."""

    index: int
    name: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Stem:
    """The student's own stem, trained with block 0 (a teacher feature cannot feed it: the stems differ)."""

    in_chs: int
    out_chs: int
    stride: int
    in_size: tuple[int, int]
    layer: str = ""  # a fixed timm block after the conv (space.stem_layer), e.g. DNA's ds_r1_k3_s1_c16_se0.25
    layer_out: int = 0  # its output channels (block 0 reads them)


@dataclass(frozen=True)
class BlockSpec:
    name: str
    index: int
    cells: tuple[CellSpec, ...]
    in_chs: int  # the teacher's channels at the block input (image channels for block 0)
    out_chs: int  # the teacher's channels at the block output
    width: int  # the student's channels at the block output
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    se_ratio: float
    act: str
    stem: Stem | None = None

    def candidates(self) -> Iterator[str]:
        """All candidate ids, cell by cell, in prefix-tree order (the op order of ``space.ops``)."""
        for cell in self.cells:
            for ops in itertools.product(*(layer.choices for layer in cell.layers)):
                yield candidate_id(cell, ops)

    def num_candidates(self) -> int:
        return sum(math.prod(len(layer.choices) for layer in cell.layers) for cell in self.cells)

    def parse(self, cid: str) -> tuple[CellSpec, tuple[str, ...]]:
        """Inverse of ``candidate_id``; a ValueError names the block and the id when it is not in the space."""
        prefix, _, body = cid.rpartition(":")
        cells = [c for c in self.cells if c.name == prefix]
        ops = tuple(body.split("-"))
        if len(cells) != 1 or len(ops) != len(cells[0].layers) or any(
                op not in layer.choices for op, layer in zip(ops, cells[0].layers, strict=True)):
            raise ValueError(f"{cid!r} is not a candidate of block {self.name} (e.g. {next(self.candidates())!r})")
        return cells[0], ops


@dataclass(frozen=True)
class SpaceSpec:
    """The resolved space: params' ``space`` group laid over the teacher's blocks (``blocks.json``)."""

    blocks: tuple[BlockSpec, ...]
    stem: Stem
    head: int
    num_classes: int
    act: str

    def block(self, name: str) -> BlockSpec:
        for block in self.blocks:
            if block.name == name:
                return block
        raise ConfigError(f"block {name!r} is not in the space: choose one of {', '.join(b.name for b in self.blocks)}")


def candidate_id(cell: CellSpec, ops: Sequence[str]) -> str:
    body = "-".join(ops)
    return f"{cell.name}:{body}" if cell.name else body


def check_space(space: Space, num_blocks: int) -> None:
    """Config-time checks of the ``space`` group (no teacher needed): ops, block keys, layers, widths."""
    if not space.ops or len(set(space.ops)) != len(space.ops):
        raise ConfigError(f"params key 'space.ops' = {list(space.ops)} is invalid: "
                          "list distinct ops, e.g. [k3e3, k3e6]")
    for op in space.ops:
        if op == SKIP:
            raise ConfigError("params key 'space.ops' lists 'skip': set space.identity=true instead")
        parse_op(op)
    if not 0 <= space.se_ratio < 1:
        raise ConfigError(f"params key 'space.se_ratio' = {space.se_ratio} is invalid: must be in [0, 1)")
    try:
        get_act_layer(space.act)
    except Exception:  # noqa: BLE001 - timm raises several types for unknown names
        raise ConfigError(f"params key 'space.act' = {space.act!r} is not a timm activation "
                          "(e.g. swish, relu)") from None
    _check_width("space.stem", space.stem)
    if space.stem_layer:
        _check_width("space.stem_layer's c<channels>", stem_layer_out(space.stem_layer))
    if space.head < 0:
        raise ConfigError(f"params key 'space.head' = {space.head} is invalid: 0 (no head conv) or a width")
    expected = [f"b{i}" for i in range(num_blocks)]
    if list(space.blocks) != expected:
        raise ConfigError(f"params key 'space.blocks' has keys {list(space.blocks)} but the teacher "
                          f"(teacher.boundaries) has {num_blocks} blocks: use exactly {expected}")
    for name, block in space.blocks.items():
        key = f"space.blocks.{name}"
        _check_width(f"{key}.width", block.width)
        if block.lr < 0:
            raise ConfigError(f"params key '{key}.lr' = {block.lr} is invalid: 0 (= supernet.lr) or a positive lr")
        if not block.cells:
            raise ConfigError(f"params key '{key}.cells' is empty: give at least one cell, "
                              "e.g. [{layers: 2, width: 16}]")
        shapes = [(c.layers, cell_width(c, block.width), cell_out(c, block.width)) for c in block.cells]
        if len(set(shapes)) != len(shapes):
            raise ConfigError(f"params key '{key}.cells' repeats a cell {shapes}: cells must differ in layers or width")
        for i, cell in enumerate(block.cells):
            if cell.layers < 1:
                raise ConfigError(f"params key '{key}.cells.{i}.layers' = {cell.layers} is invalid: "
                                  "a cell needs >= 1 layer")
            if cell.width:
                _check_width(f"{key}.cells.{i}.width", cell.width)
            if cell.out:
                _check_width(f"{key}.cells.{i}.out", cell.out)
    last, block = list(space.blocks.items())[-1]
    if any(cell_out(c, block.width) != block.width for c in block.cells):
        raise ConfigError(f"params key 'space.blocks.{last}.cells' sets an out width: the head reads the last block, "
                          f"so its cells must all write space.blocks.{last}.width ({block.width})")


def cell_width(cell: Cell, block_width: int) -> int:
    """Width of a cell's inner layers; a one-layer cell has none, its only layer writes the block width."""
    return (cell.width or block_width) if cell.layers > 1 else block_width


def cell_out(cell: Cell, block_width: int) -> int:
    """Width a cell writes: ``out``, else the block's. Cells writing several widths make the next block's cells
    read each of them (their ids end in ``i<width>``); ``check_chain`` keeps a network's widths joined."""
    return cell.out or block_width


def stem_layer_out(arch: str) -> int:
    """Output channels of ``space.stem_layer``: one stride-1 block in timm's arch-string grammar."""
    try:
        ((args,),) = decode_arch_def([[arch]])
    except Exception:  # noqa: BLE001 - timm's decoder raises assertion, value and key errors alike
        raise ConfigError(f"params key 'space.stem_layer' = {arch!r} is not one timm block string "
                          "(e.g. ds_r1_k3_s1_c16_se0.25, DNA's depthwise-separable stem block)") from None
    if args["stride"] != 1:
        raise ConfigError(f"params key 'space.stem_layer' = {arch!r} has stride {args['stride']}: use s1 "
                          "(the stem conv and block 0 take the teacher's strides)")
    return int(args["out_chs"])


def _check_width(key: str, width: int) -> None:
    if width <= 0 or width % CHANNEL_DIVISOR:
        raise ConfigError(f"params key '{key}' = {width} is invalid: use a positive multiple of {CHANNEL_DIVISOR} "
                          f"(timm's EfficientNet rounds widths to multiples of {CHANNEL_DIVISOR}, which would break "
                          f"the cost model)")


def load_teacher_blocks(path: Path | str | None = None) -> dict[str, Any]:
    """The teacher's ``blocks.json`` (written by the ``teacher`` stage)."""
    path = Path(path) if path is not None else repo_root() / TEACHER_BLOCKS
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: rebuild it with `dvc repro teacher`") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is unreadable ({type(err).__name__}): "
                            "rebuild it with `dvc repro teacher`") from None


def _stride(name: str, in_size: Sequence[int], out_size: Sequence[int], allowed: Sequence[int]) -> int:
    """The stride that maps the teacher's input size to its output size (padded convs: out = ceil(in / s))."""
    for stride in allowed:
        if all(math.ceil(i / stride) == o for i, o in zip(in_size, out_size, strict=True)):
            return stride
    raise ConfigError(f"teacher block {name} maps {list(in_size)} to {list(out_size)}, which no student layer "
                      f"stride in {list(allowed)} can match: choose other teacher.boundaries")


def build_space(space: Space, teacher_blocks: Mapping[str, Any]) -> SpaceSpec:
    """Lay the ``space`` params over the teacher's blocks; errors name the block and the fix."""
    tblocks = teacher_blocks["blocks"]
    check_space(space, len(tblocks))
    names = [b["name"] for b in tblocks]
    if names != list(space.blocks):
        raise ConfigError(f"teacher blocks.json has blocks {names} but params space.blocks has {list(space.blocks)}: "
                          f"rebuild the teacher (`dvc repro teacher`) or fix space.blocks")
    first = tblocks[0]
    total = _stride(first["name"], first["in_size"], first["out_size"], (1, 2, 4))
    stem_stride = min(total, 2)
    stem = Stem(in_chs=int(first["in_channels"]), out_chs=space.stem, stride=stem_stride,
                in_size=tuple(first["in_size"]), layer=space.stem_layer,
                layer_out=stem_layer_out(space.stem_layer) if space.stem_layer else 0)
    blocks, reads = [], [stem.layer_out or space.stem]  # the widths the previous block can write
    for index, tb in enumerate(tblocks):
        params = space.blocks[tb["name"]]
        if index == 0:
            in_chs, in_size = reads[0], tuple(math.ceil(s / stem_stride) for s in tb["in_size"])
            stride = total // stem_stride
        else:
            in_chs, in_size = int(tb["in_channels"]), tuple(tb["in_size"])
            stride = _stride(tb["name"], in_size, tb["out_size"], (1, 2))
        geometry = dict(teacher_in=in_chs, teacher_out=int(tb["out_channels"]), stride=stride, in_size=in_size)
        variants = [(cell, width) for cell in params.cells for width in reads]
        cells = tuple(_cell(i, cell.layers, cell_width(cell, params.width), cell_out(cell, params.width),
                            _cell_name(cell, params.width, width if len(reads) > 1 else 0) if len(variants) > 1
                            else "", space, student_in=width, **geometry)
                      for i, (cell, width) in enumerate(variants))
        blocks.append(BlockSpec(name=tb["name"], index=index, cells=cells, in_chs=int(tb["in_channels"]),
                                out_chs=int(tb["out_channels"]), width=params.width, in_size=in_size,
                                out_size=tuple(tb["out_size"]), se_ratio=space.se_ratio, act=space.act,
                                stem=stem if index == 0 else None))
        reads = sorted({cell_out(cell, params.width) for cell in params.cells})
    return SpaceSpec(blocks=tuple(blocks), stem=stem, head=space.head,
                     num_classes=int(teacher_blocks["num_classes"]), act=space.act)


def _cell_name(cell: Cell, block_width: int, reads: int) -> str:
    """``d<layers>w<width>``, then ``o<out>`` when it writes another width than the block's, ``i<in>`` when the
    previous block writes several widths and this variant reads ``reads`` of them."""
    out = cell_out(cell, block_width)
    return (f"d{cell.layers}w{cell_width(cell, block_width)}" + (f"o{out}" if out != block_width else "")
            + (f"i{reads}" if reads else ""))


def _cell(index: int, depth: int, width: int, out: int, name: str, space: Space, *, teacher_in: int,
          teacher_out: int, student_in: int, stride: int, in_size: tuple[int, int]) -> CellSpec:
    layers, size = [], in_size
    for i in range(depth):
        last = i == depth - 1
        # a skip must preserve channels in both search and student, so only layers strictly inside a cell skip
        choices = tuple(space.ops) + ((SKIP,) if space.identity and 0 < i < depth - 1 else ())
        layers.append(Layer(choices=choices, stride=stride if i == 0 else 1,
                            in_chs=teacher_in if i == 0 else width, out_chs=teacher_out if last else width,
                            student_in=student_in if i == 0 else width, student_out=out if last else width,
                            in_size=size))
        size = tuple(math.ceil(s / (stride if i == 0 else 1)) for s in size)
    return CellSpec(index=index, name=name, layers=tuple(layers))


# ---------------------------------------------------------------------------------------------------- modules
def build_layer(block: BlockSpec, layer: Layer, op: str, student: bool = False) -> nn.Module:
    """One op at one layer position, with search (teacher-matched) or student channels."""
    in_chs, out_chs = (layer.student_in, layer.student_out) if student else (layer.in_chs, layer.out_chs)
    return build_op(op, in_chs, out_chs, layer.stride, block.se_ratio, block.act)


def build_stem(stem: Stem, act: str) -> nn.Sequential:
    """timm EfficientNet's stem (``conv_stem`` + ``bn1``), with the stride the teacher's first block needs, then
    the fixed ``stem.layer`` built by timm's own builder (named ``blocks.0.0`` as in the student)."""
    norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(act))
    parts = OrderedDict(conv_stem=create_conv2d(stem.in_chs, stem.out_chs, 3, stride=stem.stride),
                        bn1=norm_act(stem.out_chs, inplace=True))
    if stem.layer:
        builder = EfficientNetBuilder(act_layer=get_act_layer(act), norm_layer=nn.BatchNorm2d, se_layer=SqueezeExcite)
        parts["blocks"] = nn.Sequential(*builder(stem.out_chs, decode_arch_def([[stem.layer]])))
    return nn.Sequential(parts)


def build_candidate(block: BlockSpec, cid: str) -> nn.Sequential:
    """A standalone network for one candidate at search widths (stem first for block 0), built from its id alone."""
    cell, ops = block.parse(cid)
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if block.stem is not None:
        parts["stem"] = build_stem(block.stem, block.act)
    layers = (build_layer(block, layer, op) for layer, op in zip(cell.layers, ops, strict=True))
    parts["layers"] = nn.Sequential(*layers)
    return nn.Sequential(parts)


# ---------------------------------------------------------------------------------------------------- timm arch
def candidate_arch(block: BlockSpec, cid: str) -> list[str]:
    """The candidate as one timm stage of arch strings at student widths (skips omitted)."""
    cell, ops = block.parse(cid)
    strings = []
    for layer, op in zip(cell.layers, ops, strict=True):
        arch = op_arch(op, layer.student_out, layer.stride, block.se_ratio)
        if arch is not None:
            strings.append(arch)
    return strings


def arch_def(spec: SpaceSpec, choice: Mapping[str, str]) -> list[list[str]]:
    """One candidate id per block -> timm ``decode_arch_def`` input (one stage per block, after the stem layer's)."""
    missing = [b.name for b in spec.blocks if b.name not in choice]
    if missing:
        raise ValueError(f"no candidate chosen for blocks {missing}")
    check_chain(spec, choice)
    stem = [[spec.stem.layer]] if spec.stem.layer else []
    return stem + [candidate_arch(block, choice[block.name]) for block in spec.blocks]


def check_chain(spec: SpaceSpec, choice: Mapping[str, str]) -> None:
    """Each block's candidate must read the width the previous one writes (cells with an ``out`` width)."""
    writes, writer = spec.stem.layer_out or spec.stem.out_chs, "the stem"
    for block in spec.blocks:
        cell, _ = block.parse(choice[block.name])
        reads = cell.layers[0].student_in
        if reads != writes:
            fits = [c.name for c in block.cells if c.layers[0].student_in == writes]
            raise ValueError(f"block {block.name} candidate {choice[block.name]!r} reads {reads} channels but "
                             f"{writer} writes {writes}: choose a {block.name} cell reading {writes} ({fits})")
        writes, writer = cell.layers[-1].student_out, f"block {block.name}'s {choice[block.name]!r}"


def num_architectures(spec: SpaceSpec) -> int:
    """How many whole networks the space holds: candidates per block, joined where widths match."""
    ways = {spec.stem.layer_out or spec.stem.out_chs: 1}  # width written so far -> networks writing it
    for block in spec.blocks:
        nxt: dict[int, int] = {}
        for cell in block.cells:
            out = cell.layers[-1].student_out
            size = math.prod(len(layer.choices) for layer in cell.layers)
            nxt[out] = nxt.get(out, 0) + ways.get(cell.layers[0].student_in, 0) * size
        ways = nxt
    return sum(ways.values())


def student_kwargs(spec: SpaceSpec) -> dict[str, Any]:
    """Keyword arguments of timm ``EfficientNet`` that, with ``decode_arch_def(arch_def(...))``, give the student.

    The stem stride is set after construction (``model.conv_stem.stride``) when it is not timm's fixed 2.
    """
    return dict(stem_size=spec.stem.out_chs, fix_stem=True, num_features=spec.head, in_chans=spec.stem.in_chs,
                num_classes=spec.num_classes, act_layer=get_act_layer(spec.act))


# ---------------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class Cost:
    """Parameters, FLOPs (multiply-accumulates of convolutions and linear layers, the papers' FLOPs) and FLOPs by
    DNA's own counter (``dna_flops``: what its Table 1 reports), one field per counted metric."""

    params: int
    flops: int
    flops_dna: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.flops + other.flops, self.flops_dna + other.flops_dna)

    def metric(self, metric: str) -> float:
        if metric not in COUNTED_METRICS:
            raise ConfigError(f"cost metric {metric!r} is invalid: {' or '.join(COUNTED_METRICS)}")
        return float(getattr(self, metric))

    def counted(self) -> dict[str, float]:
        """Every counted metric, as the cost tables hold them."""
        return {metric: self.metric(metric) for metric in COUNTED_METRICS}


ZERO = Cost(0, 0, 0)
_AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, FastAdaptiveAvgPool)


def dna_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    """One module's FLOPs under DNA's counter: a conv k*k*(C_in/groups)*C_out per output pixel (+ C_out with a
    bias), BatchNorm 2 per output element, Linear in*out per row, average pooling its input elements. Activations,
    SE's squeeze (a mean, no module), gates and residual adds count 0, as there."""
    if isinstance(module, nn.Conv2d):
        per_pixel = math.prod(module.kernel_size) * module.in_channels // module.groups * module.out_channels
        pixels = output.numel() // module.out_channels
        return (per_pixel + (module.out_channels if module.bias is not None else 0)) * pixels
    if isinstance(module, nn.BatchNorm2d):
        return 2 * output.numel()
    if isinstance(module, nn.Linear):
        return inputs[0].numel() * module.out_features
    return inputs[0].numel() if isinstance(module, _AVG_POOLS) else 0


def module_cost(module: nn.Module, input_shape: Sequence[int]) -> Cost:
    """Count a module (batch 1): its parameters, half the FLOPs torch's counter reports (it counts a MAC as 2),
    and DNA's FLOPs (``dna_flops`` summed over its modules by forward hooks)."""
    module, counts = module.eval(), []
    hooks = [m.register_forward_hook(lambda m, i, o: counts.append(dna_flops(m, i, o))) for m in module.modules()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return Cost(sum(p.numel() for p in module.parameters()), counter.get_total_flops() // 2, sum(counts))


@functools.lru_cache(maxsize=4096)
def _op_cost(op: str, in_chs: int, out_chs: int, stride: int, in_size: tuple[int, int], se_ratio: float,
             act: str) -> Cost:
    return module_cost(build_op(op, in_chs, out_chs, stride, se_ratio, act), (in_chs, *in_size))


def layer_cost(block: BlockSpec, layer: Layer, op: str) -> Cost:
    """One op at one layer position at student widths (the lookup table of DNA's search)."""
    return _op_cost(op, layer.student_in, layer.student_out, layer.stride, layer.in_size, block.se_ratio, block.act)


def candidate_cost(block: BlockSpec, cid: str) -> Cost:
    cell, ops = block.parse(cid)
    return sum((layer_cost(block, layer, op) for layer, op in zip(cell.layers, ops, strict=True)), ZERO)


def fixed_parts_cost(spec: SpaceSpec) -> Cost:
    """Stem, head conv and classifier: the parts every student shares."""
    stem = module_cost(build_stem(spec.stem, spec.act), (spec.stem.in_chs, *spec.stem.in_size))
    last = spec.blocks[-1]
    head_in, head = last.width, spec.head or last.width
    norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(spec.act))
    parts = [] if not spec.head else [create_conv2d(head_in, head, 1), norm_act(head, inplace=True)]
    pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)  # timm EfficientNet's global_pool
    head_cost = module_cost(nn.Sequential(*parts, pool), (head_in, *last.out_size))
    return stem + head_cost + module_cost(nn.Linear(head, spec.num_classes), (head,))


def fixed_cost(params: Params, metric: str, teacher_blocks: Mapping[str, Any] | None = None) -> float:
    """Cost of the unsearched parts (stem, head, classifier) in ``metric`` (params | flops).

    Reads the teacher's ``blocks.json`` (spatial sizes, classes) unless ``teacher_blocks`` is given.
    """
    split = teacher_blocks if teacher_blocks is not None else load_teacher_blocks()
    return fixed_parts_cost(build_space(params.space, split)).metric(metric)
