"""tests/collective under mpirun, and proof that its plugin fails every rank together, never hangs.

``tests/collective`` runs inside the ranks (``mpirun -np 2 python -m pytest tests/collective``);
plain ``pytest`` skips it. Here the main suite runs it under mpirun, then runs small test files
that misbehave on one rank only, with the same plugin (``-p mpi_plugin``), and checks what each
rank reports. ``--tag-output`` prefixes every line with its rank, so each rank's output is read apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from mpi_launch import MPIRUN, mpi_env, run

pytestmark = pytest.mark.mpi
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_DIR = os.path.join(REPO, "tests", "collective")


def _mpirun_pytest(args, cwd, timeout, env=None):
    """``mpirun -np 2 python -m pytest ARGS`` as a user types it (no ``-m mpi4py``: the plugin
    alone must turn one rank's failure or hang into the job's), each line tagged with its rank."""
    if MPIRUN is None:
        pytest.fail("mpirun not found: run the README's test command, which installs OpenMPI")
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", "--bind-to", "none", "--tag-output",
           sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", *args]  # fmt: skip
    extra = {"COLUMNS": "200", "PYTHONPATH": os.pathsep.join(filter(None, [PLUGIN_DIR, os.environ.get("PYTHONPATH")]))}
    return run(cmd, timeout, env=mpi_env({**extra, **(env or {})}), cwd=cwd)


def _by_rank(res):
    """Each rank's stdout, then its stderr."""
    out, err = _split_tags(res.stdout), _split_tags(res.stderr)
    return {r: out.get(r, "") + err.get(r, "") for r in sorted({*out, *err})}


def _split_tags(output):
    """{rank: its output} from mpirun --tag-output: every forwarded piece of a rank's stream starts
    with ``[job,rank]<stdout>:`` (also mid-line, after a write without a newline), so split on every
    tag and join each rank's pieces as they came."""
    ranks = {}
    pieces = re.split(r"\[\d+,(\d+)\]<std(?:out|err)>:", output)
    for rank, text in zip(pieces[1::2], pieces[2::2]):  # pieces[0]: before any tag (mpirun's own)
        ranks.setdefault(int(rank), []).append(text)
    return {r: "".join(texts) for r, texts in ranks.items()}


def _demo(tmp_path, name, source, timeout=60, env=None):
    (tmp_path / name).write_text(textwrap.dedent(source))
    res = _mpirun_pytest(["-p", "mpi_plugin", "-q", "-ra", name], cwd=str(tmp_path), timeout=timeout, env=env)
    return res, _by_rank(res)


@pytest.mark.parametrize("backend", ["horovod", "mpi", "torch"])
def test_collective_suite_passes_on_both_ranks(backend):
    env = {"MPIRL_COLLECTIVE_TIMEOUT": "60", "MPIRL_TEST_BACKEND": backend}
    res = _mpirun_pytest(["-q", "tests/collective"], cwd=REPO, timeout=180, env=env)
    out = _by_rank(res)
    assert res.returncode == 0, res.output[-6000:]
    counts = []
    for rank in (0, 1):
        m = re.search(rf"mpi_plugin: rank {rank} of 2: (\d+) passed, 0 failed$", out[rank], re.M)
        assert m, f"rank {rank}:\n{out.get(rank, '')[-3000:]}"
        assert re.search(rf"^\s*{m.group(1)} passed in ", out[rank], re.M), out[rank][-3000:]
        counts.append(int(m.group(1)))
    assert counts[0] == counts[1] >= 10


def test_failure_or_skip_on_one_rank_is_every_ranks(tmp_path):
    res, out = _demo(tmp_path, "test_fail_demo.py", """
        import pytest
        from mpi4py import MPI

        def test_before():
            MPI.COMM_WORLD.Barrier()

        def test_fails_on_rank_1_only():
            assert MPI.COMM_WORLD.Get_rank() != 1, "rank 1 disagrees"

        def test_skips_on_rank_1_only():
            if MPI.COMM_WORLD.Get_rank() == 1:
                pytest.skip("rank 1 has nothing to do")

        def test_after_still_in_step():
            assert MPI.COMM_WORLD.allreduce(1) == MPI.COMM_WORLD.Get_size()
    """)  # fmt: skip
    assert res.returncode != 0, res.output
    for rank in (0, 1):
        text = out[rank]
        assert f"mpi_plugin: rank {rank} of 2: 2 passed, 1 failed, 1 skipped" in text, text
        assert re.search(r"^\s*1 failed, 2 passed, 1 skipped in ", text, re.M), text
        assert "FAILED test_fail_demo.py::test_fails_on_rank_1_only" in text, text
        assert "failed on rank 1: AssertionError: rank 1 disagrees" in text, text
        assert re.search(r"test_fail_demo.py:\d+: skipped on rank 1: rank 1 has nothing to do", text), text
    assert "(passed on rank 0; the traceback is in the output of rank 1)" in out[0]
    assert "E       AssertionError: rank 1 disagrees" in out[1]  # the traceback where it happened


