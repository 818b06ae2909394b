"""The job's ranks as processes (host, pid), recorded at start, so that a rank whose collective
fails because a peer died can name that peer: "rank 1 (pid 4242 on node7) is no longer
running". Only ranks on this rank's host can be checked; a peer elsewhere is named by the
launcher (mpirun: "process rank 1 ... exited on signal 9"; srun: "task 1 ... Killed").
"""

from __future__ import annotations

import os
import socket
import time

from mpirl import procfs

_PEERS: list[tuple[str, int]] = []  # by rank: (host name, pid)


def me() -> tuple[str, int]:
    """This process, as it is recorded."""
    return socket.gethostname(), os.getpid()


def record(peers: list[tuple[str, int]]) -> None:
    """Remember every rank's ``me()`` (gathered by mpirl.dist at start, in rank order)."""
    _PEERS[:] = [(str(h), int(p)) for h, p in peers]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    fields = procfs.stat_fields(f"/proc/{pid}/stat")  # a zombie (exited, not yet reaped) is gone too
    return not fields or fields[0] != "Z"


def gone(settle_s: float = 1.0) -> list[str]:
    """The ranks on this host that are no longer running, as "rank R (pid P on HOST)", after
    waiting up to ``settle_s`` for a dying peer to finish dying. Empty when none is known."""
    host, _ = me()
    deadline = time.monotonic() + settle_s
    while True:
        dead = [f"rank {r} (pid {p} on {h})" for r, (h, p) in enumerate(_PEERS) if h == host and not _alive(p)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.1)
