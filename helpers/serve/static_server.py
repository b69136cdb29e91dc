"""A static file server for one folder on loopback: the folder's regular files and nothing
else (no listings, no links leading out of it, a malformed path answered 400, not a
traceback), with the cross-origin isolation headers that let a wasm runtime use threads.

Torch-free and imports nothing else of the package: `webapp.make_server` builds on it.
"""

from __future__ import annotations

import http.server
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import IO, Any

BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a % not followed by two hex digits
MIME_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
              ".webmanifest": "application/manifest+json", ".onnx": "application/octet-stream",
              ".json": "application/json"}


def resolve_request(root: str | os.PathLike, request_path: str) -> Path | int:
    """The regular file inside `root` that a request's path names, else an HTTP status:
    400 for a malformed path, 404 for anything missing, outside `root` or not a regular
    file, 301 for a folder asked for without its trailing slash (its index.html otherwise)."""
    path = request_path.split("?", 1)[0].split("#", 1)[0]
    if BAD_PERCENT.search(path):
        return 400
    try:
        name = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return 400
    if "\0" in name:
        return 400
    try:
        top = Path(root).resolve()
        target = (top / name.lstrip("/")).resolve()  # links followed: where it really is
        if target.is_dir():
            if not path.endswith("/"):
                return 301
            target = (target / "index.html").resolve()
        inside = target.is_relative_to(top) and target.is_file()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a name too long
        return 404
    return target if inside else 404


IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent before the server closes it


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Serves what resolve_request allows, with cross-origin isolation and no caching; a
    connection silent for IDLE_TIMEOUT seconds is closed (its thread freed)."""

    timeout = IDLE_TIMEOUT  # socketserver sets it on each connection
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self) -> None:
        """The isolation headers (wasm threads need them), then the blank line."""
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")  # the service worker does the caching
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: one line per file is noise here."""

    def send_head(self) -> IO[bytes] | None:
        """Send the headers for the requested file and return it open, or send an error."""
        target = resolve_request(self.directory, self.path)
        if target == 301:  # the page's relative links need the folder's slash
            self.send_response(301)
            # one leading slash: "//host/" would send the browser to another site
            self.send_header("Location", "/" + self.path.split("?", 1)[0].lstrip("/") + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if isinstance(target, int):
            self.send_error(target)
            return None
        try:
            file = open(target, "rb")  # noqa: SIM115 (do_GET copies it, then closes it)
        except OSError:
            self.send_error(404)
            return None
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(str(target)))
        self.send_header("Content-Length", str(os.fstat(file.fileno()).st_size))
        self.end_headers()
        return file

    def list_directory(self, path: str | os.PathLike) -> None:
        """No folder listings, whatever calls for one."""
        self.send_error(404)


class StaticServer(http.server.ThreadingHTTPServer):
    """A threading server on which a client dropping its connection is no traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away is routine; anything else is a bug and keeps its traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
