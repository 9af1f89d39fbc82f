"""Kernel thread count: ``JITKERNELS_NUM_THREADS``, then ``OMP_NUM_THREADS``, then the CPUs this process may use."""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def _default() -> int:
    for var in ("JITKERNELS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").split(",")[0].strip()
        if v:
            try:
                n = int(v)
            except ValueError:
                raise ValueError(f"{var}={os.environ[var]!r} is not a thread count") from None
            if n > 0:
                return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_threads = _default()


def get_num_threads() -> int:
    return _threads


def set_num_threads(n: int) -> int:
    """Set the threads every backend's kernels use; returns the previous value."""
    global _threads
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    with _lock:
        old, _threads = _threads, n
    return old
