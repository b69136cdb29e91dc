"""This process's place among several under torchrun: rank, world size, the process group,
and the few collectives the training loop needs (sums, a shared stop, a barrier).

Torch is imported only inside the methods, as in runtime.py: one process never needs it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass
class Distributed:
    """This process's place among several (torchrun); one process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its machine: which GPU it uses

    @classmethod
    def from_environment(cls) -> Distributed:
        """The place torchrun's variables give (RANK, WORLD_SIZE, LOCAL_RANK), else rank 0 of 1."""
        return cls(rank=int(os.environ.get("RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        """True on the process that logs, calibrates, evaluates and saves."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device this process uses: on CUDA its own GPU (LOCAL_RANK), else `device`."""
        import torch

        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    @contextlib.contextmanager
    def joined(self, device: torch.device) -> Iterator[Distributed]:
        """Join torchrun's process group for the block (NCCL on CUDA, else gloo), then leave it.

        Nothing happens for one process.
        """
        if self.world_size == 1:
            yield self
            return
        import torch
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=self.rank, world_size=self.world_size)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    @property
    def backend(self) -> str:
        """The process group's backend ("nccl", "gloo"), or "" for one process."""
        if self.world_size == 1:
            return ""
        import torch.distributed as dist

        return dist.get_backend()

    def agree(self, flag: bool) -> bool:
        """True when any process says so (a stop asked of one rank stops them all together)."""
        return self.total([float(flag)])[0] > 0

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (train loss and counts of every shard)."""
        if self.world_size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every process gets here (after rank 0 saved, before the others read)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value: T) -> T:
        """Rank 0's value, on every process (a run id, any picklable value)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _collective_device():
    """The device collectives run on: the process's GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
