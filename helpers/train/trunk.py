"""Running the frozen trunk fast: OpenVINO, ONNX Runtime or PyTorch, whichever is fastest here.

The cached recipe pushes every training image through the frozen trunk, so its runtime sets
the pace of a CPU run. Which runtime wins depends on the CPU (its SIMD kinds) and on the
versions installed, so the first run on a machine measures each one that is installed on a
small batch, keeps those whose output agrees with PyTorch fp32 (allclose, 1e-4), and records
the fastest in the cache folder; later runs read the choice (`trunk_runtime`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from helpers.core.device import autocast, cpu_flags
from helpers.core.files import atomic_write_bytes, cache_dir, is_intact, runtime_choice, seal
from helpers.model.onnx_io import onnx_bytes
from helpers.serve.engine import onnx_session

Runner = Callable[[torch.Tensor], torch.Tensor]
RUNTIMES = ("openvino", "onnxruntime", "torch")  # the order of preference on a tie
TOLERANCE = 1e-4  # agreement with PyTorch fp32 (absolute and relative)


def installed(runtime: str) -> bool:
    """True when a runtime's package can be imported."""
    if runtime == "torch":
        return True
    try:
        __import__(runtime)
    except ImportError:
        return False
    return True


def onnx_trunk(trunk: nn.Module, *, digest: str, input_size: int) -> Path:
    """The trunk exported once to ONNX for one input size (cached, sealed)."""
    path = cache_dir() / "onnx" / f"trunk-{digest[:24]}-{input_size}.onnx"
    if not is_intact(path):
        example = torch.zeros(2, 3, input_size, input_size)
        seal(atomic_write_bytes(onnx_bytes(trunk, example, outputs=["activations"]), path))
    return path


def torch_runner(trunk: nn.Module, device: torch.device) -> Runner:
    """The trunk in PyTorch: channels_last and bf16/fp16 autocast where the hardware has them."""
    trunk = trunk.to(device, memory_format=torch.channels_last).eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(device):
            return trunk(images)

    return run


def make_runner(runtime: str, trunk: nn.Module, *, digest: str, input_size: int,
                device: torch.device) -> Runner:
    """A function from a batch of images to the trunk's activations, in `runtime`."""
    if runtime == "torch":
        return torch_runner(trunk, device)
    run = onnx_session(onnx_trunk(trunk, digest=digest, input_size=input_size),
                       runtime=runtime, threads=torch.get_num_threads())
    return lambda images: torch.from_numpy(run(images.numpy())[0])


def _versions() -> dict[str, str]:
    """The installed version of every runtime (a choice is remeasured when one changes)."""
    found = {}
    for runtime in RUNTIMES:
        try:
            found[runtime] = metadata.version(runtime)
        except metadata.PackageNotFoundError:
            pass
    return found


def measure_runtimes(trunk: nn.Module, *, digest: str, input_size: int, batch_size: int = 16,
                     repeats: int = 3) -> dict[str, dict[str, float]]:
    """Images/s and largest difference from PyTorch fp32 of each installed CPU runtime.

    fp32 PyTorch is measured as the reference; its autocast (bf16) is not a candidate, for
    it disagrees with fp32 far beyond the tolerance.
    """
    images = torch.randn(batch_size, 3, input_size, input_size,
                         generator=torch.Generator().manual_seed(0))
    trunk = trunk.float().eval()
    with torch.inference_mode():
        expected = trunk(images)
    results = {}
    for runtime in RUNTIMES:
        if not installed(runtime):
            continue
        if runtime == "torch":
            run: Runner = trunk.to(memory_format=torch.channels_last)
        else:
            run = make_runner(runtime, trunk, digest=digest, input_size=input_size,
                              device=torch.device("cpu"))
        with torch.inference_mode():
            got = run(images)  # the first call also warms the runtime up
            times = []
            for _ in range(repeats):
                tic = time.perf_counter()
                run(images)
                times.append(time.perf_counter() - tic)
        results[runtime] = {
            "images_per_s": batch_size / statistics.median(times),
            "max_diff": float((got.float() - expected).abs().max()),
            "agrees": bool(torch.allclose(got.float(), expected, atol=TOLERANCE,
                                          rtol=TOLERANCE))}
    return results


def trunk_runtime(trunk: nn.Module, *, digest: str, input_size: int,
                  log: Callable[[str], None] | None = print) -> str:
    """The fastest runtime on this CPU that agrees with PyTorch fp32: measured on the first
    run with these versions on this CPU, then read from the cache folder."""
    facts = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
             "isa_ceiling": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
             "versions": _versions(), "threads": torch.get_num_threads(),
             "input_size": input_size}
    path = runtime_choice()
    try:
        saved = json.loads(path.read_text())
        if saved.get("facts") == facts and saved.get("runtime") in RUNTIMES and installed(
                saved["runtime"]):
            return saved["runtime"]
    except (OSError, ValueError, AttributeError):
        pass
    measured = measure_runtimes(trunk, digest=digest, input_size=input_size)
    agreeing = {name: m for name, m in measured.items() if m["agrees"]} or {"torch": {}}
    best = max(agreeing, key=lambda name: agreeing[name].get("images_per_s", 0.0))
    atomic_write_bytes(json.dumps({"facts": facts, "runtime": best, "measured": measured},
                                  indent=1).encode(), path)
    if log:
        rates = ", ".join(f"{name} {m['images_per_s']:.0f}/s" for name, m in measured.items())
        log(f"trunk runtime: {best} (measured once on this CPU: {rates})")
    return best
