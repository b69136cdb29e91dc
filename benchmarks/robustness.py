"""Robustness: a trained model on photos as a phone takes them.

The valid or test split under 14 camera shifts at 3 severities each (helpers/insight/shifts.py:
blur, shake, low resolution, JPEG, noise, light, colour, tilt and framing), each shifted copy
made once (seeded) and kept under the cache folder; the model answers every copy through its
prediction engine, the path `predict.py` takes. Prints, per shift and severity, top-1, the
shift's mean, then the mean over all, the worst shift and the clean split, and the seconds
each copy's answers took.

    FLOWERS_DIR=../shared/data/flowers .venv/bin/python benchmarks/robustness.py \\
        build/main/checkpoint.pth --split valid

Choose settings on `--split valid`; `--split test` only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.core.device import cpu_flags  # noqa: E402
from helpers.core.files import cache_dir  # noqa: E402
from helpers.data.folders import data_dir, image_folder  # noqa: E402
from helpers.insight.shifts import SEVERITIES, SHIFTS, shifted_copies  # noqa: E402
from helpers.train.evaluate import evaluate_model  # noqa: E402

SHIFTS_VERSION = 1  # bump when a shift changes: the kept copies are made again


def copies_folder(split_root: Path, *, shift: str, severity: int, seed: int) -> Path:
    """Where the shifted copies of a split live: by split folder, shift, severity and seed."""
    import hashlib

    digest = hashlib.sha256(str(split_root.resolve()).encode()).hexdigest()[:10]
    return (cache_dir() / "shifted" / f"v{SHIFTS_VERSION}-{split_root.name}-{digest}"
            / f"{shift}-{severity}-seed{seed}")


def _make(job: tuple[list[tuple[str, int]], str, str, int, int]) -> list[tuple[str, int]]:
    samples, folder, shift, severity, seed = job
    return shifted_copies(samples, folder=folder, shift=shift, severity=severity, seed=seed)


def make_copies(samples: list[tuple[str, int]], *, split_root: Path, shifts: list[str],
                severities: list[int], seed: int = 0,
                workers: int = 2) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """Every (shift, severity) copy of the samples, made in `workers` processes (once)."""
    jobs = {(s, v): (samples, str(copies_folder(split_root, shift=s, severity=v, seed=seed)),
                     s, v, seed) for s in shifts for v in severities}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        done = dict(zip(jobs, pool.map(_make, jobs.values()), strict=True))
    return done


def measure(model: Any, samples: list[tuple[str, int]], *, split_root: Path,
            shifts: list[str] | None = None, severities: list[int] | None = None,
            seed: int = 0, log=print) -> dict[str, Any]:
    """Top-1 of a model (a Classifier or an Engine) on the clean samples and on every shifted
    copy; the seconds each took; the mean over all copies and the worst shift's mean."""
    shifts = shifts or list(SHIFTS)
    severities = severities or list(SEVERITIES)
    tic = time.perf_counter()
    copies = make_copies(samples, split_root=split_root, shifts=shifts, severities=severities,
                         seed=seed)
    made = time.perf_counter() - tic
    tic = time.perf_counter()
    clean = evaluate_model(model, samples)["top1"]
    rows = {"clean": {"top1": clean, "seconds": time.perf_counter() - tic, "n": len(samples)}}
    for (shift, severity), shifted in copies.items():
        tic = time.perf_counter()
        rows[f"{shift}-{severity}"] = {"top1": evaluate_model(model, shifted)["top1"],
                                       "seconds": time.perf_counter() - tic, "n": len(shifted)}
        if log:
            log(f"{shift} {severity}: {rows[f'{shift}-{severity}']['top1']:.2%}")
    per_shift = {s: sum(rows[f"{s}-{v}"]["top1"] for v in severities) / len(severities)
                 for s in shifts}
    cells = [rows[f"{s}-{v}"]["top1"] for s in shifts for v in severities]
    worst = min(per_shift, key=per_shift.get)
    return {"rows": rows, "per_shift": per_shift, "mean": sum(cells) / len(cells),
            "worst_shift": worst, "worst": per_shift[worst], "worst_cell": min(cells),
            "clean": clean, "copies_seconds": made, "shifts": shifts, "severities": severities}


def table(result: dict[str, Any], *, title: str) -> str:
    """The measured figures as a markdown table."""
    severities = result["severities"]
    rows = result["rows"]
    head = ("| shift | " + " | ".join(f"severity {v}" for v in severities)
            + " | mean | seconds (all severities) |")
    lines = [f"{title}", "", head, "|---" * (len(severities) + 3) + "|"]
    for shift in result["shifts"]:
        cells = [rows[f"{shift}-{v}"] for v in severities]
        lines.append(f"| {SHIFTS[shift].what} | "
                     + " | ".join(f"{c['top1']:.1%}" for c in cells)
                     + f" | {result['per_shift'][shift]:.1%} | "
                     f"{sum(c['seconds'] for c in cells):.0f} |")
    n = rows["clean"]["n"]
    answers = sum(r["n"] for r in rows.values())
    seconds = sum(r["seconds"] for r in rows.values())
    lines += ["", f"clean {result['clean']:.2%} ({n} photos); mean over the "
              f"{len(rows) - 1} shifted copies {result['mean']:.2%}; worst shift "
              f"{SHIFTS[result['worst_shift']].what} {result['worst']:.2%} (worst copy "
              f"{result['worst_cell']:.2%}); {answers} answers in {seconds:.0f} s "
              f"({1000 * seconds / answers:.1f} ms a photo, decoding included); copies "
              f"made in {result['copies_seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure a checkpoint on the shifted copies of a split and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="valid", choices=["valid", "test"])
    parser.add_argument("--data", default=None, help="data folder (default $FLOWERS_DIR)")
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--severities", nargs="*", type=int, default=list(SEVERITIES))
    parser.add_argument("--limit", type=int, default=0, help="the first N photos only (tests)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    from helpers.cli.answer_commands import load_engine

    root = Path(args.data) if args.data else data_dir()
    split_root = root / args.split
    samples = image_folder(split_root).samples
    if args.limit:
        samples = samples[::max(1, len(samples) // args.limit)][:args.limit]
    engine = load_engine(args.checkpoint)
    result = measure(engine, samples, split_root=split_root, shifts=args.shifts,
                     severities=args.severities, log=None)
    flags = cpu_flags()
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                           if line.startswith("Model name")), "?")
    except OSError:
        model_name = "?"
    print(table(result, title=f"{args.checkpoint} on {args.split} ({time.strftime('%Y-%m-%d')}"
                              f", {os.cpu_count()} cores {model_name}, flags {flags}, "
                              f"runtime {engine.runtime})"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
