"""mpirl.dist's Horovod backend: ring-allreduce over MPI (and NCCL for CUDA tensors where
Horovod was built with it), plus an mpi4py communicator of our own for point-to-point shard
streaming. Only mpirl.dist imports this module; call mpirl.dist's functions instead.

Every collective carries a name: Horovod matches requests across ranks by name, so every
rank must issue the same names in the same order (mpirl's names start with ``mpirl.``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

_SHARD_TAG = 4242


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


class HorovodBackend:
    """The collectives of a Horovod job (see mpirl.dist for what each one promises)."""

    name = "horovod"

    def __init__(self, device: torch.device) -> None:
        # Importing mpi4py initialises MPI with MPI_THREAD_MULTIPLE, which Horovod's background
        # thread needs; hvd.init() below then reuses that MPI.
        import horovod.torch as hvd
        from mpi4py import MPI

        # DQN sends a small gradient (~0.3 MB) every update, so allreduce latency is what counts.
        # Horovod's default 1 ms cycle put a ~1.1 ms floor under every allreduce (raw MPI: 60 us
        # at 256 KiB); 0.05 ms took 2 ranks from ~2,100 to ~3,100 env steps/s here, while it
        # slowed a single rank down; this backend only runs with several (benchmarks/allreduce.py,
        # throughput.py). A user's own HOROVOD_CYCLE_TIME wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.05")
        hvd.init()  # HVD: init (collective over the world communicator)
        self.hvd = hvd
        # Our own communicator for point-to-point shard streaming, apart from Horovod's.
        self.comm = MPI.COMM_WORLD.Dup()  # MPI: collective
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
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

    def allgather_object(self, obj: Any) -> list[Any]:
        return list(self.comm.allgather(obj))  # MPI: allgather on our communicator

    def gather_to_root(self, obj: Any) -> list[Any]:
        out = self.comm.gather(obj, root=0)  # MPI: gather on our communicator
        return list(out) if out is not None else []

    def send_object(self, dest: int, obj: Any) -> None:
        self.comm.ssend(obj, dest=dest, tag=_SHARD_TAG)  # MPI: synchronous send: at most one in flight

    def recv_object(self, source: int) -> Any:
        return self.comm.recv(source=source, tag=_SHARD_TAG)  # MPI: receive

    def barrier_within(self, timeout: float) -> None:
        """Wait (bounded) until every rank got here."""
        import time

        req = self.comm.Ibarrier()  # MPI: non-blocking barrier, polled with a deadline
        deadline = time.monotonic() + timeout
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.01)


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