def test_hang_on_one_rank_aborts_the_job_at_the_deadline(tmp_path):
    res, out = _demo(tmp_path, "test_hang_demo.py", """
        import time
        from mpi4py import MPI

        def test_hangs_on_rank_1():
            if MPI.COMM_WORLD.Get_rank() == 1:
                time.sleep(3600)
            MPI.COMM_WORLD.Barrier()
    """, timeout=60, env={"MPIRL_COLLECTIVE_TIMEOUT": "8"})  # fmt: skip
    assert res.returncode != 0, res.output
    assert res.elapsed_s < 40, res.output  # start-up + 8 s deadline + 2 s grace, not the 60 s of run()
    dumps = [r for r in (0, 1) if "test test_hang_demo.py::test_hangs_on_rank_1 did not finish within 8 s" in out[r]]
    assert dumps, res.output
    for rank in dumps:  # the rank that timed out shows where its threads were
        assert f"mpi_plugin: rank {rank}: aborting the job (MPI_Abort)" in out[rank], res.output
        assert "in test_hangs_on_rank_1" in out[rank], res.output


def test_exception_on_one_rank_while_peer_waits_aborts_with_its_message(tmp_path):
    res, out = _demo(tmp_path, "test_raise_demo.py", """
        from mpi4py import MPI

        def test_raises_on_rank_1_while_rank_0_waits():
            if MPI.COMM_WORLD.Get_rank() == 1:
                raise RuntimeError("boom on rank 1")
            MPI.COMM_WORLD.Barrier()
    """, timeout=60, env={"MPIRL_COLLECTIVE_TIMEOUT": "8"})  # fmt: skip
    assert res.returncode != 0, res.output
    assert res.elapsed_s < 40, res.output
    note = (
        "test_raise_demo.py::test_raises_on_rank_1_while_rank_0_waits (call) failed here: RuntimeError: boom on rank 1"
    )
    assert f"mpi_plugin: rank 1: {note}" in out[1], res.output  # printed at once, before the peer's timeout
    assert "did not finish within 8 s" in res.output


def test_pytest_exit_on_one_rank_aborts_the_job(tmp_path):
    res, out = _demo(tmp_path, "test_exit_demo.py", """
        import pytest
        from mpi4py import MPI

        def test_exits_on_rank_1():
            if MPI.COMM_WORLD.Get_rank() == 1:
                pytest.exit("leaving early")

        def test_next():
            MPI.COMM_WORLD.Barrier()
    """, timeout=60, env={"MPIRL_COLLECTIVE_TIMEOUT": "30"})  # fmt: skip
    assert res.returncode != 0, res.output
    assert res.elapsed_s < 25, res.output  # at once, not at the 30 s deadline
    note = "pytest stopped during test_exit_demo.py::test_exits_on_rank_1 (Exit: leaving early)"
    assert f"mpi_plugin: rank 1: {note}" in out[1], res.output


def test_different_collection_on_one_rank_stops_every_rank(tmp_path):
    res, out = _demo(tmp_path, "test_differ_demo.py", """
        import os

        def test_common():
            pass

        if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            def test_only_on_rank_1():
                pass
    """)  # fmt: skip
    assert res.returncode != 0, res.output
    for rank in (0, 1):
        assert "the MPI ranks collected different tests" in out[rank], res.output
        assert "only on rank 1: test_differ_demo.py::test_only_on_rank_1" in out[rank], res.output


def test_plain_pytest_skips_them_without_starting_mpi():
    code = ("import sys, pytest; rc = pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/collective']); "
            "print('mpi4py imported:', 'mpi4py' in sys.modules); sys.exit(rc)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^\d+ skipped in ", out.stdout, re.M), out.stdout
    assert "mpi4py imported: False" in out.stdout, out.stdout
    assert "mpirun -np 2 python -m pytest tests/collective" in out.stdout, out.stdout  # -ra shows the reason
