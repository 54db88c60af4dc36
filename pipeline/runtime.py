"""Where and how tensors run: device, threads, mixed precision, DDP rank and sharding, progress bars, seeding.

Everything that differs between this 2-core CPU and a CUDA machine lives here, so training code
is written once and runs unchanged on both (``torchrun`` sets the DDP environment, one node or several).
Under DDP a batch size is the global batch: each rank takes its part of the same global order (``Shard``), the
loss is weighted so DDP's gradient average is the global batch's gradient, and training-mode batch norm uses the
global batch's statistics (``global_batch_norm``), so W ranks train what one process trains, up to float32
rounding (``tests/test_multinode.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import multiprocessing.pool
import os
import random
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.config import ConfigError, Runtime

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


@dataclass(frozen=True)
class Shard:
    """This rank's part of every global batch: a contiguous slice of the batch all ranks draw from the same seeded
    order (DistributedSampler's contract, per batch), so the ranks together see what one process sees."""

    rank: int = 0
    world: int = 1

    def part(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (shares differ by at most one row)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def check(self, batch_size: int, key: str) -> None:
        """Every rank needs a row of every full batch."""
        if batch_size < self.world:
            raise ConfigError(f"{key}={batch_size} is smaller than the {self.world} DDP ranks (the batch size is the "
                              f"global batch, split among them): raise {key} or start fewer processes")

    def global_mean(self, loss: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
        """A mean over this rank's ``rows`` of a global ``batch``, weighted so that DDP's gradient average (the sum
        over ranks / world) is the gradient of the mean over the global batch, also for unequal shares."""
        return loss if rows * self.world == batch else loss * (rows * self.world / batch)


def shard() -> Shard:
    """The Shard of this process: rank and world size of the torchrun group, (0, 1) without one."""
    return Shard(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Shard()


_BATCH_NORM = inspect.signature(F.batch_norm)


def _global_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                       momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm`` in training mode over the rows of all ranks: per-channel sums are all-reduced (autograd
    flows back through the collective, as in torch's SyncBatchNorm), in float32; two passes (mean, then centred
    squares) as exact as the single-process kernel."""
    from torch.distributed import _functional_collectives as collectives

    def total(t: torch.Tensor) -> torch.Tensor:
        return collectives.wait_tensor(collectives.all_reduce(t, "sum", dist.group.WORLD))

    x = input.float()
    dims, shape = [d for d in range(x.ndim) if d != 1], (1, -1) + (1,) * (x.ndim - 2)
    sums = total(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.shape[1])]))
    count, mean = sums[-1], sums[:-1] / sums[-1]
    centred = x - mean.view(shape)
    var = total((centred * centred).sum(dims)) / count
    y = centred * torch.rsqrt(var + eps).view(shape)
    y = y if weight is None else y * weight.view(shape)
    y = y if bias is None else y + bias.view(shape)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1).clamp_min(1)) * momentum)
    return y.to(input.dtype)


class _GlobalBatchNorm(TorchFunctionMode):
    """Routes training-mode ``F.batch_norm`` calls (torch's and timm's BN layers all make them) to the global one."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM.bind(*args, **kwargs)
            if bound.arguments.get("training"):
                return _global_batch_norm(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)


def global_batch_norm() -> contextlib.AbstractContextManager:
    """Batch statistics of the global batch for a training forward under DDP; a no-op in one process.

    torch's SyncBatchNorm would do it on GPUs but refuses CPU tensors (gloo), and it needs the model's layers
    swapped; this needs neither, so one code path runs on every device.
    """
    return _GlobalBatchNorm() if dist.is_initialized() and dist.get_world_size() > 1 else contextlib.nullcontext()


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
        torch.set_num_threads(rt.threads or cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return torch.device(name)


def cpu_threads(procs: int = 1) -> int:
    """Torch threads per process for ``runtime.threads: 0``: ``OMP_NUM_THREADS`` where a launcher set it (per
    process, as OpenMP reads it: torchrun, SLURM, CI), else the cores shared among ``procs`` processes. Without
    it two parallel jobs on two cores would each run two threads, which spin against each other."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, len(os.sched_getaffinity(0)) // procs)


def worker_pool(workers: int, start_method: str | None = None) -> multiprocessing.pool.Pool:
    """A process pool whose workers ignore SIGINT. Ctrl-C signals the whole process group, and a worker that dies
    mid-task leaves a ``concurrent.futures`` pool waiting for it forever; here only the parent gets
    KeyboardInterrupt, and leaving ``with`` terminates the workers."""
    return multiprocessing.get_context(start_method).Pool(workers, initializer=signal.signal,
                                                          initargs=(signal.SIGINT, signal.SIG_IGN))


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """``runtime.amp``'s autocast dtype: bfloat16 (float32's range, no loss scaling), float16 on GPUs without it."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype``; a no-op when disabled."""
    dtype = amp_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class Precision:
    """A training loop's mixed precision: the autocast context, and a GradScaler where float16 needs one.

    float16's smallest normal value (6e-5) is above the supernet's MSE gradients (~1e-6): without loss scaling
    they flush to zero. The scaler multiplies the loss before backward, unscales before the step and skips steps
    with inf/NaN gradients. With bfloat16 or amp off it is disabled and backward/step are the plain calls.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, enabled) == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state for a checkpoint; empty when there is no scaler (amp off, bfloat16)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the loss scale; a checkpoint without one (amp off, bfloat16) leaves the initial scale."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


@dataclass(frozen=True)
class Loop:
    """Where and how a loop runs (teacher, supernet block, student, ranking unit): the one reading of the runtime
    params that every loop shares. Only ``seed`` changes a result on a given device."""

    device: torch.device
    seed: int = 0
    amp: bool = False  # Precision: bfloat16, or float16 with a GradScaler
    channels_last: bool = True
    progress: bool = True
    workers: int = 0  # reader threads gathering image batches ahead of the step (same batches with any number)


def loop_for(rt: Runtime, device: torch.device, seed: int, progress: bool | None = None) -> Loop:
    """The Loop of a stage: ``runtime.*`` params on ``device``; ``progress`` overrides ``runtime.progress``."""
    return Loop(device, seed, rt.amp, rt.channels_last, rt.progress if progress is None else progress, rt.workers)


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
