"""A benchmark users run themselves: ``python -m jitkernels.benchmark`` (or :func:`run`).

Folding is memory-bound, so every number here is a ratio measured in one run on one machine: a kernel's time
against the machine's read bandwidth (its *roofline*), and against the peers' time on the same updates. Absolute
times mean little on a shared machine.

What is measured, per workload (N float32 elements in uneven leaves, k updates):

* **probe**: a STREAM-like read of 256 MB of float32 by ``jitkernels._core.probe_read`` on the kernels' threads,
  each call the next slice of a buffer four times the last-level cache (so it reads memory, not cache). Its
  bandwidth B bounds every fold.
* **fold_many**: ``Aggregator.fold_many`` of k pre-admitted updates into a cleared aggregator, per backend and input
  dtype (float32, float16, bfloat16, int8 via :meth:`Quantized.quantize` per leaf). Bytes moved:
  ``k*N*itemsize(in) + 2*N*4`` (each update read once; the float32 accumulator read and written once; int8 counts
  values and scales).
* **fold**: the same k updates folded one call at a time (``agg.fold(a)``, as they would arrive). Bytes moved:
  ``k*(N*itemsize(in) + 2*N*4)``: the accumulator is read and written once per call. A call's fixed cost is
  measured apart, on the same layout shrunk to one element per leaf.
* **admit_many**: the admission stats pass alone over the k raw updates. Bytes moved: ``k*N*itemsize(in)``.
* **peers** on the same float32 updates (:data:`PEERS`): numpy eager ``acc += w*u``, torch ``add_(alpha=)`` and
  ``_foreach_add_``, Flower's ``aggregate``/``aggregate_inplace``, NVFlare's ``WeightedAggregationHelper``; their
  roofline counts the bytes of the fused float32 fold (``k*N*4 + 8N``), what a weighted sum must move; jitkernels'
whole average (``fold_many+finalize``: zeroing, fold, finalize) counts its own, ``k*N*4 + 20N``.

Every measurement is **interleaved** with the probe (probe, kernel, probe, kernel, ..., probe): the probe drifts
over a run (10-20 %, up to 2x on a shared host), so a row reports its median time, the median of the probes
around it, and ``fraction of roofline = (bytes / B) / time``. B is a read bandwidth: traffic that writes (the
accumulator, an output) can go faster or slower than reads on a given machine, so a fraction is a ratio to that
probe, not to a bound, and can pass 1 without any cache (the per-update fold rows did on an EPYC whose 32 MB L3
could not hold their 100 MB accumulator); a workload whose data fit in the last-level cache passes it too.

Accumulators are kept across repetitions, as a server keeps them across rounds: jitkernels clears its own with
``agg.reset(reuse=True)`` (zeroed in place) and numpy/torch eager get theirs zeroed, both untimed, so no timing pays
the page faults of a fresh model-sized buffer. Flower's and NVFlare's calls allocate theirs inside, as their APIs do;
that is part of their cost.

Peak extra memory is measured in one untimed pass per method, which also warms it up: ``traced`` is the peak of
numpy (and Python) allocations seen by :mod:`tracemalloc`, results included; torch's CPU allocator is invisible to
it, so ``rss`` is the growth of the resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, with freed heap memory first returned by ``malloc_trim``). Neither counts the reused
accumulators above, which every method needs once (4N bytes).

``OMP_WAIT_POLICY=passive`` is set (unless already set) before any OpenMP runtime is loaded: torch, numba and the
C++ kernels each bring an OpenMP thread pool, and by default a pool's threads spin after each parallel region,
stealing the cores the next library's kernel needs (on a 2-core machine, all of them). The header says whether the
setting came too late (torch or the C++ extension imported before this module: the command line then runs again
with it set, :func:`command_line`).
"""

from __future__ import annotations

import os
import sys

# OpenMP runtimes read the variable when they load: note any that loaded before it was set here.
_SET_TOO_LATE = [] if "OMP_WAIT_POLICY" in os.environ else [m for m in ("torch", "jitkernels._core")
                                                             if m in sys.modules]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

import jitkernels as jk  # noqa: E402

from . import _core  # noqa: E402  (the probe lives in the C++ extension)
from .progress import bar as progress_bar  # noqa: E402

PROBE_MB = 256
DTYPES = ("float32", "float16", "bfloat16", "int8")
BACKENDS = ("numpy", "numba", "cpp")
ACC_ITEMSIZE = 4  # float32 accumulator
DEFAULT_SIZES = ((25_000_000, 50, 10), (1_000_000, 50, 10), (100_000, 10, 100))
"""(N, leaves, k): a large model, a small one, and the small-model regime where per-call overhead shows."""
QUICK_SIZES = ((500_000, 20, 8), (50_000, 10, 32))


