"""mpirl.dist's choices made before any communication: launcher, backend, MPI wait mode."""

from __future__ import annotations

import pytest

from mpirl import dist, dist_horovod

CPU_HOROVOD = "Horovod was built without GPU operations"


@pytest.fixture
def horovod(monkeypatch):
    """Set what Horovod is: installed or not, with GPU operations or not."""

    def set_(installed: bool = True, gpu: bool = False) -> None:
        monkeypatch.setattr(dist_horovod, "importable", lambda: installed)
        monkeypatch.setattr(dist_horovod, "gpu_operations", lambda: gpu)

    return set_


MPI2 = dist.Launch("mpi", 2, 2)


def test_auto_takes_horovod_on_cpu_and_on_cuda_when_it_has_gpu_operations(horovod):
    horovod(installed=True, gpu=True)
    assert dist._choose_backend("auto", False, MPI2) == ("horovod", "horovod", "")
    assert dist._choose_backend("auto", True, MPI2) == ("horovod", "horovod", "")


def test_auto_falls_back_to_torch_nccl_on_cuda_and_says_why(horovod):
    horovod(installed=True, gpu=False)
    kind, lib, note = dist._choose_backend("auto", True, MPI2)
    assert (kind, lib) == ("torch", "nccl") and CPU_HOROVOD in note and "torch.distributed nccl" in note
    horovod(installed=False)
    assert dist._choose_backend("auto", True, MPI2)[:2] == ("torch", "nccl")
    # torchrun has no MPI for Horovod: torch, whatever is installed.
    horovod(installed=True, gpu=True)
    assert dist._choose_backend("auto", False, dist.Launch("torchrun", 2, 2))[:2] == ("torch", "gloo")


def test_auto_without_horovod_takes_mpi_for_cpu_tensors_under_an_mpi_launcher(horovod):
    horovod(installed=False)
    kind, lib, note = dist._choose_backend("auto", False, MPI2)
    assert (kind, lib) == ("mpi", "mpi") and "Horovod is not available" in note and "MPI (mpi4py)" in note
    # Not on CUDA (the MPI backend carries CPU tensors), and not without an MPI launcher.
    assert dist._choose_backend("auto", True, MPI2)[:2] == ("torch", "nccl")
    assert dist._choose_backend("auto", False, dist.Launch("torchrun", 2, 2))[:2] == ("torch", "gloo")


def test_horovod_without_gpu_operations_is_refused_on_cuda_with_the_fix(horovod):
    horovod(installed=True, gpu=False)
    with pytest.raises(dist.DistError, match="built without GPU operations.*--backend torch"):
        dist._choose_backend("horovod", True, MPI2)
    assert dist._choose_backend("horovod", False, MPI2)[0] == "horovod"  # CPU tensors are fine
    horovod(installed=False)
    with pytest.raises(dist.DistError, match="not installed"):
        dist._choose_backend("horovod", False, MPI2)
    with pytest.raises(dist.DistError, match="MPI launcher"):
        dist._choose_backend("horovod", False, dist.Launch("torchrun", 2, 2))


def test_torch_picks_its_library_by_device_and_nccl_needs_cuda(horovod):
    horovod()
    assert dist._choose_backend("torch", False, MPI2)[:2] == ("torch", "gloo")
    assert dist._choose_backend("torch", True, MPI2)[:2] == ("torch", "nccl")
    assert dist._choose_backend("gloo", True, MPI2)[:2] == ("torch", "gloo")  # may share a GPU
    with pytest.raises(dist.DistError, match="nccl needs CUDA"):
        dist._choose_backend("nccl", False, MPI2)
    with pytest.raises(dist.DistError, match="--backend must be one of"):
        dist._choose_backend("mpich", False, MPI2)


def test_mpi_carries_cpu_tensors_under_an_mpi_launcher_only(horovod):
    horovod(installed=False)  # it needs no Horovod
    assert dist._choose_backend("mpi", False, MPI2) == ("mpi", "mpi", "")
    with pytest.raises(dist.DistError, match="--backend mpi carries CPU tensors.*--backend torch"):
        dist._choose_backend("mpi", True, MPI2)
    with pytest.raises(dist.DistError, match="--backend mpi carries CPU tensors.*torchrun"):
        dist._choose_backend("mpi", False, dist.Launch("torchrun", 2, 2))


def test_launch_info_reads_mpirun_torchrun_and_nothing(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "MV2_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_SIZE", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    assert dist.launch_info() == dist.Launch("none", 1, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a batch script's own shell: not a launch
    assert dist.launch_info().launcher == "none"
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert dist.launch_info() == dist.Launch("mpi", 4, 2)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert dist.launch_info() == dist.Launch("torchrun", 3, 3)


@pytest.mark.parametrize(
    ("cpus", "affinity", "local", "yields"),
    [
        (2, 2, 2, True),  # 2 ranks fill 2 cores
        (2, 1, 2, True),  # mpirun bound each rank to one core
        (16, 16, 2, False),  # 8 cores each: busy polling is fine
        (16, 4, 2, False),  # bound to 4 cores each
        (4, 4, 8, True),  # oversubscribed
    ],
)
def test_mpi_waits_yield_when_a_rank_has_one_core(monkeypatch, cpus, affinity, local, yields):
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(affinity)))
    dist._choose_mpi_wait_mode(dist.Launch("mpi", local, local))
    import os

    assert os.environ.get("OMPI_MCA_mpi_yield_when_idle") == ("1" if yields else None)


def test_a_users_own_mpi_wait_mode_wins(monkeypatch):
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    dist._choose_mpi_wait_mode(dist.Launch("mpi", 2, 2))
    import os

    assert os.environ["OMPI_MCA_mpi_yield_when_idle"] == "0"
