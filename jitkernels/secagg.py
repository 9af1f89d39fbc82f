r"""Secure-aggregation sums: quantization as Flower's SecAgg+ does it, a k-way modular sum kernel, a streaming state.

Under SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017) and
SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) party :math:`j` quantizes its update to integers :math:`q_j \in [0, T]` and sends

.. math::

    y_j = \Big(q_j + p_j + \sum_{i < j} s_{ij} - \sum_{i > j} s_{ji}\Big) \bmod 2^b,

a private mask :math:`p_j` and pairwise masks :math:`s_{ij}` that cancel in the sum. The server computes
:math:`S = \sum_j y_j \bmod 2^b`, removes the private masks (and the pairwise masks of parties that dropped out)
once their seeds are reconstructed, and dequantizes :math:`\sum_j q_j`. It never sees one :math:`q_j`.

What this module gives the server
---------------------------------
* :func:`modsum` -- ``acc <- (acc + sum_j y_j) mod 2^b`` for k updates in ONE pass: work items are cache-sized
  chunks of the accumulator that stay in L1/L2 while the k updates stream through them, so each update is read
  once and the accumulator read and written once. Bytes per element: ``k * itemsize(y) + 2 * itemsize(acc)``
  (uint32 inputs and accumulator: ``4k + 8``; Flower's int64 vectors: ``8k + 8``). Backends: the numpy reference
  (the specification; k passes), and a numba kernel over an address table of the updates, read in place as the
  library's other kernels read them; ``csrc/jk_secagg.h`` is the same per-element math for C++ and CUDA
  (``backend="cupy"``: the accumulator on the GPU, CuPy / torch CUDA updates read in place, host updates copied
  over first; csrc/cuda/kernels.cu ``modsum_rows``). Integer math: every backend gives the same bits, in any
  order, any thread count, any split into partial sums.
* :class:`SecAggSum` -- a streaming state: ``fold`` / ``fold_many`` / ``merge`` / ``result``, typed errors that name
  the party, a rejected update leaves the state bit-identical, and a checksummed safetensors file (never pickle).
* :func:`quantize` / :func:`dequantize` -- Flower's formulas (``flwr/common/secure_aggregation/quantization.py``
  and the last lines of ``SecAggPlusWorkflow.unmask_stage``), with a seeded generator instead of numpy's global one.

Inputs are taken mod 2^32 (their low 32-bit word) and the sum mod 2^b, b in [1, 32]. The accumulator is uint32
(wraps mod 2^32; reduced mod 2^b at the end of each chunk) or uint64. Accepted input dtypes: uint32 and int32
(32-bit words), int64 and uint64 (Flower ships int64 vectors in [0, 2^b); read as their low word, so a 64-bit input
costs 8 bytes per element: the whole cache line comes in anyway). 64-bit inputs need a little-endian host.

Quantization (Flower's math)
----------------------------
With clipping range :math:`c` and target range :math:`T`:

.. math::

    x' &= (\mathrm{clip}(x, -c, c) + c)\,\frac{T}{2c} \in [0, T], \qquad
    q = \lceil x' \rceil - [\,u < \lceil x' \rceil - x'\,], \quad u \sim U[0, 1)

(stochastic rounding: :math:`E[q] = x'`, :math:`|q - x'| < 1`). The sum of k quantized vectors dequantizes as

.. math::

    \hat{\Sigma} = \Big(\big(S\,\frac{2c}{T}\big) - c\Big) - (k - 1)\,c \;\approx\; \sum_j \mathrm{clip}(x_j, -c, c),

each operation rounded in float64 in that order (Flower's order, so the bits match), and with SecAgg+'s weighting
factor :math:`Q = \sum_j q^{ratio}_j` the average is :math:`\hat{\Sigma} \cdot T / Q`. The sum is exact only while
it does not wrap: :math:`k\,T < 2^b` (:func:`max_parties`). Error bound of the unweighted average of k parties
(clipping aside): :math:`|\hat{\Sigma}/k - \bar{x}| < 2c/T` per element (each :math:`|q_j - x'_j| < 1`), plus
float64 rounding (a few ulp of :math:`kc`).

Differences from Flower 1.42 (each is a bug or a hazard there; the tests show them)
-----------------------------------------------------------------------------------
* Flower computes :math:`x'` in the input's dtype: float32 updates are rounded to float32 before the stochastic
  rounding, which biases the result (at Flower's defaults c = 8, T = 2^22, by up to 1/8 of a quantization step:
  x + c in [8, 16) has float32 spacing 2^-20, times T / 2c = 2^18).
  Here :math:`x'` is float64 (bit-identical to Flower for float64 inputs).
* Flower casts :math:`\lceil x' \rceil` to int32: :math:`T \geq 2^{31}` silently turns values above :math:`2^{31}`
  into :math:`-2^{31}`. Here the output is uint32 and :math:`T \leq 2^{32} - 1` is checked.
* Flower turns NaN into :math:`-2^{31}`; here a non-finite value raises :class:`~jitkernels.errors.NonFiniteUpdate`.
* :func:`dequantize` refuses more parties than :func:`max_parties` allows for :math:`T` and :math:`b` (their sum
  may have wrapped, and a wrapped sum lies in :math:`[0, kT]` like a true one: no check of the values can tell), and
  checks :math:`0 \le S \le kT` (a value outside proves that masks did not cancel); Flower returns a wrong model
  silently. Flower's overflow warning compares ``num_shares`` (neighbours per party), not the number of parties
  summed, with :math:`2^b / T`.

Security notes on Flower's masks (not this module's math, but what a server sums): ``pseudo_rand_gen`` draws masks
with ``randint(0, num_range - 1)``, so a mask never takes the value :math:`2^b - 1` (the masked value is not quite
uniform), and it XOR-folds the seed into 32 bits for MT19937; pairwise seeds are base64 text, whose bytes all have
the high bit clear, so pairwise masks have at most 2^28 seeds and private masks 2^32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading

import numpy as np

from . import device
from .dtypes import dtype_name
from .errors import (CorruptState, DuplicateParty, IncompatibleStates, LayoutMismatch, NonFiniteUpdate,
                     OverlappingParties, BackendUnavailable, ValueOutOfRange)
from .parties import check_party, per_update
from .threads import get_num_threads

try:
    from . import _core
except ImportError:  # pragma: no cover - broken installs; the numba and numpy backends remain
    _core = None

from . import _numba
from ._numba import keeps_threads, numba

if numba is not None:
    from numba import carray, njit, prange, types
    from numba.extending import overload

    from ._numba import typed_ptr as _typed_ptr

__all__ = ["BACKENDS", "SecAggSum", "dequantize", "max_parties", "modsum", "numba_available", "quantize"]

BACKENDS = ("numpy", "numba", "cpp", "cupy")
MAX_BITS = 32
CHUNK = 65536
"""Elements per work item: 256 KiB of a uint32 accumulator stays in L2 while the k updates stream through it. The
fold's 8192 measured ~1.1x slower at N = 25M, k = 10 on a 2-core AMD EPYC VM (likely because 32 KiB segments of
4-byte inputs restart the hardware prefetchers k times per item)."""
SMALL_CALL = 1 << 18
"""Below this many element-updates one thread runs the call (waking a pool costs more than the work)."""

# Input kinds (csrc/jk_secagg.h's SecAggInput): 32-bit words, int32 (range check treats the sign), 64-bit words.
_U32, _I32, _W64 = 0, 1, 2
_CODE = {np.dtype(np.uint32): _U32, np.dtype(np.int32): _I32, np.dtype(np.int64): _W64, np.dtype(np.uint64): _W64}
ACC_DTYPES = ("uint32", "uint64")


def numba_available():
    return _numba.available()


def max_parties(target_range: int, modulus_bits: int) -> int:
    """The most parties whose quantized values (each in [0, target_range]) sum without wrapping mod 2^b:
    ``(2^b - 1) // target_range``. Flower's default (T = 2^22, b = 32) gives 1023."""
    return ((1 << _check_bits(modulus_bits)) - 1) // _check_target(target_range)


