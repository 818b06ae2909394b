"""Everything distributed: launch, backend choice, device pinning, gradient averaging,
broadcasts, reductions, "rank 0 decides" agreement, point-to-point streaming and abort.

The only module that talks to MPI, Horovod or torch.distributed (through its backends
``dist_horovod``, ``dist_mpi`` and ``dist_torch``, and ``dist_launch`` for what is decided
before any communication; nothing else imports them). Every function
that issues a collective says so in its docstring; every rank must call it, in the same order,
with the same name. Call sites are tagged ``# HVD:`` (a collective, through whichever backend runs)
or ``# MPI:`` (point-to-point), so they can be audited at a glance. Each one marks this rank
as waiting under its name for the stall watchdog (``mpirl.watchdog.waiting``).

Backends (``--backend``):

- ``horovod``: Horovod's ring-allreduce over MPI (NCCL for CUDA tensors where Horovod was
  built with it), DistributedOptimizer's grouped gradient allreduce;
- ``mpi``: MPI's own collectives on CPU tensors (mpi4py, no background thread), one flat
  gradient allreduce per update;
- ``torch``: torch.distributed, NCCL for CUDA tensors and Gloo for CPU tensors (``gloo`` or
  ``nccl`` force one), rendezvous through MPI under mpirun/srun, or torchrun's environment;
- ``auto``: Horovod where it can serve the device (CPU; CUDA when built with GPU operations),
  else torch.distributed, and the start-up line says which and why.

A process that never called ``init`` (or a job of one rank) is a world of one: collectives
return their input and nothing is initialised, so the learner, the collector and the
checkpoint code run in single-process unit tests and on machines without MPI.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import numpy as np
import torch

from mpirl import peers, watchdog
from mpirl.dist_launch import BACKENDS as BACKENDS  # re-exported: mpirl.dist is the API
from mpirl.dist_launch import DistError as DistError
from mpirl.dist_launch import Launch as Launch
from mpirl.dist_launch import _choose_backend as _choose_backend
from mpirl.dist_launch import _choose_mpi_wait_mode, _env_rank, _want_cuda
from mpirl.dist_launch import cores_per_rank as cores_per_rank
from mpirl.dist_launch import launch_info as launch_info

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int  # global rank, 0..size-1
    size: int  # world size (number of ranks)
    local_rank: int  # rank on this node
    local_size: int  # ranks on this node
    device: torch.device
    backend: str = "none"  # horovod, mpi, torch, or none (a world of one)
    library: str = ""  # the collective library, e.g. "torch.distributed gloo (2.13.0)"
    note: str = ""  # why auto chose this backend, when it is worth a log line


class GradientSync(Protocol):
    """Gradient averaging for one optimizer: ``start`` after an update's last backward pass,
    ``wait`` until ``.grad`` holds the average over ranks, ``step`` to apply it."""

    optimizer: Any  # what to step, zero, checkpoint and restore

    def start(self) -> None: ...
    def wait(self) -> None: ...
    def step(self) -> None: ...


_B: Any = None  # the backend of this job (None: a world of one)
_CTX: Optional[DistContext] = None


def init(device: str = "auto", torch_threads: int = 0, backend: str = "auto") -> DistContext:
    """Start the job's communication (idempotent), pin the device and the torch thread count.

    ``device``: auto -> cuda:local_rank when CUDA is available, else cpu. ``torch_threads``:
    0 -> ``cores_per_rank`` (so N ranks do not oversubscribe the cores). ``backend``: see the
    module docstring. DistError (the same on every rank) for what cannot work.
    """
    global _B, _CTX
    if _CTX is not None:
        return _CTX
    launch = launch_info()
    _choose_mpi_wait_mode(launch)
    cuda = _want_cuda(device)
    kind, library, note = _choose_backend(backend, cuda, launch)
    rank, size, local_rank, local_size = 0, 1, 0, 1
    if launch.world_size > 1:
        if kind == "horovod":
            from mpirl.dist_horovod import HorovodBackend

            _B = HorovodBackend(device=torch.device("cuda" if cuda else "cpu"))
        elif kind == "mpi":
            from mpirl.dist_mpi import MpiBackend

            _B = MpiBackend()
        else:
            from mpirl.dist_torch import TorchBackend

            _B = TorchBackend(launch.launcher, library)
        rank, size, local_rank, local_size = _B.rank, _B.size, _B.local_rank, _B.local_size
        peers.record(_B.allgather_object(peers.me()))  # HVD: allgather (small): who to name if one dies
    dev = torch.device("cpu")
    if cuda:
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        dev = torch.device("cuda", gpu)
    if _B is not None and library in ("nccl", "horovod") and cuda:
        _refuse_shared_gpus(dev, library)  # HVD: an allgather of the GPUs in use
    torch.set_num_threads(torch_threads if torch_threads > 0 else cores_per_rank(local_size))
    _CTX = DistContext(rank, size, local_rank, local_size, dev, kind if _B is not None else "none",
                       _B.library if _B is not None else "", note if _B is not None else "")  # fmt: skip
    return _CTX


def _refuse_shared_gpus(dev: torch.device, library: str) -> None:
    """Collective: NCCL cannot put two ranks on one GPU; refuse it at start, on every rank alike
    (per-rank CUDA_VISIBLE_DEVICES, as SLURM's --gpus-per-task sets it, is honoured)."""
    try:
        gpu_id = str(torch.cuda.get_device_properties(dev).uuid)
    except (AttributeError, RuntimeError):
        gpu_id = f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{dev.index}"
    everyone = _B.allgather_object((socket.gethostname(), gpu_id))  # HVD: allgather (small)
    if len(set(everyone)) < len(everyone):
        raise DistError(
            f"{len(everyone)} ranks share {len(set(everyone))} GPU(s): {library} cannot put two ranks on one GPU; "
            "start one rank per GPU, or use --backend gloo (slower, allows sharing)"
        )


def _alone() -> bool:
    """True when there is nobody to communicate with (one rank, or init() never called)."""
    return _B is None or _B.size == 1


def _rank() -> int:
    return 0 if _B is None else int(_B.rank)


# --- collectives ------------------------------------------------------------------------------


def gradient_sync(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, fp16: bool, backward_passes_per_step: int
) -> GradientSync:
    """Gradient averaging around ``optimizer`` for ``model``'s parameters (several ranks only):
    one grouped allreduce per update, ``fp16`` halves its bytes, and ``backward_passes_per_step``
    passes accumulate locally before it starts."""
    assert _B is not None, "gradient_sync needs several ranks"
    return _B.gradient_sync(optimizer, model, fp16, backward_passes_per_step)


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
    dtype, device = tensors[0].dtype, tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    with watchdog.waiting(name):
        flat = _B.average_(flat, name=name)  # HVD: allreduce (one fused buffer)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n


def broadcast_model(model: torch.nn.Module) -> None:
    """Collective: every rank receives rank 0's parameters and buffers."""
    if not _alone():
        with watchdog.waiting("mpirl.weights"):
            _B.broadcast_module(model)  # HVD: broadcast


def broadcast_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank receives rank 0's optimizer state.

    Only call this when rank 0's optimizer has state (after a restore): on a fresh optimizer
    Horovod would run a zero-gradient step to create state, which offsets Adam's step count.
    """
    if not _alone():
        with watchdog.waiting("mpirl.optimizer"):
            _B.broadcast_optimizer(optimizer)  # HVD: broadcast (several)


def broadcast_object(obj: T, name: str) -> T:
    """Collective: rank 0's picklable ``obj`` on every rank. ``name`` is required (see README)."""
    if _alone():
        return obj
    with watchdog.waiting(name):
        return _B.broadcast_object(obj, name=name)  # HVD: broadcast


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
    with watchdog.waiting(name):
        return _B.allreduce_sum(values, name=name)  # HVD: allreduce


def allreduce_min_max(value: float, name: str) -> tuple[float, float]:
    """Collective: (min, max) of a scalar over ranks; used to prove replicas are identical."""
    if _alone():
        return float(value), float(value)
    with watchdog.waiting(name):
        out = _B.allreduce_min(np.array([value, -value]), name=name)  # HVD: allreduce
    return float(out[0]), float(-out[1])


def allgather_object(obj: Any) -> list[Any]:
    """Collective: every rank's small picklable ``obj``, in rank order, on every rank. Objects
    may differ in size between ranks (it runs before anything assumes they agree)."""
    if _alone():
        return [obj]
    with watchdog.waiting("mpirl.allgather"):
        return _B.allgather_object(obj)  # MPI: allgather (small)


def gather_to_root(obj: Any) -> list[Any]:
    """Collective: rank 0 gets every rank's small picklable ``obj`` in rank order; others []."""
    if _alone():
        return [obj]
    with watchdog.waiting("mpirl.gather"):
        return _B.gather_to_root(obj)  # MPI: gather (small)


def send_object(dest: int, obj: Any) -> None:
    """Point-to-point: a picklable message to ``dest`` (returns once it was handed over, so at
    most one is in flight per sender)."""
    with watchdog.waiting(f"replay shard stream (to rank {dest})"):
        _B.send_object(dest, obj)  # MPI: p2p send


def recv_object(source: int) -> Any:
    """Point-to-point: the next message ``send_object`` sent from ``source``."""
    with watchdog.waiting(f"replay shard stream (from rank {source})"):
        return _B.recv_object(source)  # MPI: p2p receive


def versions() -> dict[str, str]:
    """Versions of the communication libraries in use, for checkpoints' provenance."""
    from mpirl import dist_horovod

    return {"horovod": dist_horovod.version()} if dist_horovod.importable() else {}


# --- errors and abort -------------------------------------------------------------------------


def stderr_taken(timeout: float = 5.0) -> bool:
    """Wait (bounded, seconds) until the launcher has read all this rank wrote to stderr.

    mpirun and srun forward a rank's stderr through a pipe, and when a rank exits non-zero they
    end the job, dropping what they have not yet read: under load a peer's error line was lost
    that way though it had been written before the ranks' barrier. FIONREAD on a pipe counts its
    unread bytes (Linux, either end). A file or terminal is never behind: True at once; False if
    the pipe still held bytes at ``timeout`` (a launcher that stopped reading)."""
    import array
    import fcntl
    import stat
    import termios

    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return True
    except (OSError, ValueError, AttributeError):  # stderr replaced (pytest capture) or closed
        return True
    unread, deadline = array.array("i", [0]), time.monotonic() + timeout
    while True:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, unread, True)
        except OSError:
            return True  # not a pipe that can tell: nothing to wait for
        if unread[0] == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def abort(code: int = 1) -> None:
    """End the whole job now (MPI_Abort where MPI runs; under torchrun, exiting makes torchrun
    end the others); a plain process just exits. What this rank wrote to stderr (the reason)
    reaches the launcher first (``stderr_taken``, bounded)."""
    sys.stdout.flush()
    stderr_taken(2.0)
    if "mpi4py.MPI" in sys.modules:  # MPI is up (Horovod, or torch launched by mpirun/srun)
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    os._exit(code)


