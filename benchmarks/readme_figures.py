"""Re-measure every figure the README states, in one go, and print them with date and CPU.

    python benchmarks/readme_figures.py                 # main job, pictures, predict speed,
                                                        # notebook, app (about 25 minutes)
    python benchmarks/readme_figures.py --benchmarks    # and both benchmark regimes (+1 h)

Needs the flowers data ($FLOWERS_DIR, else ../shared/data/flowers). Each step runs as its
own process from an empty cache where the README's figure is "from raw images". Writes
build/readme_figures.json and prints a markdown summary to paste into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark import cpu_name  # noqa: E402


def run(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run a command from the project root; its wall time, peak RSS, output and status."""
    tic = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    out = process.stdout.read()  # until the process closes it, at exit
    _, status, usage = os.wait4(process.pid, 0)
    return {"cmd": " ".join(cmd), "wall_s": time.perf_counter() - tic,
            "status": os.waitstatus_to_exitcode(status), "peak_rss_mb": usage.ru_maxrss / 1024,
            "output": out}


def main(argv: list[str] | None = None) -> int:
    """Run every measurement; print the summary; exit 1 if any step failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", action="store_true",
                        help="also run benchmarks/benchmark.py for both regimes")
    args = parser.parse_args(argv)
    data = os.environ.get("FLOWERS_DIR") or str(ROOT.parent / "shared" / "data" / "flowers")
    python = sys.executable
    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="readme-cache-") as cache:
        env = os.environ | {"FLOWERS_DIR": data, "FLOWERS_CACHE": cache}
        steps["main job"] = run([python, "-m", "helpers", "pipeline", "--out", "build/main"],
                                env=env)
        steps["pictures"] = run([python, "benchmarks/figures.py", "build/main/checkpoint.pth"],
                                env=env)
        steps["predict speed"] = run([python, "benchmarks/predict_speed.py",
                                      "build/main/checkpoint.pth", "--data", data], env=env)
        steps["notebook"] = run([python, "-m", "jupyter", "nbconvert", "--to", "notebook",
                                 "--execute", "--ExecutePreprocessor.timeout=3600",
                                 "--output-dir", "build/notebook",
                                 "Image_Classifier_Project.ipynb"], env=env)
        steps["app"] = run([python, "-m", "pytest", "tests/test_app_browser.py", "-q", "-s"],
                           env=env | {"APP_TEST_CHECKPOINT": "build/main/checkpoint.pth"})
    if args.benchmarks:
        for regime in ("course", "fewshot"):
            steps[f"benchmark {regime}"] = run([python, "benchmarks/benchmark.py", "--regime",
                                                regime, "--data", data])
    metrics = json.loads((ROOT / "build" / "main" / "metrics.json").read_text())
    report = {"date": date.today().isoformat(), "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
              "main_job": {"wall_s": steps["main job"]["wall_s"],
                           "peak_rss_mb": steps["main job"]["peak_rss_mb"],
                           "valid": metrics.get("valid"), "test": metrics.get("test"),
                           "calibration": metrics.get("calibration"),
                           "timings": metrics.get("timings")},
              "steps": steps}
    out = ROOT / "build" / "readme_figures.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"measured {report['date']} on {report['cpu']}\n")
    m = report["main_job"]
    print(f"- main job: {m['wall_s']:.0f} s wall, peak {m['peak_rss_mb']:.0f} MB; valid top-1 "
          f"{m['valid']['top1']:.2%}, test top-1 {m['test']['top1']:.2%}, top-5 "
          f"{m['test']['top5']:.2%}; temperature {m['calibration']['temperature']:.2f}, "
          f"unsure below {m['calibration']['unsure_below']:.1%}")
    for name, step in steps.items():
        tail = "\n".join(step["output"].strip().splitlines()[-12:])
        print(f"\n## {name} (exit {step['status']}, {step['wall_s']:.0f} s)\n{tail}")
    print(f"\nall figures: {out}")
    return 0 if all(s["status"] == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
