"""Shared fixtures: tiny synthetic ImageFolders and the location of the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# The real data: $FLOWERS_TEST_DATA, else ../shared/data/flowers beside the checkout (or
# beside /work/main, where clean clones made elsewhere find it).
_CANDIDATES = [ROOT.parent / "shared" / "data" / "flowers", Path("/work/shared/data/flowers")]
REAL_DATA = Path(os.environ.get("FLOWERS_TEST_DATA") or next(
    (p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0]))

# Each class is a distinct hue so that even a few steps of training can separate them.
PALETTE = [(220, 40, 40), (40, 180, 40), (40, 40, 220), (220, 220, 40), (220, 40, 220),
           (40, 220, 220), (250, 150, 40), (120, 60, 20), (150, 150, 150), (20, 20, 20),
           (250, 250, 250), (120, 40, 160)]


def synthetic_image(cls: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image:
    """A noisy picture dominated by the colour of class `cls`, with a stripe to give it shape."""
    w, h = size
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.float32)
    pixels = base + rng.normal(0, 25, size=(h, w, 3))
    pixels[:, (cls * 3) % w: (cls * 3) % w + 4] = 255 - base
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, classes: list[str], per_class: int,
                      splits: tuple[str, ...] = ("train", "valid", "test"), seed: int = 0) -> Path:
    """root/<split>/<class>/img_N.jpg with `per_class` synthetic images each."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                synthetic_image(i, rng).save(folder / f"img_{n}.jpg", quality=95)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """Class folders "1".."12" (string-sorted by ImageFolder), 3 images each, in 3 splits."""
    return make_image_folder(tmp_path / "flowers", [str(i) for i in range(1, 13)], per_class=3)


@pytest.fixture
def real_data() -> Path:
    """The course split of the flowers data, or a skip saying where it was looked for."""
    if not (REAL_DATA / "train").is_dir():
        pytest.skip(f"real flowers data not found at {REAL_DATA} (set FLOWERS_TEST_DATA)")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Caches go to a temporary folder, never to the user's or the data's."""
    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path_factory.mktemp("cache")))


# In CI (CI=true) a test that could not run is a failure, not a pass: a missing browser, data
# folder, launcher, npm or root would otherwise leave a green run that proved nothing. Skips
# stay allowed on a developer's machine, and everywhere for what CI lacks by design: a GPU.
_SKIPPED_IN_CI: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (os.environ.get("CI", "").lower() == "true" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "GPU" not in reason:
            _SKIPPED_IN_CI.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_IN_CI:
        print("\nCI=true: these tests were skipped, so the run fails:\n  "
              + "\n  ".join(_SKIPPED_IN_CI))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
