"""Measure the GPU recipe on a subset, beside the CPU recipe and the notebook (gpu_check.sh).

    python benchmarks/gpu_check.py --data build/gpu_subset [--out build/gpu_check] [--dry-run]

Runs train.py's command in this process (so the GPU's peak memory can be read): the default
GPU recipe (`--recipe auto --gpu`: full fine-tuning), then the CPU recipe (`--recipe cached`)
on the same photos, then the notebook top to bottom. Prints test accuracy on the subset,
images/s (photos through the network per second of extraction and training), peak GPU
memory, wall time per phase, and the time extrapolated to the course
split's 6,552 training images. --dry-run: test_efficientnet, one epoch, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import cli  # noqa: E402
from helpers.model import checkpoint  # noqa: E402

COURSE_TRAIN_IMAGES = 6552


def train(name: str, data: Path, out: Path, options: list[str]) -> dict:
    """train.py's command on `data`; its figures, wall time and peak GPU memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    print(f"\n== {name}: train.py {data} {' '.join(options)}", flush=True)
    tic = time.perf_counter()
    status = cli.main(["train", str(data), "--save_dir", str(out / name), *options],
                      prog="train.py")
    wall = time.perf_counter() - tic
    if status != 0:
        sys.exit(f"error: the {name} run failed with status {status}")
    saved = checkpoint.read_checkpoint(out / name / "checkpoint.pth")
    metrics, config = saved["metrics"], saved["config"]
    timings = metrics["timings"]
    phases = {row["phase"] for row in metrics["history"]}
    seconds = timings["extract"] + sum(timings[p] for p in phases)
    n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
    # Photos through the network while training: every epoch for the image recipes; the
    # centre and augmented views once for the cached recipe (its epochs reuse activations).
    passes = 1 + config["views"] if config["recipe"] == "cached" else config["epochs"]
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    scale = COURSE_TRAIN_IMAGES / n_train
    return {"name": name, "test_top1": metrics["test"]["top1"], "n_test": metrics["test"]["n"],
            "images_per_s": n_train * passes / max(seconds, 1e-9),
            "gpu_memory_gib": memory, "wall_s": wall,
            "phases_s": {k: round(v, 1) for k, v in timings.items() if k != "extract_images"},
            "course_split_estimate_s": seconds * scale}


def notebook(data: Path, out: Path, *, epochs: int, arch: str) -> float:
    """Run the notebook's cells top to bottom on `data` (in a kernel when nbclient is
    installed, else one after another in this process); its wall time."""
    import nbformat

    os.environ.update({"FLOWERS_DIR": str(data), "NB_EPOCHS": str(epochs), "NB_ARCH": arch,
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                "")])})
    folder = out / "notebook"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\n== notebook: FLOWERS_DIR={data} NB_EPOCHS={epochs} NB_ARCH={arch}", flush=True)
    nb = nbformat.read(ROOT / "Image_Classifier_Project.ipynb", as_version=4)
    tic = time.perf_counter()
    try:
        from nbclient import NotebookClient
    except ImportError:
        NotebookClient = None
    if NotebookClient is None:  # no Jupyter here: the same cells, plain Python
        print("nbclient is not installed: running the cells in this process", flush=True)
        os.environ["MPLBACKEND"] = "Agg"
        namespace: dict = {}
        here = Path.cwd()
        os.chdir(folder)
        try:
            for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
                exec(compile(cell.source, f"notebook cell {i + 1}", "exec"), namespace)
        finally:
            os.chdir(here)
        return time.perf_counter() - tic
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    nbformat.write(nb, folder / "executed.ipynb")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs if o.output_type == "stream")
    print("\n".join(line for line in printed.splitlines() if "top-1" in line or "device" in line))
    return time.perf_counter() - tic


def main() -> None:
    """Run the three checks and print one table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "build" / "gpu_subset")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check")
    p.add_argument("--dry-run", action="store_true",
                   help="test_efficientnet, one epoch, on the CPU: checks the script only")
    args = p.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()  # the notebook runs elsewhere
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA GPU (CPU only)'}, "
          f"{os.cpu_count()} CPU cores")
    if args.dry_run:
        quick = ["--arch", "test_efficientnet", "--epochs", "1"]
        gpu = ["--recipe", "full", *quick]
        cpu = ["--recipe", "cached", *quick]
        nb_epochs, nb_arch = 1, "test_efficientnet"
    else:
        if not cuda:
            sys.exit("error: no CUDA GPU here; run with --dry-run to check the script on a CPU")
        gpu, cpu = ["--recipe", "auto", "--gpu"], ["--recipe", "cached"]
        nb_epochs, nb_arch = 2, "efficientnet_lite0"
    runs = [train("gpu-recipe", args.data, args.out, gpu),
            train("cpu-recipe", args.data, args.out, cpu)]
    nb_seconds = notebook(args.data, args.out, epochs=nb_epochs, arch=nb_arch)
    print("\n| run | test top-1 | images/s | GPU memory GiB | wall s | phases s | "
          f"{COURSE_TRAIN_IMAGES:,} images, s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['test_top1']:.1%} of {r['n_test']} | "
              f"{r['images_per_s']:.0f} | {r['gpu_memory_gib']:.2f} | {r['wall_s']:.0f} | "
              f"{r['phases_s']} | {r['course_split_estimate_s']:.0f} |")
    print(f"| notebook | | | | {nb_seconds:.0f} | | |")
    report = {"dry_run": args.dry_run, "cuda": cuda, "runs": runs, "notebook_s": nb_seconds}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"figures: {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
