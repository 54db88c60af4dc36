"""The timm teacher: create, load, cut into blocks, and read its features at block boundaries.

Blocks end at entries of timm's ``feature_info`` (DNA section 2: stage boundaries). Channels and
spatial sizes are measured by a forward pass at the configured image size rather than read from
``reduction``, which stays at the model's default even when the stem is adapted to small images.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.checkpoint import ArtifactError, atomic, sha256_file
from pipeline.config import Teacher
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
BLOCKS = "blocks.json"
REBUILD = "dvc repro teacher"


class TeacherError(PipelineError):
    """A teacher setting that cannot work (unknown model, bad boundaries, unusable checkpoint)."""


def check_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise TeacherError(f"teacher.name={name!r} is not a timm model{hint}")


def create_teacher(cfg: Teacher, in_chans: int, num_classes: int) -> nn.Module:
    """A timm classifier, its stem adapted to small images when configured."""
    import timm

    check_name(cfg.name)
    kwargs: dict[str, Any] = {k: v for k, v in cfg.kwargs.items() if v is not None}  # null: an overlay unsets it
    if cfg.pretrained and cfg.checkpoint:
        raise TeacherError("set either teacher.pretrained=true or teacher.checkpoint, not both")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, in_chans=in_chans,
                                  num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise TeacherError(f"teacher.kwargs {kwargs} do not fit {cfg.name}: {err}") from None
    if cfg.stem_stride:
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        stem.stride = (cfg.stem_stride, cfg.stem_stride)
    if not cfg.stem_pool:
        for name in ("maxpool", "stem_pool"):
            if isinstance(getattr(model, name, None), nn.MaxPool2d):
                setattr(model, name, nn.Identity())
    if not getattr(model, "feature_info", None):
        raise TeacherError(f"timm model {cfg.name} has no feature_info: pick a CNN with feature stages")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Local safetensors, or a torch file loaded weights-only (plain or {'state_dict': ...})."""
    if not path.is_file():
        raise TeacherError(f"teacher.checkpoint={str(path)!r} does not exist: give a local .safetensors or .pt file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as err:  # noqa: BLE001 - any decode failure means an unusable file
        raise TeacherError(f"teacher checkpoint {path} is corrupt or not a weights-only file "
                           f"({type(err).__name__}): replace it or clear teacher.checkpoint") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise TeacherError(f"teacher checkpoint {path} does not fit {type(model).__name__}: {first}") from None


# ---------------------------------------------------------------- cutting into blocks


class _Recorder:
    """Forward hooks at the boundary modules; optionally stops the forward after the last one."""

    class _Stop(Exception):
        pass

    def __init__(self, model: nn.Module, modules: list[str], stop: bool) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = []
        for i, name in enumerate(modules):
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(i, stop and i == len(modules) - 1)))

    def _hook(self, i: int, last: bool):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self.outputs[i] = out
            if last:
                raise self._Stop

        return hook

    def run(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        try:
            model(x)
        except self._Stop:
            pass
        finally:
            for h in self.handles:
                h.remove()
        return [o for o in self.outputs if o is not None]


def _block_modules(model: nn.Module, boundary_modules: list[str], x: torch.Tensor) -> list[list[str]]:
    """Top-most modules that run entirely inside each block, found by tracing one forward pass."""
    block_of: dict[str, tuple[int, int]] = {}
    current = [0]
    names = {m: n for n, m in model.named_modules() if n}
    handles = []

    def pre(m: nn.Module, _inp: Any) -> None:
        block_of[names[m]] = (current[0], -1)

    def post(m: nn.Module, _inp: Any, _out: Any) -> None:
        name = names[m]
        block_of[name] = (block_of[name][0], current[0])
        if name in boundary_modules:
            current[0] += 1

    for m in names:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    blocks: list[list[str]] = [[] for _ in boundary_modules]
    for name, (start, end) in block_of.items():
        if start != end or start >= len(boundary_modules):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else None
        if parent is not None and block_of.get(parent, (-1, -2))[0] == start == block_of[parent][1]:
            continue  # the parent already lies wholly in this block
        blocks[start].append(name)
    return blocks


_MAX_IMAGE_SIZE = 2048  # the resolution check looks no further for a size that works


def _forward_error(model: nn.Module, in_chans: int, size: int) -> str | None:
    """Why a forward of one zero image of ``size`` px fails (a map below 1 px, a kernel larger than its padded
    input), or None when it runs."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    except RuntimeError as err:
        return " ".join(str(err).split())
    return None


def check_resolution(model: nn.Module, in_chans: int, image_size: int) -> None:
    """Fail in one line, naming the smallest image size that works, when the model downsamples ``image_size`` px
    images away. Map sizes never shrink as the input grows, so doubling then bisecting finds it in a few forwards
    (eval mode: batch norm on 1x1 maps of one image would fail in training mode)."""
    error = _forward_error(model, in_chans, image_size)
    if error is None:
        return
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    low, high = image_size, image_size * 2
    while _forward_error(model, in_chans, high) is not None:
        if high >= _MAX_IMAGE_SIZE:
            raise TeacherError(f"teacher {name} fails on {in_chans}-channel images of every size from "
                               f"data.image_size={image_size} to {high} px: {error}")
        low, high = high, min(high * 2, _MAX_IMAGE_SIZE)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _forward_error(model, in_chans, mid) is not None else (low, mid)
    raise TeacherError(f"teacher {name} downsamples data.image_size={image_size} px images below what its layers "
                       f"accept ({error}): set data.image_size >= {high}, or reduce its downsampling "
                       "(teacher.stem_stride, teacher.stem_pool=false, another teacher.name)")


def _boundary_modules(model: nn.Module, boundaries: list[int | str]) -> list[str]:
    """The modules that end the blocks: ``feature_info`` entries by index, or modules named directly (for stages
    ``feature_info`` skips, such as EfficientNet's stride-1 stages), which must follow the model's order."""
    info = model.feature_info
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    stages = [e["module"] for e in entries]
    if all(isinstance(b, str) for b in boundaries):
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        unknown = [b for b in boundaries if b not in order]
        if unknown:
            raise TeacherError(f"teacher.boundaries names {unknown[0]!r}, which is not a module of this model: name "
                               f"modules such as its feature stages {stages} or their siblings (e.g. blocks.3)")
        if [order[b] for b in boundaries] != sorted(order[b] for b in boundaries):
            raise TeacherError(f"teacher.boundaries={list(boundaries)} are not in the model's order: list them as "
                               "the forward pass reaches them")
        return list(boundaries)
    if max(boundaries) >= len(entries):
        raise TeacherError(f"teacher.boundaries={list(boundaries)} out of range: this model has "
                           f"{len(entries)} feature stages (indices 0..{len(entries) - 1}: {stages})")
    return [entries[i]["module"] for i in boundaries]


def cut_blocks(model: nn.Module, boundaries: list[int | str], in_chans: int, image_size: int) -> list[dict]:
    """Per block: teacher modules, channels, stride and map sizes at the configured image size."""
    modules = _boundary_modules(model, boundaries)
    was_training = model.training
    model.eval()
    try:
        check_resolution(model, in_chans, image_size)
        x = torch.zeros(1, in_chans, image_size, image_size)
        with torch.no_grad():
            outs = _Recorder(model, modules, stop=False).run(model, x)
        members = _block_modules(model, modules, x)
    finally:
        model.train(was_training)
    blocks, prev_ch, prev_hw = [], in_chans, (image_size, image_size)
    for b, (boundary, out) in enumerate(zip(boundaries, outs, strict=True)):
        hw = tuple(out.shape[-2:])
        blocks.append({"name": f"b{b}", "boundary": boundary, "module": modules[b], "modules": members[b],
                       "in_channels": prev_ch, "out_channels": int(out.shape[1]),
                       "stride": int(round(prev_hw[0] / hw[0])), "in_size": list(prev_hw), "out_size": list(hw)})
        prev_ch, prev_hw = int(out.shape[1]), hw
    return blocks


def block_outputs(model: nn.Module, blocks_json: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's feature map at every block boundary; the forward stops after the last one."""
    modules = [b["module"] for b in blocks_json["blocks"]]
    return _Recorder(model, modules, stop=True).run(model, x)


# ---------------------------------------------------------------- artifacts


def save_teacher(model: nn.Module, blocks_json: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    (out_dir / BLOCKS).write_text(json.dumps(blocks_json, indent=2))


def weights_hash(teacher_dir: Path | str) -> str:
    return sha256_file(Path(teacher_dir) / WEIGHTS)


def load_teacher(teacher_dir: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the teacher from ``blocks.json`` (which records its config) and its safetensors weights."""
    teacher_dir = Path(teacher_dir)
    path = teacher_dir / BLOCKS
    if not path.is_file() or not (teacher_dir / WEIGHTS).is_file():
        raise ArtifactError(f"{teacher_dir} has no trained teacher: run `{REBUILD}`")
    try:
        blocks_json = json.loads(path.read_text())
        cfg = Teacher(**{k: v for k, v in blocks_json["config"].items() if k != "train"})
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path} is corrupt ({err}): run `{REBUILD}`") from None
    cfg.pretrained, cfg.checkpoint = False, ""
    model = create_teacher(cfg, blocks_json["in_chans"], blocks_json["num_classes"])
    try:
        load_weights(model, teacher_dir / WEIGHTS)
    except TeacherError as err:
        raise ArtifactError(f"{err}: run `{REBUILD}`") from None
    return model.to(device).eval(), blocks_json
