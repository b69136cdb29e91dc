"""The phone app's command under misuse and damage: a bad or busy port fails before the build,
the server gives out the app's regular files only, a damaged npm install is fetched again
(or refused in one line), and a full disk names --out and leaves no half-written file."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_webapp import tiny_ckpt  # noqa: F401 (the fixture: a random-weight checkpoint)

from conftest import ROOT
from helpers import cli
from helpers.core.errors import AppError
from helpers.core.files import file_sha256
from helpers.serve import webapp

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
WASM = "ort-wasm-simd-threaded.wasm"


@pytest.fixture
def no_build(monkeypatch):
    """build_app replaced by a failure: a test using it proves the build never started."""
    def refuse(*args, **kwargs):
        raise AssertionError("the build started before the port was checked")

    monkeypatch.setattr(webapp, "build_app", refuse)


@pytest.mark.parametrize("port", ["99999", "-5", "0", "80x"])
def test_a_port_out_of_range_is_a_usage_error_before_the_build(port, no_build, tmp_path,
                                                               capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["app", "ckpt.pth", "--out", str(tmp_path / "app"), "--serve", port])
    assert exit_.value.code == 2
    assert f"'{port}' is not a port: give one from 1 to 65535" in capsys.readouterr().err
    with pytest.raises(AppError, match="port 70000: not a TCP port"):
        webapp.make_server(tmp_path, port=70000, built=False)


def test_a_busy_port_is_one_line_before_the_build(no_build, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["app", "ckpt.pth", "--out", str(tmp_path / "app"), "--serve",
                         str(port)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: 127.0.0.1:{port}: cannot serve there")
    assert not (tmp_path / "app").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "app").write_text("not a folder")
    assert cli.main(["app", "ckpt.pth", "--out", str(tmp_path / "app")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'app'}: --out is a file; give a folder to write the app "
                   "into\n")


def _get(server, path: str) -> tuple[int, bytes, str | None]:
    """Status, body and Location of one raw GET (the path sent as is, unnormalised)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Location")
    finally:
        connection.close()


