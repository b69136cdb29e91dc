"""Shared fixtures: tiny synthetic ImageFolders, the location of the real data and of a
browser, and a home of its own for the whole run (nothing is written to the user's)."""

from __future__ import annotations

import os
import shutil
import tempfile
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


def write_checkpoint(model, path: Path, *, config=None, metrics=None) -> Path:
    """A checkpoint file alone, without the engine that inference.save_model writes beside it:
    the tests of the checkpoint format, and of an engine rebuilt when it is missing or stale."""
    from helpers.core.files import atomic_write_bytes
    from helpers.model.checkpoint import checkpoint_dict, encode_checkpoint

    ckpt = checkpoint_dict(model, config=config, metrics=metrics)
    return atomic_write_bytes(encode_checkpoint(ckpt, suffix=Path(path).suffix), path)


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


def chromium() -> Path:
    """The Chromium (or Chrome) the browser tests drive: the first of chromium,
    chromium-browser, google-chrome, google-chrome-stable on PATH; $CHROMIUM overrides. A
    skip names what was looked for (in CI a skip fails the run)."""
    if os.environ.get("CHROMIUM"):
        path = Path(os.environ["CHROMIUM"])
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.skip(f"browser not found: $CHROMIUM={path} is not an executable file")
        return path
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    pytest.skip(f"browser not found: none of {', '.join(CHROMIUM_NAMES)} is on PATH "
                "(apt-get install chromium, or set CHROMIUM=/path/to/chrome)")


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


# A home of the run's own: caches, configuration and telemetry that libraries write under the
# user's home (matplotlib's font list, Jupyter's runtime files, IPython's profile, torch hub,
# OpenVINO's ~/intel, XDG folders) go to a temporary folder removed at the end. npm keeps the
# user's cache and settings: its cache holds the packages the app build installs offline.
# Set in pytest_configure, before any test module imports matplotlib or runs a process.
_HOME_VARS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
              "XDG_RUNTIME_DIR", "MPLCONFIGDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
              "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "TORCH_HOME", "HF_HOME", "FLOWERS_CACHE",
              "npm_config_cache", "npm_config_userconfig")
_saved_env: dict[str, str | None] = {}
_run_home: Path | None = None
USER_HOME = Path(os.path.expanduser("~"))
# The user's own flowers cache, as the package would find it outside the tests.
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or USER_HOME / ".cache") / "flower-classifier"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, mtime in ns), to tell whether anything wrote there."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath, name)
            try:
                stat = path.lstat()
            except OSError:
                continue
            found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return found


_user_cache_before: dict[str, tuple[int, int]] = {}


def pytest_configure(config: pytest.Config) -> None:
    global _run_home
    _user_cache_before.update(_snapshot(USER_CACHE))
    _run_home = Path(tempfile.mkdtemp(prefix="flowers-tests-home-"))
    values = {"HOME": _run_home, "XDG_CACHE_HOME": _run_home / ".cache",
              "XDG_CONFIG_HOME": _run_home / ".config",
              "XDG_DATA_HOME": _run_home / ".local" / "share",
              "XDG_STATE_HOME": _run_home / ".local" / "state",
              "XDG_RUNTIME_DIR": _run_home / "run",
              "MPLCONFIGDIR": _run_home / ".config" / "matplotlib",
              "JUPYTER_CONFIG_DIR": _run_home / ".jupyter",
              "JUPYTER_DATA_DIR": _run_home / ".local" / "share" / "jupyter",
              "JUPYTER_RUNTIME_DIR": _run_home / ".local" / "share" / "jupyter" / "runtime",
              "IPYTHONDIR": _run_home / ".ipython", "TORCH_HOME": _run_home / ".cache" / "torch",
              "HF_HOME": _run_home / ".cache" / "huggingface",
              "FLOWERS_CACHE": _run_home / ".cache" / "flower-classifier"}
    # npm: the user's cache (the offline packages) and settings, wherever HOME points.
    npm_cache = Path(os.environ.get("npm_config_cache") or USER_HOME / ".npm")
    npm_rc = Path(os.environ.get("npm_config_userconfig") or USER_HOME / ".npmrc")
    values["npm_config_cache"] = npm_cache
    if npm_rc.is_file():
        values["npm_config_userconfig"] = npm_rc
    for name in _HOME_VARS:
        _saved_env[name] = os.environ.get(name)
        if name in values:
            os.environ[name] = str(values[name])
    (_run_home / "run").mkdir(mode=0o700)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _run_home is not None:
        shutil.rmtree(_run_home, ignore_errors=True)


def isolated_env(**extra: str) -> dict[str, str]:
    """A minimal environment for a child process that still writes nothing to the user's
    home: PATH, the run's HOME and cache variables, plus `extra`."""
    env = {"PATH": "/usr/bin:/bin"}
    env |= {k: os.environ[k] for k in _HOME_VARS if k in os.environ}
    return env | extra


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
    changed = _user_cache_before != _snapshot(USER_CACHE)
    if changed:  # something bypassed FLOWERS_CACHE and HOME: a test that must be fixed
        before, after = set(_user_cache_before.items()), set(_snapshot(USER_CACHE).items())
        names = sorted({n for n, _ in before ^ after})
        print(f"\nthe user's cache {USER_CACHE} changed during the run (a test or a process it "
              f"started bypassed FLOWERS_CACHE/HOME), so the run fails: {names[:10]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _SKIPPED_IN_CI:
        print("\nCI=true: these tests were skipped, so the run fails:\n  "
              + "\n  ".join(_SKIPPED_IN_CI))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def server(tmp_path: Path):
    """A loopback HTTP server of tmp_path/www (downloads without the internet): yields the
    folder and its base URL."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
