"""Fits spread over processes (and machines) with torch.distributed.

Every process of a distributed fit holds the same parameters and runs its share of the
targets; one all-reduce per loss evaluation sums what each share contributes (per-target
losses and gradients, see :class:`Reducer`), so every process takes the same optimiser
step. Launch with ``torchrun``, which sets the environment :func:`reducer` reads
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). The backend is
gloo for CPU simulators and NCCL for CUDA ones; a process group the caller initialised
first is used as it is. See docs/distributed-fitting.md.
"""

from __future__ import annotations

import atexit
import gc
import os
from datetime import timedelta

import torch

# How long a process waits for the others at a collective before giving up (s).
TIMEOUT_S = 600


class Reducer:
    """Sums tensors over the processes of a fit; this base class is the one-process case.

    Attributes:
        rank: this process's index (0 writes results and reports).
        size: the number of processes.
    """

    rank = 0
    size = 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over the processes (here: ``values``)."""
        return values

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true in any process."""
        return bool(flag)

    @property
    def distributed(self) -> bool:
        return self.size > 1


class ProcessGroupReducer(Reducer):
    """Sums over the default torch.distributed process group.

    Args:
        device: the device of the tensors it sums: the simulator's for NCCL, CPU for gloo.
    """

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.device = device

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to(self.device).clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM)
        return out.to(values.device)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(self.sum(t)[0] > 0)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def initialized() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def reducer(distributed: bool | None, device: str | torch.device = "cpu") -> Reducer:
    """The reducer of a fit, initialising the process group where needed.

    Args:
        distributed: True to spread the fit over the processes of a process group (the
            existing one, or one made from torchrun's environment); False for one process;
            None to decide from the environment (an initialised group of more than one
            process, or ``WORLD_SIZE`` > 1).
        device: the simulator's device (it picks NCCL for CUDA, gloo for CPU).

    Raises:
        RuntimeError: distributed asked for but torch.distributed (or the environment
            torchrun sets) is missing.
    """
    device = torch.device(device)
    if distributed is None:
        distributed = (initialized() and _world_size() > 1) or launched()
    if not distributed:
        return Reducer()
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("distributed fitting needs torch.distributed, which this torch lacks")
    if not dist.is_initialized():
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise RuntimeError(
                f"distributed fitting: no process group and no {', '.join(missing)} in the "
                "environment; start the processes with torchrun (docs/distributed-fitting.md) "
                "or call torch.distributed.init_process_group first"
            )
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(_local_device(device))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S))
        global _created
        _created = True
        # A script that ends with the group alive had a process abort at exit, tearing down
        # Gloo's threads ("terminate called without an active exception", once in a CI run
        # of tests/test_fit_distributed.py): destroy it at exit, after a barrier.
        atexit.register(finish)
    collective = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return ProcessGroupReducer(collective)


def local_device(device: str | torch.device) -> torch.device:
    """The CUDA device of this process on its machine (``cuda:LOCAL_RANK`` modulo the
    device count) for a CUDA ``device``; other devices as they are."""
    device = torch.device(device)
    return _local_device(device) if device.type == "cuda" else device


def share_cores() -> int | None:
    """Splits this machine's cores between the processes torchrun started on it.

    Sets ``DIFFSIM_WARP_THREADS`` (the Warp backend's CPU threads) to the cores this process
    may use divided by ``LOCAL_WORLD_SIZE``, unless it is set already or this process was
    not started by torchrun with several processes. Call it before building the simulator.

    Returns:
        The threads per process it set, or None if it set nothing.
    """
    if not launched() or "DIFFSIM_WARP_THREADS" in os.environ:
        return None
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // local)
    os.environ["DIFFSIM_WARP_THREADS"] = str(threads)
    return threads


def finish() -> None:
    """Destroys the process group if :func:`reducer` created it, after a barrier (the command
    line calls this at its end; from Python the group stays for the next fit, and this runs
    at the interpreter's exit)."""
    global _created
    if _created and initialized():
        import torch.distributed as dist

        # Every process reaches the end before any destroys the group: one process
        # tearing down while another still has Gloo work pending aborted it at exit
        # ("terminate called without an active exception"), once in a CI run.
        dist.barrier()
        dist.destroy_process_group()
        # Gloo's work objects hold tensors; freed during the interpreter's finalization they
        # take the GIL of a dying interpreter and abort: free them while it is alive.
        gc.collect()
    _created = False


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    if initialized():
        import torch.distributed as dist

        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


_created = False


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _local_device(device: torch.device) -> torch.device:
    if device.index is not None:
        return device
    count = max(torch.cuda.device_count(), 1)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
