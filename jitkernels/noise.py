r"""Gaussian noise for differential privacy, bit-identical on numpy, numba, C++ and CUDA.

Element ``i`` of leaf ``leaf`` in round ``round`` of a job with 64-bit ``seed`` gets the standard normal sample
``z(seed, round, leaf, i)``, a pure function of those four integers: no generator state, so the noise does not
depend on thread count, on how ``[start, start + n)`` is split, or on the backend. The server adds
``sigma * z`` (float64) at finalize. This module is the specification (numpy) and a numba kernel;
``csrc/jk_noise.h`` is the same function for C++ and CUDA.

Math
----
Elements ``2c`` and ``2c + 1`` share Philox block ``c = i >> 1``:

.. math::

    (w_0, w_1, w_2, w_3) &= \mathrm{Philox4x32\text{-}10}(\text{counter} = (c_{lo}, c_{hi}, \text{leaf},
    \text{round}),\ \text{key} = (\text{seed}_{lo}, \text{seed}_{hi})) \\
    u_1 &= (\lfloor 2^{21} w_0 + w_1 / 2^{11} \rfloor + 1)\, 2^{-53} \in (0, 1], \qquad
    u_2 = \lfloor 2^{21} w_2 + w_3 / 2^{11} \rfloor\, 2^{-53} \in [0, 1) \\
    \rho &= \sqrt{-2 \ln u_1}, \qquad z_{2c} = \rho \cos(2\pi u_2), \qquad z_{2c+1} = \rho \sin(2\pi u_2)

(Box & Muller 1958; Philox: Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011,
as Random123's ``philox4x32_10``). The counter packing keeps every (round, leaf, element pair) on its own Philox
block, so streams of different rounds and leaves never overlap; the key is the job's seed. Both uniforms take 53
bits and are built exactly (an integer <= 2^53 times a power of two). ``u1 > 0``, so ``|z| <= sqrt(106 ln 2) ~ 8.57``.

Bit-exactness: ``ln``, ``sin`` and ``cos`` are our own (:func:`jk_log`, :func:`sincos_2pi`), written with ``+ - * /``
and exact bit manipulation in one fixed order (fdlibm's methods, error < 1 ulp; the tests measure it), because
libm, numpy, LLVM and CUDA each round those functions differently in the last bit. ``sqrt`` is correctly rounded in
IEEE 754 and taken from each platform. C++ must be compiled with ``-ffp-contract=off`` and CUDA with
``--fmad=false``: a fused multiply-add rounds once where this reference rounds twice.

Privacy caveats
---------------
* Noise added in floating point is not exactly the Gaussian mechanism: which outputs ``x + sigma * z`` can reach,
  and how often, depends on ``x`` through rounding, and that can leak ``x`` (Mironov, "On significance of the least
  significant bits for differential privacy", CCS 2012, for the Laplace mechanism; Jin, McMurtry, Rubinstein and
  Ohrimenko, "Are we there yet? Timing and floating-point attacks on differential privacy systems", IEEE S&P 2022,
  for Gaussian samplers). Mitigations (snapping, a discrete Gaussian) are out of scope here.
* The samples are also not exactly normal: ``u1`` lies on a grid of 2^53 points, so ``|z| <= 8.57`` (the normal's
  mass beyond that is ~1e-17), and each sample is a float64.
* Philox is a fast statistical generator, not a cryptographic one. The seed must be secret and unpredictable:
  :func:`new_seed` draws it from ``os.urandom``. ``round`` and ``leaf`` separate the streams of one aggregate.
* The same noise on two different aggregates cancels in the difference of the two released models, which then
  gives the difference of their sums exactly. So the aggregator keys each aggregate's noise with
  :func:`aggregate_key` (an HMAC of the aggregate's own bytes under the seed), not with the seed alone: aggregates
  that differ get independent noise, whatever copies, pickles, saved states or seeds they share, and an aggregate
  released again (a replay after a restart, a second finalize) gets its noise again, which releases nothing new.
  "The same" is bit for bit: outside deterministic mode the same updates folded in another order give other bits,
  so other noise, and a second release of them costs the privacy budget again.
* Epsilon/delta accounting (choosing ``sigma`` for a privacy budget) is out of scope: use an accountant such as
  Opacus' RDP accountant (``opacus.accountants.RDPAccountant``).

Cost: 8 bytes written per element for :func:`gaussian`; :func:`add_noise` reads and writes the output once
(4 or 8 bytes each way). One Philox block (20 32x32->64 multiplies) per two elements, one log, one sin+cos pair and
one sqrt per two elements.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .device import to_host
from .threads import get_num_threads

from . import _numba
from ._numba import keeps_threads, numba

if numba is not None:
    from numba import njit, prange, types
    from numba.extending import overload

    from ._numba import bits_f64 as _f64_from_bits, f64_bits as _f64_bits

__all__ = ["new_seed", "philox4x32_10", "jk_log", "sincos_2pi", "gaussian", "gaussian_numba", "add_noise",
           "numba_available"]

# Philox4x32 constants (Random123): multipliers and the Weyl key increments (golden ratio, sqrt(3) - 1).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

# jk_log: fdlibm e_log.c (ln2 split so that k * LN2_HI is exact for |k| < 2000; Lg1..Lg7 minimax, error < 2^-58.45).
LN2_HI, LN2_LO = float.fromhex("0x1.62e42fee00000p-1"), float.fromhex("0x1.a39ef35793c76p-33")
LG = tuple(float.fromhex(h) for h in (
    "0x1.5555555555593p-1", "0x1.999999997fa04p-2", "0x1.2492494229359p-2", "0x1.c71c51d8e78afp-3",
    "0x1.7466496cb03dep-3", "0x1.39a09d078c69fp-3", "0x1.2f112df3e5244p-3"))
# sin / cos kernels on [-pi/4, pi/4]: FreeBSD msun k_sin.c, k_cos.c.
S = tuple(float.fromhex(h) for h in (
    "-0x1.5555555555549p-3", "0x1.111111110f8a6p-7", "-0x1.a01a019c161d5p-13", "0x1.71de357b1fe7dp-19",
    "-0x1.ae5e68a2b9cebp-26", "0x1.5d93a5acfd57cp-33"))
C = tuple(float.fromhex(h) for h in (
    "0x1.555555555554cp-5", "-0x1.6c16c16c15177p-10", "0x1.a01a019cb1590p-16", "-0x1.27e4f809c52adp-22",
    "0x1.1ee9ebdb4b1c4p-29", "-0x1.8fae9be8838d4p-37"))
PIO2_HI = float.fromhex("0x1.921fb54442d18p0")    # pi/2 rounded to double
PIO2_LO = float.fromhex("0x1.1a62633145c07p-54")  # pi/2 - PIO2_HI
PIO2_HH = float.fromhex("0x1.921fb58000000p0")    # Veltkamp halves of PIO2_HI: PIO2_HH + PIO2_HL == PIO2_HI
PIO2_HL = float.fromhex("-0x1.dde9740000000p-27")
SPLIT = 134217729.0                               # 2^27 + 1 (Veltkamp)
ROUND_INT = float.fromhex("0x1.8p52")             # x + 1.5 * 2^52 - 1.5 * 2^52 rounds |x| < 2^51 to an integer
TWO_M53 = float.fromhex("0x1p-53")

_MASK32 = 0xFFFFFFFF
_U64_MAX = 2 ** 64 - 1
_BLOCKS = 1024  # Philox blocks per numba work item: two 8 KiB scratch arrays, in L1/L2
_CHUNK = 1 << 20  # elements per numpy pass: bounds the reference's temporaries (~20 arrays of 4 MiB)


def new_seed() -> int:
    """A fresh secret 64-bit job seed from the OS CSPRNG (``os.urandom(8)``)."""
    return int.from_bytes(os.urandom(8), "little")


_KEY_CHUNK = 8 << 20  # bytes per SHA-256 of aggregate_key: fixed, so that the key does not depend on the threads
_KEY_PARALLEL = 4 * _KEY_CHUNK  # past this many bytes, the chunks are hashed on the kernel threads


def aggregate_key(seed: int, round: int, arrays) -> int:
    """The 64-bit Philox key of one aggregate's noise: the first 8 bytes of HMAC-SHA-256 under ``seed`` of
    ``round`` and the SHA-256 of each 8 MiB chunk of ``arrays`` (the noised sums, the weights that divide them and
    the noise's scale; host or device arrays). A pseudorandom function of the aggregate under the secret seed:
    two aggregates that differ in any bit get independent noise; the same aggregate gets the same noise. Reads
    every byte once: SHA-256 runs at ~2 GB/s per core here (~50 ms for 25M float32 sums, half that on two
    threads); device arrays are copied to the host first."""
    seed = _uint("seed", seed, 64)
    views = [memoryview(np.ascontiguousarray(to_host(a))).cast("B") for a in arrays]
    chunks = [v[i:i + _KEY_CHUNK] for v in views for i in range(0, len(v), _KEY_CHUNK)]
    total = sum(len(v) for v in views)
    threads = get_num_threads()
    if threads > 1 and total > _KEY_PARALLEL:
        with ThreadPoolExecutor(threads) as pool:  # (hashlib releases the GIL on large inputs)
            digests = list(pool.map(_sha256, chunks))
    else:
        digests = [_sha256(c) for c in chunks]
    mac = hmac.new(seed.to_bytes(8, "little"), _uint("round", round, 64).to_bytes(8, "little"), hashlib.sha256)
    for v in views:  # (the lengths too: arrays split differently into the same bytes are other aggregates)
        mac.update(len(v).to_bytes(8, "little"))
    for d in digests:
        mac.update(d)
    return int.from_bytes(mac.digest()[:8], "little")


def _sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def numba_available():
    """True, or the reason the numba kernels cannot be used."""
    return _numba.available()


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (shared by every backend, so that all reject the same inputs with the same exception)

def _uint(name: str, v, bits: int) -> int:
    if isinstance(v, (bool, np.bool_)):  # (seed=True was the seed 1)
        raise TypeError(f"{name} must be an integer, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None
    if not 0 <= v < 1 << bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {v}")
    return v


def _check(seed, round, leaf, start, n):
    seed = _uint("seed", seed, 64)
    round = _uint("round", round, 32)
    leaf = _uint("leaf", leaf, 32)
    start = _uint("start", start, 64)
    n = _uint("n", n, 64)
    if start + n > 1 << 64:
        raise ValueError(f"element range [start, start + n) = [{start}, {start + n}) passes 2^64")
    return seed, round, leaf, start, n


def _check_sigma(sigma) -> float:
    s = float(sigma)
    if not (s >= 0.0 and np.isfinite(s)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    return s


# ----------------------------------------------------------------------------------------------------------------
# numpy reference: the specification. Integer words travel as uint64 arrays holding 32-bit values, so that the
# 32x32 -> 64 products of Philox are exact; float64 operations are written in exactly the header's order.

def _philox_np(c0, c1, c2, c3, k0: int, k1: int):
    m0, m1, mask, s32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(_MASK32), np.uint64(32)
    for _ in range(10):
        p0 = m0 * c0  # mulhilo32(M0, c0)
        p1 = m1 * c2  # mulhilo32(M1, c2)
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ np.uint64(k0), p1 & mask, (p0 >> s32) ^ c3 ^ np.uint64(k1), p0 & mask
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 (Random123's ``philox4x32_10``): ``counter`` uint32 of shape (4,) or (4, m), ``key`` (2,).
    Returns uint32 of the counter's shape."""
    ctr = np.asarray(counter, dtype=np.uint32)
    k = np.asarray(key, dtype=np.uint32)
    if ctr.shape[0] != 4 or ctr.ndim > 2 or k.shape != (2,):
        raise ValueError(f"counter must have shape (4,) or (4, m) and key (2,), got {ctr.shape} and {k.shape}")
    words = _philox_np(*(ctr.astype(np.uint64)), int(k[0]), int(k[1]))
    return np.stack(words).astype(np.uint32)


def _bits53_np(hi, lo):
    return (hi << np.uint64(21)) | (lo >> np.uint64(11))


def jk_log(x) -> np.ndarray:
    r"""Natural log of positive normal finite float64 ``x`` (no special cases: 0, subnormals, inf and NaN are
    outside the domain), bit-identical to ``jk::jk_log``.

    fdlibm's method: :math:`x = 2^k (1 + f)` with :math:`\sqrt2/2 \le 1 + f < \sqrt2` (exact, from the bits),
    :math:`s = f / (2 + f)`, :math:`\ln(1+f) = 2s + sR(s^2)` (R minimax, degree 7), evaluated as
    :math:`k\,ln2_{hi} - ((h - (s(h + R) + k\,ln2_{lo})) - f)` with :math:`h = f^2/2`. Error < 1 ulp.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    bits = x.view(np.uint64)
    hx = (bits >> np.uint64(32)).astype(np.int64)
    k = (hx >> 20) - 1023
    hx = hx & 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000  # mantissa >= sqrt(2): normalize to x/2 and k + 1
    m = (((hx | (i ^ 0x3FF00000)).astype(np.uint64) << np.uint64(32)) | (bits & np.uint64(_MASK32))).view(np.float64)
    k = k + (i >> 20)
    f = m - 1.0
    s = f / (2.0 + f)
    dk = k.astype(np.float64)
    z = s * s
    w = z * z
    t1 = w * (LG[1] + w * (LG[3] + w * LG[5]))
    t2 = z * (LG[0] + w * (LG[2] + w * (LG[4] + w * LG[6])))
    R = t2 + t1
    hfsq = 0.5 * f * f
    return dk * LN2_HI - ((hfsq - (s * (hfsq + R) + dk * LN2_LO)) - f)


def _kernel_sin_np(x, y):
    z = x * x
    w = z * z
    r = (S[1] + z * (S[2] + z * S[3])) + z * w * (S[4] + z * S[5])
    v = z * x
    return x - ((z * (0.5 * y - v * r) - y) - v * S[0])


def _kernel_cos_np(x, y):
    z = x * x
    w = z * z
    r = z * (C[0] + z * (C[1] + z * C[2])) + w * w * (C[3] + z * (C[4] + z * C[5]))
    hz = 0.5 * z
    v = 1.0 - hz
    return v + (((1.0 - v) - hz) + (z * r - x * y))


def sincos_2pi(u):
    r"""``(sin(2 pi u), cos(2 pi u))`` for float64 ``u`` in turns, ``|u| < 2^48``; bit-identical to
    ``jk::jk_sincos_2pi``.

    Range reduction is exact because the argument is in turns: :math:`t = 4u`, :math:`q = \mathrm{rint}(t)`,
    :math:`r = t - q \in [-1/2, 1/2]`. Then :math:`\theta = r\pi/2` as a double-double: :math:`p = fl(r\,P)` and its
    error exactly by Dekker's product on Veltkamp halves (no FMA), plus :math:`r(\pi/2 - P)`; fdlibm's kernels give
    :math:`\sin\theta, \cos\theta` (< 1 ulp), and :math:`q \bmod 4` swaps and negates them.
    """
    u = np.asarray(u, dtype=np.float64)
    t = 4.0 * u
    q = (t + ROUND_INT) - ROUND_INT
    r = t - q
    p = r * PIO2_HI
    c = SPLIT * r
    rh = c - (c - r)
    rl = r - rh
    e = (((rh * PIO2_HH - p) + rh * PIO2_HL) + rl * PIO2_HH) + rl * PIO2_HL
    y = e + r * PIO2_LO
    s = _kernel_sin_np(p, y)
    co = _kernel_cos_np(p, y)
    n = q.astype(np.int64) & 3
    odd = (n & 1) == 1
    sn = np.where(odd, co, s)
    cs = np.where(odd, s, co)
    sn = np.where((n & 2) != 0, -sn, sn)
    cs = np.where(((n + 1) & 2) != 0, -cs, cs)
    return sn, cs


def _pair_np(seed: int, round: int, leaf: int, c):
    """The normals of blocks ``c`` (uint64 array): (z of element 2c, z of element 2c + 1)."""
    mask, s32 = np.uint64(_MASK32), np.uint64(32)
    w0, w1, w2, w3 = _philox_np(c & mask, c >> s32, np.full_like(c, leaf), np.full_like(c, round),
                                seed & _MASK32, seed >> 32)
    u1 = (_bits53_np(w0, w1) + np.uint64(1)).astype(np.float64) * TWO_M53
    u2 = _bits53_np(w2, w3).astype(np.float64) * TWO_M53
    rho = np.sqrt(-2.0 * jk_log(u1))
    s, co = sincos_2pi(u2)
    return rho * co, rho * s


def gaussian(seed, round, leaf, start, n) -> np.ndarray:
    """The reference: ``z(seed, round, leaf, i)`` for ``i`` in ``[start, start + n)``, float64 of length ``n``.

    ``seed`` in [0, 2^64), ``round`` and ``leaf`` in [0, 2^32), ``start + n <= 2^64``. Works in chunks of 2^20
    elements, so the temporaries stay bounded whatever ``n``.
    """
    seed, round, leaf, start, n = _check(seed, round, leaf, start, n)
    out = np.empty(n, dtype=np.float64)
    a = start
    while a < start + n:
        b = min(a + _CHUNK, start + n)
        c0 = a >> 1
        m = ((b - 1) >> 1) - c0 + 1  # blocks covering [a, b)
        c = np.arange(m, dtype=np.uint64) + np.uint64(c0)
        z = np.empty(2 * m, dtype=np.float64)
        z[0::2], z[1::2] = _pair_np(seed, round, leaf, c)
        out[a - start:b - start] = z[a - 2 * c0:b - 2 * c0]
        a = b
    return out


def _add_noise_numpy(out, sigma, seed, round, leaf, start):
    for a in range(0, out.shape[0], _CHUNK):
        b = min(a + _CHUNK, out.shape[0])
        noise = (sigma * gaussian(seed, round, leaf, start + a, b - a)).astype(out.dtype)  # T(sigma * z)
        out[a:b] += noise


# ----------------------------------------------------------------------------------------------------------------
# numba: the same scalar operations in the same order (numba does not contract a*b + c into an FMA, nor reassociate,
# unless fastmath is asked for, which it never is here). Integer words are uint64 throughout: numba's mixed
# signed/unsigned 64-bit arithmetic would go through float64.

if numba is not None:

    def _narrow(x, like):  # pragma: no cover - replaced by the overload inside numba
        raise NotImplementedError

    @overload(_narrow)
    def _narrow_ol(x, like):
        """Round float64 ``x`` to the element type of array ``like`` (nearest even)."""
        if like.dtype == types.float32:
            return lambda x, like: np.float32(x)
        return lambda x, like: x

    _M0, _M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    _W0, _W1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    _MASK, _S32, _S21, _S11, _ONE = np.uint64(_MASK32), np.uint64(32), np.uint64(21), np.uint64(11), np.uint64(1)
    _LG1, _LG2, _LG3, _LG4, _LG5, _LG6, _LG7 = LG
    _S1, _S2, _S3, _S4, _S5, _S6 = S
    _C1, _C2, _C3, _C4, _C5, _C6 = C

    @njit(cache=True, inline="always")
    def _philox_nb(c0, c1, c2, c3, k0, k1):
        for _ in range(10):
            p0 = _M0 * c0
            p1 = _M1 * c2
            n0 = (p1 >> _S32) ^ c1 ^ k0
            n2 = (p0 >> _S32) ^ c3 ^ k1
            c1 = p1 & _MASK
            c3 = p0 & _MASK
            c0 = n0
            c2 = n2
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        return c0, c1, c2, c3

    @njit(cache=True, inline="always")
    def _log_nb(x):
        bits = _f64_bits(x)
        hx = np.int64(bits >> _S32)
        k = (hx >> 20) - 1023
        hx = hx & 0x000FFFFF
        i = (hx + 0x95F64) & 0x100000
        m = _f64_from_bits((np.uint64(hx | (i ^ 0x3FF00000)) << _S32) | (bits & _MASK))
        k = k + (i >> 20)
        f = m - 1.0
        s = f / (2.0 + f)
        dk = np.float64(k)
        z = s * s
        w = z * z
        t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
        t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
        R = t2 + t1
        hfsq = 0.5 * f * f
        return dk * LN2_HI - ((hfsq - (s * (hfsq + R) + dk * LN2_LO)) - f)

    @njit(cache=True, inline="always")
    def _sincos_nb(u):
        t = 4.0 * u
        q = (t + ROUND_INT) - ROUND_INT
        r = t - q
        p = r * PIO2_HI
        c = SPLIT * r
        rh = c - (c - r)
        rl = r - rh
        e = (((rh * PIO2_HH - p) + rh * PIO2_HL) + rl * PIO2_HH) + rl * PIO2_HL
        y = e + r * PIO2_LO
        z = p * p
        w = z * z
        rs = (_S2 + z * (_S3 + z * _S4)) + z * w * (_S5 + z * _S6)
        v = z * p
        s = p - ((z * (0.5 * y - v * rs) - y) - v * _S1)
        rc = z * (_C1 + z * (_C2 + z * _C3)) + w * w * (_C4 + z * (_C5 + z * _C6))
        hz = 0.5 * z
        v2 = 1.0 - hz
        co = v2 + (((1.0 - v2) - hz) + (z * rc - p * y))
        n = np.int64(q) & 3
        sn = co if n & 1 else s
        cs = s if n & 1 else co
        if n & 2:
            sn = -sn
        if (n + 1) & 2:
            cs = -cs
        return sn, cs

    @njit(cache=True, inline="always")
    def _pair_nb(k0, k1, rnd, leaf, c):
        w0, w1, w2, w3 = _philox_nb(c & _MASK, c >> _S32, leaf, rnd, k0, k1)
        u1 = np.float64(((w0 << _S21) | (w1 >> _S11)) + _ONE) * TWO_M53
        u2 = np.float64((w2 << _S21) | (w3 >> _S11)) * TWO_M53
        rho = np.sqrt(-2.0 * _log_nb(u1))
        s, co = _sincos_nb(u2)
        return rho * co, rho * s

    @njit(cache=True, inline="always")
    def _blocks_nb(k0, k1, rnd, leaf, c0, m, z0, z1):
        """z0[j], z1[j] = the normals of block c0 + j, for j < m. Three plain loops (Philox, then the float math,
        in place) so that LLVM vectorizes each: one fused loop with the tuple-valued helpers stays scalar, ~4x slower.
        Vector instructions round like scalar ones (IEEE, no FMA), so the bits do not change."""
        for j in range(m):
            c = c0 + np.uint64(j)
            w0, w1, w2, w3 = _philox_nb(c & _MASK, c >> _S32, leaf, rnd, k0, k1)
            z0[j] = np.float64(((w0 << _S21) | (w1 >> _S11)) + _ONE) * TWO_M53  # u1, in (0, 1]
            z1[j] = np.float64((w2 << _S21) | (w3 >> _S11)) * TWO_M53          # u2, in [0, 1)
        for j in range(m):
            rho = np.sqrt(-2.0 * _log_nb(z0[j]))
            s, co = _sincos_nb(z1[j])
            z0[j] = rho * co
            z1[j] = rho * s

    @njit(parallel=True, cache=True)
    def _noise_nb(out, sigma, seed, rnd, leaf, start, add):
        """add: out[j] = out[j] + T(sigma * z(seed, rnd, leaf, start + j)), T the element type of out; else
        out[j] = z(...) (float64 out). Parallel over chunks of _BLOCKS Philox blocks; element 2c + e of block c lands
        at out[2c + e - start] when that is in range (the first and last block may be half ours)."""
        n = out.shape[0]
        if n == 0:
            return
        c_first = start >> _ONE
        nb = np.int64(((start + np.uint64(n - 1)) >> _ONE) - c_first) + 1
        lead = np.int64(start & _ONE)  # 1 when start is odd: element 2 * c_first is not ours
        k0 = seed & _MASK
        k1 = seed >> _S32
        for ch in prange((nb + _BLOCKS - 1) // _BLOCKS):
            a = ch * _BLOCKS
            m = min(_BLOCKS, nb - a)
            z0 = np.empty(_BLOCKS)
            z1 = np.empty(_BLOCKS)
            _blocks_nb(k0, k1, rnd, leaf, c_first + np.uint64(a), m, z0, z1)
            for j in range(m):
                o = 2 * (a + j) - lead
                if o >= 0:
                    out[o] = out[o] + _narrow(sigma * z0[j], out) if add else z0[j]
                if o + 1 < n:
                    out[o + 1] = out[o + 1] + _narrow(sigma * z1[j], out) if add else z1[j]


@keeps_threads
def _noise_numba(out, sigma, seed, round, leaf, start, add) -> None:
    """The numba kernel on jitkernels' thread count, capped at numba's pool (the numba backend's policy)."""
    if _numba.available() is not True:
        raise RuntimeError(f"the numba noise kernel is unavailable: {_numba.available()}")
    _numba.use_threads(get_num_threads())
    _noise_nb(out, sigma, np.uint64(seed), np.uint64(round), np.uint64(leaf), np.uint64(start), add)


def gaussian_numba(seed, round, leaf, start, n, out=None) -> np.ndarray:
    """:func:`gaussian` by the numba kernel (parallel over Philox blocks), bit-identical to it. Fills ``out``
    (float64, contiguous, length ``n``) when given, else a new array; returns it."""
    seed, round, leaf, start, n = _check(seed, round, leaf, start, n)
    if out is None:
        out = np.empty(n, dtype=np.float64)
    elif out.dtype != np.float64 or out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable contiguous float64 array of shape ({n},)")
    _noise_numba(out, 1.0, seed, round, leaf, start, False)
    return out


_ADD_BACKENDS = ("numpy", "numba")


def _default_add_backend() -> str:
    """numba when importable, else the numpy reference (the one place that chooses)."""
    return "numba" if _numba.available() is True else "numpy"


def add_noise(out, sigma, seed, round, leaf, start=0, *, backend=None) -> np.ndarray:
    """In place: ``out[j] = out[j] + T(sigma * z(seed, round, leaf, start + j))`` for a 1-d contiguous float32 or
    float64 ``out`` of element type T. ``sigma * z`` is computed in float64 and rounded to T (nearest even), then
    added in T, identically on every backend. ``backend``: "numpy" or "numba"; None lets
    :func:`_default_add_backend` choose. Returns ``out``. Reads and writes ``out`` once (2 * itemsize bytes/element).
    """
    if not isinstance(out, np.ndarray) or out.dtype not in (np.float32, np.float64):
        raise TypeError(f"out must be a float32 or float64 numpy array, got {getattr(out, 'dtype', type(out))}")
    if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be 1-d, contiguous and writeable (pass a flat view of a leaf)")
    seed, round, leaf, start, _ = _check(seed, round, leaf, start, out.shape[0])
    sigma = _check_sigma(sigma)
    backend = _default_add_backend() if backend is None else backend
    if backend == "numpy":
        _add_noise_numpy(out, sigma, seed, round, leaf, start)
    elif backend == "numba":
        _noise_numba(out, sigma, seed, round, leaf, start, True)
    else:
        raise ValueError(f"backend must be one of {_ADD_BACKENDS}, got {backend!r}")
    return out
