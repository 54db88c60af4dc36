"""The searched student as a real timm model (DNA, Li et al., CVPR 2020, Sec. 4: the result is retrained).

``architecture.json`` (one candidate id per block, from the assemble stage) becomes timm arch strings through
the search space (``pipeline.space.arch_def``), and those become a timm ``EfficientNet`` through timm's own
``decode_arch_def``. The model is registered in timm's registry as ``dna_student`` (model args: the arch
strings plus the stem/head widths), so an exported folder in timm's Hugging Face layout (``config.json`` +
``model.safetensors``) reloads with ``timm.create_model("local-dir:<folder>", pretrained=True)`` in any
process that imported this module; ``load`` does exactly that. Users of the original DNA code had to edit
model files by hand to get there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, create_model, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from pipeline import space
from pipeline.checkpoint import ArtifactError, read_json
from pipeline.config import COUNTED_METRICS, Search
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

MODEL_NAME = "dna_student"
CONFIG, WEIGHTS, ARCHITECTURE, ONNX = "config.json", "model.safetensors", "architecture.json", "model.onnx"
ASSEMBLE = "dvc repro assemble"
REBUILD = "dvc repro retrain"
ONNX_TOLERANCE = 1e-4

# timm's registry reads the module-level `default_cfgs` when the entry point below is registered.
default_cfgs = generate_default_cfgs({MODEL_NAME: {
    "url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (1, 1), "crop_pct": 1.0,
    "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,), "first_conv": "conv_stem",
    "classifier": "classifier"}})


class StudentError(PipelineError):
    """An architecture that does not fit the search space or the budget; the message names the fix."""


@register_model
def dna_student(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """A DNA-searched EfficientNet: ``arch`` holds timm arch strings, one stage per searched block.

    ``act`` names the activation (a string, so the args stay JSON for export); ``stem_stride`` is 1 when the
    teacher's first block keeps the image size (timm's EfficientNet stem always has stride 2).
    """
    arch, act, stem_stride = kwargs.pop("arch"), kwargs.pop("act", "swish"), kwargs.pop("stem_stride", 2)
    model = build_model_with_cfg(EfficientNet, MODEL_NAME, pretrained, block_args=decode_arch_def(arch),
                                 act_layer=get_act_layer(act), **kwargs)
    model.conv_stem.stride = (stem_stride, stem_stride)
    return model


# ---------------------------------------------------------------------------------------------------- architecture
def read_architecture(path: Path | str) -> dict[str, Any]:
    """The assemble stage's ``architecture.json``; a missing or unreadable file names the rebuild command."""
    content = read_json(path, ASSEMBLE)
    if not isinstance(content, dict) or not isinstance(content.get("candidates"), list):
        raise ArtifactError(f"{path} has no 'candidates' list (one candidate id per block): rebuild it with "
                            f"`{ASSEMBLE}`")
    return content


def choice_of(architecture: Mapping[str, Any], spec: space.SpaceSpec, source: str = ARCHITECTURE,
              rebuild: str = ASSEMBLE) -> dict[str, str]:
    """{block: candidate id}, checked against the search space: block count, names, layer count, every op."""
    names = [b.name for b in spec.blocks]
    candidates = list(architecture["candidates"])
    blocks = list(architecture.get("blocks") or names[:len(candidates)])
    fix = f"rebuild it with `{rebuild}` (or make space.blocks match it)"
    if len(candidates) != len(names) or blocks != names:
        raise StudentError(f"{source} has {len(candidates)} blocks {blocks} but the search space has {len(names)} "
                           f"{names}: {fix}")
    for block, cid in zip(spec.blocks, candidates, strict=True):
        allowed = sorted({op for cell in block.cells for layer in cell.layers for op in layer.choices})
        unknown = [op for op in str(cid).rpartition(":")[2].split("-") if op not in allowed]
        if unknown:
            raise StudentError(f"{source}: block {block.name} candidate {cid!r} uses op {unknown[0]!r}, which is not "
                               f"in the search space {allowed}: {fix}")
        try:
            block.parse(str(cid))
        except ValueError as err:
            raise StudentError(f"{source}: {err}: {fix}") from None
    choice = dict(zip(names, map(str, candidates), strict=True))
    try:
        space.check_chain(spec, choice)
    except ValueError as err:
        raise StudentError(f"{source}: {err}") from None
    return choice


def model_args(spec: space.SpaceSpec, choice: Mapping[str, str]) -> dict[str, Any]:
    """JSON-able ``dna_student`` arguments: arch strings, stem/head widths, channels, classes, activation."""
    kwargs = space.student_kwargs(spec)
    kwargs.pop("act_layer")
    return {"arch": space.arch_def(spec, choice), "act": spec.act, "stem_stride": spec.stem.stride, **kwargs}


def check_arch(architecture: Mapping[str, Any], args: Mapping[str, Any], source: str = ARCHITECTURE) -> None:
    """The arch strings the assembly wrote (if any) must be those the current space gives for its choice."""
    written = architecture.get("arch")
    if written is not None and written != args["arch"]:
        raise StudentError(f"{source} lists arch strings {written} but the current search space turns its candidates "
                           f"into {args['arch']} (space params changed since the search): rebuild it with "
                           f"`{ASSEMBLE}`")


def create(args: Mapping[str, Any], meta: Mapping[str, Any], drop_rate: float = 0.0,
           drop_path_rate: float = 0.0) -> EfficientNet:
    """The student with the dataset's preprocessing in its ``pretrained_cfg`` (so timm's data config is right)."""
    overlay = {"num_classes": int(meta["num_classes"]), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
               "input_size": (int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))}
    return create_model(MODEL_NAME, pretrained_cfg_overlay=overlay, drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate, **args)


