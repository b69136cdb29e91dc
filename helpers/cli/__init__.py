"""Command lines: `python -m helpers pipeline|train|predict|evaluate|export|cache`.

Exit status: 0 on success, 2 for usage errors (argparse), 1 for a mistake in the input
(one line on stderr naming the file or value, and what to do), 130 when a run is stopped
by Ctrl-C or SIGTERM after saving what can be resumed. A genuine bug still shows its
traceback. Nothing here imports torch: `predict` answers without it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from helpers.core.errors import Interrupted, Stopped, UserError
from helpers.core.files import FULL_DISK

# The OS errors a user causes: a missing file, no permission, a full disk or quota.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
READ_ONLY = (errno.EROFS,)


def build_parser(prog: str = "python -m helpers") -> argparse.ArgumentParser:
    """The argument parser of `python -m helpers`, its commands from the command modules."""
    from helpers.cli import (
        answer_commands,
        artefact_commands,
        doctor_command,
        teach_command,
        train_commands,
    )

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_commands, answer_commands, artefact_commands, doctor_command,
                   teach_command):
        module.add_commands(sub)
    return parser


def _is_user_error(err: BaseException) -> bool:
    """True for the project's own error types and the OS errors a user causes."""
    if isinstance(err, (UserError, *USER_OS_ERRORS)):
        return True
    return isinstance(err, OSError) and err.errno in FULL_DISK + READ_ONLY


def _one_line(err: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror.lower()}"
        if err.errno in READ_ONLY + (errno.EACCES,):
            text += f"; {_where_instead(err.filename)}"
    return text.splitlines()[0] if text else type(err).__name__


def _where_instead(filename: str) -> str:
    """What to do about a place that cannot be written: the cache has its own variable."""
    from helpers.core.files import cache_dir

    try:
        in_cache = Path(filename).resolve().is_relative_to(cache_dir().resolve())
    except (OSError, UserError):
        in_cache = False
    if in_cache:
        return "the cache folder cannot be written: set FLOWERS_CACHE to a writable folder"
    return "choose a writable folder (--save_dir, --out)"


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run a command; a user mistake prints one line on stderr and returns 1."""
    if argv is None or prog is not None:  # a process of its own (python -m helpers, train.py,
        # predict.py): SIGTERM and SIGHUP stop it cleanly from now on
        from helpers.core.device import stop_on_signals

        stop_on_signals()
    argv = sys.argv[1:] if argv is None else list(argv)
    if prog is not None:  # train.py / predict.py: their own name in usage and --help
        parser = build_parser(prog)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[argv[0]]
        command.prog = prog
        args = command.parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}",
                                                           file=sys.stderr)
    try:
        args.func(args)
    except Stopped as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 130
    except Interrupted as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (| head): stop quietly, as other tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except Exception as err:
        broken = _broken_install(err)
        if broken:
            print(f"error: {broken}", file=sys.stderr)
            return 1
        if not _is_user_error(err):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


def _broken_install(err: BaseException) -> str | None:
    """One line for a torch or torchvision that fails while it is imported (a torchvision
    built for another torch: "operator torchvision::nms does not exist"); None otherwise."""
    import traceback
    from importlib import metadata

    frames = traceback.extract_tb(err.__traceback__)
    importing = any((f.line or "").lstrip().startswith(("import ", "from ")) for f in frames)
    package = next((name for f in reversed(frames) for name in ("torchvision", "torch")
                    if f"{os.sep}{name}{os.sep}" in f.filename), None)
    if not (importing and package) and getattr(err, "name", None) not in ("torch",
                                                                           "torchvision"):
        return None
    package = package or err.name

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "(not installed)"

    torch, vision = version("torch"), version("torchvision")
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    base = torch.split("+")[0]
    try:
        major, minor = (int(x) for x in base.split(".")[:2])
        pair = f"pip install torch=={base} torchvision==0.{minor + 15}.*" if major == 2 else ""
    except ValueError:
        pair = ""
    if package == "torchvision":
        return (f"torchvision {vision} does not work with torch {torch} ({why}); install a "
                f"matching pair: {pair or 'see https://pytorch.org/get-started/locally'}")
    return (f"torch {torch} cannot be imported ({why}); reinstall it with a matching "
            f"torchvision: {pair or 'see https://pytorch.org/get-started/locally'}")
