"""The default recipe against the course recipe, on the same data, in one run.

    python benchmarks/benchmark.py            # the full course split, 3 seeds (about 1 hour)
    python benchmarks/benchmark.py --quick    # a small subset, 1 seed (about a minute)

Each recipe runs in its own process, from raw images with an empty cache, so wall times
and peak memory are its own. Prints a table and writes the same figures as JSON.
The speed-up is the course recipe's time to its best valid accuracy divided by the
default recipe's time to reach that same valid accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import checkpoint, data, recipes, train  # noqa: E402


def run_one(recipe: str, seed: int, data_root: Path, quick: bool,
            save: Path | None = None) -> dict:
    """Train one recipe from raw images; return its history, phases, accuracy and memory."""
    if recipe == "course":
        config = train.TrainConfig.course(seed=seed, epochs=1 if quick else 5)
    else:
        config = train.TrainConfig(seed=seed, **({"epochs": 2, "probe_epochs": 5} if quick else {}))
    device = torch.device("cpu")
    start = time.perf_counter()
    sets, clf = recipes.prepare(data_root, config)
    phases: dict[str, float] = {}
    history = recipes.run_recipe(clf, sets, config, device, progress=False, log=None,
                                 start=start, phases=phases)
    trained = time.perf_counter()
    result = {split: recipes.evaluate_split(clf, sets[split], config, device)
              for split in ("valid", "test")}
    phases["evaluate"] = time.perf_counter() - trained
    if save:
        checkpoint.save_checkpoint(clf, save, config, result)
    phases["total"] = time.perf_counter() - start
    return {"recipe": recipe, "seed": seed, "config": asdict(config), "history": history,
            "phases": phases, "valid": result["valid"], "test": result["test"],
            "train_images": len(sets["train"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def latency(fn, x, repeats: int) -> tuple[float, float]:
    """p50 and p95 in milliseconds of fn(x), after two warm-up calls."""
    fn(x), fn(x)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - tic) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.95) - 1]


def run_export(ckpt_path: Path, data_root: Path, quick: bool) -> dict:
    """Exported models: size, test accuracy and batch-1 latency, next to PyTorch."""
    import numpy as np
    import onnxruntime as ort

    from helpers import export
    from helpers.predict import process_for

    clf, _ = checkpoint.load_checkpoint(ckpt_path)
    tmp = ckpt_path.parent
    paths = {"onnx fp32": export.export_onnx(clf, tmp / "model.onnx")}
    paths["onnx int8"] = export.quantize_onnx(clf, paths["onnx fp32"], out=tmp / "model.int8.onnx",
                                              calibration=data_root / "train",
                                              count=40 if quick else 200)
    test = data.image_folder(data_root / "test")
    x_all = np.stack([process_for(clf, p) for p, _ in test.samples])
    labels = np.array(test.targets)
    rows = {}
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        probs = torch.cat([clf(torch.from_numpy(x_all[i:i + 64])).softmax(1)
                           for i in range(0, len(x_all), 64)]).numpy()
        one = torch.from_numpy(x_all[:1])
        p50, p95 = latency(clf, one, 20 if quick else 100)
    rows["pytorch fp32"] = {"mb": ckpt_path.stat().st_size / 1e6, "p50_ms": p50, "p95_ms": p95,
                            "test_top1": float((probs.argmax(1) == labels).mean())}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs = np.concatenate([session.run(None, {"images": x_all[i:i + 64]})[0]
                                for i in range(0, len(x_all), 64)])
        p50, p95 = latency(lambda x, s=session: s.run(None, {"images": x}), x_all[:1],
                           20 if quick else 200)
        rows[name] = {"mb": path.stat().st_size / 1e6, "p50_ms": p50, "p95_ms": p95,
                      "test_top1": float((probs.argmax(1) == labels).mean())}
    return rows


def subset(root: Path, dest: Path, classes: int = 10, per_class: int = 8) -> Path:
    """A small copy of the data by symbolic links: the first classes, a few images each."""
    names = sorted((p.name for p in (root / "train").iterdir()), key=lambda n: (len(n), n))
    for split in ("train", "valid", "test"):
        for cls in names[:classes]:
            (dest / split / cls).mkdir(parents=True)
            for image in sorted((root / split / cls).iterdir())[:per_class]:
                (dest / split / cls / image.name).symlink_to(image.resolve())
    return dest


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Seconds from the start until validation accuracy first reached target."""
    return next((r["seconds"] for r in history if r["valid_top1"] >= target - 1e-9), None)


