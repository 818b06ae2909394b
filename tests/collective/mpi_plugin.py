"""pytest inside MPI ranks: ``mpirun -np 2 python -m pytest tests/collective``.

Every rank runs the same tests in the same order; the tests call collectives themselves. This
plugin makes that safe and readable (the design of mpi4py's and pytest-mpi's own suites):

- **Single process**: with no launcher announcing two or more ranks (plain ``pytest``), every
  test it governs is skipped at once, without initialising MPI.
- **Same tests everywhere**: after collection the ranks compare their test ids (and collection
  error counts) with one allgather; if they differ, every rank stops with a usage error that
  names what differs, before any test runs.
- **One outcome per test**: after each phase (setup, call, teardown) the ranks exchange their
  outcome and a one-line message with one allgather on a communicator of their own. A test that
  failed on any rank fails on every rank, with ``failed on rank R: <its error>``; one skipped on
  some rank (and failed nowhere) is skipped everywhere. So pytest's control flow (run the call
  phase or not, ``-x``) and its exit code are the same on every rank.
- **Never a hang**: a watchdog thread gives each test ``MPIRL_COLLECTIVE_TIMEOUT`` seconds
  (default 120). Past it, the rank prints the test id, its rank and every thread's stack to the
  real stderr, and calls ``MPI_Abort`` on COMM_WORLD, which ends the whole job non-zero. That
  also covers a test that raised on one rank while its peer waits in a collective of the same
  test, and a rank that stops early (``pytest.exit``, KeyboardInterrupt): such a rank aborts the
  job itself. A faulthandler timer (30 s later, no GIL needed) ends the process if even the
  watchdog cannot run. At exit the ranks wait for each other, bounded by the same timeout.

Use it from a ``conftest.py`` (``from mpi_plugin import *``: then it governs that directory's
tests only) or with ``-p mpi_plugin`` (then every test of the session) with this folder on
``PYTHONPATH``. It needs mpi4py, and nothing of mpirl.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import threading
import time
from typing import Any, Optional

import pytest

__all__ = [
    "pytest_collection_finish",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_runtest_setup",
    "pytest_terminal_summary",
    "pytest_unconfigure",
]

TIMEOUT_ENV = "MPIRL_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
RUN_HINT = "run under MPI with 2+ ranks: mpirun -np 2 python -m pytest tests/collective"
_BACKSTOP_S = 30.0  # faulthandler's exit=True timer, past the watchdog's deadline
_ABORT_GRACE_S = 2.0  # between a rank's stack dump and MPI_Abort: peers' watchdogs dump theirs too


def launcher_world_size() -> int:
    """World size as the launcher announced it in the environment (1 if none), read without
    initialising MPI. SLURM_NTASKS is left out on purpose: a batch script's shell has it too."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


class _Watchdog:
    """Aborts the job when the armed deadline passes before ``disarm``."""

    def __init__(self, rank: int, err_fd: int, abort: Any) -> None:
        self.rank, self.err_fd, self._abort = rank, err_fd, abort
        self._cv = threading.Condition()
        self._label: Optional[str] = None
        self._deadline = 0.0
        self._limit = 0.0
        threading.Thread(target=self._run, name="mpi-plugin-watchdog", daemon=True).start()

    def arm(self, label: str, timeout: float) -> None:
        with self._cv:
            self._label, self._limit, self._deadline = label, timeout, time.monotonic() + timeout
            self._cv.notify()
        faulthandler.dump_traceback_later(timeout + _BACKSTOP_S, exit=True, file=self.err_fd)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._cv:
            self._label = None
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                if self._label is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                label, limit = self._label, self._limit
                break
        _write(
            self.err_fd,
            f"\nmpi_plugin: rank {self.rank}: {label} did not finish within {limit:g} s ({TIMEOUT_ENV}); "
            f"a rank is stuck (a collective its peers never reached?). Stacks of rank {self.rank}:\n",
        )
        faulthandler.dump_traceback(file=self.err_fd, all_threads=True)
        _write(self.err_fd, f"mpi_plugin: rank {self.rank}: aborting the job (MPI_Abort) after {label}\n")
        time.sleep(_ABORT_GRACE_S)
        self._abort(1)