def test_the_server_gives_out_regular_files_inside_its_folder_only(tmp_path, capsys):
    app, secret = tmp_path / "app", tmp_path / "secret.txt"
    (app / "ort").mkdir(parents=True)
    (app / "docs").mkdir()
    (app / "index.html").write_text("page")
    (app / "ort" / "a.mjs").write_text("runtime")
    (app / "docs" / "index.html").write_text("docs page")
    secret.write_text("not for the phone")
    (app / "leak.txt").symlink_to(secret)
    (app / "outside").symlink_to(tmp_path)
    (app / "same.html").symlink_to(app / "index.html")  # a link that stays inside is fine
    os.mkfifo(app / "pipe")
    server = webapp.make_server(app, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _get(server, "/")[:2] == (200, b"page")
        assert _get(server, "/ort/a.mjs?v=1")[:2] == (200, b"runtime")
        assert _get(server, "/same.html")[:2] == (200, b"page")
        assert _get(server, "/docs/")[:2] == (200, b"docs page")  # a folder: its index.html
        assert _get(server, "/docs")[::2] == (301, "/docs/")
        assert _get(server, "//docs")[::2] == (301, "/docs/")  # never "//docs/": another host
        statuses = {path: _get(server, path)[0] for path in (
            "/ort/", "/ort", "/leak.txt", "/outside/secret.txt", "/../secret.txt",
            "/%2e%2e/secret.txt", "//etc/passwd", "/pipe", "/missing.js",
            "/%00", "/index.html%00.js", "/%zz", "/%4", "/%ff%fe")}
    finally:
        server.shutdown()
        server.server_close()
    assert statuses == {
        "/ort/": 404, "/ort": 301, "/leak.txt": 404, "/outside/secret.txt": 404,
        "/../secret.txt": 404, "/%2e%2e/secret.txt": 404, "//etc/passwd": 404, "/pipe": 404,
        "/missing.js": 404, "/%00": 400, "/index.html%00.js": 400, "/%zz": 400, "/%4": 400,
        "/%ff%fe": 400}
    assert "Traceback" not in capsys.readouterr().err


def _wasm_is_whole(dist: Path) -> bool:
    """The runtime file has the sha256 the lock file's tarball gives it."""
    record = json.loads((dist.parents[2] / "ort-files.json").read_text())
    return file_sha256(dist / WASM) == record["files"][WASM]


@pytest.mark.slow  # npm ci, twice
@needs_npm
def test_a_damaged_npm_install_is_fetched_again(tmp_path):
    dist = webapp.ort_dist()
    whole = (dist / WASM).stat().st_size
    (dist / WASM).write_bytes(b"")  # as an interrupted npm ci leaves it
    assert webapp.ort_dist() == dist
    assert (dist / WASM).stat().st_size == whole > 0 and _wasm_is_whole(dist)
    (dist / "ort.wasm.min.mjs").write_bytes(b"// truncated")  # damage of any size
    webapp.ort_dist()
    assert _wasm_is_whole(dist) and b"truncated" not in (dist / "ort.wasm.min.mjs").read_bytes()


@pytest.mark.slow  # npm ci, then a build
@needs_npm
def test_npm_that_keeps_damaging_the_runtime_is_one_line_and_no_app(tiny_ckpt, tmp_path,  # noqa: F811
                                                                    monkeypatch, capsys):
    """An npm whose `ci` always leaves a 0-byte wasm (a disk or npm fault): refused, exit 1."""
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n"{shutil.which("npm")}" "$@" || exit $?\n'
                    f'[ "$1" = ci ] && : > node_modules/onnxruntime-web/dist/{WASM}\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "app"
    assert cli.main(["app", str(tiny_ckpt[0]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "after a fresh npm ci" in err
    assert not out.exists()


FULL_DISK_SCRIPT = """
mount -t tmpfs -o size=4m tmpfs {disk} || exit 99
mkdir {disk}/old && echo old > {disk}/old/model.onnx
{python} -m helpers app {ckpt} --out {disk}/old; echo "rc=$?"
{python} -m helpers app {ckpt} --out {disk}/new; echo "rc=$?"
ls -AR {disk}
cat {disk}/old/model.onnx
"""


@pytest.mark.slow  # processes of their own
@needs_npm
def test_a_full_disk_names_out_and_leaves_no_half_written_file(tiny_ckpt, tmp_path):  # noqa: F811
    """A 4 MB disk for a 13 MB model: the previous model.onnx stays whole, a new app folder
    goes again, no temporary file is left, and the error names --out."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private tmpfs needs root and unshare (CI runs as root)")
    webapp.ort_dist()  # the runtime in the cache, outside the small disk
    disk = tmp_path / "disk"
    disk.mkdir()
    script = FULL_DISK_SCRIPT.format(disk=disk, python=sys.executable, ckpt=tiny_ckpt[0])
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          errors="replace", cwd=ROOT, timeout=600)
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    errors = done.stderr.strip().splitlines()
    assert done.stdout.count("rc=1") == 2, done.stdout + done.stderr
    assert len(errors) == 2, errors
    for line, out in zip(errors, ("old", "new"), strict=True):
        assert line.startswith(f"error: no space left on the device holding {disk / out} ")
    listing = done.stdout.split("rc=1")[-1]
    assert ".tmp" not in listing and ".build-" not in listing and "new" not in listing
    assert done.stdout.rstrip().endswith("old")  # the previous model.onnx, whole


def test_an_idle_connection_is_closed_and_frees_its_thread(tmp_path, monkeypatch):
    """Connections that send nothing (550 held threads for ever before) are closed after the
    idle timeout; the server keeps answering."""
    import socket

    from helpers.serve import static_server

    monkeypatch.setattr(static_server.StaticHandler, "timeout", 0.5)
    (tmp_path / "index.html").write_text("page")
    server = webapp.make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        idle = [socket.create_connection(server.server_address) for _ in range(20)]
        deadline = time.time() + 10
        for conn in idle:
            conn.settimeout(max(0.1, deadline - time.time()))
            assert conn.recv(1) == b""  # closed by the server, not by us
            conn.close()
        assert _get(server, "/")[:2] == (200, b"page")
    finally:
        server.shutdown()
        server.server_close()
