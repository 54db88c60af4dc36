"""Where and how tensors run: device, threads, mixed precision, DDP rank, progress bars, seeding.

Everything that differs between this 2-core CPU and a CUDA machine lives here, so training code
is written once and runs unchanged on both (``torchrun`` sets the DDP environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Runtime

log = logging.getLogger(__name__)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stderr)


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def select_device(rt: Runtime) -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    if rt.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        name = rt.device
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"runtime.device={rt.device} but CUDA is not available: use runtime.device=cpu")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(name))
    else:
        cores = len(os.sched_getaffinity(0))
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(rt.threads or max(1, cores // procs))
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 on CPU (no scaler needed), float16 on CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(items: Iterable[Any], enabled: bool = True, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar on a terminal of the main rank; silent in CI, logs and DDP workers."""
    from tqdm.auto import tqdm

    show = enabled and is_main() and sys.stderr.isatty()
    return iter(tqdm(items, disable=not show, leave=False, dynamic_ncols=True, **kwargs))


def to_device_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def maybe_ddp(model: torch.nn.Module, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids: list[int] | None = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)