# ------------------------------------------------------------------------------------------------------------------
# Quantization (Flower's formulas)

def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"modulus_bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def _check_target(target_range) -> int:
    if isinstance(target_range, bool) or not isinstance(target_range, (int, np.integer)) \
            or not 1 <= int(target_range) < 2 ** 32:
        raise ValueError(f"target_range must be an integer in [1, 2^32 - 1], got {target_range!r}")
    return int(target_range)


def _check_range(clipping_range, target_range, k: int = 1) -> tuple:
    """(c, T), checked: c > 0, and every quantity the formulas form finite: 2c, T / (2c) and 2c / T, and for a sum of
    k its largest, S 2c / T <= 2 k c (c = 1e-310 made T / (2c) inf: 0 quantized to T, -c to NaN; c = 1e308 made 2c
    inf: all zeros, then NaN; c = 6e307 over 2 parties dequantized a true sum of 1.2e308 to inf)."""
    c, T = float(clipping_range), _check_target(target_range)
    if not (c > 0 and all(math.isfinite(v) for v in (2 * c, T / (2 * c), 2 * c / T, 2 * k * c))):
        raise ValueError(f"clipping_range must be > 0 with 2c, T / 2c, 2c / T and 2 k c finite (T = {T}, k = {k}); "
                         f"got {clipping_range!r}")
    return c, T


def _rng(seed):
    """A Generator or RandomState passes through (a RandomState seeded like numpy's global one reproduces Flower's
    draws); anything else seeds ``np.random.default_rng`` (None: fresh OS entropy)."""
    if isinstance(seed, (np.random.Generator, np.random.RandomState)):
        return seed
    return np.random.default_rng(seed)