# --- workloads ---------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """k distinct float32 updates of N elements split into uneven leaves, their weights (sample counts) and parties;
    the same updates in the other input dtypes are made on first use and cached."""

    n: int
    k: int
    sizes: np.ndarray
    weights: list
    parties: list
    flat: list  # k float32 arrays of N elements; the leaves are views into them
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def leaves(self) -> int:
        return len(self.sizes)

    @property
    def label(self) -> str:
        return f"N={self.n:,} in {self.leaves} leaves, k={self.k}"

    def _split(self, flat) -> dict:
        bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        return {f"layer{i:02d}.weight": flat[bounds[i]:bounds[i + 1]] for i in range(self.leaves)}

    def updates(self, dtype: str) -> list:
        """The k updates as dicts of leaves in ``dtype`` (int8: a per-leaf :class:`Quantized`)."""
        if dtype not in self._cache:
            if dtype == "float32":
                ups = [self._split(f) for f in self.flat]
            elif dtype == "int8":
                ups = [{name: jk.Quantized.quantize(leaf) for name, leaf in self._split(f).items()}
                       for f in self.flat]
            else:
                dt = jk.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
                ups = [self._split(f.astype(dt)) for f in self.flat]
            self._cache[dtype] = ups
        return self._cache[dtype]

    def template(self, dtype: str) -> dict:
        """A template fixing the layout for ``dtype`` inputs (int8 updates stand in for float32 leaves)."""
        dt = {"bfloat16": jk.bfloat16, "int8": np.float32}.get(dtype, np.dtype(dtype))
        return self._split(np.zeros(self.n, dt))

    def update_bytes(self, dtype: str) -> int:
        """Bytes of the k updates in ``dtype`` (int8: values and scales)."""
        return sum(leaf.nbytes for u in self.updates(dtype) for leaf in u.values())


def make_workload(n: int, leaves: int, k: int, seed: int = 0) -> Workload:
    """k float32 updates of ``n`` elements in ``leaves`` uneven leaves (log-normal sizes: a few large layers, many
    small ones, as in real models). One RNG draw is rolled k times: distinct arrays at the cost of copies."""
    if n < leaves:
        raise ValueError(f"{n} elements cannot fill {leaves} leaves")
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(0.0, 1.5, leaves)
    # one element each, the rest in proportion (rounding up every leaf to 1 and taking the excess from the largest
    # made it negative where n is close to the leaf count: 50 leaves of 50 elements had one of -13)
    sizes = 1 + np.floor(raw / raw.sum() * (n - leaves)).astype(np.int64)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    base = rng.standard_normal(n, dtype=np.float32)
    flat = [np.roll(base, j * (n // k + 1)) for j in range(k)]
    weights = [int(w) for w in rng.integers(50, 500, k)]  # sample counts; Flower wants ints
    return Workload(n, k, sizes, weights, [f"party-{j}" for j in range(k)], flat)


# --- the bandwidth probe and interleaved timing ------------------------------------------------------------------
class Probe:
    """STREAM-like read bandwidth: ``_core.probe_read`` sums ``mb`` MB of float32 on the kernels' threads.

    Each call reads the next ``mb``-MB slice of a buffer at least four times the last-level cache (STREAM's rule), so
    it reads memory, not cache: on a machine whose cache holds the 256 MB a fixed buffer would be partly cached
    between calls whenever the kernel timed between them touches little data.
    """

    def __init__(self, mb: int = PROBE_MB):
        n = mb * 2 ** 20 // 4
        slices = max(1, -(-4 * _llc_bytes() // (n * 4)))
        self.buf = np.ones((slices, n), np.float32)  # written here, so its pages are resident before the reads
        self._next = 0

    @property
    def span_mb(self) -> int:
        return self.buf.nbytes // 2 ** 20

    def __call__(self) -> float:
        """One timed read of the next slice; GB/s."""
        part = self.buf[self._next]
        self._next = (self._next + 1) % self.buf.shape[0]
        t0 = time.perf_counter()
        _core.probe_read(part, jk.get_num_threads())
        return part.nbytes / (time.perf_counter() - t0) / 1e9


@dataclass
class Timing:
    times: list  # seconds, one per repetition
    bandwidths: list  # GB/s, the probes around them (one more than times)

    @property
    def time(self) -> float:
        return statistics.median(self.times)

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.bandwidths)


def interleaved(fn: Callable, probe: Probe, *, setup: Callable | None = None, min_reps: int = 3, max_reps: int = 7,
                budget_s: float = 0.5, cap_s: float = 4.0) -> Timing:
    """Time ``fn()`` between probes: probe, [setup], fn, probe, [setup], fn, ..., probe (setup is not timed).

    Repeats at least ``min_reps`` times and until ``budget_s`` of kernel time, at most ``max_reps`` times; a method
    slower than ``cap_s`` in total stops early (fewer than ``min_reps`` repetitions; the row says so).
    """
    times, bws = [], [probe()]
    while True:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        bws.append(probe())
        spent = sum(times)
        if len(times) >= max_reps or (len(times) >= min_reps and spent >= budget_s) or spent >= cap_s:
            return Timing(times, bws)


# --- peak extra memory -------------------------------------------------------------------------------------------
def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap memory may stay resident and hide some growth
        pass


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> int | None:
    """Reset the resident-set high-water mark; the current RSS in bytes, or None where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def peak_memory(fn: Callable) -> tuple:
    """(peak bytes traced by tracemalloc, peak resident-set growth in bytes or None) of one call ``fn()``."""
    gc.collect()
    _malloc_trim()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    rss0 = _reset_peak_rss()
    try:
        fn()
        rss = None if rss0 is None else max(0, _status_kb("VmHWM") * 1024 - rss0)
        traced = tracemalloc.get_traced_memory()[1] - traced0
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return traced, rss


# --- the jitkernels methods --------------------------------------------------------------------------------------
DET_BOUND = 2 ** 20
"""Deterministic mode's bound on weight * |x| in the benchmark (the workload's largest is ~2.5e3)."""


def prepare(wl: Workload, backend: str, dtype: str, deterministic: bool = False) -> tuple:
    """An aggregator for ``dtype`` inputs on ``backend`` (in deterministic mode: float64 binned state, bound
    :data:`DET_BOUND`) and the k updates admitted to it (once, untimed). Raises
    :class:`~jitkernels.BackendUnavailable` where the backend does not run ``dtype``."""
    det = {"deterministic": True, "bound": DET_BOUND} if deterministic else {}
    agg = jk.Aggregator(wl.template(dtype), backend=backend, **det)
    return agg, agg.admit_many(wl.updates(dtype), wl.weights, wl.parties)


def fold_many(agg, admitted) -> None:
    """The fused fold: ``agg.fold_many(admitted)``, one pass over the accumulator for all k updates. Moves
    ``sum(update bytes) + 2*N*4`` bytes. The aggregator must be cleared (``agg.reset(reuse=True)``) between calls."""
    agg.fold_many(admitted)


def fold_each(agg, admitted) -> None:
    """Arrival-time folding: ``agg.fold(a)`` once per admitted update. Moves ``sum(update bytes) + k*2*N*4`` bytes;
    the per-call cost beyond that is Python dispatch (tables, checks, the kernel launch)."""
    for a in admitted:
        agg.fold(a)


def admit(agg, wl: Workload, dtype: str) -> list:
    """The admission stats pass alone: ``agg.admit_many`` of the k raw updates (non-finite count, L2 norm and max-abs
    per update, read in place). Moves ``sum(update bytes)`` bytes."""
    return agg.admit_many(wl.updates(dtype), wl.weights, wl.parties)


def fold_many_finalize(agg, admitted):
    """A round's whole cost: ``reset(reuse=True)`` + ``fold_many`` + ``finalize``, the average itself, what Flower's
    and NVFlare's calls return. Moves ``4*N`` bytes (zeroing), ``sum(update bytes) + 2*N*4`` (the fold) and
    ``2*N*4`` (finalize, into freshly allocated outputs)."""
    agg.reset(reuse=True)
    agg.fold_many(admitted)
    return agg.finalize()


# --- peers (re-exported by bench/peers.py) -----------------------------------------------------------------------
def numpy_eager(accs, updates, weights):
    """numpy's eager loop, as FL platforms write it: ``acc += np.float32(w) * u`` per leaf, per update, into the
    zeroed float32 ``accs``. ``updates`` is a list of k lists of float32 leaves. One temporary per (leaf, update):
    about 20*N bytes moved per update (read u, write and read w*u, read and write acc)."""
    for leaves, w in zip(updates, weights):
        w32 = np.float32(w)
        for acc, x in zip(accs, leaves):
            acc += w32 * x
    return accs


def torch_add(accs, tensors, weights):
    """torch eager: ``acc.add_(u, alpha=w)`` per leaf, per update (``torch.Tensor.add_``, no temporary) into the
    zeroed ``accs``. ``tensors`` are ``torch.from_numpy`` views of the float32 leaves."""
    for leaves, w in zip(tensors, weights):
        for acc, x in zip(accs, leaves):
            acc.add_(x, alpha=w)
    return accs


def torch_foreach(accs, tensors, weights):
    """torch's multi-tensor path: one ``torch._foreach_add_(accs, leaves, alpha=w)`` per update into the zeroed
    ``accs`` (the kernel torch.optim's foreach optimizers use)."""
    import torch

    for leaves, w in zip(tensors, weights):
        torch._foreach_add_(accs, leaves, alpha=w)
    return accs


def flower_aggregate(results):
    """``flwr.server.strategy.aggregate.aggregate(results)``: ``results`` is a list of (NDArrays, num_examples); it
    builds k weighted copies of the model (O(k x model) memory), sums them per layer and divides."""
    from flwr.server.strategy.aggregate import aggregate

    return aggregate(results)


def flower_aggregate_inplace(results):
    """``flwr.server.strategy.aggregate.aggregate_inplace(results)``, what ``FedAvg.aggregate_fit`` runs by default:
    ``results`` is a list of (client proxy, ``FitRes``) whose parameters are the serialized updates
    (``ndarrays_to_parameters``, built untimed). The call deserializes each update (``np.load``, one copy), scales
    it in place and sums; the proxy is unused by the function and passed as None."""
    from flwr.server.strategy.aggregate import aggregate_inplace

    return aggregate_inplace(results)


def nvflare_weighted(updates, weights):
    """NVFlare's ``WeightedAggregationHelper``: ``add(data, weight, contributor_name, contribution_round)`` per update,
    then ``get_result()`` (the average). ``updates`` are dicts of torch tensors (in-place ``add_(alpha=)``) or of
    numpy arrays (``total + v * weight``: two temporaries per leaf)."""
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    helper = WeightedAggregationHelper()
    for j, (u, w) in enumerate(zip(updates, weights)):
        helper.add(data=u, weight=w, contributor_name=f"party-{j}", contribution_round=0)
    return helper.get_result()


# Inputs of each peer, built untimed from the workload's float32 updates (views, except Flower's serialized FitRes).
def _leaf_lists(wl):
    leaves = [list(u.values()) for u in wl.updates("float32")]
    return [np.zeros_like(x) for x in leaves[0]], leaves, wl.weights


def _tensors(wl):
    import torch

    return [[torch.from_numpy(x) for x in u.values()] for u in wl.updates("float32")]


def _torch_leaves(wl):
    import torch

    tensors = _tensors(wl)
    return [torch.zeros_like(t) for t in tensors[0]], tensors, wl.weights


def _zero(accs, *_):
    for acc in accs:
        acc[...] = 0


def _flower_results(wl):
    return ([(list(u.values()), w) for u, w in zip(wl.updates("float32"), wl.weights)],)


def _fitres(wl):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    ok = Status(code=Code.OK, message="")
    return ([(None, FitRes(status=ok, parameters=ndarrays_to_parameters(list(u.values())), num_examples=w,
                           metrics={}))
             for u, w in zip(wl.updates("float32"), wl.weights)],)


def _torch_dicts(wl):
    return [dict(zip(u, t)) for u, t in zip(wl.updates("float32"), _tensors(wl))], wl.weights


def _numpy_dicts(wl):
    return wl.updates("float32"), wl.weights


@dataclass(frozen=True)
class Peer:
    """A peer baseline: ``run(*args)``, ``args = prepare(wl)``, aggregates the workload's float32 updates with a real
    library call; ``clear(*args)`` (untimed, None where the call allocates its own) zeroes its accumulators.
    ``divides``: the call returns the average (compare it with fold_many + finalize), not just the weighted sum."""

    name: str
    package: str  # the top-level package it needs
    module: str  # imported before the untimed memory pass, so that import is not counted as the call's memory
    prepare: Callable
    run: Callable
    divides: bool
    clear: Callable | None = None


_FLWR = "flwr.server.strategy.aggregate"
_NVFLARE = "nvflare.app_common.aggregators.weighted_aggregation_helper"
PEERS = (
    Peer("numpy eager acc+=w*u", "numpy", "numpy", _leaf_lists, numpy_eager, False, _zero),
    Peer("torch add_(alpha=w)", "torch", "torch", _torch_leaves, torch_add, False, _zero),
    Peer("torch _foreach_add_", "torch", "torch", _torch_leaves, torch_foreach, False, _zero),
    Peer("flwr aggregate", "flwr", _FLWR, _flower_results, flower_aggregate, True),
    Peer("flwr aggregate_inplace", "flwr", _FLWR, _fitres, flower_aggregate_inplace, True),
    Peer("nvflare WAH (torch)", "nvflare", _NVFLARE, _torch_dicts, nvflare_weighted, True),
    Peer("nvflare WAH (numpy)", "nvflare", _NVFLARE, _numpy_dicts, nvflare_weighted, True),
)
EAGER = PEERS[0].name


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# --- header --------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _llc_bytes() -> int:
    """Size of the last-level cache in bytes (Linux sysfs; 0 where unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        idx = max((d for d in os.listdir(base) if d.startswith("index")), key=lambda d: int(d[5:]))
        with open(f"{base}/{idx}/size") as f:
            text = f.read().strip()
    except (OSError, ValueError):
        return 0
    unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * unit


def _loadavg():
    """1-minute load average: above ~0 before a run, something else shares the cores and memory bandwidth."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not Unix
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def header(probe: Probe | None = None) -> dict:
    """Date, hardware, threads and versions: what a reader needs to compare two runs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    torch_threads = None
    if installed("torch"):
        import torch

        torch_threads = torch.get_num_threads()
    versions = {"python": platform.python_version(), "numpy": np.__version__, "jitkernels": jk.__version__}
    for dist in ("numba", "torch", "ml_dtypes", "flwr", "nvflare"):
        versions[dist] = _version(dist)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": _loadavg(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cpus": usable,
        "last_level_cache_mb": _llc_bytes() / 2 ** 20,
        "threads": jk.get_num_threads(),
        "torch_threads": torch_threads,
        "simd": _core.simd,
        "openmp": bool(_core.openmp),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "omp_policy_set_after": _SET_TOO_LATE,
        "probe_mb": None if probe is None else probe.buf[0].nbytes // 2 ** 20,
        "probe_span_mb": None if probe is None else probe.span_mb,
        "versions": versions,
    }


# --- the run -------------------------------------------------------------------------------------------------------
def _row(wl, method, backend, dtype, timing=None, nbytes=None, mem=(None, None), note="", kind="jitkernels"):
    row = {"workload": wl.label, "n": wl.n, "leaves": wl.leaves, "k": wl.k, "kind": kind, "method": method,
           "backend": backend, "dtype": dtype, "time_s": None, "times_s": None, "reps": 0, "probe_gbps": None,
           "probe_gbps_all": None, "bytes": nbytes, "frac_roofline": None, "us_per_call": None,
           "extra_us_per_update": None, "vs_numpy_eager": None, "vs_fold_many": None, "jk_speedup": None,
           "jk_speedup_equal_bw": None,
           "traced_peak_bytes": mem[0], "rss_peak_bytes": mem[1], "note": note}
    if timing is not None:
        row.update(time_s=timing.time, times_s=timing.times, reps=len(timing.times), probe_gbps=timing.bandwidth,
                   probe_gbps_all=timing.bandwidths)
        if nbytes is not None:
            row["frac_roofline"] = nbytes / (timing.bandwidth * 1e9) / timing.time
    return row


def _warm_up(backends, dtypes):
    """Compile (numba) and load every kernel once on a tiny workload, outside every measurement."""
    wl = make_workload(4096, 4, 2)
    for backend in backends:
        for dtype in dtypes:
            try:
                agg, adm = prepare(wl, backend, dtype)
            except jk.BackendUnavailable:
                continue
            fold_many_finalize(agg, adm)
            agg.reset(reuse=True)
            fold_each(agg, adm)
            if dtype == "float32":  # (the deterministic row's kernels: compiled inside its memory pass, they were
                # reported as its peak memory on a first run, 12 MB traced for 0)
                fold_many(*prepare(wl, backend, dtype, deterministic=True))


def _measure(wl, method, backend, dtype, fn, probe, nbytes, clear=None, kind="jitkernels"):
    """One row: clear, the untimed memory pass (which also warms ``fn`` up), then the interleaved timing."""
    if clear is not None:
        clear()
    mem = peak_memory(fn)
    return _row(wl, method, backend, dtype, interleaved(fn, probe, setup=clear), nbytes, mem, kind=kind)


def _dispatch_row(wl, backend, probe):
    """The fixed cost of one ``agg.fold(a)`` call: k calls on the workload's layout shrunk to one element per leaf
    (same leaf count, so the same tables and checks; the bytes are negligible)."""
    tiny = make_workload(wl.leaves, wl.leaves, wl.k)
    agg, adm = prepare(tiny, backend, "float32")

    def clear():
        agg.reset(reuse=True)

    row = _measure(wl, "fold, 1 elem/leaf", backend, "float32", lambda: fold_each(agg, adm), probe, None, clear)
    row["us_per_call"] = row["time_s"] / wl.k * 1e6
    return row


def _deterministic_row(wl, backend, probe):
    """``fold_many`` in deterministic mode: two float64 partial sums per element, read and written (32N bytes), or
    on cpp written only (16N): the round's first batch goes into an empty state, whose zeros its kernel does not
    read (:func:`jitkernels.backends.cpp.fold_binned`)."""
    agg, adm = prepare(wl, backend, "float32", deterministic=True)

    def clear():
        agg.reset(reuse=True)

    nbytes = wl.update_bytes("float32") + (2 if backend == "cpp" else 4) * wl.n * 8
    return _measure(wl, DETERMINISTIC, backend, "float32", lambda: fold_many(agg, adm), probe, nbytes, clear)


def _bench_jitkernels(wl, probe, backends, dtypes, bar):
    rows = []
    acc2 = 2 * wl.n * ACC_ITEMSIZE  # the accumulator, read and written
    for backend in backends:
        for dtype in dtypes:
            bar.set_postfix_str(f"{backend} {dtype}")
            try:
                agg, adm = prepare(wl, backend, dtype)
            except jk.BackendUnavailable as e:
                rows.append(_row(wl, "-", backend, dtype, note=f"skipped: {e}"))
                bar.update(3 + 2 * (dtype == "float32"))  # (the measures planned for it: see run's per_wl)
                continue
            ub = wl.update_bytes(dtype)

            def clear(agg=agg):
                agg.reset(reuse=True)

            rows.append(_measure(wl, "fold_many", backend, dtype, lambda: fold_many(agg, adm), probe, ub + acc2, clear))
            bar.update()
            row = _measure(wl, "fold", backend, dtype, lambda: fold_each(agg, adm), probe, ub + wl.k * acc2, clear)
            row["us_per_call"] = row["time_s"] / wl.k * 1e6
            row["extra_us_per_update"] = (row["time_s"] - rows[-1]["time_s"]) / wl.k * 1e6
            rows.append(row)
            bar.update()
            if dtype == "float32":
                rows.append(_dispatch_row(wl, backend, probe))
                bar.update()
                rows.append(_deterministic_row(wl, backend, probe))
                bar.update()
            clear()  # admission refuses parties already folded into the state
            rows.append(_measure(wl, "admit_many", backend, dtype, lambda: admit(agg, wl, dtype), probe, ub))
            bar.update()
    return rows


def _bench_peers(wl, probe, rows, bar):
    """The peers, and jitkernels' fold_many + finalize on the backend fastest at float32 fold_many."""
    f32 = [r for r in rows if r["method"] == "fold_many" and r["dtype"] == "float32" and r["time_s"]]
    # the peers: the fused float32 fold's bytes (module docstring), as the legend and bench/ count them;
    # fold_many_finalize: what it moves, zeroing (one accumulator), the fold (updates, the accumulator read and
    # written), finalize (the accumulator read, a float32 output written)
    fused = wl.update_bytes("float32") + 2 * wl.n * ACC_ITEMSIZE
    whole = fused + 2 * wl.n * ACC_ITEMSIZE + 4 * wl.n
    out = []
    if f32:
        best = min(f32, key=lambda r: r["time_s"])["backend"]
        bar.set_postfix_str(f"{best} fold_many+finalize")
        agg, adm = prepare(wl, best, "float32")
        agg.reset(reuse=True)  # its pages resident, as in every later round
        out.append(_measure(wl, "fold_many+finalize", best, "float32", lambda: fold_many_finalize(agg, adm), probe,
                            whole))
    bar.update()
    for peer in PEERS:
        bar.set_postfix_str(peer.name)
        if not installed(peer.package):
            out.append(_row(wl, peer.name, peer.package, "float32", note="not installed", kind="peer"))
        else:
            importlib.import_module(peer.module)  # not counted as the call's memory
            args = peer.prepare(wl)
            clear = None if peer.clear is None else (lambda: peer.clear(*args))
            out.append(_measure(wl, peer.name, peer.package, "float32", lambda: peer.run(*args), probe, fused, clear,
                                kind="peer"))
            del args
        bar.update()
    return out


FOLDS = ("fold_many", "fold", "fold_many+finalize")
DETERMINISTIC = "fold_many deterministic"


def _ratios(rows):
    """``vs_numpy_eager`` (numpy eager time / row time) on float32 fold rows and peers; ``jk_speedup`` (peer time /
    jitkernels' best comparable time) on peers: fold_many for weighted sums, fold_many + finalize for averages; and
    ``jk_speedup_equal_bw``, the same ratio with each time scaled by its own probe bandwidth (time x GB/s: what it
    would take at one bandwidth), since the two rows are timed minutes apart and the machine's bandwidth drifts
    (exact for methods that memory bounds, an approximation for the compute-bound ones)."""
    eager = next((r["time_s"] for r in rows if r["method"] == EAGER and r["time_s"]), None)
    f32 = [r for r in rows if r["method"] == "fold_many" and r["dtype"] == "float32" and r["time_s"]]
    best_sum = min(f32, key=lambda r: r["time_s"], default=None)
    best_avg = next((r for r in rows if r["method"] == "fold_many+finalize" and r["time_s"]), None)
    divides = {p.name: p.divides for p in PEERS}
    for r in rows:
        if not r["time_s"]:
            continue
        if eager and r["dtype"] == "float32" and (r["kind"] == "peer" or r["method"] in FOLDS):
            r["vs_numpy_eager"] = eager / r["time_s"]
        ref = best_avg if divides.get(r["method"]) else best_sum
        if r["kind"] == "peer" and ref:
            r["jk_speedup"] = r["time_s"] / ref["time_s"]
            if r["probe_gbps"] and ref["probe_gbps"]:
                r["jk_speedup_equal_bw"] = r["time_s"] * r["probe_gbps"] / (ref["time_s"] * ref["probe_gbps"])
        if r["method"] == DETERMINISTIC:
            f = next((x["time_s"] for x in rows if x["method"] == "fold_many" and x["dtype"] == "float32"
                      and x["backend"] == r["backend"] and x["time_s"]), None)
            r["vs_fold_many"] = None if f is None else r["time_s"] / f
            if f is not None:
                r["note"] = f"{r['vs_fold_many']:.2f}x its float32 fold_many"


def run(sizes=None, *, quick: bool = False, backends=None, dtypes=DTYPES, peers: bool = True, threads=None,
        probe_mb: int = PROBE_MB, json_path=None, plot_path=None, progress: bool = True, file=None) -> list:
    """Run the benchmark, print one table (header included) and return its rows (dicts).

    ``sizes``: (N, leaves, k) tuples; default :data:`DEFAULT_SIZES` (:data:`QUICK_SIZES` with ``quick``).
    ``backends``: default every available CPU backend. ``threads``: kernel threads (default
    :func:`jitkernels.get_num_threads`); torch is run on as many. ``json_path`` / ``plot_path``: also write the
    header and rows as JSON, and a bar plot of fold_many's fraction of roofline (PNG).
    """
    sizes = tuple(_check_size(s) for s in (sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)))
    avail = jk.available_backends()
    backends = [b for b in (backends or BACKENDS) if avail.get(b) is True]
    dtypes = list(dtypes)
    old_threads = jk.set_num_threads(threads) if threads else None
    torch_old = None
    if peers and installed("torch"):
        import torch

        torch_old = torch.get_num_threads()
        torch.set_num_threads(jk.get_num_threads())
    try:
        _warm_up(backends, dtypes)
        probe = Probe(probe_mb)
        head = header(probe)
        per_wl = len(backends) * (len(dtypes) * 3 + 2 * ("float32" in dtypes)) + (1 + len(PEERS) if peers else 0)
        rows = []
        with progress_bar(total=per_wl * len(sizes), enabled=progress, unit="measure") as bar:
            for n, leaves, k in sizes:
                bar.set_description(f"N={n:,} k={k}")
                bar.set_postfix_str("generating updates")
                wl = make_workload(n, leaves, k)
                wl_rows = _bench_jitkernels(wl, probe, backends, dtypes, bar)
                if peers:
                    wl_rows += _bench_peers(wl, probe, wl_rows, bar)
                _ratios(wl_rows)
                rows += wl_rows
                del wl
    finally:
        if old_threads:
            jk.set_num_threads(old_threads)
        if torch_old is not None:
            torch.set_num_threads(torch_old)
    head["load_average_end"] = _loadavg()
    print(format_table(head, rows), file=file or sys.stdout)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1)
    if plot_path:
        plot(rows, plot_path)
    return rows


