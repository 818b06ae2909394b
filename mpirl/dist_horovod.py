"""mpirl.dist's Horovod backend: ring-allreduce over MPI (and NCCL for CUDA tensors where
Horovod was built with it) for tensors, plus the MPI backend's communicator of our own for
objects and point-to-point shard streaming. Only mpirl.dist imports this module; call
mpirl.dist's functions instead.

Every collective carries a name: Horovod matches requests across ranks by name, so every
rank must issue the same names in the same order (mpirl's names start with ``mpirl.``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mpirl.dist_mpi import MpiBackend


def importable() -> bool:
    """Is Horovod (with its PyTorch extension) installed?"""
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_operations() -> bool:
    """Was this Horovod built with GPU collectives (NCCL)? Without them, a CUDA tensor's first
    allreduce fails deep inside Horovod ("Requested ReadyEvent with GPU device but not compiled
    with CUDA"), so mpirl asks before it starts."""
    import horovod.torch as hvd

    return bool(hvd.nccl_built())


def version() -> str:
    import horovod

    return str(horovod.__version__)


class HorovodBackend(MpiBackend):
    """The collectives of a Horovod job (see mpirl.dist for what each one promises): Horovod's
    for tensors, MpiBackend's (on a communicator apart from Horovod's) for objects,
    point-to-point shard streaming and bounded barriers."""

    name = "horovod"

    def __init__(self, device: torch.device) -> None:
        # Importing mpi4py initialises MPI with MPI_THREAD_MULTIPLE, which Horovod's background
        # thread needs; hvd.init() below then reuses that MPI.
        import horovod.torch as hvd
        from mpi4py import MPI  # noqa: F401  (before hvd.init: see above)

        # DQN sends a small gradient (~0.3 MB) every update, so allreduce latency is what counts.
        # Horovod's default 1 ms cycle put a ~1.1 ms floor under every allreduce (raw MPI: 60 us
        # at 256 KiB); 0.05 ms took 2 ranks from ~2,100 to ~3,100 env steps/s here, while it
        # slowed a single rank down; this backend only runs with several (benchmarks/allreduce.py,
        # throughput.py). A user's own HOROVOD_CYCLE_TIME wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.05")
        hvd.init()  # HVD: init (collective over the world communicator)
        self.hvd = hvd
        super().__init__()  # MPI: collective; our own communicator, and rank, size, local rank alike
        gpu = "NCCL" if device.type == "cuda" else "MPI"
        self.library = f"Horovod {version()} ({gpu} ring-allreduce)"

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)  # HVD: broadcast

    def broadcast_module(self, module: torch.nn.Module) -> None:
        self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)  # HVD: broadcast

    def broadcast_optimizer(self, optimizer: Any) -> None:
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # HVD: broadcast (several)

    def allreduce_sum(self, values: np.ndarray, name: str) -> np.ndarray:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Sum, name=name).numpy()  # HVD: allreduce

    def allreduce_min(self, values: np.ndarray, name: str) -> np.ndarray:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Min, name=name).numpy()  # HVD: allreduce

    def average_(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        return self.hvd.allreduce(flat, op=self.hvd.Average, name=name)  # HVD: allreduce

    def gradient_sync(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, passes: int
    ) -> HorovodGradientSync:
        return HorovodGradientSync(self.hvd, optimizer, model, fp16, passes)


class HorovodGradientSync:
    """Horovod's DistributedOptimizer: hooks on the gradients start one grouped allreduce when
    the last of ``passes`` backward passes ends; ``wait`` synchronises, ``step`` applies."""

    def __init__(self, hvd: Any, optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, passes: int):
        self.optimizer: Any = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
            backward_passes_per_step=passes,
            op=hvd.Average,
            # One grouped allreduce for all gradients: one request, one negotiation and one wait per
            # update instead of one per tensor. Nothing is lost by waiting for the whole backward
            # pass, since the trainer overlaps the allreduce with the next env step instead.
            groups=1,
        )

    def start(self) -> None:
        """Nothing to do: the backward hooks started the allreduce already."""

    def wait(self) -> None:
        self.optimizer.synchronize()  # HVD: wait for the averaged gradients

    def step(self) -> None:
        with self.optimizer.skip_synchronize():
            self.optimizer.step()