def quantize(arrays, clipping_range: float, target_range: int, *, seed=None):
    r"""Stochastic quantization of float arrays into uint32 values in ``[0, target_range]``, Flower's formula:
    ``x' = (clip(x, -c, c) + c) * (T / (2c))``, ``q = ceil(x') - (u < ceil(x') - x')`` with ``u ~ U[0, 1)``.

    ``arrays``: a list of arrays (Flower's NDArrays; a list comes back) or one array. ``seed``: an int, None, a
    ``np.random.Generator`` or a ``np.random.RandomState`` (one uniform per element, in array order, C order).
    ``x'`` is computed in float64 whatever the input dtype (Flower: in the input's dtype, see the module notes) and
    capped at T (at x = +c it can round to just above T, and Flower's then returns T + 1: 0 at T = 2^32 - 1);
    non-finite values raise :class:`NonFiniteUpdate`. Reads 4 or 8 and writes 4 bytes per element (plus numpy's
    temporaries).
    """
    c, T = _check_range(clipping_range, target_range)
    single = not isinstance(arrays, (list, tuple))
    rng = _rng(seed)
    quantizer = T / (2 * c)
    out = []
    for i, arr in enumerate([arrays] if single else arrays):
        x = np.asarray(arr, dtype=np.float64)
        bad = np.size(x) - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise NonFiniteUpdate(None, str(i), bad)
        pre = (np.clip(x, -c, c) + c) * quantizer
        pre = np.minimum(pre, T)  # (x = +c can round to just above T: ceil made T + 1, and at T = 2^32 - 1, 0)
        ret = np.ceil(pre)
        u = rng.random(pre.shape)
        ret -= u < ret - pre
        out.append(np.asarray(ret).astype(np.uint32))
    return out[0] if single else out


def dequantize(arrays, clipping_range: float, target_range: int, k: int, *, q_total_ratio=None,
               modulus_bits: int = 32):
    r"""Float64 arrays from a sum of ``k`` quantized vectors (unmasked, mod 2^b), Flower's server-side formula:
    ``((S * (2c / T)) + (-c)) + (-(k - 1) * c)``, each step rounded in float64 in that order, then, when
    ``q_total_ratio`` (SecAgg+'s summed weighting factor) is given, ``* (T / q_total_ratio)``.

    ``arrays``: a list (a list comes back) or one array of integers. ``modulus_bits``: the b of the sum (Flower's
    default modulus 2^32). More than :func:`max_parties` parties raises :class:`ValueOutOfRange` before any value is
    read: their sum may have wrapped mod 2^b, and a wrapped sum lies in ``[0, k * T]`` like a true one, so no check
    of the values can tell. A value outside ``[0, k * T]`` raises it too: masks did not cancel. Reads the sums
    twice (the range check, then the conversion) and writes 8 bytes per element.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (parties summed) must be an integer >= 1, got {k!r}")
    k = int(k)
    c, T = _check_range(clipping_range, target_range, k)
    most = max_parties(T, modulus_bits)
    if k > most:
        raise ValueOutOfRange(f"{k} parties' values in [0, {T}] may have wrapped mod 2^{modulus_bits}: at most "
                              f"{most} sum exactly (max_parties); use a smaller target range or a larger modulus")
    if q_total_ratio is not None and (isinstance(q_total_ratio, (bool, np.bool_)) or not (  # (True was a ratio of 1)
            isinstance(q_total_ratio, (int, np.integer)) and q_total_ratio > 0)):
        raise ValueError(f"q_total_ratio must be a positive integer, got {q_total_ratio!r}")
    single = not isinstance(arrays, (list, tuple))
    quantizer = (2 * c) / T
    shift = -c
    offset = -(k - 1) * c
    out = []
    for i, arr in enumerate([arrays] if single else arrays):
        a = np.asarray(arr)
        if a.dtype.kind not in "iu":
            raise TypeError(f"array {i}: dequantize takes integers, got {a.dtype}")
        if a.size and (a.min() < 0 or int(a.max()) > k * T):
            raise ValueOutOfRange(
                f"array {i}: values must lie in [0, k * T] = [0, {k * T}], found [{a.min()}, {a.max()}]: masks did "
                f"not cancel")
        r = a.astype(np.float64)
        r *= quantizer
        r += shift
        r += offset
        if q_total_ratio is not None:
            r *= T / int(q_total_ratio)
        out.append(r)
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------------------------
# Address tables

def _work_items(n: np.ndarray) -> np.ndarray:
    from .batch import work_items
    return work_items(n, CHUNK)


class _Plan:
    """Rows (leaves) of the accumulator: sizes, offsets, work items."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(self.sizes.sum())
        self.work = _work_items(self.sizes)


