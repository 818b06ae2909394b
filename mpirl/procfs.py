"""Linux /proc, read without failing: a process's or thread's scheduler fields and names. Off
Linux, or for a process that has gone, every reader returns empty."""

from __future__ import annotations


def read(path: str) -> str:
    """A /proc file's text; "" when it cannot be read (no /proc, or the process or thread ended)."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def stat_fields(path: str) -> list[str]:
    """The fields of a ``stat`` file after "(comm)" (which may hold spaces and parentheses):
    ``[0]`` the state (R, S, D, Z, ...), ``[19]`` the start time in clock ticks since boot, as
    proc(5) numbers them from 3 and 22. Empty when unreadable."""
    parts = read(path).rsplit(")", 1)
    return parts[1].split() if len(parts) == 2 else []
