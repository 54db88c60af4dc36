"""Retraining the searched student (DNA, Li et al., CVPR 2020, Sec. 4): what the shared loop needs beyond a recipe.

The loop itself is ``pipeline.train.fit``. This module adds the parts only the student has: the distillation
loss from the teacher's logits, initialisation from the supernet weights of the chosen paths (DNA retrains from
scratch; inheriting is "worth a try", changlin31/DNA#31), the fingerprint that keeps a resumed checkpoint
honest, the per-epoch curve, and the MLflow model registry entry.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint
from pipeline.records import append_row
from pipeline.space import SKIP, SpaceSpec
from pipeline.supernet import SupernetBlock, candidate_state_dict
from pipeline.train import LossFn

log = logging.getLogger(__name__)


def distillation_loss(teacher: nn.Module, weight: float, temperature: float, label_smoothing: float) -> LossFn:
    """(1 - w) * label-smoothed CE + w * T^2 * KL(teacher || student) at temperature T (Hinton et al., 2015).

    The KL term is timm's ``LogitDistillationTask`` formula; the teacher sees the same normalised, augmented batch.
    """
    teacher.eval()

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images).float()
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        kd = F.kl_div(F.log_softmax(logits.float() / temperature, -1), F.log_softmax(target / temperature, -1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        return (1 - weight) * ce + weight * kd

    return loss


# ---------------------------------------------------------------------------------------------------- supernet init
def supernet_state(spec: SpaceSpec, choice: Mapping[str, str], supernet_dir: Path) -> dict[str, torch.Tensor]:
    """The chosen paths' trained supernet weights, keyed like the timm student (``conv_stem``, ``blocks.<b>.<j>``)."""
    state: dict[str, torch.Tensor] = {}
    for stage, block in enumerate(spec.blocks):
        path, rebuild = supernet_dir / f"{block.name}.pt", f"dvc repro supernet@{block.name}"
        saved = checkpoint.load(path, rebuild)
        if saved.get("epoch") != saved.get("epochs"):
            raise checkpoint.ArtifactError(f"{path} holds {saved.get('epoch')}/{saved.get('epochs')} epochs: finish "
                                           f"training with `{rebuild}`")
        net = SupernetBlock(block)
        try:
            net.load_state_dict(saved["model"])
        except (KeyError, RuntimeError):
            raise checkpoint.ArtifactError(f"{path} was trained for another search space: rebuild it with "
                                           f"`{rebuild}`") from None
        _, ops = block.parse(choice[block.name])
        layer_index = [sum(op != SKIP for op in ops[:i]) for i in range(len(ops))]  # skips are not timm blocks
        for key, value in candidate_state_dict(net, choice[block.name]).items():
            part, _, rest = key.partition(".")
            if part == "stem":
                state[rest] = value
            else:
                i, _, name = rest.partition(".")
                state[f"blocks.{stage}.{layer_index[int(i)]}.{name}"] = value
    return state


def inherit(model: nn.Module, source: Mapping[str, torch.Tensor]) -> float:
    """Copy every source tensor whose name and shape match; returns the inherited fraction of the parameters.

    The supernet's block ends have the teacher's channels (DNA's channel matching), so a block's first and last
    layers usually differ in shape from the student's and keep their fresh initialisation.
    """
    target = model.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    params = dict(model.named_parameters())
    inherited = sum(params[k].numel() for k in matched if k in params)
    fraction = inherited / sum(p.numel() for p in params.values())
    log.info("inherited %d supernet tensors (%.1f%% of the parameters); the others start fresh", len(matched),
             100 * fraction)
    return fraction


# ---------------------------------------------------------------------------------------------------- bookkeeping
def fingerprint(**identity: Any) -> str:
    """A short hash of what defines a run beyond its recipe (architecture, loss, initialisation, data)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_epoch(path: Path, row: Mapping[str, float]) -> None:
    """Append an epoch's row after dropping rows of this or later epochs (left by a run that was resumed)."""
    if path.is_file():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
        path.unlink()
        for old in kept:
            append_row(path, old)
    append_row(path, row)


def register(model: nn.Module, example: torch.Tensor, name: str) -> Any:
    """Log the model to the active MLflow run (in MLflow's pt2 format) and register it as ``name``.

    MLflow links the run's metrics to the logged model, so the registered version carries them. pt2 freezes the
    example's batch size when it is 1, so the example needs a batch >= 2 (seen with MLflow 3's pt2 flavour);
    explicit requirements skip MLflow's slow inference of them.
    """
    import mlflow
    import timm
    from mlflow.models import infer_signature

    if len(example) < 2:
        raise ValueError("the input example needs a batch of at least 2 (batch 1 would freeze the batch size)")
    model = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    example = example.cpu().contiguous()
    with torch.no_grad():
        logits = model(example)
    info = mlflow.pytorch.log_model(
        model, name="model", input_example=example.numpy(), signature=infer_signature(example.numpy(), logits.numpy()),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
        registered_model_name=name)
    log.info("registered MLflow model %s version %s", name, info.registered_model_version)
    return info
