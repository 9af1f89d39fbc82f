"""Coordinate-wise robust aggregation over a slab of k buffered updates: median and trimmed mean.

Math (per coordinate i, over the k values x_1[i] .. x_k[i], sorted ascending as x_(0) <= ... <= x_(k-1)):

* coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018)::

      a = x_(floor((k-1)/2)),  b = x_(floor(k/2))            (a == b for odd k)
      med = RN_out( ((0.5*a) + (0.5*b)) + 0.0 )               in float64, operations in this order

  Why ``0.5*a + 0.5*b``: it cannot overflow in any format (|0.5a + 0.5b| <= max(|a|, |b|), and rounding a value
  that is at most the largest finite number cannot give inf), where ``(a + b)/2`` overflows for a = b = 3e38 in
  float32 (Flower's ``aggregate_median``, i.e. ``np.median`` on float32, returns inf there) and ``a + (b-a)/2``
  overflows for b = -a = 3e38. The inputs here are at most 32-bit floats widened exactly to float64, so in float64
  every one of these forms is safe and the halvings are exact (no float64 subnormal can arise from a float32 value):
  ``0.5*a + 0.5*b`` equals ``(a+b)/2`` computed in float64, rounded once to float64, then once to float32. For odd
  k the formula gives ``a`` exactly. ``+ 0.0`` maps a -0.0 result to +0.0: selection compares values, and -0.0 ==
  +0.0, so which zero a selection returns is not defined; the canonical +0.0 makes every backend agree bit for bit.

* trimmed mean with proportion ``beta`` cut from each end (Flower's ``FedTrimmedAvg``: ``aggregate_trimmed_avg``
  and ``_trim_mean`` in flwr/server/strategy/aggregate.py, which follows ``scipy.stats.trim_mean``)::

      c = int(beta * k)            (0 <= beta < 0.5; the same float product Flower truncates)
      s = ((((+0.0 + x_(c)) + x_(c+1)) + ...) + x_(k-c-1))  in float64, ascending rank order
      tm = RN_out( s / (k - 2c) )                             a true division, then one rounding

  Summing in float64 from float32 values cannot overflow (k * 3.4e38 << 1.8e308); the sum starts at +0.0, so a
  zero result is +0.0.

Ties: the value of both statistics depends only on the multiset of values (equal values have equal bits; the one
exception, -0.0 vs +0.0, is canonicalized above), so no tie-breaking rule is needed for them and none is applied. A
statistic that returns *which* party was selected (Krum, Bulyan) would need one: break ties by party (row) order.

Kernels (numba here, C++ in csrc/jk_robust_coord.h, the same two paths; numpy below is the specification): a
sorting network, SIMD across coordinates: comparator (i, j) puts the lane-wise min in i and the max in j; no
branches, no data-dependent control flow. The network is Batcher's odd-even merge sort for k inputs (the
power-of-two network without the comparators that touch positions >= k), pruned to the comparators that can change
the ranks read (the two middle ranks for the median; the trimmed mean sorts fully). Comparators: 32 pruned to 29
for the median of 10, 403 to 330 for 50. Per-coordinate quickselect (nth_element on the k gathered values) measured
10-15x slower: its branches depend on the data.

* register path (numba k <= NUMBA_REG_MAX_K = 64, C++ k <= 32 median / 24 trimmed mean): the network is unrolled
  for that k (numba: generated source, compiled once per (k, dtype, statistic) and cached on disk, ~3 s at k = 50;
  C++: a template instantiation per k), so a block of coordinates (8/16 lanes) is read from the k rows, sorted in
  vector registers (the compiler spills what does not fit) and written: no buffer. numba's kernel also prefetches
  each row a few lines ahead (k rows are k read streams). This runs at memory speed for k ~ 10 and at ~0.5 of it
  for k = 50; ``backend="auto"`` takes numba's kernel from k = AUTO_NUMBA_FROM_K = 16 to 64.
* tile path (larger k, or ``tile=`` given): tiles of T coordinates (:func:`default_tile`: k*T*4 bytes near 32 KB);
  each row's T contiguous values are widened into a k x T float32 buffer (per thread), the network's leading
  disjoint comparators applied on the way, then the rest run over buffer rows, T lanes at a time.

No full sort of the model, no stacked copy: memory is the slab + the output + (tile path) k*T*4 + T*8 bytes per
thread. Any exact selection gives the same values, so backends and paths agree bit for bit.

Bytes moved per coordinate: k * itemsize read (4 for float32, 2 for float16/bfloat16) + 4 written.

Inputs: an :class:`~jitkernels.robust_store.UpdateStore` or a [k, N] array of float32, float16, bfloat16
(``jitkernels.bfloat16``), or uint16 holding bfloat16 bits with ``dtype="bfloat16"``. Values must be finite, as
admission makes them: a store's rows were checked as they were added, and a slab given directly is read once first
(NonFiniteUpdate naming the row): NaN has no place in an order (each backend placed it elsewhere), and an inf in the
kept ranks made the trimmed mean inf, -inf and +inf in them NaN (the Gram rules refuse both alike).
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np

from . import backends as _backends
from . import device as _device
from .dtypes import bf16_bits_to_float32, dtype_name, native
from .errors import BackendUnavailable, EmptyAggregate, NonFiniteUpdate
from .threads import get_num_threads

from . import _numba
from ._numba import keeps_threads, numba

if numba is not None:
    from numba import njit, prange, types
    from numba.extending import overload

    from ._numba import f32_bits as _f32_bits, fmax as _fmax, fmin as _fmin, u32_as_f32 as _u32_as_f32

# Input codes, as csrc/kernels.cpp's InCode (float64 = 0 is not a slab dtype).
F32, F16, BF16 = 1, 2, 3
CODES = {"float32": F32, "float16": F16, "bfloat16": BF16}
BACKENDS = ("numpy", "numba", "cpp", "cupy")

# Work below this many values (k * N) runs on one thread: waking a pool costs more than it saves.
SMALL_CALL = 1 << 17


# --- parameters ---------------------------------------------------------------------------------------------------
def trim_count(k: int, beta: float) -> int:
    """Values cut from each end: ``int(beta * k)``, Flower's ``_trim_mean`` rule (ValueError unless 0 <= beta < 0.5)."""
    beta = float(beta)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta (the proportion cut from each end) must be in [0, 0.5), got {beta!r}")
    return int(beta * k)


