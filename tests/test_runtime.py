"""The run-time module: progress in logs, atomic writes, the stop flag, the device."""

from __future__ import annotations

import errno
import signal

import pytest

from helpers.core import distributed
from helpers.core.device import StopFlag, progress
from helpers.core.errors import DiskFullError
from helpers.core.files import atomic_write, atomic_write_bytes


def test_progress_in_logs_is_a_few_lines_with_rate_and_time_left(capsys):
    items = list(progress(range(5), desc="extract", every=0.0))
    assert items == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.rstrip().splitlines()
    assert lines[0].startswith("  extract: 1/5 batches, ") and "s left" in lines[0]
    assert lines[-1].startswith("  extract: 5 batches in ")  # the phase's closing line
    assert not any("\r" in line for line in lines)  # no bar animation in a log


def test_progress_is_quiet_for_short_phases(capsys):
    assert sum(progress(range(3), desc="probe", every=60.0)) == 3
    assert capsys.readouterr().err == ""


def test_atomic_write_turns_enospc_into_one_line_and_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "file.bin"
    atomic_write_bytes(b"old", target)

    def fill(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on the device holding "
                                                     f"{target.parent}"):
        atomic_write(target, fill)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == [
        "file.bin"]
    assert isinstance(DiskFullError("x"), OSError)  # callers catching OSError still do


def test_other_write_failures_keep_their_own_error(tmp_path):
    def broken(f):
        raise ValueError("a bug, not the user's")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_stop_flag_catches_signals_only_while_watching():
    stop = StopFlag()
    before = signal.getsignal(signal.SIGTERM)
    with stop.watch():
        signal.raise_signal(signal.SIGTERM)  # handled: the flag is set, nothing raised
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_single_process_agrees_with_itself():
    one = distributed.Distributed()
    assert one.is_main and one.agree(True) and not one.agree(False)
