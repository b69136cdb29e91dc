"""How fast each runtime runs the frozen trunk of EfficientNet-Lite0 (what the cached recipe
extracts once per image and view), and how far each is from PyTorch fp32.

    .venv/bin/python benchmarks/trunk_runtimes.py [--batch 32] [--repeats 5]

The first rows are the candidates `helpers.trunk` chooses from (fp32: they must agree with
PyTorch within 1e-4); the others are settings tried and rejected (other graph optimisation
levels, OpenVINO's throughput hint, bf16), for the record. Prints the CPU's flags: run it
again with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` to see PyTorch and OpenVINO
as on an AVX2-only CPU (ONNX Runtime has no such switch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from helpers.core.device import cpu_flags, cpu_has_bf16
from helpers.model.backbones import get_backbone
from helpers.model.classifier import weights_digest
from helpers.train.cache import split_backbone
from helpers.train.trunk import measure_runtimes, onnx_trunk


def _rate(run, x: torch.Tensor, repeats: int) -> float:
    """Median images/s over `repeats` calls after one warm-up."""
    run(x)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - tic)
    return len(x) / statistics.median(times)


def _rejected(trunk: torch.nn.Module, path, batch: int):
    """(name, runner) of the settings tried and not chosen."""
    import onnxruntime as ort
    import openvino as ov

    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        yield f"onnxruntime {level}", partial(
            lambda s, x: torch.from_numpy(s.run(None, {"images": x.numpy()})[0]), session)
    core = ov.Core()
    settings = [("THROUGHPUT", "f32")] + ([("LATENCY", "bf16")] if cpu_has_bf16() else [])
    for hint, precision in settings:
        request = core.compile_model(core.read_model(str(path)), "CPU", {
            "PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision,
        }).create_infer_request()
        yield f"openvino {hint} {precision}", partial(
            lambda r, x: torch.from_numpy(r.infer({0: x.numpy()})[0].copy()), request)
    bf16 = trunk.to(memory_format=torch.channels_last)

    def torch_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return bf16(x.contiguous(memory_format=torch.channels_last)).float()

    if cpu_has_bf16():
        yield "torch channels_last bf16 autocast", torch_bf16


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = get_backbone("efficientnet_lite0")
    trunk, _ = split_backbone(spec.build(True).eval(), 1)
    digest = weights_digest(trunk).hexdigest()
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; batch {args.batch}")
    print("| runtime | images/s | max difference from PyTorch fp32 | candidate |")
    print("|---|---|---|---|")
    measured = measure_runtimes(trunk, digest=digest, input_size=spec.preprocess.input_size,
                                batch_size=args.batch, repeats=args.repeats)
    for name, m in measured.items():
        verdict = "agrees" if m["agrees"] else "disagrees"
        print(f"| {name} fp32 | {m['images_per_s']:.0f} | {m['max_diff']:.1e} | {verdict} |")
    path = onnx_trunk(trunk, digest=digest, input_size=spec.preprocess.input_size)
    x = torch.randn(args.batch, 3, spec.preprocess.input_size, spec.preprocess.input_size)
    with torch.inference_mode():
        expected = trunk(x)
    for name, run in _rejected(trunk, path, args.batch):
        diff = float((run(x).float() - expected).abs().max())
        print(f"| {name} | {_rate(run, x, args.repeats):.0f} | {diff:.1e} | rejected |",
              flush=True)


if __name__ == "__main__":
    main()
