"""Everything MPI: Horovod init, device pinning, optimizer wrapping, broadcasts, reductions, abort.

This is the only module that imports horovod or mpi4py. Every function that issues a
collective says so in its docstring; every rank must call it, in the same order, with the
same name. Tags ``# HVD:`` mark each collective so they can be audited at a glance.

A process that never called ``init`` is a job of one rank: the collectives return their
input (rank 0's value is its own), so the learner, the collector and the checkpoint code run
in plain single-process unit tests without MPI.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")
_COMM: Any = None  # mpi4py communicator for shard streaming, created by init()
_SHARD_TAG = 4242


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int  # global rank, 0..size-1
    size: int  # world size (number of ranks)
    local_rank: int  # rank on this node
    local_size: int  # ranks on this node
    device: torch.device


def _env_world_size() -> int:
    """World size as the launcher announced it, before MPI is initialised (1 if none)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _env_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _rank() -> int:
    return 0 if _COMM is None else int(_COMM.Get_rank())


def _alone() -> bool:
    """True when there is nobody to communicate with (one rank, or init() never called)."""
    return _COMM is None or _COMM.Get_size() == 1


def init(device: str = "auto", torch_threads: int = 0) -> DistContext:
    """Initialise MPI and Horovod (idempotent), pin the device and the torch thread count.

    ``device``: auto -> cuda:local_rank when CUDA is available, else cpu. ``torch_threads``:
    0 -> usable cores on this node divided by ranks on this node (at least 1), so N ranks
    do not oversubscribe the cores.
    """
    # Importing mpi4py initialises MPI with MPI_THREAD_MULTIPLE, which Horovod's background
    # thread needs; hvd.init() below then reuses that MPI.
    import horovod.torch as hvd
    from mpi4py import MPI

    if _env_world_size() > 1:
        # DQN sends a small gradient (~0.3 MB) every update, so allreduce latency is what counts.
        # Horovod's default 1 ms cycle put a ~1.1 ms floor under every allreduce (raw MPI: 60 us
        # at 256 KiB); 0.05 ms took 2 ranks from ~2,100 to ~3,100 env steps/s here, while it
        # slowed a single rank down, hence only with several (benchmarks/allreduce.py,
        # throughput.py). A user's own HOROVOD_CYCLE_TIME wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.05")
    hvd.init()  # HVD: init (collective over the world communicator)
    global _COMM
    if _COMM is None:
        # Our own communicator for point-to-point shard streaming, apart from Horovod's.
        _COMM = MPI.COMM_WORLD.Dup()  # MPI: collective
    rank, size, local_rank, local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        dev = torch.device("cuda", gpu)
    else:
        dev = torch.device("cpu")
    if torch_threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Affinity may already be a per-rank binding (mpirun --bind-to core): then use it all.
        per_rank = cores if cores < (os.cpu_count() or cores) else cores // max(local_size, 1)
        torch_threads = max(1, per_rank)
    torch.set_num_threads(torch_threads)
    return DistContext(rank, size, local_rank, local_size, dev)


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, backward_passes_per_step: int
) -> Any:
    """Horovod DistributedOptimizer: gradients are averaged with ring-allreduce on backward."""
    import horovod.torch as hvd

    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average,
        # One grouped allreduce for all gradients: one request, one negotiation and one wait per
        # update instead of one per tensor. Nothing is lost by waiting for the whole backward
        # pass, since the trainer overlaps the allreduce with the next env step instead.
        groups=1,
    )


def average_tensors_(tensors: Sequence[torch.Tensor], name: str) -> None:
    """Collective: replace each tensor, in place, by its elementwise mean over all ranks.

    Local SGD's parameter averaging (``--sync-every K > 1``). Every rank must pass the same
    number of tensors with the same shapes, in the same order. They are packed into one flat
    buffer of the first tensor's dtype and device (exact for float32 weights, Adam moments,
    step counts and 0/1 flags), so the whole state travels in a single allreduce: for DQN-sized
    networks the collective's latency, not its bytes, is what costs.
    """
    if not tensors or _alone():
        return
    import horovod.torch as hvd

    dtype, device = tensors[0].dtype, tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    flat = hvd.allreduce(flat, op=hvd.Average, name=name)  # HVD: allreduce (one fused buffer)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n


def broadcast_model(model: torch.nn.Module) -> None:
    """Collective: every rank receives rank 0's parameters and buffers."""
    if _alone():
        return
    import horovod.torch as hvd

    hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # HVD: broadcast


def broadcast_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank receives rank 0's optimizer state.

    Only call this when rank 0's optimizer has state (after a restore): on a fresh optimizer
    Horovod would run a zero-gradient step to create state, which offsets Adam's step count.
    """
    if _alone():
        return
    import horovod.torch as hvd

    hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # HVD: broadcast (several)


def broadcast_object(obj: T, name: str) -> T:
    """Collective: rank 0's picklable ``obj`` on every rank. ``name`` is required (see README)."""
    if _alone():
        return obj
    import horovod.torch as hvd

    return hvd.broadcast_object(obj, root_rank=0, name=name)  # HVD: broadcast