def _write(fd: int, text: str) -> None:
    """One write per message (mpirun forwards each rank's stream line by line)."""
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


class _State:
    enabled = False
    rank = 0
    size = 1
    timeout = DEFAULT_TIMEOUT_S
    comm: Any = None  # outcome agreement
    exit_comm: Any = None  # the bounded barrier at exit, apart so it never matches a test's collective
    err_fd = 2
    watchdog: Optional[_Watchdog] = None


_S = _State()


def _abort(code: int) -> None:
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(code)
    os._exit(code)  # not reached


def pytest_configure(config: pytest.Config) -> None:
    if _S.enabled or launcher_world_size() < 2:
        return  # plain pytest: MPI stays uninitialised, tests are skipped in pytest_runtest_setup
    from mpi4py import MPI  # initialises MPI (MPI_THREAD_MULTIPLE; Horovod reuses it later)

    world = MPI.COMM_WORLD
    if world.Get_size() < 2:
        return
    _S.rank, _S.size = world.Get_rank(), world.Get_size()
    _S.timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    _S.comm = world.Dup()  # MPI: collective (pytest_configure runs on every rank)
    _S.exit_comm = world.Dup()  # MPI: collective
    # Capture (--capture=fd) redirects fd 2 while a test runs; the watchdog must reach the terminal.
    _S.err_fd = os.dup(2)
    _S.watchdog = _Watchdog(_S.rank, _S.err_fd, _abort)
    _S.enabled = True


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _S.enabled:
        return
    _S.enabled = False
    # Wait (bounded) until every rank got here: a rank that ends its session early (a usage
    # error on it alone) must not leave its peers blocked in a collective, nor block in
    # MPI_Finalize itself.
    req = _S.exit_comm.Ibarrier()  # MPI: non-blocking barrier, polled with a deadline
    deadline = time.monotonic() + _S.timeout
    while not req.Test():
        if time.monotonic() > deadline:
            _write(
                _S.err_fd,
                f"mpi_plugin: rank {_S.rank}: pytest ended here, but not on every rank within "
                f"{_S.timeout:g} s; aborting the job (MPI_Abort)\n",
            )
            _abort(1)
        time.sleep(0.01)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _S.enabled:
        pytest.skip(RUN_HINT)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Check that every rank collected the same tests, before any of them runs."""
    if not _S.enabled:
        return
    ids = [item.nodeid for item in session.items]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    assert _S.watchdog is not None
    _S.watchdog.arm("collection", _S.timeout)
    try:
        everyone = _S.comm.allgather((digest, len(ids), session.testsfailed))  # MPI: allgather
        if len(set(everyone)) == 1:
            return
        all_ids = _S.comm.allgather(ids)  # MPI: allgather (every rank saw the mismatch alike)
    finally:
        _S.watchdog.disarm()
    lines = [f"rank {r}: {n} test(s), {errors} collection error(s)" for r, (_, n, errors) in enumerate(everyone)]
    common = set(all_ids[0]).intersection(*map(set, all_ids[1:]))
    for r, rank_ids in enumerate(all_ids):
        only = [i for i in rank_ids if i not in common]
        if only:
            lines.append(f"only on rank {r}: {', '.join(only[:5])}{' ...' if len(only) > 5 else ''}")
    # Every rank raises the same error, so no rank waits for another; pytest exits 4 everywhere.
    raise pytest.UsageError("mpi_plugin: the MPI ranks collected different tests:\n  " + "\n  ".join(lines))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Any:
    if not _S.enabled:
        yield
        return
    assert _S.watchdog is not None
    _S.watchdog.arm(f"test {item.nodeid}", _S.timeout)
    outcome = yield
    _S.watchdog.disarm()
    excinfo = getattr(outcome, "excinfo", None) or getattr(outcome, "_excinfo", None)
    if excinfo is not None:
        # pytest.exit or KeyboardInterrupt on this rank: its session ends here while its peers
        # carry on into collectives it will never join, so take the whole job down now.
        exc = excinfo[1]
        _write(
            _S.err_fd,
            f"mpi_plugin: rank {_S.rank}: pytest stopped during {item.nodeid} "
            f"({type(exc).__name__}: {exc}); aborting the job (MPI_Abort)\n",
        )
        _abort(1)


class PeerFailure:
    """The report of a test that passed here but failed on other ranks (a TerminalRepr-alike:
    ``reprcrash.message`` is what pytest's short summary shows)."""

    class _Crash:
        def __init__(self, message: str) -> None:
            self.message = message

    def __init__(self, summary: str, details: list[str]) -> None:
        self.reprcrash = self._Crash(summary)
        self.lines = [summary, *details]

    def toterminal(self, tw: Any) -> None:
        for line in self.lines:
            tw.line(line, red=True)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _one_line(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", ""):
        lines = crash.message.splitlines()
    elif isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, lineno, reason)
        lines = [str(longrepr[2])]
    else:
        lines = list(reversed(str(longrepr or "").splitlines()))  # a text traceback: its last line
    lines = [line.strip() for line in lines if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "AssertionError:" and the message on the next line
        lines[0] = f"{lines[0]} {lines[1]}"
    return lines[0][:300] if lines else report.outcome


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """Agree on this phase's outcome across the ranks (outermost wrapper: after xfail handling)."""
    outcome = yield
    if not _S.enabled:
        return
    report: pytest.TestReport = outcome.get_result()
    # An xfail is a skip to pytest; keep it apart, so that it never makes the other ranks skip.
    kind = "xfailed" if report.skipped and hasattr(report, "wasxfail") else report.outcome
    mine = (kind, "" if report.passed else _one_line(report))
    if report.failed:
        # At once, not only in the final report: if a peer now hangs in a collective of this
        # test, this line is what explains the watchdog's abort.
        _write(_S.err_fd, f"mpi_plugin: rank {_S.rank}: {item.nodeid} ({call.when}) failed here: {mine[1]}\n")
    everyone = _S.comm.allgather(mine)  # MPI: allgather (one per test phase, on every rank)
    failed = [r for r, (o, _) in enumerate(everyone) if o == "failed"]
    skipped = [r for r, (o, _) in enumerate(everyone) if o == "skipped"]
    if failed:
        by_message: dict[str, list[int]] = {}
        for r in failed:
            by_message.setdefault(everyone[r][1], []).append(r)
        summary = "; ".join(f"failed on {_ranks(ranks)}: {message}" for message, ranks in by_message.items())
        table = "\n".join(f"rank {r}: {o}{': ' + m if m else ''}" for r, (o, m) in enumerate(everyone))
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None and hasattr(crash, "message"):
                crash.message = summary
            elif not isinstance(report.longrepr, (tuple, type(None))):
                report.longrepr = f"{summary}\n{report.longrepr}"
        else:
            report.outcome = "failed"
            details = [f"(passed on rank {_S.rank}; the traceback is in the output of {_ranks(failed)})"]
            report.longrepr = PeerFailure(summary, details)  # type: ignore[assignment]
        report.sections.append(("MPI ranks", f"{summary}\n{table}"))
    elif skipped and len(skipped) < len(everyone) and kind != "xfailed":
        # Skipped on some ranks only: skipped on all, saying where (a skip everywhere stays as it is).
        reason = everyone[skipped[0]][1].removeprefix("Skipped: ")
        path, lineno = item.location[0], (item.location[1] or 0) + 1  # the test's line, alike on every rank
        report.outcome = "skipped"
        report.longrepr = (path, lineno, f"Skipped: skipped on {_ranks(skipped)}: {reason}")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line per rank with its counts, naming the rank, so each rank's result can be told apart."""
    if not _S.enabled or exitstatus == pytest.ExitCode.USAGE_ERROR:
        return
    counts = []
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        reports = [r for r in terminalreporter.stats.get(key, []) if getattr(r, "when", "call") != "collect"]
        if reports or key in ("passed", "failed"):
            counts.append(f"{len(reports)} {key}")
    terminalreporter.write_line(f"mpi_plugin: rank {_S.rank} of {_S.size}: {', '.join(counts)}")
