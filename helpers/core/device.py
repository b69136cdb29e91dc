"""What every stage needs while it computes, in one place: device, seeding, mixed precision,
the CPU's flags, a stop flag for signals, and progress that suits the output.

In the bottom layer of `helpers/` (core): torch is imported only inside the functions that
need it, so that the torch-free prediction path can use the rest.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from helpers.core.errors import Stopped

if TYPE_CHECKING:  # imported where used: the command lines and the engine start without it
    import torch

T = TypeVar("T")


def get_device(gpu: bool = True) -> torch.device:
    """cuda, then mps, then cpu (cpu only when gpu is False)."""
    import torch

    if gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if gpu and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(device: torch.device, *, enabled: bool = True) -> torch.dtype | None:
    """The autocast type where it pays: bf16 on CUDA GPUs that have it (Ampere on), else
    fp16 (T4, V100: the loop then scales the loss); bf16 on CPUs with native bf16; else None."""
    import torch

    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if enabled and device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


# The CPU flags that decide which kernels run, as lscpu and /proc/cpuinfo name them.
SIMD_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
# oneDNN's ISA ceiling (ONEDNN_MAX_CPU_ISA=AVX2 runs PyTorch's and OpenVINO's kernels as on
# an AVX2-only CPU); below AVX512_CORE_BF16 there is no native bf16.
_NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                 "AVX512_CORE_VNNI")


def cpu_flags() -> str:
    """The CPU's SIMD flags that matter for speed (from /proc/cpuinfo), space-separated."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    have = set(line.split(":", 1)[-1].split())
    return " ".join(f for f in SIMD_FLAGS if f in have)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (and ONEDNN_MAX_CPU_ISA does not forbid it)."""
    import torch

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported())


def autocast(device: torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision where it pays (see autocast_dtype); a no-op elsewhere (MPS included)."""
    import torch

    dtype = autocast_dtype(device, enabled=enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


def stop_at_once(signum: int, frame: Any = None) -> None:
    """A handler for SIGTERM and SIGHUP outside the training loops: stop now (Stopped), so the
    command's context managers release its folder lock and say what happened."""
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def stop_on_signals() -> None:
    """Install stop_at_once for SIGTERM and SIGHUP (main thread), first thing in a command:
    set-up, calibration, evaluation and saving stop cleanly; the loops watch their own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        if s != signal.SIGINT:  # Ctrl-C keeps Python's KeyboardInterrupt
            signal.signal(s, stop_at_once)


class StopFlag:
    """Set by the first SIGINT, SIGTERM or SIGHUP (a closed terminal, a dropped ssh session);
    the training loop stops at the next batch boundary.

    A second signal raises KeyboardInterrupt at once. Outside `watch()` nothing is changed.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def request(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        """Ask the loop to stop; the second request aborts at once."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def check(self, where: str) -> None:
        """Raise Stopped when a stop was asked for (call it between two steps of work)."""
        if self.requested:
            raise Stopped(f"stopped by {self.signal_name} during {where}")

    @contextlib.contextmanager
    def watch(self) -> Iterator[StopFlag]:
        """Catch SIGINT, SIGTERM and SIGHUP while the block runs (main thread only), then
        restore."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in previous:
            signal.signal(s, self.request)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a data-loader worker: leave SIGINT/SIGTERM to the main process, which saves and stops.

    A scheduler (systemd, Slurm, Kubernetes) signals the whole process group; workers that
    died on it would break the batch under way with a traceback.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm draws one updating widget bar)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress(items: Iterable[T], *, desc: str, total: int | None = None,
             unit: str = "batch", every: float = 20.0) -> Iterator[T]:
    """Iterate with progress suited to where the output goes.

    A terminal gets one tqdm bar, a notebook one updating widget bar; logs (CI, nohup,
    nbconvert) get a line when the phase starts and then every `every` seconds, with the
    rate and the expected time left.
    """
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if in_notebook() or sys.stderr.isatty():
        from tqdm.auto import tqdm

        # The bar is told of each item; it never holds the iterator (a data loader's
        # iterator left alive would be inherited by the next loader's forked workers).
        bar = tqdm(desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        try:
            for item in items:
                yield item
                bar.update()
        finally:
            bar.close()
        return
    start = last = time.perf_counter()
    done = 0
    units = unit + ("es" if unit.endswith(("s", "ch")) else "s")
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every:
            last = now
            rate = done / (now - start)
            left = f", about {(total - done) / rate:.0f} s left" if total else ""
            of = f"/{total}" if total else ""
            print(f"  {desc}: {done}{of} {units}, {rate:.1f} {units}/s{left}", file=sys.stderr,
                  flush=True)
    elapsed = time.perf_counter() - start
    if elapsed >= every:  # the phase's one closing line, when it was long enough to report
        print(f"  {desc}: {done} {units} in {elapsed:.0f} s, {done / elapsed:.1f} {units}/s",
              file=sys.stderr, flush=True)
