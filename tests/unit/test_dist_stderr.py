"""dist.stderr_taken: a rank's error line reaches the launcher before the rank exits (mpirun
ends the job at the first non-zero exit and drops what it has not read from a rank's pipe)."""

from __future__ import annotations

import select
import subprocess
import sys

from mpirl import dist

CHILD = """
import sys
from mpirl import dist
sys.stderr.write("mpirl: error: bad input\\n")
taken = dist.stderr_taken({timeout})
sys.stdout.write(f"taken {{taken}}\\n")
sys.stdout.flush()
"""


def _child(timeout: float) -> subprocess.Popen:
    code = CHILD.format(timeout=timeout)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_waits_until_the_reader_has_taken_the_line():
    proc = _child(timeout=60)
    try:
        assert select.select([proc.stderr], [], [], 60)[0]  # the line is in the pipe, unread
        # While it stays unread the child must not get past stderr_taken.
        assert not select.select([proc.stdout], [], [], 1.5)[0]
        assert proc.stderr.readline() == b"mpirl: error: bad input\n"
        out, _ = proc.communicate(timeout=60)
        assert out == b"taken True\n"
    finally:
        proc.kill()


def test_gives_up_at_its_deadline_when_nobody_reads():
    proc = _child(timeout=0.3)
    try:
        assert proc.stdout.readline() == b"taken False\n"  # stderr not read yet
        assert proc.stderr.readline() == b"mpirl: error: bad input\n"
    finally:
        proc.kill()
        proc.communicate()


def test_a_file_or_terminal_is_never_behind(tmp_path, monkeypatch):
    with open(tmp_path / "err.txt", "w") as fh:
        monkeypatch.setattr(sys, "stderr", fh)
        fh.write("mpirl: error: bad input\n")
        assert dist.stderr_taken(0.0) is True
