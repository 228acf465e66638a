"""A reader that goes away (closed pipe) never crashes a command nor cuts its work short:
:class:`clm_stratify.cli.output.GuardedStream` and the exit code of :func:`clm_stratify.cli.main`
(141 when the result was not all delivered, the command's own code when it failed).
The real processes and pipes of every command: tests/integration/test_closed_pipe.py."""

from __future__ import annotations

import errno
import io
import os
import stat
import sys

import pytest

from fhir_adapters.project import EXIT_CLOSED_PIPE

from clm_stratify.cli import main, output
from fixtures import FIXTURES_DIR

BUNDLE = str(FIXTURES_DIR / "05-borderline-size-50mm-exact.json")


class ReaderGone(io.StringIO):
    """A stream whose reader went away: every write and flush fails with EPIPE (or ``code``)."""

    def __init__(self, code: int = errno.EPIPE) -> None:
        super().__init__()
        self.code, self.attempts = code, 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise OSError(self.code, os.strerror(self.code))   # EPIPE: a BrokenPipeError

    def flush(self) -> None:
        raise OSError(self.code, os.strerror(self.code))


@pytest.fixture
def closed_pipe_stream():
    """A text stream on the write end of a real pipe whose read end is closed."""
    r, w = os.pipe()
    os.close(r)
    stream = open(w, "w")
    yield stream
    stream.close()


def test_guarded_stream_on_a_closed_pipe_drops_output_and_points_at_devnull(closed_pipe_stream):
    guard = output.GuardedStream(closed_pipe_stream)
    assert guard.write("x" * 200_000) == 200_000     # more than a pipe holds: the write reaches the fd
    assert guard.closed_by_reader
    assert stat.S_ISCHR(os.fstat(closed_pipe_stream.fileno()).st_mode)   # /dev/null now
    assert guard.write("more\n") == 5
    guard.flush()
    closed_pipe_stream.flush()                        # what was buffered goes nowhere, no error


def test_guarded_stream_notices_the_closed_pipe_on_flush(closed_pipe_stream):
    guard = output.GuardedStream(closed_pipe_stream)
    guard.write("one line\n")                         # buffered: nothing reaches the pipe yet
    assert not guard.closed_by_reader
    guard.flush()
    assert guard.closed_by_reader


def test_guarded_stream_passes_writes_and_attributes_through():
    inner = io.StringIO()
    guard = output.GuardedStream(inner)
    print("hello", file=guard)
    guard.writelines(["a", "b\n"])
    assert inner.getvalue() == "hello\nab\n" and guard.getvalue() == inner.getvalue()
    assert not guard.isatty() and not guard.closed_by_reader


def test_other_write_errors_are_not_hidden():
    guard = output.GuardedStream(ReaderGone(errno.ENOSPC))
    with pytest.raises(OSError):
        guard.write("disk full?")
    assert not guard.closed_by_reader


def test_a_reset_socket_is_a_reader_gone_too():
    guard = output.GuardedStream(ReaderGone(errno.ECONNRESET))
    guard.write("x")
    assert guard.closed_by_reader


@pytest.mark.parametrize("argv", [["rules", "validate"], ["classify", "--bundle", BUNDLE],
                                  ["classify", "--bundle", BUNDLE, "--format", "json"]])
def test_main_exits_141_when_stdout_was_closed(argv, monkeypatch, capsys):
    gone = ReaderGone()
    monkeypatch.setattr(sys, "stdout", gone)
    assert main(argv) == EXIT_CLOSED_PIPE
    assert gone.attempts == 1                         # the first write found it; the rest was dropped
    assert sys.stdout is gone                         # put back
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["rules", "validate", "--help"]])
def test_argparse_exits_141_too(argv, monkeypatch):
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_CLOSED_PIPE


def test_a_failure_keeps_its_own_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert main(["classify", "--bundle", "/nonexistent/bundle.json"]) == 2
    assert "file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_closed_stderr_keeps_the_result_and_the_exit_code(monkeypatch, capsys):
    assert main(["classify", "--bundle", BUNDLE]) == 0
    want = capsys.readouterr().out
    monkeypatch.setattr(sys, "stderr", ReaderGone())
    assert main(["classify", "--bundle", BUNDLE]) == 0
    assert capsys.readouterr().out == want
    assert main(["classify", "--bundle", "/nonexistent/bundle.json"]) == 2   # its message is lost, not its code


def test_main_puts_the_streams_back(capsys):
    before = sys.stdout, sys.stderr
    assert main(["rules", "validate"]) == 0
    assert (sys.stdout, sys.stderr) == before
    assert "is valid" in capsys.readouterr().out


def test_stderr_closed_before_the_start_does_not_leak_onto_stdout(monkeypatch, capsys):
    """``2>&-``: Python starts with ``sys.stderr`` None, and ``print(..., file=None)`` writes on
    standard output; the error message goes nowhere instead, the exit code stays 2."""
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["classify", "--bundle", "/nonexistent/bundle.json"]) == 2
    assert sys.stderr is None
    assert capsys.readouterr().out == ""