# --- output --------------------------------------------------------------------------------------------------------
_COLUMNS = (  # title, width, row -> text
    ("method", 24, lambda r: r["method"]),
    ("backend", 7, lambda r: r["backend"]),
    ("dtype", 8, lambda r: r["dtype"]),
    ("ms", 9, lambda r: _f(r["time_s"], 1e3, ".2f")),
    ("reps", 4, lambda r: str(r["reps"]) if r["reps"] else ""),
    ("probe", 6, lambda r: _f(r["probe_gbps"], 1, ".1f")),
    ("MB", 7, lambda r: _f(r["bytes"], 1e-6, ".0f")),
    ("roofl", 5, lambda r: _f(r["frac_roofline"], 1, ".2f")),
    ("us/call", 7, lambda r: _f(r["us_per_call"], 1, ".0f")),
    ("+us/upd", 7, lambda r: _f(r["extra_us_per_update"], 1, ".0f")),
    ("x eager", 7, lambda r: _f(r["vs_numpy_eager"], 1, ".2f")),
    ("jk x", 6, lambda r: _f(r["jk_speedup"], 1, ".2f")),
    ("jk x@bw", 7, lambda r: _f(r["jk_speedup_equal_bw"], 1, ".2f")),
    ("trc MB", 7, lambda r: _f(r["traced_peak_bytes"], 1e-6, ".0f")),
    ("RSS MB", 7, lambda r: _f(r["rss_peak_bytes"], 1e-6, ".0f")),
)

