"""The notebook's first code cell, which gets the project in a hosted notebook (Colab, Kaggle).

The cell's own text runs in a child process standing for a fresh hosted runtime: the project
is not importable (setuptools' editable finder is taken out), `google.colab` is a stand-in
module (or Kaggle's variable is set), the repository is this checkout's HEAD cloned over
file://, `python -m pip` is a stand-in that only writes down its arguments (nothing is
installed into the real environment), and the data comes from a loopback HTTP server
through $FLOWERS_DATA_URL, in the course archive's layout.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, isolated_env
from helpers.data import download

NOTEBOOK = ROOT / "Image_Classifier_Project.ipynb"

# Run in the child (python -c, so that '' heads sys.path as in a kernel): take the installed
# project away, run the cell twice as a user might, then report what the kernel now sees.
RUNNER = """
import importlib, importlib.util, json, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
importlib.invalidate_caches()
assert importlib.util.find_spec("helpers") is None, "helpers importable before the cell"
if os.environ.get("HIDE_GOOGLE"):
    sys.modules["google"] = None  # no google package at all: find_spec("google") is None
cell = open(sys.argv[1]).read()
exec(cell, {})
exec(cell, {})  # a second run adds nothing
spec = importlib.util.find_spec("helpers")
report = {"cwd": os.getcwd(), "helpers": spec and spec.origin}
if os.environ.get("GET_DATA"):
    from helpers.data import download
    report["data"] = str(download.ensure_data())
print(json.dumps(report))
"""

FAKE_PIP = """import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
"""


def hosted_cell() -> str:
    """The notebook's first code cell."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.fixture
def kernel(tmp_path):
    """Runs the cell in a child process: kernel(hosted, **env) -> (report, pip calls, output)."""
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout: nothing for the cell to clone")
    (tmp_path / "cell.py").write_text(hosted_cell())
    fake_pip = tmp_path / "fake_pip"
    (fake_pip / "pip").mkdir(parents=True)
    (fake_pip / "pip" / "__init__.py").write_text("")
    (fake_pip / "pip" / "__main__.py").write_text(FAKE_PIP)
    fake_colab = tmp_path / "fake_colab"
    (fake_colab / "google" / "colab").mkdir(parents=True)  # google/ stays a namespace package
    (fake_colab / "google" / "colab" / "__init__.py").write_text('"""Stand-in for Colab."""\n')
    work = tmp_path / "content"
    work.mkdir()
    log = tmp_path / "pip.log"

    def run(hosted: str | None, **env: str) -> tuple[dict, list[str], str]:
        paths = [fake_pip, fake_colab] if hosted == "colab" else [fake_pip]
        env |= {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"} if hosted == "kaggle" else {}
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, str(tmp_path / "cell.py")], cwd=work,
            capture_output=True, text=True, timeout=300,
            env=isolated_env(PYTHONPATH=":".join(map(str, paths)), FAKE_PIP_LOG=str(log),
                             FLOWERS_PROJECT=ROOT.as_uri(), **env))
        assert done.returncode == 0, done.stderr
        calls = log.read_text().splitlines() if log.exists() else []
        return json.loads(done.stdout.splitlines()[-1]), calls, done.stdout + done.stderr

    run.work = work
    return run


def _course_archive(path: Path) -> None:
    """A flower_data.tar.gz with the real archive's shape (102 classes, 8,189 images in
    train/valid/test), every image the same 1-pixel JPEG, so that the notebook's own call,
    ensure_data() with no arguments, accepts it."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    sizes = {"train": 6552, "valid": 818, "test": 819}
    assert sum(sizes.values()) == download.NUM_IMAGES
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        n = 0
        for split, size in sizes.items():
            for i in range(size):
                n += 1
                info = tarfile.TarInfo(f"flower_data/{split}/{i % download.NUM_CLASSES + 1}/"
                                       f"image_{n:05d}.jpg")
                info.size = len(jpeg)
                tar.addfile(info, io.BytesIO(jpeg))


def test_the_hosted_cell_is_the_first_code_cell_and_stdlib_only():
    cell = hosted_cell()
    assert "google.colab" in cell and "KAGGLE_KERNEL_RUN_TYPE" in cell
    assert "https://github.com/OWNER/REPO" in cell  # the placeholder docs/gpu.md uses too
    assert "OWNER/REPO" in (ROOT / "docs" / "gpu.md").read_text()
    modules = {w.strip(",") for line in cell.splitlines() if line.startswith("import ")
               for w in line.split("#")[0].split()[1:] if w not in ("as", "iu,")}
    assert modules <= set(sys.stdlib_module_names) | {"importlib.util"}, modules


@pytest.mark.parametrize("hide_google", [False, True])
def test_outside_a_hosted_runtime_the_cell_does_nothing(kernel, hide_google):
    report, pip, _ = kernel(None, **({"HIDE_GOOGLE": "1"} if hide_google else {}))
    assert report == {"cwd": str(kernel.work), "helpers": None}
    assert pip == [] and list(kernel.work.iterdir()) == []  # no pip, no clone


@pytest.mark.slow  # a clone and a download
def test_in_colab_the_cell_clones_installs_and_the_data_comes_with_a_progress_bar(
        kernel, server, tmp_path):
    www, url = server
    _course_archive(www / "flower_data.tar.gz")
    report, pip, output = kernel("colab", GET_DATA="1",
                                 FLOWERS_DATA_URL=url + "flower_data.tar.gz")
    clone = kernel.work / "flowers-project"
    assert (clone / ".git").is_dir() and (clone / "Image_Classifier_Project.ipynb").is_file()
    assert pip == [f"install -q -e {clone}"]  # once, though the cell ran twice
    assert report["cwd"] == str(clone)  # build/notebook and the like land in the clone
    assert report["helpers"] == str(clone / "helpers" / "__init__.py")
    # the notebook's ensure_data() put the data in the clone's flowers/, as data_dir() says
    assert report["data"] == str(clone / "flowers")
    assert sorted(p.name for p in (clone / "flowers").iterdir()) == ["test", "train", "valid"]
    assert len(list((clone / "flowers" / "valid").iterdir())) == download.NUM_CLASSES
    assert f"downloading {url}flower_data.tar.gz" in output and "100%" in output  # tqdm's bar


def test_on_kaggle_the_cell_clones_and_installs_and_in_the_clone_it_does_nothing(kernel):
    report, pip, _ = kernel("kaggle")
    clone = kernel.work / "flowers-project"
    assert pip == [f"install -q -e {clone}"]
    assert report == {"cwd": str(clone), "helpers": str(clone / "helpers" / "__init__.py")}
