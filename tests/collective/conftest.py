"""Collective tests: they run inside the MPI ranks, and call mpirl's collectives themselves.

    mpirun -np 2 python -m pytest tests/collective

Plain ``pytest`` skips them (without initialising MPI); ``tests/mpi/test_collective.py`` runs
them under mpirun as part of the main suite. ``mpi_plugin`` (imported here, so it governs this
folder's tests only) agrees on every outcome across the ranks and aborts the job on a hang.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # mpi_plugin

from mpi_plugin import *  # noqa: E402, F403  (its hooks, scoped to this folder as a conftest's are)


@pytest.fixture(scope="session")
def ctx() -> Any:
    """mpirl's distributed context on the CPU, with the backend MPIRL_TEST_BACKEND names
    (default horovod; tests/mpi/test_collective.py runs the suite with each)."""
    from mpirl import dist

    return dist.init("cpu", 1, os.environ.get("MPIRL_TEST_BACKEND", "horovod"))  # HVD: init (collective)


@pytest.fixture
def shared_tmp_path(ctx: Any) -> Iterator[str]:
    """A fresh folder, the same path on every rank: rank 0 creates it, a broadcast tells the others."""
    from mpirl import dist

    made = tempfile.mkdtemp(prefix="mpirl-collective-") if ctx.rank == 0 else None
    path = dist.broadcast_object(made, name="tests.shared_tmp_path")  # HVD: broadcast
    yield path
    dist.broadcast_object(None, name="tests.shared_tmp_path.done")  # HVD: every rank is done with it
    if ctx.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