LEGEND = """\
ms: median time; reps: repetitions (each between two probes); probe: median read bandwidth (GB/s) of the probes
around them; MB: bytes the method must move (fold_many, peers: k*N*itemsize + 8N; fold_many+finalize: k*N*4 + 20N,
zeroing and finalize included; fold: k*(N*itemsize + 8N);
admit_many: k*N*itemsize; int8 counts values and scales; deterministic: k*N*itemsize + 32N, or + 16N on cpp,
which only writes an empty state's sums); roofl: (MB / probe) /
ms, a ratio to a read probe, above 1 where writes or cache go faster than it (module docstring); us/call:
time per fold call ("fold, 1 elem/leaf": a call's fixed cost, measured on the same layout shrunk to one element per
leaf); +us/upd:
(fold - fold_many) / k, what folding each update on arrival costs over batching; x eager: numpy eager's time / this
time (float32 folds and peers); jk x: this peer's time / jitkernels' best float32 fold_many (or fold_many+finalize
for peers that return the average); jk x@bw: the same with each time scaled by its own probe (time x GB/s), as if
both ran at one bandwidth (rows are timed minutes apart); trc MB: peak numpy allocations (tracemalloc, results included; torch's allocator
is not traced); RSS MB: peak resident-set growth. Neither counts the accumulators that jitkernels and numpy/torch
eager reuse across repetitions (4N bytes); Flower and NVFlare allocate theirs per call."""


