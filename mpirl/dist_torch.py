"""mpirl.dist's torch.distributed backend: NCCL for CUDA tensors, Gloo for CPU tensors (and
for every small object, vote and point-to-point message). Only mpirl.dist imports this module.

Started from the launchers mpirl already serves, with nothing for the user to set: under
``mpirun``/``srun`` the ranks learn rank, size and local rank from MPI, and rank 0 tells the
others a free TCP port for torch's rendezvous through one MPI broadcast (MPI does nothing
else here); under ``torchrun`` (no MPI needed) torch's own environment is used; a plain
process is a world of one. Collectives are matched by order, not by name: every rank issues
the same ones in the same order (the names mpirl passes are for Horovod and for reading).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import socket
import sys
import time
from typing import Any, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as tdist

from mpirl import procfs
from mpirl.dist_flat import FlatGradientSync

TIMEOUT = _dt.timedelta(minutes=30)  # a collective waits this long for a peer before failing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _root_address(one_node: bool) -> str:
    """Where the other ranks reach rank 0: loopback on one node; else MPIRL_MASTER_ADDR, or the
    address this host's name resolves to (set MPIRL_MASTER_ADDR where that is a loopback)."""
    if os.environ.get("MPIRL_MASTER_ADDR"):
        return os.environ["MPIRL_MASTER_ADDR"]
    if one_node:
        return "127.0.0.1"
    return socket.gethostbyname(socket.getfqdn())


GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives Gloo's worker threads (/proc/self/task/*/comm)


def workers_idle(name: str = GLOO_WORKER, timeout: float = 2.0, polls: int = 3) -> bool:
    """Wait, at most ``timeout`` seconds and sleeping (so without the GIL), until every thread of
    this process named ``name`` has been asleep ('S' in /proc) on ``polls`` polls in a row, 5 ms
    apart. True when they were (or there are none, or no /proc); False at the deadline."""
    tids, deadline, quiet = _threads_named(name), time.monotonic() + timeout, 0
    while quiet < polls:
        if time.monotonic() >= deadline:
            return False
        quiet = quiet + 1 if all(_state(tid) in ("S", "") for tid in tids) else 0
        time.sleep(0.005)
    return True


def _threads_named(name: str) -> list[str]:
    """This process's thread ids whose name (comm) is ``name``."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    return [tid for tid in tasks if procfs.read(f"/proc/self/task/{tid}/comm").strip() == name]


def _state(tid: str) -> str:
    """A thread's scheduler state (R, S, D, ...); "" once it has ended."""
    fields = procfs.stat_fields(f"/proc/self/task/{tid}/stat")
    return fields[0] if fields else ""


def _start_allreduce(flat: torch.Tensor) -> Any:
    """Start an asynchronous SUM allreduce of ``flat`` in place; returns its wait."""
    return tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, async_op=True).wait  # TORCH: allreduce starts


