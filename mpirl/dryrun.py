"""``python -m mpirl.train --dry-run``: what a job would use, per rank, without training.

    mpirun -np 2 python -m mpi4py -m mpirl.train --backend auto --dry-run

Starts the job's communication exactly as a run does (launcher, MPI wait mode, backend
choice, device pinning), prints each rank's host, local rank, device, torch threads, backend
and collective library and Open MPI wait mode (rank 0 prints them all, in rank order), proves
the collectives with one allreduce, and exits.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch

from mpirl import dist
from mpirl.config import Config


def backend_words(ctx: dist.DistContext) -> str:
    """The backend and its collective library, for log lines."""
    return f"backend {ctx.backend} ({ctx.library})" if ctx.library else "no collectives (one rank)"


def dry_run(cfg: Config) -> None:
    """Collective: start the job's communication as a run would, print each rank's device,
    backend and collective library (rank 0, in rank order), prove one allreduce, and stop."""
    cfg.validate()
    ctx = dist.init(cfg.device, cfg.torch_threads, cfg.backend)
    wait_mode = os.environ.get("OMPI_MCA_mpi_yield_when_idle", "unset")
    mine = (f"rank {ctx.rank}: host {socket.gethostname()}, local rank {ctx.local_rank} of {ctx.local_size}, "
            f"device {ctx.device}, torch threads {torch.get_num_threads()}, {backend_words(ctx)}, "
            f"OMPI_MCA_mpi_yield_when_idle={wait_mode}")  # fmt: skip
    lines = dist.gather_to_root(mine)  # MPI: gather (small)
    total = dist.allreduce_sum(np.ones(1), name="mpirl.dry_run")[0]  # HVD: one allreduce, as a check
    if ctx.rank == 0:
        if ctx.note:
            print(f"mpirl: {ctx.note}")
        print("\n".join(lines))
        ok = "ok" if total == ctx.size else f"WRONG: {total:g}"
        print(f"mpirl: dry run: {ctx.size} rank(s); an allreduce of 1 per rank gave {total:g} ({ok}); no training")