def _leaves_of(update, plan: _Plan, who: str = "", party=None):
    """One update as per-row flat views (no copy), checked against the plan: a flat array of the total size, or a
    list/tuple of arrays with the rows' sizes."""
    R = plan.sizes.size
    if isinstance(update, (list, tuple)):
        if len(update) != R:
            raise LayoutMismatch(f"{who}has {len(update)} arrays, the layout {R}", party=party)
        arrays = [(str(r), a) for r, a in enumerate(update)]
    else:
        arrays = [(None, update)]
    flat = []
    for leaf, a in arrays:
        if device.is_device_array(a):  # CuPy / torch CUDA: a CuPy view of the same memory (cupy backend only)
            dl = device.device_leaf(a)
            a, dt = dl.array, dl.dtype  # (a bf16 one as its uint16 bits: named by its dtype)
        elif not isinstance(a, np.ndarray):
            raise LayoutMismatch(f"{who}expected a numpy array, got {type(a).__name__}", leaf=leaf, party=party)
        elif isinstance(a, np.ma.MaskedArray):  # (its masked words would be summed: the aggregator refuses them too)
            raise LayoutMismatch(f"{who}a masked array's masked values would be summed; send a plain array",
                                 leaf=leaf, party=party)
        else:
            # a subclass as the plain array it holds: an np.matrix stayed 2-D through reshape(-1), the leaves were
            # sliced from its rows, and every leaf past the first summed nothing while the party counted
            a = np.asarray(a)
            dt = a.dtype
        if not dt.isnative:  # (before the dtype's name: a big-endian uint32 was "not one of uint32, ...")
            raise LayoutMismatch(f"{who}byte-swapped arrays ({dt.str}) are not read in place; convert to native "
                                 f"order first", leaf=leaf, party=party)
        if dt not in _CODE:
            raise LayoutMismatch(f"{who}dtype {dtype_name(dt)} is not one of uint32, int32, int64, uint64", leaf=leaf,
                                 party=party)
        if not (a.flags.c_contiguous and device.aligned(a)):  # (the kernels read it through typed pointers)
            raise LayoutMismatch(f"{who}array is not C-contiguous and aligned to its elements (the kernels read it "
                                 f"in place)", leaf=leaf, party=party)
        if _CODE[a.dtype] == _W64 and sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            raise LayoutMismatch(f"{who}64-bit inputs are read by their low word: little-endian hosts only", leaf=leaf,
                                 party=party)
        flat.append((leaf, a.reshape(-1)))
    if len(flat) == 1 and flat[0][0] is None:
        a = flat[0][1]
        if a.size != plan.total:
            raise LayoutMismatch(f"{who}has {a.size} elements, the layout {plan.total}", party=party)
        return [a[o:o + n] for o, n in zip(plan.offsets.tolist(), plan.sizes.tolist())]
    out = []
    for (leaf, a), n in zip(flat, plan.sizes.tolist()):
        if a.size != n:
            raise LayoutMismatch(f"{who}has {a.size} elements, the layout {n}", leaf=leaf, party=party)
        out.append(a)
    return out


def _tables(leaves: list, plan: _Plan, addr=None):
    """ptr[R, k] (addresses; 0 for empty rows) and code[R, k] of k updates' per-row views; ``addr(a)``: an array's
    address (default: host memory)."""
    k, R = len(leaves), plan.sizes.size
    ptr = np.zeros((R, k), np.int64)
    code = np.zeros((R, k), np.int64)
    for j, rows in enumerate(leaves):
        for r, a in enumerate(rows):
            ptr[r, j] = (a.__array_interface__["data"][0] if addr is None else addr(a)) if a.size else 0
            code[r, j] = _CODE[a.dtype]
    return ptr, code


def _check_acc(acc, backend: str) -> None:
    on_device = device.is_device_array(acc)
    if not (isinstance(acc, np.ndarray) or on_device) or getattr(acc.dtype, "name", None) not in ACC_DTYPES:
        raise TypeError(f"acc must be a uint32 or uint64 array, got {getattr(acc, 'dtype', type(acc))}")
    if on_device != (backend == "cupy"):
        raise TypeError(f"acc is in {'GPU' if on_device else 'host'} memory but the backend is {backend!r}")
    if acc.ndim != 1 or not acc.flags.c_contiguous or not acc.dtype.isnative or not (
            on_device or acc.flags.writeable):
        raise ValueError("acc must be 1-d, C-contiguous, native-endian and writeable")


def _on_host(leaves: list, backend: str) -> None:
    """A CPU backend reads host memory only: say so for an update in GPU memory (rather than fail on its address)."""
    if backend != "cupy":
        for j, rows in enumerate(leaves):
            if any(not isinstance(a, np.ndarray) for a in rows):
                raise LayoutMismatch(f"update {j} is in GPU memory; use backend='cupy' for device updates")


# ------------------------------------------------------------------------------------------------------------------
# Backends: (acc, plan, leaves, bits, subtract) -> bool[k] (update j holds a value outside [0, 2^b)); acc updated