# ---------------------------------------------------------------------------------------------------- cost, budget
def check_cost(model: torch.nn.Module, architecture: Mapping[str, Any], input_shape: tuple[int, ...],
               search: Search, source: str = ARCHITECTURE) -> space.Cost:
    """Count the built student; it must cost what the assembly predicted and fit the budget and limits.

    An architecture searched under other ``search`` params (metric, budget, limits, relative) is stale; one whose
    counted cost exceeds a ceiling (e.g. the fixed stem/head alone cost more) cannot be retrained as configured.
    Counted metrics are checked exactly here; measured ones (latency) are the report's, within costs.tolerance.
    All fail before training.
    """
    cost = space.module_cost(model, input_shape)
    wanted = {"metric": search.metric, "budget": search.budget, "limits": dict(search.limits),
              "relative": search.relative}
    searched = architecture.get("search")
    if searched is not None and searched != wanted:
        raise StudentError(f"{source} was searched for {_ceilings(searched)} but params.yaml has "
                           f"{_ceilings(wanted)}: rebuild it with `{ASSEMBLE}`")
    predicted = {m: architecture.get(m) for m in ("params", "flops")}
    if "arch" in architecture and predicted != {"params": cost.params, "flops": cost.flops}:
        raise StudentError(f"the student built from {source} has {cost.params} params and {cost.flops} FLOPs, the "
                           f"assembly predicted {predicted['params']} and {predicted['flops']}: the search space "
                           f"changed since; rebuild it with `{ASSEMBLE}`")
    budget = architecture.get("budget") if search.relative else search.budget  # absolute, as searched
    ceilings = {**(architecture.get("limits") or {}), **({search.metric: budget} if budget else {})}
    for metric, ceiling in ceilings.items():
        if metric in COUNTED_METRICS and cost.metric(metric) > ceiling:
            raise StudentError(f"the student costs {cost.metric(metric):g} {metric}, over its ceiling {ceiling:g} "
                               f"(search.budget / search.limits): raise it or shrink the fixed parts (space.stem, "
                               f"space.head), then `{ASSEMBLE}`")
    return cost


def _ceilings(search: Mapping[str, Any]) -> str:
    limits = "".join(f", {m} <= {v:g}" for m, v in (search.get("limits") or {}).items())
    relative = " (x the teacher's)" if search.get("relative") else ""
    return f"{search.get('metric')} budget {search.get('budget') or 'none'}{limits}{relative}"


@dataclass(frozen=True)
class Built:
    """A checked student and what it was built from."""

    model: EfficientNet
    architecture: dict[str, Any]
    choice: dict[str, str]
    args: dict[str, Any]
    cost: space.Cost


def from_architecture(path: Path | str, spec: space.SpaceSpec, meta: Mapping[str, Any], search: Search,
                      drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> Built:
    """``architecture.json`` -> the timm student, checked against the space, the predicted cost and the budget."""
    architecture = read_architecture(path)
    choice = choice_of(architecture, spec, str(path))
    args = model_args(spec, choice)
    check_arch(architecture, args, str(path))
    model = create(args, meta, drop_rate, drop_path_rate)
    shape = (int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))
    return Built(model, architecture, choice, args, check_cost(model, architecture, shape, search, str(path)))


# ---------------------------------------------------------------------------------------------------- export
def save(model: EfficientNet, out_dir: Path | str, architecture: Mapping[str, Any],
         labels: list[str] | None = None) -> Path:
    """timm's Hugging Face layout (config.json + model.safetensors) plus architecture.json, swapped in whole.

    Moves ``model`` to the CPU in eval mode (timm's exporter reads its weights and config from there).
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = {"label_names": list(labels)} if labels else None
    save_for_hf(model.cpu().eval(), str(tmp), model_config=model_config, safe_serialization=True)
    (tmp / ARCHITECTURE).write_text(json.dumps(dict(architecture), indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load(model_dir: Path | str, device: torch.device | str = "cpu") -> EfficientNet:
    """Rebuild an exported student (any process): timm reads config.json and loads model.safetensors strictly."""
    model_dir = Path(model_dir)
    missing = [f for f in (CONFIG, WEIGHTS) if not (model_dir / f).is_file()]
    if missing:
        raise ArtifactError(f"{model_dir} has no exported student ({', '.join(missing)} missing): run `{REBUILD}`")
    try:
        model = create_model(f"local-dir:{model_dir.resolve()}", pretrained=True)
    except Exception as err:  # noqa: BLE001 - JSON, safetensors and state-dict errors all mean "corrupt"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"{model_dir} holds a corrupt student export ({first[:200]}): run `{REBUILD}`") from None
    return model.to(device).eval()


def export_onnx(model: torch.nn.Module, path: Path | str, example: torch.Tensor) -> float:
    """ONNX (torch.export-based exporter) with a dynamic batch axis; returns the largest |onnxruntime - torch|
    logit difference on ``example`` (batch >= 2: the exporter specialises a batch of 1).

    Needs the ``onnx`` extra (``pip install -e '.[onnx]'``); a difference over ``ONNX_TOLERANCE`` is an error.
    """
    import numpy as np
    import onnxruntime

    path, model = Path(path), model.cpu().eval()
    example = example.cpu().contiguous()
    with torch.no_grad():
        expected = model(example).numpy()
    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = float(np.abs(session.run(None, {"images": example.numpy()})[0] - expected).max())
    if diff > ONNX_TOLERANCE:
        raise StudentError(f"ONNX export {path} differs from the torch model by {diff:.2e} > {ONNX_TOLERANCE:g}: "
                           f"set retrain.onnx=false or report the timm/torch/onnxruntime versions")
    return diff
