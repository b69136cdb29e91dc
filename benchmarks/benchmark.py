"""The default recipe on data regimes (and against the course recipe), in one run.

    python benchmarks/benchmark.py --regime course    # the course split, 3 seeds (~25 min)
    python benchmarks/benchmark.py --regime fewshot   # 10 train + 10 valid images a class
    python benchmarks/benchmark.py --regime course --with-course-recipe   # + the course's
    python benchmarks/benchmark.py --quick            # a small subset, 1 seed (~2 minutes)

Regimes: `course` is the course split as it is; `fewshot` takes 10 training and 10
validation images a class (seeded) from the course's train/ folder and tests on the whole
test/ folder, with `--final` (a final model on train+valid). Each run is its own process,
from raw images with an empty cache, so wall times and peak memory are its own. Prints a
table (per seed, then the mean) and writes the same figures as JSON. Valid and test
figures come from the model's prediction engine, as predict.py's answers do.
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

from helpers.core.device import cpu_flags  # noqa: E402
from helpers.core.files import runtime_choice  # noqa: E402
from helpers.data.folders import data_dir, image_folder  # noqa: E402
from helpers.model import checkpoint  # noqa: E402
from helpers.train import run  # noqa: E402


def run_one(recipe: str, seed: int, data_root: Path, quick: bool, *, final: bool = False,
            save: Path | None = None) -> dict:
    """Train one recipe from raw images as train.py does (run.set_up and run.run: the same
    settling, training, figures and saving); return its history, phases, accuracy and memory."""
    typed = {"seed": seed} | ({"recipe": "course"} if recipe == "course" else {})
    if quick:
        typed |= {"epochs": 1} if recipe == "course" else {"epochs": 2, "probe_epochs": 5}
    setup = run.set_up(data_root, typed=typed, device_type="cpu")
    done = run.run(setup, device=torch.device("cpu"), out=save, final=final, log=None)
    phases = dict(done.timings)
    chosen = runtime_choice()  # the trunk runtime the cached recipe measured
    trunk = json.loads(chosen.read_text())["runtime"] if chosen.is_file() else "torch"
    # history seconds count from the start of training, after the extraction
    history = [r | {"seconds": r["seconds"] + phases.get("extract", 0.0)} for r in done.history]
    first = done.metrics.get("first_run", {k: done.figures[k] for k in ("valid", "test")})
    return {"recipe": recipe, "seed": seed, "config": asdict(done.config), "history": history,
            "phases": phases, "trunk_runtime": trunk, "valid": done.figures["valid"],
            "test": done.figures["test"], "first_run": first, "final": final,
            "train_images": len(done.data.sets["train"]),
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


def run_export(folder: Path, data_root: Path, quick: bool) -> dict:
    """Exported models: size, test accuracy and batch-1 latency, next to PyTorch."""
    import numpy as np
    import onnxruntime as ort

    from helpers.data.preprocess import process_image
    from helpers.serve import export

    ckpt = folder / "checkpoint.pth"
    clf, _ = checkpoint.load_checkpoint(ckpt)
    paths = {"onnx fp32": export.export_onnx(clf, folder / "model.onnx")}
    paths["onnx int8"] = export.quantize_onnx(
        clf, paths["onnx fp32"], out=folder / "model.int8.onnx",
        calibration=data_root / "train", count=40 if quick else 200)
    test = image_folder(data_root / "test")
    x_all = np.stack([process_image(p, spec=clf.preprocess) for p, _ in test.samples])
    labels = np.array(test.targets)
    rows = {}
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        probs = torch.cat([clf(torch.from_numpy(x_all[i:i + 64])).softmax(1)
                           for i in range(0, len(x_all), 64)]).numpy()
        one = torch.from_numpy(x_all[:1])
        p50, p95 = latency(clf, one, 20 if quick else 100)
    rows["pytorch fp32"] = {"mb": ckpt.stat().st_size / 1e6, "p50_ms": p50, "p95_ms": p95,
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


def fewshot(root: Path, dest: Path, *, seed: int = 0, per_class: int = 10) -> Path:
    """10 training and 10 validation images a class, drawn (seeded) from the course's train/
    folder by symbolic links; test/ is the course's whole test/ folder."""
    import random

    rng = random.Random(seed)
    for cls in sorted(p.name for p in (root / "train").iterdir()):
        images = sorted((root / "train" / cls).iterdir())
        picked = rng.sample(images, min(len(images), 2 * per_class))
        for split, part in (("train", picked[:per_class]), ("valid", picked[per_class:])):
            (dest / split / cls).mkdir(parents=True)
            for image in part:
                (dest / split / cls / image.name).symlink_to(image.resolve())
    (dest / "test").symlink_to((root / "test").resolve())
    return dest


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Seconds from the start until validation accuracy first reached target."""
    return next((r["seconds"] for r in history if r["valid_top1"] >= target - 1e-9), None)


def _child(recipe: str, seed: int, data_root: Path, quick: bool, out: Path, *,
           final: bool = False, save: Path | None = None) -> dict:
    """Run one recipe (or the export measurement) in a fresh process with an empty cache."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        env = os.environ | {"FLOWERS_CACHE": cache}
        cmd = [sys.executable, __file__, "--child", recipe, "--seed", str(seed),
               "--data", str(data_root), "--json", str(out)] + (["--quick"] if quick else [])
        cmd += ["--final"] if final else []
        subprocess.run(cmd + (["--save", str(save)] if save else []), env=env, check=True)
    return json.loads(out.read_text())