def _modsum_numpy(acc, plan, leaves, bits, subtract):
    """The specification: per update, ``acc +=`` (or ``-=``) its values cast to acc's dtype (C's conversion to
    unsigned: mod 2^32 or 2^64), wrapping; then ``acc &= 2^b - 1``. An update is out of range when some value, as
    its dtype's integer, lies outside [0, 2^b)."""
    op = np.subtract if subtract else np.add
    hi = 1 << bits
    bad = np.zeros(len(leaves), bool)
    for j, rows in enumerate(leaves):
        for o, n, u in zip(plan.offsets.tolist(), plan.sizes.tolist(), rows):
            if n == 0:
                continue
            a = acc[o:o + n]
            op(a, u, out=a, dtype=acc.dtype, casting="unsafe")
            bad[j] |= bool(((u < 0) | (u >= hi)).any()) if u.dtype.kind == "i" else bool((u >= hi).any())
    if bits < acc.dtype.itemsize * 8:
        np.bitwise_and(acc, acc.dtype.type(hi - 1), out=acc)
    return bad


if numba is not None:

    def _as_acc(x, a):  # pragma: no cover - replaced by the overload
        raise NotImplementedError

    @overload(_as_acc, inline="always")
    def _as_acc_ov(x, a):
        if a.dtype == types.uint64:
            return lambda x, a: np.uint64(x)
        return lambda x, a: np.uint32(x)

    # Loops index slices from 0 (a = acc[o:o+n]; a[i]), as backends/numba_kernels.py's: offsets inside the index
    # keep numba's wraparound check in the loop and block vectorization. Every operand is unsigned (numba turns
    # mixed signed/unsigned 64-bit arithmetic into float64).
    @njit(parallel=True, cache=True, nogil=True)
    def _modsum_nb(acc, off, ptr, code, work, bits, mask, subtract, bad, w32, w64):
        m, k = work.shape[0], ptr.shape[1]
        full = mask == _as_acc(np.uint64(0xFFFFFFFFFFFFFFFF), acc)
        for it in prange(m):
            r, s, ln = work[it, 0], work[it, 1], work[it, 2]
            a = acc[off[r] + s:off[r] + s + ln]
            for j in range(k):
                p = ptr[r, j]
                if p == 0:
                    continue
                c = code[r, j]
                sh = np.uint64(31) if (c == 1 and bits > 31) else np.uint64(bits)
                # OR of the raw values, shifted once at the end: (OR v) >> sh != 0 iff some v >> sh != 0
                if c == 2:
                    u = carray(_typed_ptr(p, w64), (s + ln,))[s:]
                    o64 = np.uint64(0)
                    if subtract:
                        for i in range(ln):
                            v = u[i]
                            a[i] = a[i] - _as_acc(np.uint32(v & np.uint64(0xFFFFFFFF)), acc)
                            o64 |= v
                    else:
                        for i in range(ln):
                            v = u[i]
                            a[i] = a[i] + _as_acc(np.uint32(v & np.uint64(0xFFFFFFFF)), acc)
                            o64 |= v
                    ex = o64 >> sh
                else:
                    u = carray(_typed_ptr(p, w32), (s + ln,))[s:]
                    o32 = np.uint32(0)
                    if subtract:
                        for i in range(ln):
                            v = u[i]
                            a[i] = a[i] - _as_acc(v, acc)
                            o32 |= v
                    else:
                        for i in range(ln):
                            v = u[i]
                            a[i] = a[i] + _as_acc(v, acc)
                            o32 |= v
                    ex = np.uint64(o32) >> sh
                bad[it, j] = ex != np.uint64(0)
            if not full:
                for i in range(ln):
                    a[i] = a[i] & mask


@keeps_threads
def _modsum_numba(acc, plan, leaves, bits, subtract):
    if _numba.available() is not True:
        raise BackendUnavailable(f"backend 'numba' unavailable: {_numba.available()}")
    k = len(leaves)
    ptr, code = _tables(leaves, plan)
    work = plan.work
    _numba.use_threads(1 if plan.total * max(k, 1) < SMALL_CALL else get_num_threads())
    bad = np.zeros((work.shape[0], k), np.bool_)
    mask = acc.dtype.type((1 << bits) - 1)
    _modsum_nb(acc, plan.offsets, ptr, code, work, np.int64(bits), mask, bool(subtract), bad,
               np.empty(0, np.uint32), np.empty(0, np.uint64))
    return bad.any(axis=0) if work.shape[0] else np.zeros(k, bool)


def _modsum_cpp(acc, plan, leaves, bits, subtract):
    if _core is None or not hasattr(_core, "modsum"):
        raise BackendUnavailable("backend 'cpp' unavailable: the C++ extension is not built")
    k = len(leaves)
    ptr, code = _tables(leaves, plan)
    nt = 1 if plan.total * max(k, 1) < SMALL_CALL else get_num_threads()
    bad = _core.modsum(acc, plan.offsets, ptr, code, plan.work, int(bits), bool(subtract), nt)
    return bad.astype(bool).any(axis=0) if plan.work.shape[0] else np.zeros(k, bool)


