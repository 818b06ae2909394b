"""mpirl.dist's MPI backend: mpi4py's collectives, called on numpy views of CPU tensors (no
copy, no thread of its own). Only mpirl.dist (and the Horovod backend, for its objects and
point-to-point messages) imports this module.

On the CPU this is the allreduce Horovod itself runs (MPI_Allreduce) without Horovod's
background thread, its cycle and its per-request negotiation, which cost about 0.2 ms per
collective and a share of a core at every cycle (BENCHMARKS.md "backends side by side").
It carries CPU tensors only: MPI libraries that read CUDA memory are not the rule, and
NCCL (``--backend torch``) is the library for GPUs. Collectives are matched by order on a
communicator of their own, as MPI does; every rank issues the same ones in the same order.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from mpirl.dist_flat import FlatGradientSync

_SHARD_TAG = 4242


def _sum_fp16(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """MPI has no 16-bit float type: a user reduction that adds the 2-byte words as float16
    (numpy adds in float32 and rounds once, as Horovod's CPU float16 sum does)."""
    out = np.frombuffer(inoutbuf, dtype=np.float16)
    out += np.frombuffer(inbuf, dtype=np.float16)


def _done() -> None:
    """The wait of a collective that has completed already."""


class MpiBackend:
    """The collectives of a plain-MPI job, and the object, point-to-point and barrier calls
    every MPI-launched backend shares (see mpirl.dist for what each one promises)."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()  # MPI: collective; a communicator of mpirl's own
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # MPI: collective, the ranks of this node
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._fp16_sum: Any = None  # created on first use (MPI.Op.Create)
        self.library = f"MPI ({MPI.Get_library_version().split(',')[0].strip()}, mpi4py)"

    # --- objects, point-to-point, barrier ------------------------------------------------------
    def broadcast_object(self, obj: Any, name: str) -> Any:
        return self.comm.bcast(obj, root=0)  # MPI: broadcast (pickled)

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
        req = self.comm.Ibarrier()  # MPI: non-blocking barrier, polled with a deadline
        deadline = time.monotonic() + timeout
        while not req.Test() and time.monotonic() < deadline:
            time.sleep(0.01)

    # --- CPU tensors ---------------------------------------------------------------------------
    def _buffer(self, t: torch.Tensor) -> Any:
        """An MPI buffer over ``t``'s own memory (contiguous, on the CPU)."""
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"--backend mpi carries contiguous CPU tensors only, got {t.device}, {t.stride()}")
        if t.dtype == torch.float16:
            return [t.view(torch.int16).numpy(), self.MPI.INT16_T]
        return t.view(torch.uint8).numpy() if t.dtype == torch.bool else t.numpy()

    def allreduce_sum(self, values: np.ndarray, name: str) -> np.ndarray:
        out = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)  # MPI: allreduce
        return out

    def allreduce_min(self, values: np.ndarray, name: str) -> np.ndarray:
        out = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.MIN)  # MPI: allreduce
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for t in module.state_dict().values():  # the parameters' and buffers' own memory
                self.comm.Bcast(self._buffer(t), root=0)  # MPI: broadcast (in place)

    def broadcast_optimizer(self, optimizer: Any) -> None:
        state = self.broadcast_object(optimizer.state_dict() if self.rank == 0 else None, name="mpirl.optimizer")
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def _sum_(self, flat: torch.Tensor) -> Callable[[], None]:
        """SUM-allreduce ``flat`` in place, now; returns a wait with nothing left to wait for.

        Blocking on purpose: Open MPI's non-blocking MPI_Iallreduce runs other algorithms than
        its tuned blocking one, 1.4-1.6x slower from 64 KiB up here (BENCHMARKS.md), and it moves
        data only inside MPI calls, which the env step between start and wait does not make;
        so overlapping it with the env step would gain nothing and lose bandwidth."""
        op = self.MPI.SUM
        if flat.dtype == torch.float16:
            if self._fp16_sum is None:
                self._fp16_sum = self.MPI.Op.Create(_sum_fp16, commute=True)
            op = self._fp16_sum
        self.comm.Allreduce(self.MPI.IN_PLACE, self._buffer(flat), op=op)  # MPI: allreduce
        return _done

    def average_(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        self._sum_(flat)  # MPI: allreduce
        return flat.div_(self.size)

    def gradient_sync(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, passes: int
    ) -> Any:  # a dist.GradientSync (Horovod's backend returns its own kind)
        params = [p for p in model.parameters() if p.requires_grad]
        return FlatGradientSync(optimizer, params, fp16, self.size, self._sum_)
