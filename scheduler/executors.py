"""Executors run a deployment's tasks (a fused fold of the pending updates, or a finalize).

* :class:`LocalExecutor` (default, real clock): a thread pool; the kernels release the GIL, so folds of several
  jobs run in parallel. Threads per kernel are sized so that slots x kernel threads <= cores.
* :class:`ModelExecutor` (virtual clock): a task takes the cost model's estimate of virtual time.
* :class:`MeasuredExecutor` (virtual clock, the simulator's ``--real`` mode): runs the real task, then lets virtual
  time advance by the measured duration.

``run(task, done)`` calls ``done(duration_s, result, error)`` on the clock's thread when the task ends.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jitkernels as jk


@dataclass
class Task:
    kind: str  # "fold" | "finalize"
    job: str
    round: int
    n_updates: int
    nbytes: int
    est_s: float
    fn: object = field(default=None, repr=False)  # () -> result, or None for a modelled job


def _call(task: Task):
    t0 = time.perf_counter()
    result, error = None, None
    try:
        result = task.fn() if task.fn is not None else None
    except Exception as e:  # surfaced through the round's future
        error = e
    return time.perf_counter() - t0, result, error


class ModelExecutor:
    """Virtual time advances by the cost model's estimate; a task with data still runs (so results are real and
    timings deterministic)."""

    def __init__(self, clock):
        self.clock = clock

    def run(self, task: Task, done) -> None:
        _, result, error = _call(task)
        self.clock.call_later(task.est_s, done, task.est_s, result, error)

    def close(self):
        pass


class MeasuredExecutor:
    """Virtual time advances by the measured duration of the real task."""

    def __init__(self, clock):
        self.clock = clock

    def run(self, task: Task, done) -> None:
        dt, result, error = _call(task)
        self.clock.call_later(dt, done, dt, result, error)

    def close(self):
        pass


class LocalExecutor:
    def __init__(self, clock, slots: int, kernel_threads: int | None = None):
        self.clock = clock
        self.pool = ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="jitkernels-fold")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.kernel_threads = kernel_threads or max(1, cores // max(1, slots))
        self._old_threads = jk.set_num_threads(self.kernel_threads)

    def run(self, task: Task, done) -> None:
        def work():
            self.clock.call_soon_threadsafe(done, *_call(task))

        self.pool.submit(work)

    def close(self):
        self.pool.shutdown(wait=True)
        jk.set_num_threads(self._old_threads)
