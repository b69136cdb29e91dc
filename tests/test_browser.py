"""The notebook in a real browser: JupyterLab runs every cell on synthetic data, draws charts,
and names a photo uploaded through the last cell's widget."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import CHROMIUM_ARGS, ROOT, chromium, make_image_folder, synthetic_image

if TYPE_CHECKING:  # playwright is optional: the fixture skips the test without it
    from playwright.sync_api import Page

pytestmark = pytest.mark.slow

NOTEBOOK = "Image_Classifier_Project.ipynb"
# Every cell in the DOM (no windowing), so the checks below see the whole notebook.
SETTINGS = {"@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True,
                                                       "windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                            "checkForUpdates": False}}
RUN_TIMEOUT_MS = 8 * 60 * 1000  # one CPU epoch plus cached activations on a busy 2-core box
STDERR = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'
SCREENSHOT = ROOT / "build" / "browser" / "notebook.png"
ASSET = ROOT / "assets" / "notebook_jupyterlab.png"

# Run All marks every queued cell [*] at once, so once none is left the run is over: finished,
# or stopped by an error (JupyterLab then drops the queued cells, so waiting longer would hang).
DONE_JS = """() => ![...document.querySelectorAll('.jp-Notebook .jp-InputArea-prompt')]
  .some(p => p.textContent.includes('[*]'))"""
STARTED_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-InputArea-prompt')]
  .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""


def _free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers, failing early with the log if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer {url} in {timeout} s:\n{log.read_text()}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server on loopback over a copy of the notebook and synthetic data: its URL,
    and the browser to open it in."""
    browser = chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip)")
    flowers = make_image_folder(tmp_path / "flowers", ["1", "2", "10"], per_class=4)
    nb_dir = tmp_path / "lab"
    nb_dir.mkdir()
    shutil.copy(ROOT / NOTEBOOK, nb_dir / NOTEBOOK)
    # Our own settings folder, so no user theme or layout leaks in; it also keeps dialogs and
    # toasts (kernel choice, news) from covering the notebook, and JupyterLab off the internet.
    for plugin, values in SETTINGS.items():
        path = tmp_path / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    # NB_* settings of the caller (NB_ARCH, ...) would change what the notebook runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NB_")}
    env |= {"FLOWERS_DIR": str(flowers), "NB_EPOCHS": "1",
            "FLOWERS_CACHE": str(tmp_path / "cache"),
            # The kernel runs in the notebook's temporary folder, yet must import our helpers.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    port = _free_port()
    jupyter = Path(sys.executable).parent / "jupyter"
    log = tmp_path / "jupyter.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.token=", "--ServerApp.password=", "--allow-root",
             f"--ServerApp.root_dir={nb_dir}"],
            env=env, cwd=nb_dir, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_http(f"{url}/api", server, log)
        yield url, browser
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _run_all_cells(page: Page) -> None:
    """Run > Run All Cells from the menu bar, as a user would, until a cell starts running."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for _ in range(3):
        page.locator(".lm-MenuBar-itemLabel:text-is('Run')").click()
        page.locator(".lm-Menu-itemLabel:text-is('Run All Cells')").click()
        try:
            # A click that lands while JupyterLab is still settling can be lost: check it took.
            page.wait_for_function(STARTED_JS, timeout=30_000)
            return
        except PlaywrightTimeoutError:
            page.keyboard.press("Escape")
    pytest.fail("Run > Run All Cells did not start the notebook")


def _try_your_photo(page: Page, tmp_path: Path) -> None:
    """Upload a synthetic photo through the last cell's FileUpload: its top-5 chart appears."""
    import numpy as np

    photo = tmp_path / "my_flower.png"
    synthetic_image(2, np.random.default_rng(5), size=(120, 90)).save(photo)
    cell = page.locator(".jp-CodeCell").last
    assert "try_your_photo" in cell.locator(".jp-InputArea").inner_text()
    button = cell.locator("button.widget-upload")
    button.wait_for(timeout=60_000)
    with page.expect_file_chooser() as chooser:  # as a user would: click, pick a file
        button.click()
    chooser.value.set_files(str(photo))
    chart = cell.locator(".jp-OutputArea-output img")
    chart.first.wait_for(timeout=120_000)
    verdict = cell.locator(".jp-OutputArea-output", has_text=re.compile("Most likely|Not sure"))
    verdict.first.wait_for(timeout=30_000)


def test_notebook_runs_in_jupyterlab_and_draws_charts(lab: tuple[str, Path],
                                                      tmp_path: Path) -> None:
    """Run > Run All Cells in headless Chromium: every cell runs, none fails, charts appear."""
    from playwright.sync_api import sync_playwright

    lab, executable = lab
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        try:
            page.goto(f"{lab}/lab/tree/{NOTEBOOK}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
            # Menus clicked before the kernel is up can be swallowed by its start-up.
            page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(
                timeout=120_000)
            _run_all_cells(page)
            page.wait_for_function(DONE_JS, timeout=RUN_TIMEOUT_MS, polling=1000)

            # Errors render as stderr text; a SyntaxError has no "Traceback" line, only its name.
            errors = page.locator(STDERR, has_text=re.compile(r"Traceback|^\w*(Error|Exception)\b",
                                                              re.MULTILINE))
            assert errors.count() == 0, errors.first.inner_text()
            prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            assert all(re.fullmatch(r"\[\d+\]:", t.strip()) for t in prompts), prompts
            assert page.locator(".jp-CodeCell").last.locator(".jp-OutputArea-output").count()
            images = page.locator(".jp-OutputArea-output img").count()
            assert images >= 8, f"only {images} charts rendered"
            _try_your_photo(page, tmp_path)

            # Fold the file browser away and show the sanity-check grid, the chart worth seeing.
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
            sanity = page.locator(".jp-CodeCell", has_text="plot_prediction_grid").first
            sanity.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            if os.environ.get("SAVE_ASSET") == "1":
                ASSET.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(SCREENSHOT, ASSET)
        except Exception:
            # What the page showed when it failed says more than a timeout does.
            with contextlib.suppress(Exception):
                page.screenshot(path=str(SCREENSHOT.with_name("failure.png")), full_page=True)
            raise
        finally:
            browser.close()
