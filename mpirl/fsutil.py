"""Durable file operations: what a crash at any moment may leave behind is either the old
file or the new one, whole (write a temporary, fsync it, rename it over, fsync the folder)."""

from __future__ import annotations

import os


def fsync(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically and durably (``<path>.tmp`` in between)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync(os.path.dirname(path) or ".")
