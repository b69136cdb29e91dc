"""This process's place among several under torchrun: rank, world size, the process group,
and the few collectives the training loop needs (sums, a shared stop, a barrier).

When another process of the run dies (killed, out of memory, its machine gone), the
collectives of the survivors fail with a gloo or NCCL connection error, or wait for it until
the group's timeout ($FLOWERS_DIST_TIMEOUT seconds, default 300). `guard()` turns those
failures into `PeerLost`, a `Stopped`: the command line then prints one line saying how to
resume from the last whole epoch, as after Ctrl-C. A rank stuck in a collective when
torchrun's SIGTERM comes leaves by itself after STUCK_GRACE seconds, before torchrun's
SIGKILL (30 s later), with one line too.

Torch is imported only inside the methods, as in device.py: one process never needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from helpers.core.errors import Stopped, UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
TIMEOUT_VARIABLE = "FLOWERS_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other processes
STUCK_GRACE = 15.0  # seconds after SIGTERM before a rank stuck in a collective leaves anyway
# What a collective's error says when the other end is gone or silent (gloo, NCCL, the store).
_GONE = re.compile(r"connection (reset|closed|refused)|broken pipe|end of file|peer|"
                   r"timed out|timeout|remote process|communicator was aborted|ncclRemoteError",
                   re.IGNORECASE)
_FROM_COMMUNICATION = re.compile(r"gloo|nccl|c10d|processgroup|tcpstore", re.IGNORECASE)


class PeerLost(Stopped):
    """Another process of the run stopped; this one stops too (the last whole epoch is saved)."""


def collective_timeout() -> float:
    """Seconds a collective waits for the other processes: $FLOWERS_DIST_TIMEOUT, else 300."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{TIMEOUT_VARIABLE}={text!r}: give the seconds a process waits for "
                        "the others, a number above 0 (default 300)")
    return seconds


def lost_peer(err: BaseException) -> bool:
    """True when a collective failed because another process is gone or stopped answering."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(err)
    return (isinstance(err, RuntimeError) and bool(_FROM_COMMUNICATION.search(text))
            and bool(_GONE.search(text)))


def relaunch(command: str) -> str:
    """`command` ("python train.py ...") as this process was started: under torchrun, by
    torchrun with as many processes (and machines) as now."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not command.startswith("python "):
        return command
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    machines = max(int(os.environ.get("WORLD_SIZE", here)) // max(here, 1), 1)
    launcher = ("torchrun --standalone" if machines == 1
                else f"torchrun --nnodes={machines} <your rendezvous options>")
    return f"{launcher} --nproc_per_node={here} {command.removeprefix('python ')}"


@dataclass
class Distributed:
    """This process's place among several (torchrun); one process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its machine: which GPU it uses
    _state: Path | None = field(default=None, repr=False, compare=False)  # the run's last.pth
    _leaving: bool = field(default=False, repr=False, compare=False)  # a peer was lost
    _timeout: float = field(default=DEFAULT_TIMEOUT, repr=False, compare=False)

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

        Collectives wait collective_timeout() seconds at most; see `_signals` for SIGTERM.
        Nothing happens for one process.
        """
        if self.world_size == 1:
            yield self
            return
        import torch
        import torch.distributed as dist

        self._timeout = collective_timeout()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=self._timeout))
        with self._signals():
            try:
                yield self
            finally:
                dist.destroy_process_group()

    @contextlib.contextmanager
    def guard(self, state: str | os.PathLike | None = None) -> Iterator[Distributed]:
        """Raise PeerLost for a collective that failed for want of another process (any other
        error passes unchanged); `state`: the resumable state a stuck rank names as it leaves."""
        if state is not None:
            self._state = Path(state)
        if self.world_size == 1:
            yield self
            return
        try:
            yield self
        except Stopped:
            raise
        except Exception as err:
            if not lost_peer(err):
                raise
            self._leaving = True
            raise PeerLost(f"another process of the run stopped ({self._why(err)}), so this "
                           "one stops too") from err

    def _why(self, err: BaseException) -> str:
        """Why a collective failed, in a few words."""
        if re.search(r"timed out|timeout", str(err), re.IGNORECASE):
            return (f"it did not answer for {self._timeout:.0f} s; ${TIMEOUT_VARIABLE} sets "
                    "how long to wait")
        return "its connection closed"

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """While in the group (main thread): SIGTERM outside training raises Stopped, and is
        ignored once a lost peer has this rank leaving (its one line comes at the end); a rank
        still here STUCK_GRACE s after SIGTERM or SIGINT (a collective does not return, and
        signal handlers wait for it) prints one line and exits with 130."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        left = threading.Event()
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch, args=(read, left), daemon=True,
                         name="stuck-in-collective").start()
        try:
            yield
        finally:
            left.set()  # leaving for a lost peer: its line is out, torchrun's SIGTERM is late
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self._leaving else previous)
            signal.set_wakeup_fd(previous_fd)
            os.close(write)  # the watcher reads the end and closes its side

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM outside training: stop here, unless this rank is leaving already."""
        if self._leaving or sys.exc_info()[1] is not None:
            return
        raise Stopped("stopped by SIGTERM")

    def _watch(self, read: int, left: threading.Event) -> None:
        """Wait for SIGTERM or SIGINT (the wakeup fd's bytes); then give the main thread
        STUCK_GRACE s to leave the group, else leave for it."""
        with open(read, "rb", buffering=0) as signals:
            while chunk := signals.read(64):
                if not {signal.SIGTERM, signal.SIGINT} & set(chunk):
                    continue
                if left.wait(STUCK_GRACE):
                    return
                name = signal.Signals(signal.SIGTERM if signal.SIGTERM in chunk
                                      else signal.SIGINT).name
                resume = (f"; resume with --resume {self._state}"
                          if self._state is not None and self._state.is_file()
                          else "; nothing was saved to resume from")
                print(f"error: stopped by {name} while waiting {STUCK_GRACE:.0f} s for another "
                      f"process that does not answer{resume}", file=sys.stderr, flush=True)
                os._exit(130)

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

        with self.guard():
            tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
            dist.all_reduce(tensor)
            return tensor.tolist()

    def barrier(self) -> None:
        """Wait until every process gets here (after rank 0 saved, before the others read)."""
        if self.world_size > 1:
            import torch.distributed as dist

            with self.guard():
                dist.barrier()

    def share(self, value: T) -> T:
        """Rank 0's value, on every process (a run id, any picklable value)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        with self.guard():
            dist.broadcast_object_list(box, src=0)
        return box[0]


def _collective_device():
    """The device collectives run on: the process's GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