class TorchBackend:
    """The collectives of a torch.distributed job (see mpirl.dist for what each one promises)."""

    name = "torch"

    def __init__(self, launcher: str, library: str) -> None:
        if launcher == "mpi":
            # MPI tells rank, size and the node's ranks, and carries rank 0's port to the others.
            from mpi4py import MPI

            comm = MPI.COMM_WORLD  # used for the rendezvous only
            rank, size = comm.Get_rank(), comm.Get_size()
            node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # MPI: the ranks of this node
            local_rank, local_size = node.Get_rank(), node.Get_size()
            one_node = bool(comm.allreduce(local_size == size, op=MPI.LAND))  # MPI: allreduce
            root = (_root_address(one_node), _free_port()) if rank == 0 else None
            addr, port = comm.bcast(root, root=0)  # MPI: broadcast (rendezvous only)
            node.Free()
            init = f"tcp://{addr}:{port}"
            tdist.init_process_group(library, init_method=init, rank=rank, world_size=size, timeout=TIMEOUT)
        elif launcher == "torchrun":
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
            tdist.init_process_group(library, timeout=TIMEOUT)  # env://: MASTER_ADDR, MASTER_PORT
        else:
            raise ValueError(f"no launcher to start torch.distributed from: {launcher!r}")
        # Objects, metric vectors, votes and shard messages live on the CPU: a Gloo group for them
        # whatever carries the tensors (NCCL has no CPU tensors).
        self.cpu_group: Optional[Any] = tdist.new_group(backend="gloo") if library == "nccl" else None
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.library = f"torch.distributed {library} ({torch.__version__})"
        # Tear the process group down, and let its threads go quiet, before the interpreter
        # finalizes (see destroy). atexit runs this before mpi4py's MPI_Finalize (registered earlier).
        atexit.register(self.destroy)

    # --- objects and small CPU vectors (Gloo) ------------------------------------------------
    def broadcast_object(self, obj: Any, name: str) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.cpu_group)  # TORCH: broadcast
        return box[0]

    def allreduce_sum(self, values: np.ndarray, name: str) -> np.ndarray:
        t = torch.tensor(np.asarray(values, dtype=np.float64))
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=self.cpu_group)  # TORCH: allreduce
        return t.numpy()

    def allreduce_min(self, values: np.ndarray, name: str) -> np.ndarray:
        t = torch.tensor(np.asarray(values, dtype=np.float64))
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=self.cpu_group)  # TORCH: allreduce
        return t.numpy()

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        tdist.all_gather_object(out, obj, group=self.cpu_group)  # TORCH: allgather
        return out

    def gather_to_root(self, obj: Any) -> list[Any]:
        out: Optional[list[Any]] = [None] * self.size if self.rank == 0 else None
        tdist.gather_object(obj, out, dst=0, group=self.cpu_group)  # TORCH: gather
        return list(out) if out is not None else []

    def send_object(self, dest: int, obj: Any) -> None:
        # Returns once the message was handed over: at most one in flight per sender.
        tdist.send_object_list([obj], dst=dest, group=self.cpu_group)  # TORCH: send (p2p)

    def recv_object(self, source: int) -> Any:
        box: list[Any] = [None]
        tdist.recv_object_list(box, src=source, group=self.cpu_group)  # TORCH: receive (p2p)
        return box[0]

    def barrier_within(self, timeout: float) -> None:
        """Wait (bounded) until every rank got here."""
        work = tdist.barrier(group=self.cpu_group, async_op=True)  # TORCH: barrier
        try:
            work.wait(timeout=_dt.timedelta(seconds=timeout))
        except RuntimeError:  # a peer is gone or late: do not wait for it
            pass

    # --- tensors on the device (NCCL on CUDA, Gloo on the CPU) -------------------------------
    def broadcast_module(self, module: torch.nn.Module) -> None:
        for t in module.state_dict().values():
            tdist.broadcast(t, src=0)  # TORCH: broadcast (in place)

    def broadcast_optimizer(self, optimizer: Any) -> None:
        state = optimizer.state_dict() if self.rank == 0 else None
        if state is not None:  # tensors travel as CPU objects; load_state_dict moves them back
            state = {**state, "state": {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                                        for i, st in state["state"].items()}}  # fmt: skip
        state = self.broadcast_object(state, name="mpirl.optimizer")  # TORCH: broadcast
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def average_(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)  # TORCH: allreduce
        return flat.div_(self.size)

    def gradient_sync(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, passes: int
    ) -> FlatGradientSync:
        params = [p for p in model.parameters() if p.requires_grad]
        return FlatGradientSync(optimizer, params, fp16, self.size, _start_allreduce)

    def destroy(self) -> None:
        """Destroy the process group, then wait (bounded) until Gloo's worker threads sleep.

        Why the wait: those threads outlive ``destroy_process_group`` (the group is freed only at
        interpreter exit), and one that has just completed a collective still has to drop the
        work's tensors, which takes the GIL when Python already let go of them. If the
        interpreter is finalizing by then, Python ends that thread with pthread_exit, whose
        unwinding through a noexcept frame calls std::terminate: "terminate called without an
        active exception", SIGABRT, exit 134 after a finished run. gdb on the core:
        ``ProcessGroupGloo::runLoop`` -> ``TensorImpl::decref_pyobject`` ->
        ``PyEval_AcquireThread`` -> ``pthread_exit``, the main thread in ``Py_FinalizeEx``; 4 of
        150 runs of a 2-rank script that returns after ``mpirl.fit`` here. Called at exit
        (atexit, before finalization) and by ``exit``."""
        if tdist.is_initialized():
            tdist.destroy_process_group()
        workers_idle()

    def exit(self, code: int) -> NoReturn:
        """End the process after a finished run without C++ static destructors (what ``destroy``
        guards against at a normal exit, skipped altogether). MPI is finalized first, as mpirun
        expects."""
        self.destroy()
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
