"""Every error a user can cause, in one place: each derives from `UserError`, so the command
lines print it as one line (naming the file or value, and what to do), while a genuine bug
still shows its traceback. Torch-free: the command lines and the engine import it."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for or gave; the message is one line saying what to do.

    Every error type of the project that a user can cause derives from it, so the command
    lines print it in one line, while a genuine bug still shows its traceback.
    """


class Stopped(Exception):
    """Work stopped on a signal between two steps, after saving what can be resumed."""


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM after saving; the message says how to resume it."""


class RunStopped(Interrupted):
    """A training run stopped by a signal; `state` is its resumable state (None: nothing to
    resume), `final` True when it was the final model that stopped (the first run is done)."""

    def __init__(self, message: str, *, state: Path | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.state, self.final = state, final


class FolderError(UserError):
    """An output folder cannot be written, or another run is saving into it; the command line
    names the option that chooses another."""


class DiskFullError(UserError, OSError):
    """A save did not fit on its disk; the previous file is whole and no temporary file is left."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


class DataError(UserError):
    """The data folder or a names file is missing or malformed; the message says what to do."""


class ImageError(UserError, ValueError):
    """An image file cannot be read; the message names the file and what to do."""


class FixesError(UserError):
    """A fixes file is missing, malformed, or names a photo or class the data lacks."""


class BackboneError(UserError):
    """A backbone is unknown or its pretrained weights cannot be had."""


class CheckpointError(UserError):
    """A file is not a checkpoint this version can load; the message says why."""


class AppError(UserError):
    """The app cannot be built; the message names the file or tool at fault and what to do."""
