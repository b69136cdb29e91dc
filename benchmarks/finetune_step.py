"""How long one fine-tune step of the cached recipe takes (tail + head, forward, backward and
AdamW on a batch of cached activations), for each setting that could make it cheaper.

    .venv/bin/python benchmarks/finetune_step.py [--batch 128] [--steps 8]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/finetune_step.py

Prints the CPU's flags and one row a setting: milliseconds a step (median) and activations/s.
The second line runs PyTorch's kernels as on a CPU with AVX2 alone (fp32, no bf16).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from helpers.core.device import autocast_dtype, cpu_flags
from helpers.model.backbones import get_backbone
from helpers.model.classifier import build_head
from helpers.train.cache import split_backbone
from helpers.train.recipes import CachedModel


def step_ms(net: CachedModel, x: torch.Tensor, y: torch.Tensor, *, steps: int,
            channels_last: bool, dtype: torch.dtype | None) -> float:
    """Median milliseconds of a training step, after two warm-up steps."""
    net = copy.deepcopy(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    times = []
    for _ in range(steps + 2):
        tic = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = get_backbone("efficientnet_lite0")
    _, tail = split_backbone(spec.build(True), 1)
    head = build_head(spec.num_features, 102, hidden_units=0, dropout=0.2)
    x = torch.randn(args.batch, 192, 7, 7).half()  # the cache holds fp16
    y = torch.randint(0, 102, (args.batch,))
    ceiling = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    print(f"CPU flags: {cpu_flags()}" + (f" (ONEDNN_MAX_CPU_ISA={ceiling})" if ceiling else "")
          + f"; {torch.get_num_threads()} threads; batch {args.batch}")
    print("| batch norm | layout | precision | ms a step | activations/s |")
    print("|---|---|---|---|---|")
    precisions = {"fp32": None}
    if autocast_dtype(torch.device("cpu")) is not None:
        precisions["bf16 autocast"] = torch.bfloat16
    for frozen in (False, True):
        net = CachedModel(tail, head, freeze_bn=frozen)
        for channels_last in (True, False):
            for name, dtype in precisions.items():
                ms = step_ms(net, x, y, steps=args.steps, channels_last=channels_last,
                             dtype=dtype)
                print(f"| {'frozen' if frozen else 'batch statistics'} "
                      f"| {'channels_last' if channels_last else 'contiguous'} | {name} "
                      f"| {ms:.0f} | {args.batch / ms * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