def _modsum_cupy(acc, plan, leaves, bits, subtract):
    from .backends import cupy_backend

    rt = cupy_backend.runtime()
    # updates in host memory are copied to the device first (this path has no staging ring: SecAgg vectors are
    # 32-bit words, and a server that folds them on the GPU receives them there)
    dev = [[a if not isinstance(a, np.ndarray) else rt.upload(a) for a in rows] for rows in leaves]
    ptr, code = _tables(dev, plan, addr=rt.ptr)
    return cupy_backend.modsum(acc, plan.offsets, ptr, code, plan.sizes, bits, subtract)


_BACKEND_FUNCS = {"numpy": _modsum_numpy, "numba": _modsum_numba, "cpp": _modsum_cpp, "cupy": _modsum_cupy}


def _default_backend() -> str:
    """cpp, else numba when importable, else the numpy reference (the one place that chooses)."""
    if _core is not None and hasattr(_core, "modsum"):
        return "cpp"
    return "numba" if _numba.available() is True else "numpy"


def _resolve(backend) -> str:
    backend = _default_backend() if backend is None else backend
    if backend == "cpp" and (_core is None or not hasattr(_core, "modsum")):
        raise BackendUnavailable("backend 'cpp' unavailable: the C++ extension is not built")
    if backend not in _BACKEND_FUNCS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numba" and _numba.available() is not True:
        raise BackendUnavailable(f"backend 'numba' unavailable: {_numba.available()}")
    if backend == "cupy":
        from .backends import cupy_backend

        ok = cupy_backend.available()
        if ok is not True:
            raise BackendUnavailable(f"backend 'cupy' unavailable: {ok}")
    return backend


def _run(acc, plan, leaves, bits, subtract, backend):
    _on_host(leaves, backend)
    return _BACKEND_FUNCS[backend](acc, plan, leaves, bits, subtract)


def modsum(acc, updates, modulus_bits: int = 32, *, subtract: bool = False, backend=None):
    r"""In place: ``acc <- (acc +/- sum_j y_j) mod 2^b`` over k updates, in one pass over ``acc``; returns ``acc``.

    ``acc``: 1-d uint32 (wraps mod 2^32) or uint64 array; after the call its values lie in [0, 2^b). ``updates``: k
    updates, each a C-contiguous uint32 / int32 / int64 / uint64 array of ``acc.size`` elements (any shape) or a
    list of such arrays whose sizes split ``acc`` into leaves (the same split for every list). Each value counts
    mod 2^32 (its low 32-bit word); no range check here (:class:`SecAggSum` checks). ``subtract=True`` subtracts
    instead (removing masks). ``backend``: "numpy" (the reference), "numba", "cpp", "cupy" (``acc`` a CuPy array;
    updates in GPU memory read in place, host ones copied over) or None (cpp, else numba, else numpy).
    Bytes per element: ``k * itemsize(y) + 2 * itemsize(acc)``.
    """
    bits = _check_bits(modulus_bits)
    backend = _resolve(backend)
    _check_acc(acc, backend)
    updates = list(updates)
    split = next((u for u in updates if isinstance(u, (list, tuple))), None)
    plan = _Plan([acc.size] if split is None else [np.size(a) for a in split])
    if plan.total != acc.size:
        raise LayoutMismatch(f"the updates' leaves hold {plan.total} elements, acc {acc.size}")
    leaves = [_leaves_of(u, plan, f"update {j}: ") for j, u in enumerate(updates)]
    _run(acc, plan, leaves, bits, subtract, backend)
    return acc


# ------------------------------------------------------------------------------------------------------------------
# The streaming state

FORMAT = "jitkernels.secaggsum"
VERSION = 1