def _f(x, scale, spec):
    return "" if x is None else format(x * scale, spec)


def format_table(head: dict, rows: list) -> str:
    """The header, then one table with a section per workload, then the legend."""
    v = head["versions"]
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    missing = ", ".join(k for k, val in v.items() if not val)
    lines = [
        f"jitkernels benchmark  {head['date']}  (1-min load average {head['load_average']} at start, "
        f"{head.get('load_average_end')} at end)",
        f"CPU: {head['cpu']}; {head['cores']} cores ({head['usable_cpus']} usable); last-level cache "
        f"{head['last_level_cache_mb']:.0f} MB",
        f"threads: jitkernels {head['threads']}, torch {head['torch_threads']}; simd {head['simd']}; "
        f"OpenMP {head['openmp']}; OMP_WAIT_POLICY={head['OMP_WAIT_POLICY']}"
        + (f" (set after {', '.join(head['omp_policy_set_after'])} loaded: not in effect there)"
           if head["omp_policy_set_after"] else ""),
        f"versions: {vers}" + (f"; not installed: {missing}" if missing else ""),
        f"probe: {head['probe_mb']} MB float32 read per call (jitkernels._core.probe_read), cycling through "
        f"{head['probe_span_mb']} MB",
    ]
    titles = " ".join(f"{t:<{w}}" if i < 3 else f"{t:>{w}}" for i, (t, w, _) in enumerate(_COLUMNS)) + "  note"
    rule = "-" * len(titles)
    lines += [rule, titles]
    current = None
    for r in rows:
        if r["workload"] != current:
            current = r["workload"]
            lines += [rule, f"[{current}]"]
        cells = [fmt(r) for _, _, fmt in _COLUMNS]
        text = " ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, ((_, w, _), c) in enumerate(zip(_COLUMNS, cells)))
        note = r["note"]
        if r["reps"] and r["reps"] < 3:
            note = (note + "; " if note else "") + "slow: fewer reps"
        lines.append(text + ("  " + note if note else ""))
    lines += [rule, LEGEND]
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    """Bar plot (PNG) of fold_many's fraction of roofline per backend x dtype, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["kind"] == "jitkernels"))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, wl in zip(axes[0], workloads):
        sel = [r for r in rows if r["workload"] == wl and r["method"] == "fold_many"]
        dts = list(dict.fromkeys(r["dtype"] for r in rows if r["workload"] == wl and r["kind"] == "jitkernels"))
        for i, b in enumerate(backends):
            vals = [next((r["frac_roofline"] for r in sel if r["backend"] == b and r["dtype"] == d), 0) or 0
                    for d in dts]
            ax.bar(np.arange(len(dts)) + (i - (len(backends) - 1) / 2) * width, vals, width, label=b)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(dts)), dts)
        ax.set_title(wl, fontsize=9)
        ax.set_ylabel("fold_many: fraction of roofline")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _size(text: str) -> tuple:
    """N:LEAVES:K, checked when parsed (a bad second --size crashed when its workload was built, after the first
    had been measured, and took every row with it)."""
    try:
        n, leaves, k = (int(x.replace("_", "")) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:LEAVES:K, got {text!r}") from None
    try:
        return _check_size((n, leaves, k))
    except ValueError:
        raise argparse.ArgumentTypeError(f"need 1 <= LEAVES <= N and K >= 1, got {text!r}") from None


def _check_size(size) -> tuple:
    """(N, leaves, k) as ints with 1 <= leaves <= N and k >= 1, else ValueError (run() checks every size before the
    first is measured: jk.bench's were not checked, and a bad later one lost the earlier rows)."""
    try:
        n, leaves, k = size
    except (TypeError, ValueError):
        raise ValueError(f"a size is (N, LEAVES, K), got {size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size) or not (
            1 <= leaves <= n and k >= 1):
        raise ValueError(f"need integers 1 <= LEAVES <= N and K >= 1 in a size (N, LEAVES, K), got {size!r}")
    return int(n), int(leaves), int(k)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--threads 0`` was ignored, ``--probe-mb 0`` divided by zero)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def available_or_exit(names, what: str) -> None:
    """Stop with one line for each backend named on the command line that this machine cannot run (they were dropped
    without a word, or left none, and the run crashed at its end)."""
    avail = jk.available_backends()
    missing = [f"{b} ({avail.get(b)})" for b in names or () if avail.get(b) is not True]
    if missing:
        raise SystemExit(f"{what}: backends not available here: {', '.join(missing)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jitkernels.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK_SIZES} (a smoke run)")
    p.add_argument("--size", type=_size, action="append", metavar="N:LEAVES:K",
                   help=f"a workload (repeatable); default {DEFAULT_SIZES}")
    p.add_argument("--backends", nargs="+", choices=BACKENDS)
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--threads", type=positive_int, help="kernel threads (default: jitkernels.get_num_threads())")
    p.add_argument("--probe-mb", type=positive_int, default=PROBE_MB)
    p.add_argument("--json", metavar="PATH", help="write header and rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of fold_many's fraction of roofline")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    available_or_exit(a.backends, "python -m jitkernels.benchmark")
    run(a.size, quick=a.quick, backends=a.backends, dtypes=a.dtypes, peers=not a.no_peers, threads=a.threads,
        probe_mb=a.probe_mb, json_path=a.json, plot_path=a.plot, progress=not a.no_progress)
    return 0


def command_line(argv, module: str = "jitkernels.benchmark", entry=None) -> int:
    """The command line of a benchmark module (``python -m jitkernels.benchmark``, ``jitagg bench``, and the
    algorithms and GPU benchmarks): ``entry(argv)`` (this module's :func:`main` by default). Importing the package
    loads the C++ extension, whose OpenMP runtime reads ``OMP_WAIT_POLICY`` then: where that came before this module
    could set it, the command runs again in a fresh interpreter that has it from the start (the header says so
    either way)."""
    if _SET_TOO_LATE:
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])  # the environment has it now
    return (entry or main)(argv)


if __name__ == "__main__":
    sys.exit(command_line(sys.argv[1:]))