def rank0_decides(decide: Callable[[], T], name: str, errors: type[Exception]) -> T:
    """Collective: rank 0 runs ``decide()``, every rank returns its value, or every rank raises
    ``errors(message)`` alike when rank 0's call raised ``errors``.

    For the checks only rank 0 can make (files it alone reads or writes): the other ranks wait
    in the broadcast instead of going on alone, and a bad file becomes one agreed error on every
    rank (exit 2), never one rank's exception while the others block in the next collective.
    Any other exception on rank 0 propagates there only (and aborts the job, see run_or_abort).
    """
    result: tuple[Any, str] = (None, "")
    if _rank() == 0:
        try:
            result = (decide(), "")
        except errors as exc:
            result = (None, str(exc))
    value, err = broadcast_object(result, name=name)  # HVD: rank 0 decides, all learn it
    if err:
        raise errors(err)
    return value


def allreduce_sum(values: np.ndarray, name: str) -> np.ndarray:
    """Collective: elementwise float64 sum over ranks of a small vector (metrics, votes)."""
    if _alone():
        return np.array(values, dtype=np.float64)
    import horovod.torch as hvd

    t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    return hvd.allreduce(t, op=hvd.Sum, name=name).numpy()  # HVD: allreduce


def allreduce_min_max(value: float, name: str) -> tuple[float, float]:
    """Collective: (min, max) of a scalar over ranks; used to prove replicas are identical."""
    if _alone():
        return float(value), float(value)
    import horovod.torch as hvd

    t = torch.tensor([value, -value], dtype=torch.float64)
    out = hvd.allreduce(t, op=hvd.Min, name=name)  # HVD: allreduce
    return float(out[0]), float(-out[1])


def gather_to_root(obj: Any) -> list[Any]:
    """Collective: rank 0 gets every rank's small picklable ``obj`` in rank order; others []."""
    if _COMM is None:
        return [obj]
    out = _COMM.gather(obj, root=0)  # MPI: gather on our communicator
    return list(out) if out is not None else []


def send_object(dest: int, obj: Any) -> None:
    """Point-to-point: a picklable message to ``dest`` (blocks until it is received)."""
    _COMM.ssend(obj, dest=dest, tag=_SHARD_TAG)  # MPI: synchronous send: at most one in flight


def recv_object(source: int) -> Any:
    """Point-to-point: the next message ``send_object`` sent from ``source``."""
    return _COMM.recv(source=source, tag=_SHARD_TAG)  # MPI: receive


def versions() -> dict[str, str]:
    """Versions of the communication libraries in use, for checkpoints' provenance."""
    try:
        import horovod

        return {"horovod": horovod.__version__}
    except ImportError:  # pragma: no cover - horovod is a dependency
        return {}


def abort(code: int = 1) -> None:
    """End the whole job now (MPI_Abort) when it has more than one rank; else exit."""
    sys.stderr.flush()
    sys.stdout.flush()
    if _env_world_size() > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


class AgreedError(RuntimeError):
    """An error every rank raises alike, after agreeing on it through a collective (so no rank
    is left waiting); ends the job with ``exit_code`` and one line per rank, no MPI_Abort."""

    exit_code = 3


def _settle(timeout: float = 10.0) -> None:
    """Wait (bounded) until every rank got here, so that no rank's exit aborts a peer before
    it printed its message. Only for errors all ranks raise alike (agreed by a collective)."""
    if _COMM is None or _COMM.Get_size() == 1:
        return
    import time

    req = _COMM.Ibarrier()  # MPI: non-blocking barrier, polled with a deadline
    deadline = time.monotonic() + timeout
    while not req.Test() and time.monotonic() < deadline:
        time.sleep(0.01)


def run_or_abort(fn: Callable[[], T], user_errors: tuple[type[BaseException], ...] = ()) -> T:
    """Run ``fn``; on an uncaught exception print it with this rank and abort every rank.

    Errors in ``user_errors`` print one line and exit 2 (no traceback): they are raised on
    every rank alike (validation), so each rank exits without waiting for the others. Any
    other exception may be on one rank only, so it must take the job down: MPI_Abort.
    """
    try:
        return fn()
    except user_errors as exc:
        # One write per line: print() writes text and newline apart, and mpirun's forwarding
        # can interleave two ranks' lines between them.
        sys.stderr.write(f"mpirl: error: {exc}\n")
        sys.stderr.flush()
        _settle()
        sys.exit(2)
    except AgreedError as exc:
        sys.stderr.write(f"mpirl: error: {exc}\n")
        sys.stderr.flush()
        _settle()
        sys.exit(exc.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        rank = _env_rank()
        tb = traceback.format_exc()
        sys.stderr.write(f"{tb}mpirl: rank {rank} failed: {type(exc).__name__}: {exc}\n")
        abort(1)
        raise  # not reached