def summarize(runs: list[dict]) -> dict:
    """Mean and spread of accuracy, the phases, and (with the course recipe) the speed-up."""
    default = [r for r in runs if r["recipe"] == "default"]
    tops = [r["test"]["top1"] for r in default]
    summary = {
        "test_top1_mean": statistics.mean(tops),
        "test_top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
        "test_top5_mean": statistics.mean(r["test"]["top5"] for r in default),
        "valid_top1_mean": statistics.mean(r["valid"]["top1"] for r in default),
        "total_seconds_max": max(r["phases"]["total"] for r in default),
        "total_seconds_mean": statistics.mean(r["phases"]["total"] for r in default),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
    }
    course = next((r for r in runs if r["recipe"] == "course"), None)
    if course is not None:
        best = max(course["history"], key=lambda r: r["valid_top1"])
        reach = [time_to_reach(r["history"], best["valid_top1"]) for r in default]
        summary |= {"course_best_valid": best["valid_top1"],
                    "course_seconds_to_best": best["seconds"],
                    "default_seconds_to_course_best": reach,
                    "speedup": (best["seconds"] / statistics.mean(reach)) if all(reach)
                    else None}
    return summary


def table(runs: list[dict], summary: dict) -> str:
    """The figures as a markdown table (per run, then the mean), then the summary lines."""
    lines = ["| recipe | seed | valid top-1 | valid top-5 | test top-1 | test top-5 "
             "| trunk runtime | extract s | extract img/s | probe s | fine-tune s | calibrate s "
             "| final s | eval s | total s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["phases"]
        rate = p["extract_images"] / p["extract"] if p.get("extract") else None
        train_s = p.get("fine-tune", p.get("train", 0.0))
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['valid']['top1']:.2%} | {r['valid']['top5']:.2%} "
            f"| {r['test']['top1']:.2%} | {r['test']['top5']:.2%} "
            f"| {r.get('trunk_runtime', '-')} | {p.get('extract', 0):.0f} "
            f"| {f'{rate:.0f}' if rate else '-'} | {p.get('linear probe', 0):.0f} "
            f"| {train_s:.0f} | {p.get('calibrate', 0):.0f} | {p.get('final', 0):.0f} "
            f"| {p['evaluate']:.0f} | {p['total']:.0f} | {r['peak_rss_mb']:.0f} |")
    s = summary
    lines += ["", f"default recipe: test top-1 {s['test_top1_mean']:.2%} "
                  f"(std {s['test_top1_std']:.2%}), top-5 {s['test_top5_mean']:.2%}, valid "
                  f"top-1 {s['valid_top1_mean']:.2%}; raw images to checkpoint "
                  f"{s['total_seconds_mean']:.0f} s on average, at most "
                  f"{s['total_seconds_max']:.0f} s"]
    if "speedup" in s:
        speedup = f"{s['speedup']:.1f}x" if s["speedup"] else "not reached"
        reach = ", ".join(f"{t:.0f} s" if t else "never"
                          for t in s["default_seconds_to_course_best"])
        lines.append(f"course recipe: best valid top-1 {s['course_best_valid']:.2%} after "
                     f"{s['course_seconds_to_best']:.0f} s; the default recipe reached it "
                     f"after {reach}: speed-up {speedup}")
    lines.append(f"peak RSS {s['peak_rss_mb_max']:.0f} MB")
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
    """Run the benchmark (or, with --child, one of its runs) and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=["course", "fewshot"], default="course",
                        help="the data regime (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="10 classes, 8 images each, 1 seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the default recipe")
    parser.add_argument("--with-course-recipe", action="store_true",
                        help="also run the course's recipe once, for the speed-up")
    parser.add_argument("--data", type=Path, help="data folder (default: FLOWERS_DIR)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the figures go (default build/benchmark-REGIME.json)")
    parser.add_argument("--child", choices=["default", "course", "export"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--final", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_root = args.data or data_dir()
    if args.child == "export":
        args.json.write_text(json.dumps(run_export(args.save, data_root, args.quick)))
        return 0
    if args.child:
        result = run_one(args.child, args.seed, data_root, args.quick, final=args.final,
                         save=args.save)
        args.json.write_text(json.dumps(result, default=str))
        return 0
    out = args.json or ROOT / "build" / f"benchmark-{'quick' if args.quick else args.regime}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    final = args.regime == "fewshot"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if args.quick:
            data_root = subset(data_root, Path(tmp) / "subset")
        elif args.regime == "fewshot":
            data_root = fewshot(data_root, Path(tmp) / "fewshot")
        seeds = [0] if args.quick else list(range(args.seeds))
        runs = []
        if args.quick or args.with_course_recipe:
            runs.append(_child("course", 0, data_root, args.quick, Path(tmp) / "course.json"))
        saved = Path(tmp) / "default0"  # its checkpoint.pth and engine
        runs += [_child("default", s, data_root, args.quick, Path(tmp) / f"default{s}.json",
                        final=final, save=saved if s == seeds[0] else None) for s in seeds]
        exports = _child("export", 0, data_root, args.quick, Path(tmp) / "export.json",
                         save=saved)
    summary = summarize(runs)
    ceiling = os.environ.get("ONEDNN_MAX_CPU_ISA")
    report = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, "
              f"{os.cpu_count()} cores, flags: {cpu_flags()}"
              + (f" (run as AVX2: ONEDNN_MAX_CPU_ISA={ceiling})" if ceiling else "")
              + f", torch {torch.__version__}", "quick": args.quick,
              "regime": "quick" if args.quick else args.regime, "final": final,
              "data": str(data_root), "summary": summary, "runs": runs, "exports": exports}
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"{report['regime']} regime, {report['date']}, {report['machine']}"
          + (" (test figures: the final model on train+valid)" if final else ""))
    print(table(runs, summary))
    print()
    print(export_table(exports))
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
