"""Threads for Warp's CPU kernels, which run on one thread each and release the GIL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import SimpleQueue

import torch

# Each worker thread gets at least this many tets: below, splitting costs more than it saves.
MIN_TETS_PER_WORKER = 1024
# A fused contact launch, whose other threads only add tet forces while its main thread
# also runs the contact part of each substep, shares its tets from this many per worker
# (side by side, best of 5: the colliding spheres' 1,632 tets 0.149 -> 0.131 ms a substep
# forward, 0.263 -> 0.211 forward+backward; the mat on the ball's 1,662 0.243 -> 0.228
# and 0.509 -> 0.462; the ball at the mat's 2,022, 7.4 -> 6.8 ms a frame; 256 no better).
MIN_TETS_PER_CONTACT_WORKER = 400


class SplitLauncher:
    """Runs jobs on this thread and ``threads - 1`` helper threads at once.

    Warp's CPU kernels run on one thread and release the GIL, so launches made from
    several threads run in parallel on several cores. One launcher per thread count
    serves every backend of the process; a lock keeps callers from different threads apart.
    """

    _shared: dict[int, SplitLauncher] = {}

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self._queues: list[SimpleQueue] = []
        self._done: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        for i in range(threads - 1):
            jobs: SimpleQueue = SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(jobs,), daemon=True, name=f"diffsim-warp-{i + 1}"
            )
            thread.start()
            self._queues.append(jobs)

    @classmethod
    def shared(cls, threads: int = 2) -> SplitLauncher:
        """The process-wide launcher with this many threads, started on first use."""
        if threads not in cls._shared:
            cls._shared[threads] = cls(threads)
        return cls._shared[threads]

    def _work(self, jobs: SimpleQueue) -> None:
        while True:
            job = jobs.get()
            try:
                job()
                self._done.put(None)
            except BaseException as error:  # handed back to the caller
                self._done.put(error)

    def run(self, first, *others) -> None:
        """Runs ``others`` on helper threads and ``first`` here; waits for all of them."""
        if len(others) >= self.threads:
            raise ValueError(f"{len(others) + 1} jobs for {self.threads} threads")
        with self._lock:
            for jobs, job in zip(self._queues, others, strict=False):
                jobs.put(job)
            try:
                first()
            finally:
                errors = [self._done.get() for _ in others]
        for error in errors:
            if error is not None:
                raise error


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch's intra-op threads set to one within the block, as they were after it.

    The Warp backend's CPU work runs in its own worker threads; the torch ops between its
    launches are small. Torch's OpenMP threads go on spinning after each parallel op and
    take the cores from the workers: with torch's default threads (one per core),
    spheres_collide ran its frames forward 1.4-1.66 times slower on two cores than with one
    (benchmarks/bench_torch_threads.py). Process-wide while it lasts, as
    ``torch.set_num_threads`` is.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