def _child(recipe: str, seed: int, data_root: Path, quick: bool, out: Path,
           save: Path | None = None) -> dict:
    """Run one recipe (or the export measurement) in a fresh process with an empty cache."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        env = os.environ | {"FLOWERS_CACHE": cache}
        cmd = [sys.executable, __file__, "--child", recipe, "--seed", str(seed),
               "--data", str(data_root), "--json", str(out)] + (["--quick"] if quick else [])
        subprocess.run(cmd + (["--save", str(save)] if save else []), env=env, check=True)
    return json.loads(out.read_text())


def summarize(runs: list[dict]) -> dict:
    """Mean and spread of accuracy, the phases, images/s and the speed-up ratio."""
    default = [r for r in runs if r["recipe"] == "default"]
    course = next(r for r in runs if r["recipe"] == "course")
    best = max(course["history"], key=lambda r: r["valid_top1"])
    reach = [time_to_reach(r["history"], best["valid_top1"]) for r in default]
    tops = [r["test"]["top1"] for r in default]
    return {
        "test_top1_mean": statistics.mean(tops),
        "test_top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
        "test_top5_mean": statistics.mean(r["test"]["top5"] for r in default),
        "valid_top1_mean": statistics.mean(r["valid"]["top1"] for r in default),
        "course_best_valid": best["valid_top1"], "course_seconds_to_best": best["seconds"],
        "default_seconds_to_course_best": reach,
        "speedup": (best["seconds"] / statistics.mean(reach)) if all(reach) else None,
        "total_seconds_max": max(r["phases"]["total"] for r in default),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
    }


def table(runs: list[dict], summary: dict) -> str:
    """The figures as a markdown table, then the summary lines."""
    lines = ["| recipe | seed | valid top-1 | valid top-5 | test top-1 | test top-5 | extract s "
             "| extract img/s | train s | fine-tune s | eval s | total s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["phases"]
        rate = p["extract_images"] / p["extract"] if p.get("extract") else None
        train_s = p.get("train", p.get("probe", 0.0))
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['valid']['top1']:.2%} | {r['valid']['top5']:.2%} "
            f"| {r['test']['top1']:.2%} | {r['test']['top5']:.2%} | {p.get('extract', 0):.0f} "
            f"| {f'{rate:.0f}' if rate else '-'} | {train_s:.0f} | {p.get('finetune', 0):.0f} "
            f"| {p['evaluate']:.0f} | {p['total']:.0f} | {r['peak_rss_mb']:.0f} |")
    s = summary
    speedup = f"{s['speedup']:.1f}x" if s["speedup"] else "not reached"
    reach = ", ".join(f"{t:.0f} s" if t else "never" for t in s["default_seconds_to_course_best"])
    lines += ["", f"default recipe: test top-1 {s['test_top1_mean']:.2%} "
                  f"(std {s['test_top1_std']:.2%}), top-5 {s['test_top5_mean']:.2%}, "
                  f"at most {s['total_seconds_max']:.0f} s from raw images to the checkpoint",
              f"course recipe: best valid top-1 {s['course_best_valid']:.2%} after "
              f"{s['course_seconds_to_best']:.0f} s; the default recipe reached it after {reach}:"
              f" speed-up {speedup}",
              f"peak RSS {s['peak_rss_mb_max']:.0f} MB"]
    return "\n".join(lines)


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def export_table(rows: dict) -> str:
    """Size, test accuracy and single-image latency of each way to run the model."""
    lines = ["| model | size MB | test top-1 | latency p50 ms | latency p95 ms |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['mb']:.1f} | {r['test_top1']:.2%} | {r['p50_ms']:.1f} "
              f"| {r['p95_ms']:.1f} |" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 classes, 8 images each, 1 seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the default recipe")
    parser.add_argument("--data", type=Path, help="data folder (default: FLOWERS_DIR)")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "benchmark.json")
    parser.add_argument("--child", choices=["default", "course", "export"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_root = args.data or data.data_dir()
    if args.child == "export":
        args.json.write_text(json.dumps(run_export(args.save, data_root, args.quick)))
        return 0
    if args.child:
        result = run_one(args.child, args.seed, data_root, args.quick, args.save)
        args.json.write_text(json.dumps(result, default=str))
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if args.quick:
            data_root = subset(data_root, Path(tmp) / "subset")
        seeds = [0] if args.quick else list(range(args.seeds))
        runs = [_child("course", 0, data_root, args.quick, Path(tmp) / "course.json")]
        saved = Path(tmp) / "default0.pth"
        runs += [_child("default", s, data_root, args.quick, Path(tmp) / f"default{s}.json",
                        saved if s == seeds[0] else None) for s in seeds]
        exports = _child("export", 0, data_root, args.quick, Path(tmp) / "export.json", saved)
    summary = summarize(runs)
    report = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}", "quick": args.quick,
              "data": str(data_root), "summary": summary, "runs": runs, "exports": exports}
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(table(runs, summary))
    print()
    print(export_table(exports))
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
