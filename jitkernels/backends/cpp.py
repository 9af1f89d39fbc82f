"""The C++ backend: jitkernels._core (OpenMP, GIL released, AVX2/F16C chosen at run time)."""

from __future__ import annotations

import os
import warnings

import numpy as np

from ..batch import CODE, rows_from_items, threads_for, walk
from ..threads import get_num_threads
from ..state import BINNED_BATCH
from .numpy_ref import binned_constants

NAME = "cpp"
DTYPES = ("float64", "float32", "float16", "bfloat16", "int8")
WHOLE_CALLS = True  # a fold call checks its arguments and allocates before it writes: it writes all or nothing

try:
    from .. import _core
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _core = None
    _reason = f"C++ extension not built ({e}); reinstall with `pip install -e .`"
else:
    _reason = None
    # The extension reads the variable itself and honours only "baseline"; a typo would silently test the AVX2 code.
    if os.environ.get("JITKERNELS_SIMD", "auto") not in ("auto", "", "baseline"):
        warnings.warn(f"JITKERNELS_SIMD={os.environ['JITKERNELS_SIMD']!r} is neither 'baseline' nor 'auto'; ignored "
                      f"(the C++ backend runs {_core.simd})", RuntimeWarning, stacklevel=2)


def available():
    return True if _core is not None else _reason


def _walk(g):
    """(work, share, tiles): the group's work items and batch.walk's order of them, for threads_for's threads."""
    return (g.work,) + walk(g, threads_for(g, get_num_threads()))


def finite_maxabs(a) -> tuple:
    """(non-finite values, max |x| of the finite ones) of a C-contiguous float32/float64 array, on the kernel
    threads (csrc/kernels.h ``finite_maxabs``)."""
    return _core.finite_maxabs(a, get_num_threads())


def fold(acc, base, g):
    """:func:`numpy_ref.fold`'s math, element order and bytes (csrc/kernels.h ``fold_rows``; the updates of a tile
    in groups of four per pass over its accumulator, which stays in cache)."""
    _core.fold(acc, base, CODE[g.in_dtype], g.off, g.ptr, g.w, g.scale_ptr, g.block, *_walk(g))


def fold_binned(hi, lo, base, g, bound_log2, zero=False):
    """:func:`numpy_ref.fold_binned` (deterministic mode), bit for bit: 32 bytes of accumulator moved per element
    (``hi`` and ``lo`` read and written) beside the updates (``fold_binned_rows``); with ``zero`` (hi and lo hold
    zeros over the group's rows: a state's first batch) they are written and not read, 16 bytes."""
    if g.k > BINNED_BATCH:  # the kernel's biased low part has room for 2^19 terms; Aggregator folds in parts
        raise ValueError(f"the deterministic kernel takes at most {BINNED_BATCH} updates per call, got {g.k}")
    s1, s2 = binned_constants(bound_log2)
    _core.fold_binned(hi, lo, base, CODE[g.in_dtype], g.off, g.ptr, g.w, g.scale_ptr, g.block, *_walk(g), s1, s2,
                      zero)


def stats(base, g, acc_dtype):
    """:func:`numpy_ref.stats` (``stats_rows``: float64 sums of squares, in lanes)."""
    per_item = _core.stats(base, np.dtype(acc_dtype), CODE[g.in_dtype], g.off, g.ptr, g.scale_ptr, g.block,
                           *_walk(g))
    return rows_from_items(g, *per_item)


def fold_stats(acc, base, g, norms: bool = True):
    """fold() and stats() in one pass over the updates (for a batch into an empty state; see Aggregator). Without
    ``norms`` the sums of squares are not formed (returned as zeros): finiteness is tested by sums of x - x."""
    per_item = _core.fold_stats(acc, base, CODE[g.in_dtype], g.off, g.ptr, g.w, g.scale_ptr, g.block, *_walk(g),
                                norms)
    return rows_from_items(g, *per_item)


def finalize(acc, base, og):
    """:func:`numpy_ref.finalize`: reads the accumulator (and base), writes each output once, rounded to its dtype
    in the kernel (``finalize_rows``)."""
    _core.finalize(acc, base, CODE[og.out_dtype], og.off, og.total_w, og.ptr, og.work, get_num_threads())


def step(acc, x, m, v, kind, coef, og):
    """:func:`numpy_ref.step`, one fused pass (``step_span``: 24 bytes per float32 element for momentum, 32 for the
    adaptive optimizers)."""
    _core.step(acc, x, m, v, kind, np.asarray(coef, np.float64), CODE[og.out_dtype], og.off, og.total_w, og.ptr,
               og.work, get_num_threads())
