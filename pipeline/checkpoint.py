"""Atomic, weights-only checkpoints: what makes killed stages resumable and loads safe.

A checkpoint is written to a temporary file and moved into place, so a kill mid-write leaves the
previous checkpoint intact (timm's CheckpointSaver does the same).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class ArtifactError(PipelineError):
    """A missing or corrupt artifact; the message names the file and the command that rebuilds it."""


def read_json(path: Path | str, rebuild: str) -> Any:
    """A JSON artifact; missing or unreadable becomes one line naming the file and ``rebuild``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: build it with `{rebuild}`") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is unreadable ({type(err).__name__}): rebuild it with `{rebuild}`") from None


@contextlib.contextmanager
def atomic(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix: writers that pick a format by it still work), moved onto
    ``path`` when the block succeeds and removed when it fails: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path | str, chunk: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in chunks (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save(path: Path | str, state: dict[str, Any]) -> None:
    """Save plain containers and tensors (no config objects: they break weights-only loading)."""
    with atomic(path) as tmp:
        torch.save(state, tmp)


def load(path: Path | str, rebuild: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; any failure becomes one line naming the file and ``rebuild``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: rebuild it with `{rebuild}`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors all mean "corrupt"
        raise ArtifactError(f"{path} is corrupt or not a weights-only torch file ({type(err).__name__}): "
                            f"delete it and rebuild with `{rebuild}`") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} does not hold a checkpoint dict: delete it and rebuild with `{rebuild}`")
    return state


def same_identity(state: Mapping[str, Any], identity: Mapping[str, Any], path: Path | str) -> bool:
    """Whether a checkpoint was made under ``identity`` (everything that defines its result: recipe, data, seed,
    model, inputs). If not, one line names the parts that differ, so the user knows why the run starts over."""
    saved = state.get("identity")
    if not isinstance(saved, Mapping):
        log.info("%s records no identity (an older format): starting over", path)
        return False
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if changed:
        log.info("%s was made with another %s: starting over", path, ", ".join(changed))
    return not changed


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of tensors: the identity of weights a run starts from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
