"""Running one training over several processes, as `torchrun` starts them: one process per device, on one or many nodes.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process and everything here is a no-op.
The model knows nothing of this: `parallelize` wraps it in DDP (a whole copy per process, gradients averaged) or shards
it with FSDP2 (`fully_shard`: each process holds 1/world_size of every parameter, gradient and optimizer state).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tinylm.device import resolve_device
from tinylm.errors import TinylmError

T = TypeVar("T")


@dataclass
class Processes:
    """This process's place among the processes of a run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and prints; every rank computes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def run_on_main(self, work: Callable[[], T]) -> T | None:
        """Run `work` on rank 0 only, the other ranks waiting; a TinylmError there is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except TinylmError as raised:
                error = str(raised)
        if self.distributed:
            error = self.broadcast(error)
        if error is not None:
            raise TinylmError(error)
        return result

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def min(self, value: int) -> int:
        if not self.distributed:
            return value
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device_name: str) -> Processes:
    """Join the process group torchrun set up (NCCL between GPUs, gloo on CPU), or stand alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process on each node
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise TinylmError(f"distributed training runs on CUDA or CPU, not {device.type}; use --train.device cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return Processes(rank, world_size, device)


def parallelize(model: nn.Module, processes: Processes, parallel: Literal["ddp", "fsdp"]) -> nn.Module:
    """The module the training step calls: the model itself, wrapped in DDP, or sharded in place by FSDP2."""
    if not processes.distributed:
        return model.to(processes.device)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each block is a unit whose full parameters exist only while it computes; the root holds the rest.
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(processes.device)
    return DistributedDataParallel(
        model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
    )


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Average gradients across processes only on the last micro-batch of a step: the earlier ones just accumulate."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reshard(model: nn.Module) -> None:
    """After forward passes without a backward (evaluation, sampling), FSDP2 leaves the root's parameters whole;
    shard them again so that the model is back to the state that training and checkpoints expect."""
    if hasattr(model, "reshard"):
        model.reshard()
