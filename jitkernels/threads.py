"""Kernel thread count: ``JITKERNELS_NUM_THREADS``, then ``OMP_NUM_THREADS``, then the CPUs this process may use."""

from __future__ import annotations

import operator
import os
import threading
import warnings

_lock = threading.Lock()
# more threads than any machine runs kernels on: a larger count is a typo (100000 made OpenMP's team and the
# kernels' per-thread partials fail, a segfault in the C++ stats pass)
MAX_THREADS = 1024


def _default() -> int:
    """Our own variable must be a count (a wrong one is refused, naming it); OpenMP's is meant for other programs as
    well and must not stop the import: one we cannot use is passed over with a warning."""
    for var in ("JITKERNELS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").split(",")[0].strip()
        if not v:
            continue
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n > MAX_THREADS:
            warnings.warn(f"{var}={n}: jitkernels' kernels use at most {MAX_THREADS} threads", stacklevel=2)
            return MAX_THREADS
        if n > 0:
            return n
        if var == "JITKERNELS_NUM_THREADS":
            raise ValueError(f"JITKERNELS_NUM_THREADS={os.environ[var]!r} is not a thread count (1 to {MAX_THREADS})")
        warnings.warn(f"OMP_NUM_THREADS={os.environ[var]!r} is not a thread count: jitkernels passes it over",
                      stacklevel=2)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_threads = _default()
# GNU OpenMP's thread pool is not fork-safe: a child forked after it started hangs for ever in its first parallel
# region (multiprocessing's default start method on Linux before Python 3.14). A kernel that may have run on more
# than one thread is one that asked for the count while it was above 1; a child forked after that runs its kernels
# on one thread, which never enters the pool.
_pool = False
_forked = False


def _after_fork_in_child() -> None:
    global _threads, _forked
    if _pool:
        _threads, _forked = 1, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_num_threads() -> int:
    global _pool
    if _threads > 1:
        _pool = True
    return _threads


def thread_count(n, what: str = "the thread count") -> int:
    """``n`` as a whole number of threads in [1, MAX_THREADS] (ints, numpy ints, integral floats), else ValueError
    naming ``what``."""
    try:  # (ints and numpy ints as they are: float(10**400) raised OverflowError; "2" was taken)
        count = operator.index(n) if not isinstance(n, bool) else None
    except TypeError:
        count = int(n) if isinstance(n, float) and n.is_integer() else None
    if count is None:
        raise ValueError(f"{what} must be a whole number of threads, got {n!r}")
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"{what} must be within 1 to {MAX_THREADS}, got {count}")
    return count


def set_num_threads(n: int) -> int:
    """Set the threads every backend's kernels use; returns the previous value. In a process forked from one whose
    kernels ran on several threads, more than one is refused with a warning and 1 kept (GNU OpenMP is not fork-safe:
    start worker processes with the 'spawn' method for threads of their own)."""
    global _threads
    n = thread_count(n)
    if n > 1 and _forked:
        warnings.warn(f"set_num_threads({n}): this process was forked from one whose kernels ran OpenMP threads, "
                      "which cannot run in a forked child (it would hang): its kernels run on 1 thread; start worker "
                      "processes with the 'spawn' method for more", RuntimeWarning, stacklevel=2)
        n = 1
    with _lock:
        old, _threads = _threads, n
    return old