class AgreedError(RuntimeError):
    """An error every rank raises alike, after agreeing on it through a collective (so no rank
    is left waiting); ends the job with ``exit_code`` and one line per rank, no MPI_Abort."""

    exit_code = 3


def _settle(timeout: float = 10.0) -> None:
    """Wait (bounded) until the launcher has read this rank's message and every rank got
    here, so that no rank's exit ends the job before each rank's message reached the user.
    Only for errors all ranks raise alike (agreed by a collective)."""
    stderr_taken()
    if not _alone():
        _B.barrier_within(timeout)  # HVD: barrier with a deadline
    elif _B is None and launch_info().world_size > 1 and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI  # an error before any backend started (bad options): MPI itself is up

        if MPI.Is_initialized() and not MPI.Is_finalized():
            req, deadline = MPI.COMM_WORLD.Ibarrier(), time.monotonic() + timeout  # MPI: barrier with a deadline
            while not req.Test() and time.monotonic() < deadline:
                time.sleep(0.01)


def exit_process(code: int) -> None:  # the CLI's last call; the torch backend skips C++ teardown (its exit)
    getattr(_B, "exit", sys.exit)(code)


def run_or_abort(fn: Callable[[], T], user_errors: tuple[type[BaseException], ...] = ()) -> T:
    """Run ``fn``; on an uncaught exception print it with this rank and abort every rank.

    Errors in ``user_errors`` (and DistError) print one line and exit 2 (no traceback): they
    are raised on every rank alike (validation), so each rank exits without waiting for the
    others. Any other exception may be on one rank only, so it must take the job down: abort.
    """
    one_line: tuple[type[BaseException], ...] = (DistError, *user_errors)
    try:
        return fn()
    except one_line as exc:
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
        dead = peers.gone() if not _alone() else []  # a peer that died makes this rank's collective fail
        why = f"; {', '.join(dead)} died first" if dead else ""
        sys.stderr.write(f"{tb}mpirl: rank {rank} failed: {type(exc).__name__}: {exc}{why}\n")
        abort(1)
        raise  # not reached
