"""What mpirl.dist decides before any communication starts: the launcher and its world, the
cores a rank may use, Open MPI's wait mode, the device and the backend. Plain functions of the
environment and the installation (no MPI call), so every rank decides alike, and they are
unit-tested without a launcher. Only mpirl.dist imports this module; call mpirl.dist's names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "horovod", "mpi", "torch", "gloo", "nccl")


class DistError(ValueError):
    """A launch, backend or device choice that cannot work; one line for the user (exit 2)."""


@dataclass(frozen=True)
class Launch:
    """What the launcher announced in the environment, before anything is initialised."""

    launcher: str  # "mpi" (mpirun, srun, ...), "torchrun" or "none" (a plain process)
    world_size: int
    local_size: int  # ranks on this node (the world size where the launcher does not say)


def _first_int(names: Sequence[str]) -> Optional[int]:
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _env_world_size() -> int:
    """World size as an MPI launcher announced it, before MPI is initialised (1 if none)."""
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script's own shell has the latter too.
    found = _first_int(("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE"))
    return found or 1


def _env_rank() -> int:
    names = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK", "RANK")
    return _first_int(names) or 0


def launch_info() -> Launch:
    """The launcher of this process, from its environment (no MPI call)."""
    n = _env_world_size()
    if n > 1:
        local = _first_int(
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE")
        )
        return Launch("mpi", n, min(local or n, n))
    if os.environ.get("WORLD_SIZE", "").isdigit() and int(os.environ["WORLD_SIZE"]) > 1 and "MASTER_ADDR" in os.environ:
        n = int(os.environ["WORLD_SIZE"])
        return Launch("torchrun", n, int(os.environ.get("LOCAL_WORLD_SIZE", n)))
    return Launch("none", 1, 1)


def cores_per_rank(local_size: int) -> int:
    """Cores this rank may use: its affinity mask when the launcher bound it to part of the
    node (mpirun --bind-to core, SLURM's cpusets), else the node's cores over its ranks."""
    node = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    return max(1, mine if mine < node else mine // max(local_size, 1))


def _choose_mpi_wait_mode(launch: Launch) -> None:
    """Let MPI yield the core while it waits when a rank has a single core to itself.

    Open MPI busy-polls by default; a rank's waiting main thread (and Horovod's background
    thread) then fights the thread doing the work for the one core, which halved training
    speed at 2 ranks on 2 cores (README, BENCHMARKS.md: launch/mpirun.sh set it, the plain
    mpirun line did not). It must be set before MPI starts, which is here: ``python -m mpi4py``
    (4.x) initialises MPI only when mpirl imports it. A user's own setting wins."""
    if launch.launcher == "mpi" and cores_per_rank(launch.local_size) < 2:
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def _want_cuda(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise DistError("--device cuda asked for, but torch sees no CUDA device (a CPU-only torch build?)")
    return device in ("auto", "cuda") and torch.cuda.is_available()


def _choose_backend(backend: str, cuda: bool, launch: Launch) -> tuple[str, str, str]:
    """(backend, tensor library, note) for ``--backend``; DistError where it cannot work.
    Every rank decides alike: the same installation, options and launcher everywhere."""
    from mpirl import dist_horovod

    if backend not in BACKENDS:
        raise DistError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    torch_library = "nccl" if cuda else "gloo"
    if backend in ("gloo", "nccl"):
        if backend == "nccl" and not cuda:
            raise DistError("--backend nccl needs CUDA tensors; on the CPU use --backend gloo (or torch)")
        return "torch", backend, ""
    if backend == "torch":
        return "torch", torch_library, ""
    if backend == "mpi":
        if launch.launcher == "torchrun" or cuda:
            raise DistError("--backend mpi carries CPU tensors under an MPI launcher (mpirun, srun); on CUDA use "
                            "--backend torch (NCCL) or horovod, under torchrun --backend torch")  # fmt: skip
        return "mpi", "mpi", ""
    have_hvd = launch.launcher != "torchrun" and dist_horovod.importable()
    if backend == "horovod":
        if launch.launcher == "torchrun":
            raise DistError("--backend horovod needs an MPI launcher (mpirun, srun), not torchrun")
        if not have_hvd:
            raise DistError("--backend horovod: Horovod is not installed (launch/install.sh builds it)")
        if cuda and not dist_horovod.gpu_operations():
            raise DistError(
                "--backend horovod on CUDA: this Horovod was built without GPU operations (no nvcc at build "
                "time); use --backend torch (NCCL), or rebuild with HOROVOD_GPU_OPERATIONS=NCCL launch/install.sh"
            )
        return "horovod", "horovod", ""
    # auto
    if have_hvd and (not cuda or dist_horovod.gpu_operations()):
        return "horovod", "horovod", ""
    why = "Horovod was built without GPU operations" if have_hvd else "Horovod is not available"
    if not cuda and launch.launcher == "mpi":
        # MPI's own allreduce beat Gloo's on CPU tensors in every measure (BENCHMARKS.md "an MPI
        # backend beside Horovod and Gloo": training 1.50x against 1.06x one rank, solve time
        # 20.1 s against 27.1 s, 1 KiB 8 us against 1.9 ms), and an MPI launcher brings MPI.
        return "mpi", "mpi", f"backend auto: {why}, so collectives go through MPI (mpi4py)"
    return "torch", torch_library, f"backend auto: {why}, so collectives go through torch.distributed {torch_library}"
