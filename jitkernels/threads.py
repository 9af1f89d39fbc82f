"""Kernel thread count: ``JITKERNELS_NUM_THREADS``, then ``OMP_NUM_THREADS``, then the CPUs this process may use."""

from __future__ import annotations

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


def get_num_threads() -> int:
    return _threads


def set_num_threads(n: int) -> int:
    """Set the threads every backend's kernels use; returns the previous value."""
    global _threads
    if isinstance(n, bool) or not float(n).is_integer():
        raise ValueError(f"the thread count must be a whole number of threads, got {n!r}")
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"the thread count must be within 1 to {MAX_THREADS}, got {n}")
    with _lock:
        old, _threads = _threads, n
    return old