class SecAggSum:
    r"""Streaming SecAgg sum: ``S = sum_j y_j mod 2^b`` over the parties folded so far, O(model) memory.

    ``sizes``: the vector's length, or the leaf sizes of Flower's list of arrays (an update is then that list, or
    one flat array of the total length). ``modulus_bits``: b in [1, 32]. ``acc_dtype``: "uint32" (4 bytes per
    element) or "uint64". ``backend``: as :func:`modsum`.

    Admission happens inside the fold's one pass: the kernel ORs each value's bits above 2^b (negative values
    included) while it adds them; if any update of the batch holds one, the batch is subtracted back (exact: mod
    2^b, subtraction inverts addition) and :class:`ValueOutOfRange` names the party. Structure, dtype and party
    checks come before any arithmetic. Either way a rejected batch leaves the state bit-identical. Thread-safe (a
    lock around each call; the kernel releases the GIL). Per fold of k updates: ``k * itemsize + 2 * acc itemsize``
    bytes per element (and the same again, once, when a batch is rejected).
    """

    def __init__(self, sizes, modulus_bits: int = 32, *, acc_dtype: str = "uint32", backend=None, _acc=None,
                 _parties=()):
        self.modulus_bits = _check_bits(modulus_bits)
        if np.dtype(acc_dtype).name not in ACC_DTYPES:
            raise ValueError(f"acc_dtype must be one of {ACC_DTYPES}, got {acc_dtype!r}")
        self.acc_dtype = np.dtype(acc_dtype).name
        sz = [sizes] if isinstance(sizes, (int, np.integer)) else list(sizes)
        if not sz or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in sz):
            raise ValueError(f"sizes must be an int >= 0 or a non-empty list of them, got {sizes!r}")
        self.sizes = tuple(int(s) for s in sz)
        self._plan = _Plan(self.sizes)
        self.backend = _resolve(backend)
        on_device = self.backend == "cupy"  # the accumulator lives where the backend's kernels run
        self.acc = (device.zeros(self._plan.total, self.acc_dtype, on_device) if _acc is None
                    else device.place(_acc, on_device))
        self._parties: list = []
        self._party_set: set = set()
        for p in _parties:
            self._add_party(check_party(p))
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Start the next round in place: the accumulator zeroed (its pages stay resident), no parties."""
        with self._lock:
            self.acc[...] = 0
            self._parties.clear()
            self._party_set.clear()

    def _add_party(self, p):
        if p in self._party_set:
            raise DuplicateParty(p)
        self._parties.append(p)
        self._party_set.add(p)

    # --- summary -------------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._plan.total

    @property
    def parties(self) -> tuple:
        """The parties folded in, in fold order."""
        return tuple(self._parties)

    @property
    def count(self) -> int:
        return len(self._parties)

    def __repr__(self):
        return f"SecAggSum({self.count} parties, {self.acc_dtype}[{self.n}] mod 2^{self.modulus_bits})"

    # --- fold ----------------------------------------------------------------------------------------------------
    def fold(self, update, party) -> None:
        """Fold one party's masked vector (see :meth:`fold_many`)."""
        self.fold_many([update], [party])

    def fold_many(self, updates, parties) -> None:
        """Fold k masked vectors in one pass over the accumulator. All are checked (structure, dtype, parties)
        before anything is added; a value outside [0, 2^b) rolls the whole batch back. Errors name the party."""
        updates = list(updates)
        parties = per_update(parties, len(updates), "parties")  # ('pq' was folded as parties 'p' and 'q')
        if not updates:
            return
        parties = [check_party(p) for p in parties]
        seen = set()
        for p in parties:
            if p in seen:
                raise DuplicateParty(p, "this batch")
            seen.add(p)
        with self._lock:
            for p in parties:
                if p in self._party_set:
                    raise DuplicateParty(p)
            leaves = [_leaves_of(u, self._plan, party=p) for u, p in zip(updates, parties)]
            xp = device.array_module(self.acc)
            for p, rows in zip(parties, leaves):  # (the add changes such an update: the rollback then subtracts
                for r, a in enumerate(rows):  # other values, and a refused batch left the sums changed)
                    if type(a) is type(self.acc) and xp.may_share_memory(a, self.acc):
                        raise LayoutMismatch("the update shares memory with this sum's accumulator; send a copy",
                                             leaf=str(r), party=p)
            bad = _run(self.acc, self._plan, leaves, self.modulus_bits, False, self.backend)
            if bad.any():
                _run(self.acc, self._plan, leaves, self.modulus_bits, True, self.backend)  # exact rollback
                j = int(np.flatnonzero(bad)[0])
                raise self._out_of_range(parties[j], leaves[j])
            for p in parties:
                self._add_party(p)

    def _out_of_range(self, party, rows) -> ValueOutOfRange:
        hi = 1 << self.modulus_bits
        for r, u in enumerate(rows):
            u = device.to_host(u)
            out = (u < 0) | (u >= hi) if u.dtype.kind == "i" else (u >= hi)
            idx = np.flatnonzero(out)
            if idx.size:
                leaf = str(r) if len(rows) > 1 else None
                where = "" if leaf is None else f"leaf {leaf!r} "
                return ValueOutOfRange(f"party {party!r}: {where}holds {idx.size} value(s) outside "
                                       f"[0, 2^{self.modulus_bits}), first {u[idx[0]]} at index {idx[0]}",
                                       party=party, leaf=leaf, value=u[idx[0]].item())
        return ValueOutOfRange(f"party {party!r}: holds values outside [0, 2^{self.modulus_bits})",  # pragma: no cover
                               party=party)

    # --- merge ---------------------------------------------------------------------------------------------------
    def _check_mergeable(self, other: "SecAggSum") -> None:
        if not isinstance(other, SecAggSum):
            raise TypeError(f"can only merge a SecAggSum, got {type(other).__name__}")
        if (self.sizes, self.modulus_bits, self.acc_dtype) != (other.sizes, other.modulus_bits, other.acc_dtype):
            raise IncompatibleStates(
                f"states differ: sizes {self.sizes} / {other.sizes}, bits {self.modulus_bits} / "
                f"{other.modulus_bits}, acc {self.acc_dtype} / {other.acc_dtype}")
        shared = self._party_set & other._party_set
        if shared:
            raise OverlappingParties(shared)

    def merge(self, other: "SecAggSum") -> "SecAggSum":
        """A new state: ``(S_a + S_b) mod 2^b``, parties the union (self's, then other's). Associative and
        commutative up to party order; refuses shared parties (:class:`OverlappingParties`)."""
        self._check_mergeable(other)
        out = self.copy()
        out.merge_into(other)
        return out

    def merge_into(self, other: "SecAggSum") -> None:
        """Merge ``other`` into this state in place (checked first: a refused merge changes nothing). ``other`` is
        read from a snapshot taken under its own lock, so two states merging into each other cannot deadlock."""
        if not isinstance(other, SecAggSum):
            raise TypeError(f"can only merge a SecAggSum, got {type(other).__name__}")
        with other._lock:
            snap = other._copy_unlocked()
        with self._lock:
            self._check_mergeable(snap)
            _run(self.acc, _Plan([self.n]), [[snap.acc]], self.modulus_bits, False, self.backend)
            for p in snap._parties:
                self._add_party(p)

    # --- results -------------------------------------------------------------------------------------------------
    def result(self) -> np.ndarray:
        """A copy of the sum mod 2^b, flat, in the accumulator's dtype (a CuPy array with backend "cupy")."""
        with self._lock:
            return self.acc.copy()

    def leaves(self) -> list:
        """The sum as a list of arrays of the leaf sizes (copies), e.g. to unmask and dequantize leaf by leaf."""
        flat = self.result()
        return [flat[o:o + n] for o, n in zip(self._plan.offsets.tolist(), self._plan.sizes.tolist())]

    def copy(self) -> "SecAggSum":
        with self._lock:
            return self._copy_unlocked()

    def _copy_unlocked(self) -> "SecAggSum":
        """A copy, without taking the lock (the caller holds it)."""
        return SecAggSum(self.sizes, self.modulus_bits, acc_dtype=self.acc_dtype, backend=self.backend,
                         _acc=self.acc.copy(), _parties=self._parties)

    def same_bits(self, other: "SecAggSum") -> bool:
        """Same layout, modulus, accumulator bits and parties (in order)."""
        return (self.sizes == other.sizes and self.modulus_bits == other.modulus_bits
                and self.acc.dtype == other.acc.dtype
                and device.to_host(self.acc).tobytes() == device.to_host(other.acc).tobytes()
                and self._parties == other._parties)

    # --- files ---------------------------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {"format": FORMAT, "version": str(VERSION), "modulus_bits": str(self.modulus_bits),
                "sizes": json.dumps(list(self.sizes)), "parties": json.dumps(self._parties)}

    def to_bytes(self) -> bytes:
        """A safetensors file (tensor ``acc``) whose metadata carries the layout, modulus, parties and a SHA-256
        checksum (:func:`jitkernels.state.checked_bytes`). Nothing is pickled."""
        from .state import checked_bytes
        with self._lock:
            return checked_bytes({"acc": device.to_host(self.acc)}, self._metadata())

    def save(self, path) -> None:
        """Write atomically (temp file, fsync, rename, fsync the directory)."""
        from .state import atomic_write
        atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def load(cls, path, *, backend=None) -> "SecAggSum":
        """Load and verify a saved state: :class:`CorruptState` if it is truncated, altered, of another format or
        version, or inconsistent (values >= 2^b, wrong length, duplicate parties)."""
        from .state import check_format, read_checked
        path = os.fspath(path)
        tensors, meta = read_checked(path, what="SecAggSum file")
        check_format(path, meta, FORMAT, (VERSION,), "SecAggSum file")
        try:
            bits = int(meta["modulus_bits"])
            sizes = json.loads(meta["sizes"])
            parties = json.loads(meta["parties"])
            if not isinstance(parties, list):  # (a str was its characters: "abc" three parties)
                raise ValueError(f"its parties are a {type(parties).__name__}, not a list")
            acc = np.array(tensors["acc"])
            # the sizes against the accumulator first, in Python ints: a 288-byte file claiming 2^43 values built
            # 6 GB of work items (and int64 sums wrap) before the length check below
            if not isinstance(sizes, list) or sum(int(x) for x in sizes) != acc.size:
                raise ValueError(f"its leaf sizes {str(sizes)[:80]} do not add up to the accumulator's {acc.size}")
            state = cls(sizes, bits, acc_dtype=acc.dtype.name, backend=backend, _acc=acc, _parties=parties)
        except (KeyError, ValueError, TypeError, DuplicateParty) as e:
            raise CorruptState(f"{path}: inconsistent SecAggSum ({e})") from e
        if acc.shape != (state.n,) or (acc.size and int(acc.max()) >= 1 << bits):
            raise CorruptState(f"{path}: accumulator {acc.dtype}{acc.shape} does not hold {state.n} values mod "
                               f"2^{bits}")
        return state
