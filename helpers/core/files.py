"""Where files live and how they are trusted: the cache folder, the sha256 sealed beside
each cached file (checked before use; a damaged file is deleted and rebuilt), output folders
checked before work starts, and the lock that lets one run at a time save into a folder.

Also: every file written whole or not at all (atomic writes, a full disk one line), with
the mode a plain open() gives, and one reader for the JSON files users give. Torch-free, in
the bottom layer (core), so that the prediction engine and the command lines use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the command lines and the engine start without it
    pass
import fcntl
import socket

from helpers.core.errors import DiskFullError, FolderError, UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(folder: str | os.PathLike, *, needed: int = 0) -> str:
    """One line for a full disk: which folder, how much is free, what to do."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    want = f"free at least {max(needed - free, 1) / 1e6:.0f} MB" if needed else "free some space"
    return (f"no space left on the device holding {folder} ({free / 1e6:.0f} MB free): "
            f"{want} or choose another folder (--save_dir, --out, $FLOWERS_CACHE)")


def not_a_file(path: str | os.PathLike, what: str) -> str:
    """Why `path` cannot be read as a `what` file: missing, or not a regular file."""
    path = Path(path)
    if not os.path.lexists(path):
        return f"no such {what} file; check the path"
    kind = ("a folder" if path.is_dir() else "a named pipe (FIFO)" if path.is_fifo()
            else "a device" if path.is_char_device() or path.is_block_device()
            else "a socket" if path.is_socket() else "a broken link" if path.is_symlink()
            else "not readable")
    return f"not a regular file ({kind}); give a {what} file"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore, the only portable way to read it
    os.umask(mask)
    return mask


def saved_mode(path: str | os.PathLike) -> int:
    """The mode a saved file ends with: the mode of the file it replaces, else what a plain
    open() would give (0666 less the umask), never the 0600 of a temporary file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A crash, a kill or a full disk leaves the previous file whole and no temporary file. The
    file ends with the mode of the one it replaced, else the umask's (as open() gives).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, saved_mode(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_is_full(path.parent, err)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(disk_full_message(path.parent)) from None
        raise
    return path


def _disk_is_full(folder: Path, err: BaseException) -> bool:
    """True when a failed write failed for want of space (torch.save reports a full disk as
    a RuntimeError about the zip position, not as ENOSPC)."""
    if isinstance(err, OSError) and err.errno in FULL_DISK:
        return True
    if not isinstance(err, OSError | RuntimeError):
        return False
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` atomically (see atomic_write)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write bytes to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file to `path` atomically (see atomic_write)."""
    def write(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    return atomic_write(path, write)


def cache_dir() -> Path:
    """The cache folder: $FLOWERS_CACHE when set, else the user's cache directory."""
    if os.environ.get("FLOWERS_CACHE"):
        folder = Path(os.environ["FLOWERS_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "flower-classifier"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: the cache folder is a file; set FLOWERS_CACHE to a folder")
    return folder


def runtime_choice() -> Path:
    """The file where the cached recipe keeps the trunk runtime it measured fastest here."""
    return cache_dir() / "trunk_runtime.json"


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be written, before any work starts."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:  # a real write: permissions alone do not tell (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise FolderError(f"{folder}: cannot write there ({probe}: {err.strerror or err}); "
                          "choose another folder") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def seal(path: str | os.PathLike) -> Path:
    """Store the sha256 of a cached file beside it (written after the file itself)."""
    path = Path(path)
    atomic_write_bytes(file_sha256(path).encode(), _sidecar(path))
    return path


def is_intact(path: str | os.PathLike) -> bool:
    """True when a cached file and its stored sha256 exist and agree; else both are deleted."""
    path = Path(path)
    try:
        if path.is_file() and file_sha256(path) == _sidecar(path).read_text().strip():
            return True
    except OSError:
        pass
    with contextlib.suppress(OSError):  # a read-only cache: the caller builds it elsewhere
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
    return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold FOLDER/.lock for the block: one run saves into a folder at a time.

    A second run fails at once in one line naming the first one's pid. The kernel releases the
    lock when its process ends in any way (a crash or a kill included), so a lock left behind
    by a dead run is taken over, never waited for.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        try:  # never through a link: a planted FOLDER/.lock -> ~/.bashrc is not truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise FolderError(f"{path} is a symbolic link, not a lock this project made; "
                              "remove it, or choose another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid = f" (pid {holder[0]})" if holder else ""
            raise FolderError(f"{folder}: another run{pid} is saving into this folder; wait "
                              "for it to finish or choose another folder") from None
        try:  # the file may have been removed by a holder that just finished: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


JSON_LIMIT = 64 << 20  # bytes: a names, fixes or settings file is a few kB


def read_json(path: str | os.PathLike, *, what: str, error: type[UserError] = UserError,
              limit: int = JSON_LIMIT) -> Any:
    """The decoded JSON of a file a user gives (a BOM is fine), or one line naming the file
    and what is wrong: missing, not a regular file, too large, not UTF-8, not JSON, numbers
    too long or arrays nested too deep to read. `what` names the file in the message."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise error(f"{path}: not a regular file; give a {what} (JSON)")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    if len(data) > limit:
        raise error(f"{path}: over {limit >> 20} MB, too large for a {what}")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); fix the "
                    f"{what}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err}); fix the {what}") from None
    except (ValueError, RecursionError) as err:  # a 5,000-digit number; arrays 10^4 deep
        reason = "nested too deep" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise error(f"{path}: cannot be read as JSON ({reason}); fix the {what}") from None
