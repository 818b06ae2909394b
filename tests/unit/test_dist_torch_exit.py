"""``dist_torch.workers_idle``, the wait that keeps a finished torch-backend rank from aborting at
interpreter exit: it returns only once every thread of the given name sleeps, within its deadline.
Threads stand in for Gloo's workers by taking their name (Linux: /proc/self/task/<tid>/comm)."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import pytest

from mpirl.dist_torch import GLOO_WORKER, workers_idle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
NAME = "mpirl_test_wkr"  # at most 15 characters, as the kernel keeps them


def _named_worker(busy_s: float, stop: threading.Event) -> threading.Thread:
    """A thread named NAME that computes without the GIL (hashing a large buffer) for ``busy_s``
    seconds, as a Gloo worker finishing a collective, then sleeps until ``stop``."""
    ready = threading.Event()

    def run() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w", encoding="ascii") as fh:
            fh.write(NAME)
        ready.set()
        block, end = os.urandom(1 << 22), time.monotonic() + busy_s
        while time.monotonic() < end and not stop.is_set():
            hashlib.sha256(block).digest()  # releases the GIL for large inputs: state R
        stop.wait()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    return t


def test_waits_while_a_worker_runs_and_returns_once_it_sleeps():
    stop = threading.Event()
    worker = _named_worker(0.4, stop)
    try:
        t0 = time.monotonic()
        assert workers_idle(NAME, timeout=5.0)
        assert time.monotonic() - t0 >= 0.3  # it did wait for the busy stretch
    finally:
        stop.set()
        worker.join(5)


def test_gives_up_at_its_deadline_when_a_worker_never_sleeps():
    stop = threading.Event()
    worker = _named_worker(60.0, stop)
    try:
        t0 = time.monotonic()
        assert not workers_idle(NAME, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        worker.join(5)


def test_returns_at_once_without_such_threads():
    t0 = time.monotonic()
    assert workers_idle(GLOO_WORKER + "_none", timeout=5.0)
    assert time.monotonic() - t0 < 0.5