def median_ranks(k: int) -> tuple:
    """0-based ranks (a, b) of the two middle values; equal for odd k."""
    return (k - 1) // 2, k // 2


def default_tile(k: int) -> int:
    """Coordinates per tile: a power of two in [256, 2048] with the k x T float32 buffer near 32 KB (L1), so the
    network's passes over it stay in cache while the k row segments read per tile are long enough to stream."""
    t = 1 << max(0, (32768 // (4 * max(k, 1))).bit_length() - 1)
    return int(min(2048, max(256, t)))


@functools.lru_cache(maxsize=512)
def network(k: int, r_lo: int, r_hi: int, depth_first: bool = False) -> tuple:
    """``(i, j, fused)``: comparators (int32 arrays, i < j, applied in order: min to i, max to j) of Batcher's
    odd-even merge sort on k inputs, pruned to those that affect output ranks [r_lo, r_hi); the first ``fused`` are
    disjoint and run while the rows are loaded. The same list as jkrc::network in csrc/jk_robust_coord.h (results do
    not depend on it: any exact selection gives the same values).

    ``depth_first``: the same comparators in the recursion's post-order (sort the first half, sort the second,
    merge) instead of stage by stage. Comparators on disjoint wires commute, so the result is the same; fewer
    values are live at once, which spares the register kernels spills (k = 50, one thread, from memory: median 21 ->
    17 ns, trimmed mean 26 -> 23 ns per coordinate)."""
    pairs = []
    p = 1
    while p < k:
        q = p
        while q >= 1:
            j = q % p
            while j <= k - 1 - q:
                for i in range(min(q - 1, k - j - q - 1) + 1):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p):
                        pairs.append((i + j, i + j + q, p))
                j += 2 * q
            q //= 2
        p *= 2
    need = set(range(r_lo, r_hi))
    kept = []
    for a, b, p in reversed(pairs):
        if a in need or b in need:
            kept.append((a, b, p))
            need.add(a)
            need.add(b)
    kept.reverse()
    if depth_first:  # stage p merges blocks of 2p: order the merges by (block end, block size), stable inside one
        kept.sort(key=lambda c: ((c[0] // (2 * c[2]) + 1) * 2 * c[2], c[2]))
    fused, used = 0, set()
    for a, b, _ in kept:  # the leading disjoint comparators: applied while the rows are loaded
        if a in used or b in used:
            break
        used.update((a, b))
        fused += 1
    ci = np.array([a for a, _, _ in kept], np.int32)
    cj = np.array([b for _, b, _ in kept], np.int32)
    ci.flags.writeable = cj.flags.writeable = False
    return ci, cj, fused


# --- entry points -------------------------------------------------------------------------------------------------
def coordinate_median(x, *, backend: str | None = None, out=None, tile: int | None = None, dtype=None) -> np.ndarray:
    """Coordinate-wise median of the k rows of ``x`` (an UpdateStore or a [k, N] slab): float32[N].

    ``med = RN_f32(((0.5*a) + (0.5*b)) + 0.0)`` in float64 with a, b the two middle values (module docstring).
    Reads k*N*itemsize bytes, writes 4N. ``backend``: "numpy", "numba", "cpp" or None / "auto" (the fastest here
    for this k: see ``_pick``; ``JITKERNELS_BACKEND`` is honored). ``out``: a float32[N] to write into. ``tile``: None lets the backend choose
    (registers for small k, else :func:`default_tile`); a number forces the tile path with that tile."""
    rows, code = _slab(x, dtype)
    k = rows.shape[0]
    if k == 0:
        raise EmptyAggregate("coordinate median of zero updates")
    fns = _pick(backend, k, rows)
    out = _out(out, rows)
    fns[0](rows, code, out, _tile(tile))
    return out


def trimmed_mean(x, beta: float, *, backend: str | None = None, out=None, tile: int | None = None,
                 dtype=None) -> np.ndarray:
    """Coordinate-wise trimmed mean of the k rows of ``x``: cut ``int(beta*k)`` values from each end (Flower's
    FedTrimmedAvg rule), average the rest in float64 in ascending order, round once: float32[N].

    Reads k*N*itemsize bytes, writes 4N. Arguments as :func:`coordinate_median`."""
    rows, code = _slab(x, dtype)
    k = rows.shape[0]
    c = trim_count(k, beta)
    if k == 0:
        raise EmptyAggregate("trimmed mean of zero updates")
    fns = _pick(backend, k, rows)
    out = _out(out, rows)
    fns[1](rows, code, c, k - c, out, _tile(tile))
    return out


def available_backends() -> dict:
    """``{name: True or the reason it cannot run here}`` for the robust kernels."""
    from .backends import cupy_backend

    return {"numpy": True, "numba": _numba.available(), "cpp": _cpp_available(),
            "cupy": cupy_backend.available()}


def _pick(backend, k: int, rows):
    """The kernels for ``backend``; for auto: cupy for a slab in GPU memory; else numba's generated kernel for
    AUTO_NUMBA_FROM_K <= k <= NUMBA_REG_MAX_K, cpp otherwise (numba, numpy where cpp is missing). A slab stays where
    it is: the GPU reads device slabs only, the CPU backends host slabs only."""
    name = _backends.requested(backend)
    on_device = not isinstance(rows, np.ndarray)
    avail = available_backends()
    if name == "auto":
        if on_device:
            name = "cupy"
        else:
            order = ["cpp", "numba", "numpy"]
            if AUTO_NUMBA_FROM_K <= k <= NUMBA_REG_MAX_K:
                order = ["numba", "cpp", "numpy"]
            return _REGISTRY[next(c for c in order if avail[c] is True)]
    if name not in _REGISTRY:
        raise BackendUnavailable(f"backend {name!r} has no robust coordinate kernels (it runs {', '.join(BACKENDS)})")
    if avail[name] is not True:
        raise BackendUnavailable(f"backend {name!r} unavailable: {avail[name]}")
    if on_device != (name == "cupy"):
        hint = "use backend='cupy'" if on_device else "upload it (cupy.asarray) first"
        raise TypeError(f"the slab is in {'GPU' if on_device else 'host'} memory but the backend is {name!r}: {hint}")
    return _REGISTRY[name]


def _slab(x, dtype):
    """(rows [k, N] as stored, code): a host slab, or a CuPy view of a device one (CuPy / torch CUDA, for the cupy
    backend). Copies the slab only where its byte order is not the machine's (the kernels read its bytes as native
    values: a big-endian float32 slab's median came back byte-swapped); 16-bit floats are read as their uint16
    bits."""
    from .robust_store import UpdateStore

    if isinstance(x, UpdateStore):
        r = x.rows()
        return (r.view(np.uint16) if r.dtype == np.float16 else r), CODES[x.dtype]
    if _device.is_device_array(x):
        leaf = _device.device_leaf(x)
        a, name = leaf.array, dtype_name(leaf.dtype)
    else:
        a = native(np.asarray(x))
        name = dtype_name(a.dtype)
    if a.ndim != 2:
        raise ValueError(f"expected a [k, N] slab, got shape {a.shape}")
    if name == "uint16":
        if dtype is None or str(dtype) not in ("bfloat16", "float16"):
            raise TypeError("a uint16 slab holds 16-bit float bits: say dtype='bfloat16' or 'float16'")
        name = str(dtype)
    if name not in CODES:
        raise TypeError(f"the robust kernels read float32, float16 or bfloat16 slabs, got {name}")
    if name != "float32" and a.dtype != np.uint16:
        a = a.view(np.uint16)
    if a.shape[1] and a.strides[0] < a.shape[1] * a.itemsize:
        # rows that overlap or repeat (a row stride of 0 from x[None] or broadcast_to, a negative one from x[::-1]):
        # the kernels index row i at i * stride, which C++ refuses below a row's length ("invalid arguments")
        a = a.copy()
    check_strides(a)
    _refuse_nonfinite(a, name)
    return a, CODES[name]


_INF = {"float16": 0x7C00, "bfloat16": 0x7F80}  # from these on, with the sign bit cleared, 16-bit bits are inf or NaN


def _refuse_nonfinite(a, name: str) -> None:
    """NonFiniteUpdate naming the first row of a direct slab that holds NaN or +-inf: one read of it, a row at a
    time (no slab-sized temporary)."""
    xp = _device.array_module(a)
    for i in range(a.shape[0]):
        bad = ~xp.isfinite(a[i]) if name == "float32" else (a[i] & 0x7FFF) >= _INF[name]
        if bad.any():
            raise NonFiniteUpdate(i, "<slab row>", int(xp.count_nonzero(bad)))


def check_strides(a) -> None:
    """What the robust kernels (coordinate and Gram, host and GPU) need of a [k, N] slab's layout: each row
    contiguous, rows a whole number of elements apart (they index row i at i * ld elements), the data on an element
    boundary (a GPU faults on a misaligned load; C++ reads through typed pointers)."""
    ptr = a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
    if a.size and ptr % a.itemsize:  # (a view into a byte buffer at an odd offset; numpy's aligned flag also weighs
        # the strides, which the checks below name)
        raise ValueError(f"the slab's data (address {ptr:#x}) is not aligned to its {a.itemsize}-byte elements")
    if a.size > a.shape[0] and a.strides[1] != a.itemsize:  # (the column stride of 0 or 1 column is arbitrary)
        raise ValueError("each row of the slab must be contiguous (the kernels stream rows)")
    if a.shape[0] > 1 and a.strides[0] % a.itemsize:  # (a field of a structured array)
        raise ValueError(f"the slab's row stride ({a.strides[0]} bytes) is not a whole number of elements")


MAX_TILE = 1 << 16
"""The longest tile taken (a longer one is this long: any tile gives the same values). A tile of 2^40 asked the C++
backend for a k x T buffer inside its parallel region, and std::bad_alloc there ended the process."""


def _tile(tile):
    """0: let the backend choose (the register path for small k, else tiles of default_tile(k)); > 0: the tile path
    with tiles of that many coordinates, at most MAX_TILE (the tests compare both paths)."""
    if tile is None:
        return 0
    tile = int(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1 coordinates, got {tile}")
    return min(tile, MAX_TILE)


def _out(out, rows):
    """``out`` checked, or a new float32[N] where the slab lives (GPU memory for a device slab)."""
    n, on_device = rows.shape[1], not isinstance(rows, np.ndarray)
    if out is None:
        return _device.zeros(n, np.float32, on_device) if on_device else np.empty(n, np.float32)
    if (not on_device and not isinstance(out, np.ndarray)) or (on_device and not _device.is_device_array(out)) or \
            out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous or \
            not _device.aligned(out):  # (the kernels write it through a typed pointer)
        raise ValueError(f"out must be a contiguous, aligned float32[{n}] in {'GPU' if on_device else 'host'} memory; "
                         f"got {type(out).__name__} {getattr(out, 'dtype', '')}{list(getattr(out, 'shape', []))}")
    return out


def _threads(rows) -> int:
    return 1 if rows.size < SMALL_CALL else get_num_threads()


# --- numpy: the specification -------------------------------------------------------------------------------------
NUMPY_TILE = 1 << 15  # the numpy reference's tile (coordinates): large enough to amortize the calls per tile


def widen(block: np.ndarray, code: int) -> np.ndarray:
    """float32 copy of a block of stored values (exact for float16 and bfloat16 bits)."""
    if code == F32:
        return np.array(block, np.float32)
    if code == BF16:
        return bf16_bits_to_float32(block)
    return block.view(np.float16).astype(np.float32)


def _median_numpy(rows, code, out, tile):
    """Reference: sort each tile's columns (np.sort, a k x T copy), take the middle ranks, the float64 midpoint."""
    k, n = rows.shape
    r1, r2 = median_ranks(k)
    step = max(tile, NUMPY_TILE)
    for c0 in range(0, n, step):
        s = np.sort(widen(rows[:, c0:c0 + step], code), axis=0)
        a = s[r1].astype(np.float64)
        b = s[r2].astype(np.float64)
        out[c0:c0 + step] = ((0.5 * a) + (0.5 * b)) + 0.0


def _trimmed_numpy(rows, code, lo, hi, out, tile):
    """Reference: sort each tile's columns, sum ranks lo..hi-1 one by one in float64 from +0.0, divide, round."""
    k, n = rows.shape
    step = max(tile, NUMPY_TILE)
    for c0 in range(0, n, step):
        s = np.sort(widen(rows[:, c0:c0 + step], code), axis=0)
        acc = np.zeros(s.shape[1], np.float64)
        for r in range(lo, hi):
            acc += s[r]
        out[c0:c0 + step] = acc / np.float64(hi - lo)


# --- numba ----------------------------------------------------------------------------------------------------------
if numba is not None:

    @njit(inline="always")
    def _f16_to_f32(h):
        """jk::widen(f16) of csrc/jk_math.h: exact, branch-free (vectorizes), inf/nan kept; a subnormal as its integer
        significand times 2^-24 (no float32 subnormal on the way, which a flush-to-zero mode would read as 0)."""
        em = np.uint32(h) & np.uint32(0x7FFF)
        sign = (np.uint32(h) & np.uint32(0x8000)) << np.uint32(16)
        normal = _u32_as_f32(em << np.uint32(13)) * _u32_as_f32(np.uint32(0x77800000))
        mag = np.float32(np.int32(em)) * _u32_as_f32(np.uint32(0x33800000)) if em < np.uint32(0x400) else normal
        bits = (np.uint32(0x7F800000) | (em << np.uint32(13))) if em >= np.uint32(0x7C00) else _f32_bits(mag)
        return _u32_as_f32(sign | bits)

    def _load_pair(sa, sb, da, db, ln, code):  # pragma: no cover - replaced by the overload
        raise NotImplementedError

    def _load_row(src, dst, ln, code):  # pragma: no cover - replaced by the overload
        raise NotImplementedError

    # One implementation per stored type, so a float32 slab compiles no 16-bit code; for 16-bit bits the dtype
    # branch sits outside the lane loops (they vectorize).
    @overload(_load_pair, inline="always")
    def _load_pair_ov(sa, sb, da, db, ln, code):
        """da = min, db = max of the widened sa, sb (a fused first comparator)."""
        if sa.dtype == types.float32:
            def impl(sa, sb, da, db, ln, code):
                for t in range(ln):
                    u = sa[t]
                    v = sb[t]
                    da[t] = _fmin(u, v)
                    db[t] = _fmax(u, v)
            return impl

        def impl16(sa, sb, da, db, ln, code):
            if code == BF16:
                for t in range(ln):
                    u = _u32_as_f32(np.uint32(sa[t]) << np.uint32(16))
                    v = _u32_as_f32(np.uint32(sb[t]) << np.uint32(16))
                    da[t] = _fmin(u, v)
                    db[t] = _fmax(u, v)
            else:
                for t in range(ln):
                    u = _f16_to_f32(sa[t])
                    v = _f16_to_f32(sb[t])
                    da[t] = _fmin(u, v)
                    db[t] = _fmax(u, v)
        return impl16

    @overload(_load_row, inline="always")
    def _load_row_ov(src, dst, ln, code):
        if src.dtype == types.float32:
            def impl(src, dst, ln, code):
                for t in range(ln):
                    dst[t] = src[t]
            return impl

        def impl16(src, dst, ln, code):
            if code == BF16:
                for t in range(ln):
                    dst[t] = _u32_as_f32(np.uint32(src[t]) << np.uint32(16))
            else:
                for t in range(ln):
                    dst[t] = _f16_to_f32(src[t])
        return impl16

    @njit(inline="always")
    def _load_tile(x, code, c0, ln, buf, ci, cj, fused, paired):
        """buf[r, :ln] = widen(x[r, c0:c0+ln]) for every row r (k streams of ln contiguous values), the network's
        first ``fused`` (disjoint) comparators applied on the way."""
        for f in range(fused):
            a, b = ci[f], cj[f]
            _load_pair(x[a, c0:c0 + ln], x[b, c0:c0 + ln], buf[a], buf[b], ln, code)
        for r in range(x.shape[0]):
            if not paired[r]:
                _load_row(x[r, c0:c0 + ln], buf[r], ln, code)

    @njit(inline="always")
    def _apply_network(buf, ci, cj, fused, ln):
        """Each comparator after the fused ones: min to row ci[c], max to row cj[c], over ln lanes."""
        for c in range(fused, ci.shape[0]):
            a = buf[ci[c]]
            b = buf[cj[c]]
            for t in range(ln):
                u = a[t]
                v = b[t]
                a[t] = _fmin(u, v)
                b[t] = _fmax(u, v)

    @njit(parallel=True, cache=True, nogil=True)
    def _coord_nb(x, code, mode, r_lo, r_hi, ci, cj, fused, out, tile, nblocks):
        """mode 0: median of ranks (r_lo, r_hi) (the two middle ranks); mode 1: trimmed mean of ranks [r_lo, r_hi).
        Tiles are split into nblocks contiguous runs, one scratch buffer per run."""
        k, n = x.shape
        ntiles = (n + tile - 1) // tile
        m = np.float64(r_hi - r_lo)
        paired = np.zeros(k, np.bool_)
        for f in range(fused):
            paired[ci[f]] = True
            paired[cj[f]] = True
        for blk in prange(nblocks):
            t0 = blk * ntiles // nblocks
            t1 = (blk + 1) * ntiles // nblocks
            buf = np.empty((k, tile), np.float32)
            acc = np.empty(tile, np.float64)
            for it in range(t0, t1):
                c0 = it * tile
                ln = min(tile, n - c0)
                _load_tile(x, code, c0, ln, buf, ci, cj, fused, paired)
                _apply_network(buf, ci, cj, fused, ln)
                o = out[c0:c0 + ln]
                if mode == 0:
                    ra = buf[r_lo]
                    rb = buf[r_hi]
                    for t in range(ln):
                        o[t] = np.float32(((0.5 * np.float64(ra[t])) + (0.5 * np.float64(rb[t]))) + 0.0)
                else:
                    for t in range(ln):
                        acc[t] = 0.0
                    for r in range(r_lo, r_hi):
                        row = buf[r]
                        for t in range(ln):
                            acc[t] = acc[t] + np.float64(row[t])
                    for t in range(ln):
                        o[t] = np.float32(acc[t] / m)


# Register path: for k <= NUMBA_REG_MAX_K, a kernel generated for that k (the network unrolled over k scalars, the
# coordinate loop vectorized by LLVM, so the k values of a lane block live in vector registers: no buffer, no
# loads/stores per comparator). numba caches only functions defined in files, so the source is written to a
# per-user cache directory (0700, owner checked) and imported from there; its compile (0.6 s for k = 10, 3 s for
# k = 50, 5 s for k = 64) happens once
# per machine. Larger k, or tile= given: the tile kernel above. Both give the same bits.
NUMBA_REG_MAX_K = 64
AUTO_NUMBA_FROM_K = 16
"""``backend="auto"`` takes numba's generated kernels from this k on (C++ below: both run at memory speed there, and
C++ needs no compile step). Measured on 4M coordinates, float32, 2 threads, two runs (ms, cpp / numba): k = 10
median 7.4 / 4.4 and 5.1 / 7.5, trimmed 5.4 / 4.9 and 8.0 / 8.0; k = 16 median 10.9 / 11.4, trimmed 16.2 / 10.7;
k = 24 median 31.8 / 19.0, trimmed 48.5 / 19.2; k = 32 median 48.2 / 28.1, trimmed 102.5 / 28.6: C++'s register
path has neither the depth-first network order nor the row prefetch."""
_GEN_VERSION = 3


# Register kernels run over blocks of one cache line of coordinates; before each block, each row's line
# PREFETCH_BYTES ahead is prefetched. k rows are k concurrent read streams, more than the hardware prefetcher
# follows: at k = 50 the median ran at 13 ns per coordinate with the rows in cache and at 27 ns from memory without
# the prefetches, 21 ns with them (one thread, this machine; a block of 64 coordinates with its 4 lines per row
# prefetched in one burst: 30 ns). A prefetch never faults, so none is bounds-checked.
PREFETCH_BYTES = 2048


def _reg_source(k: int, code: int, mode: int, lo: int, hi: int) -> str:
    """Python source of the register kernel ``kernel(x, out, c0, c1)`` for k rows of dtype ``code``: the median
    (mode 0), or the trimmed mean of ranks [lo, hi) (mode 1; the ranks are baked in, so that the network is pruned to
    them).

    Every comparator is ``fmin``/``fmax`` from jitkernels._numba: one compare and one select each, no branch in
    numba's IR (a ternary per comparator made k = 50 take 36 s to compile, against 3 s). Indices are unsigned: a
    signed one costs a negative-index check per load, and LLVM then vectorizes the loads as gathers."""
    r1, r2 = median_ranks(k)
    ci, cj, _ = network(k, r1, r2 + 1, True) if mode == 0 else network(k, lo, hi, True)
    itemsize = 4 if code == F32 else 2
    ahead, line = PREFETCH_BYTES // itemsize, 64 // itemsize
    load = {F32: "{}", BF16: "_u32_as_f32(np.uint32({}) << np.uint32(16))", F16: "_f16_to_f32({})"}[code]
    what = "median" if mode == 0 else f"trimmed mean of ranks [{lo}, {hi})"
    name = {F32: "float32", F16: "float16", BF16: "bfloat16"}[code]
    out = [f"# Generated by jitkernels.robust_coord (version {_GEN_VERSION}): {what} of k={k} {name} rows. "
           "Safe to delete.",
           "import numpy as np",
           "from numba import njit",
           "from jitkernels._numba import fmax, fmin, prefetch  # noqa: F401",
           "from jitkernels.robust_coord import _f16_to_f32, _u32_as_f32  # noqa: F401",
           "",
           "",
           "@njit(cache=True, nogil=True)",
           "def kernel(x, out, c0, c1):"]
    out += [f"    x{j} = x[{j}]" for j in range(k)]
    out += [f"    for b0 in range(c0, c1, {line}):"]
    out += [f"        prefetch(x{j}, b0 + {ahead})" for j in range(k)]
    out += [f"        for c in range(b0, min(b0 + {line}, c1)):",
            "            u = np.uint64(c)"]
    out += [f"            v{j} = " + load.format(f"x{j}[u]") for j in range(k)]
    for a, b in zip(ci, cj):
        out += [f"            t = fmin(v{a}, v{b})", f"            v{b} = fmax(v{a}, v{b})", f"            v{a} = t"]
    if mode == 0:
        out += [f"            out[u] = np.float32(((0.5 * np.float64(v{r1})) + (0.5 * np.float64(v{r2}))) + 0.0)"]
    else:  # ascending rank order, from +0.0: the numpy specification's order
        out += ["            s = 0.0"]
        out += [f"            s = s + np.float64(v{j})" for j in range(lo, hi)]
        out += [f"            out[u] = np.float32(s / {float(hi - lo)!r})"]
    return "\n".join(out) + "\n"


def _cache_dir():
    """A private (0700, ours) directory for generated kernels, or None where there is none."""
    base = os.environ.get("JITKERNELS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jitkernels")
    d = os.path.join(base, "robust_coord")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        return d
    except (OSError, AttributeError):
        return None


_build_lock = threading.Lock()  # (lru_cache does not serialize first calls: two threads built one kernel at once)


@functools.lru_cache(maxsize=None)
def _reg_kernel(k: int, code: int, mode: int, lo: int, hi: int):
    with _build_lock:
        return _build_reg_kernel(k, code, mode, lo, hi)


def _build_reg_kernel(k: int, code: int, mode: int, lo: int, hi: int):
    import hashlib
    import importlib.util

    src = _reg_source(k, code, mode, lo, hi)
    name = f"jk_rc_{'med' if mode == 0 else f'trim{lo}_{hi}'}_k{k}_c{code}_{hashlib.sha256(src.encode()).hexdigest()[:16]}"
    d = _cache_dir()
    path = None if d is None else os.path.join(d, name + ".py")
    if path is not None and not _cached(path, src):
        path = _write_kernel(path, src)
    if path is None:  # no private cache directory (or no room in it): compile in memory, every process
        ns: dict = {}
        exec(compile(src.replace("cache=True", "cache=False"), name, "exec"), ns)
        return ns["kernel"]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache finds the function's module by name when it loads
    spec.loader.exec_module(mod)
    return mod.kernel


def _cached(path: str, src: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == src
    except OSError:
        return False


def _write_kernel(path: str, src: str) -> str | None:
    """Write a kernel's source into the cache (atomically: another process may be importing it); None where it
    cannot be written (a full disk, a read-only cache), leaving no temporary file."""
    from .state import atomic_write  # (a unique temporary file, taken back on failure)

    try:
        atomic_write(path, src.encode())
    except OSError:
        return None
    return path


# nice value -> (workers, ThreadPoolExecutor) of _run_threads, replaced by a larger one when a call needs more (one
# per thread count kept every one's threads for the process's life). A pool per nice value: threads take the nice of
# the thread that starts them, which is one that submits to the pool, so a scheduler's niced fold threads
# (fold_nice) get niced helpers and the caller's do not (one shared pool gave one of them the other's nice)
_pools: dict = {}
_pool_lock = threading.Lock()


def _nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)  # (Linux: the calling thread's)
    except (AttributeError, OSError):
        return 0


def _run_threads(fn, n: int, nthreads: int, *args) -> None:
    """fn(*args[:2], c0, c1, *args[2:]) over nthreads contiguous ranges of [0, n), on threads (fn releases the GIL)."""
    x, out, *rest = args
    if nthreads <= 1:
        fn(x, out, 0, n, *rest)
        return
    from concurrent.futures import ThreadPoolExecutor

    nice = _nice()
    with _pool_lock:
        workers, pool = _pools.get(nice, (0, None))
        if workers < nthreads - 1:  # (the pool it replaces ends its threads once calls running on it let it go)
            pool = ThreadPoolExecutor(nthreads - 1, thread_name_prefix="jk-robust")
            _pools[nice] = (nthreads - 1, pool)
    bounds = [b * n // nthreads for b in range(nthreads + 1)]
    futures = [pool.submit(fn, x, out, bounds[b], bounds[b + 1], *rest) for b in range(1, nthreads)]
    fn(x, out, bounds[0], bounds[1], *rest)
    for f in futures:
        f.result()


def _writable_alias(rows):
    """The same memory flagged writable where numpy allows it (rows() views are read-only; the kernels only read):
    numba compiles read-only arrays as a separate type, which would double every compile."""
    if rows.flags.writeable:
        return rows
    v = rows.view()
    try:
        v.flags.writeable = True
    except ValueError:  # a truly read-only buffer: the read-only specialization is compiled instead
        return rows
    return v


@keeps_threads
def _numba_run(rows, code, mode, r_lo, r_hi, ranks, out, tile, use_reg):
    if _numba.available() is not True:
        raise BackendUnavailable(f"backend 'numba' unavailable: {_numba.available()}")
    k, n = rows.shape
    if n == 0:
        return
    rows = _writable_alias(rows)
    # (NUMBA_NUM_THREADS caps the register path's own threads too: it did not, while every other numba path obeyed)
    nthreads = min(_threads(rows), numba.config.NUMBA_NUM_THREADS)
    if use_reg and k <= NUMBA_REG_MAX_K:
        lo, hi = (r_lo, r_hi) if mode == 1 else (0, 0)
        _run_threads(_reg_kernel(k, code, mode, lo, hi), n, min(nthreads, max(1, n // 4096)), rows, out)
        return
    _numba.use_threads(nthreads)
    ci, cj, fused = network(k, *ranks)
    ntiles = -(-n // tile)
    _coord_nb(rows, code, mode, r_lo, r_hi, ci, cj, fused, out, tile, min(ntiles, nthreads))


def _median_numba(rows, code, out, tile):
    k = rows.shape[0]
    r1, r2 = median_ranks(k)
    _numba_run(rows, code, 0, r1, r2, (r1, r2 + 1), out, tile if tile > 0 else default_tile(k), tile <= 0)


def _trimmed_numba(rows, code, lo, hi, out, tile):
    k = rows.shape[0]
    _numba_run(rows, code, 1, lo, hi, (lo, hi), out, tile if tile > 0 else default_tile(k), tile <= 0)


# --- cpp (csrc/jk_robust_coord.h, once bound into jitkernels._core) --------------------------------------------------
def _core():
    from . import _core as core

    return core


def _cpp_available():
    try:
        core = _core()
    except ImportError as e:
        return f"jitkernels._core not importable ({e})"
    if not (hasattr(core, "robust_median") and hasattr(core, "robust_trimmed_mean")):
        return "jitkernels._core has no robust_median / robust_trimmed_mean yet (csrc/jk_robust_coord.h is not bound)"
    return True


def _median_cpp(rows, code, out, tile):
    _core().robust_median(rows, code, out, tile, _threads(rows))


def _trimmed_cpp(rows, code, lo, hi, out, tile):
    _core().robust_trimmed_mean(rows, code, lo, hi, out, tile, _threads(rows))


# --- cupy (the kernels generated by jitkernels.backends.cuda_source.robust_kernel; ``tile`` does not apply) -------
def _median_cupy(rows, code, out, tile):
    from .backends import cupy_backend

    cupy_backend.robust_coord(rows, code, 0, 0, 0, out)


def _trimmed_cupy(rows, code, lo, hi, out, tile):
    from .backends import cupy_backend

    cupy_backend.robust_coord(rows, code, 1, lo, hi, out)


_REGISTRY = {
    "numpy": (_median_numpy, _trimmed_numpy),
    "numba": (_median_numba, _trimmed_numba),
    "cpp": (_median_cpp, _trimmed_cpp),
    "cupy": (_median_cupy, _trimmed_cupy),
}
