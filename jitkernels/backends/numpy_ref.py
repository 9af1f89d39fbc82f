"""The numpy reference: the specification of every primitive, and the oracle the tests hold other backends to.

Element-wise spec (acc dtype ``A``, fl = round to ``A``; no fused multiply-add anywhere):

* load   ``x = A(u[i])``; int8: ``x = A(q[i]) * A(scale[i // block])``
* delta  ``x = x - base[i]``                            (only when a base is given)
* fold   ``acc[i] = acc[i] + A(w_j) * x``                for j = 0..k-1 in batch order, groups in ``GROUP_ORDER``
* final  ``y = acc[i] / A(W_leaf)``; with a base ``y = base[i] + y``; ``out[i] = out_t(y)`` (round to nearest even)
* step   server optimizers (:func:`step`): ``d = acc[i] / A(W_leaf)``, then the update of x, m, v below, in A

Because every element sees the same operations in the same order, the compiled backends match this bit for bit.
Stats (finite count, sum of squares and max-abs in float64) are reductions: equal within a tolerance.
"""

from __future__ import annotations

import numpy as np

from ..device import array_module
from ..dtypes import Quantized, np_dtype

NAME = "numpy"
DTYPES = ("float64", "float32", "float16", "bfloat16", "int8")


def available():
    return True


def _load(u, A):
    if isinstance(u, Quantized):
        return u.dequantize(A).reshape(-1)
    return u.reshape(-1).astype(A)


def fold(acc, base, g):
    """acc[off:off+n] += sum_j A(w_j) * (x_j - base), sequentially in j. Moves k*n*itemsize(in) + 2*n*itemsize(A)
    (+ n*itemsize(base) with a base) bytes per leaf in a fused kernel; this reference makes two temporaries per update
    (~5x the bytes)."""
    A = acc.dtype
    for r, row in enumerate(g.arrays):
        o, n = int(g.off[r]), int(g.n[r])
        a = acc[o:o + n]
        b = None if base is None else base[o:o + n]
        for j, u in enumerate(row):
            if u is None:
                continue
            x = _load(u, A)
            if b is not None:
                x = x - b
            a += A.type(g.w[r, j]) * x


def binned_constants(bound_log2: int):
    """(s1, s2) of deterministic mode for a bound 2^b on |w * x| (see csrc/jk_math.h, binned_step)."""
    return 1.5 * 2.0 ** (bound_log2 + 29), 1.5 * 2.0 ** (bound_log2 - 4)


def fold_binned(hi, lo, base, g, bound_log2, zero=False):
    """Deterministic fold: t = f64(w) * x in f64, split on two fixed grids, both partial sums exact, then a carry
    from lo into hi at the end of the batch. Reads k*n*itemsize(in) + 4*n*8 bytes in a fused kernel. ``zero`` says
    that hi and lo hold zeros over the group's rows, which a kernel may then write without reading (cpp's does;
    this one and numba's and CuPy's read them all the same)."""
    s1, s2 = binned_constants(bound_log2)
    for r, row in enumerate(g.arrays):
        o, n = int(g.off[r]), int(g.n[r])
        H, Lo = hi[o:o + n], lo[o:o + n]
        b = None if base is None else base[o:o + n]
        for j, u in enumerate(row):
            if u is None:
                continue
            x = _load(u, np.float64)
            if b is not None:
                x = x - b
            binned_add(H, Lo, np.float64(g.w[r, j]) * x, s1, s2)
        binned_carry(H, Lo, s1)


def binned_add(hi, lo, t, s1, s2):
    """hi += q1, lo += q2: t split on the two fixed grids, ties away from zero (jk::binned_step)."""
    q1 = (or_last_bit(t) + s1) - s1
    q2 = (or_last_bit(t - q1) + s2) - s2
    hi += q1
    lo += q2


def or_last_bit(x):
    """x with its last mantissa bit set (jk::or_last_bit): a value halfway between two grid points is moved off the
    tie, away from zero."""
    x = array_module(x).asarray(x, dtype=np.float64)  # (a deterministic GPU state's integer leaves come here too)
    return (x.view(np.uint64) | np.uint64(1)).view(np.float64)


def binned_carry(hi, lo, s1):
    """Move lo's multiple of unit1 into hi, exactly, leaving lo in (-unit1/2, unit1/2]: one representation per sum
    (jk::binned_carry)."""
    c = (lo + s1) - s1
    hi += c
    lo -= c
    half = binned_half(s1)
    unit = (lo == -half) * (2 * half)  # (0 or unit1: the tie at -unit1/2 moves to +unit1/2)
    hi -= unit
    lo += unit


def binned_half(s1: float) -> float:
    """unit1 / 2 = ulp(s1) / 2, exactly (jk::binned_half)."""
    return (s1 / 3.0) * 2.0 ** -52


def stats(base, g, acc_dtype):
    """Per (row, update): non-finite count, sum of squares and max |x| of x = u (or u - base), in float64. Reads
    k*n*itemsize(in) (+ n*itemsize(base) per update with a base) bytes per leaf in a compiled kernel, and writes
    three numbers per (leaf, update)."""
    R, k = g.ptr.shape
    nonfinite = np.zeros((R, k), np.int64)
    sumsq = np.zeros((R, k), np.float64)
    maxabs = np.zeros((R, k), np.float64)
    for r, row in enumerate(g.arrays):
        o, n = int(g.off[r]), int(g.n[r])
        for j, u in enumerate(row):
            if u is None or n == 0:
                continue
            x = _load(u, np.float64)
            fin = np.isfinite(x)  # (of the update: a finite one whose delta overflows float64 is out of range, as
            # on cpp, not non-finite)
            if base is not None:
                with np.errstate(over="ignore", invalid="ignore"):  # (an overflowed delta is measured: inf)
                    x = x - base[o:o + n].astype(np.float64)
            nonfinite[r, j] = n - int(fin.sum())
            xf = np.where(fin, x, 0.0)
            with np.errstate(over="ignore"):  # (an overflowed sum is measured again: admission.rescale_norms)
                sumsq[r, j] = float(np.add.reduce(xf * xf))  # not np.dot: a BLAS call per leaf stalls on busy cores
            maxabs[r, j] = float(np.abs(xf).max())
    return nonfinite, sumsq, maxabs


def finalize(acc, base, og):
    """out = out_t(acc / A(W)) (+ base first, when given). Reads n*itemsize(A) (x2 with base), writes
    n*itemsize(out)."""
    A = acc.dtype
    out_t = np_dtype(og.out_dtype)
    for r, out in enumerate(og.outs):
        o, n = int(og.off[r]), int(og.n[r])
        y = acc[o:o + n] / A.type(og.total_w[r])
        if base is not None:
            y = base[o:o + n] + y
        with np.errstate(over="ignore"):  # past the output dtype's range it rounds to inf (IEEE), as the kernels do
            out.reshape(-1)[...] = y.astype(out_t)


# Optimizer kinds, as jk::OptKind in csrc/jk_math.h.
MOMENTUM, NESTEROV, ADAM, YOGI, ADAGRAD = range(5)


def step(acc, x, m, v, kind, coef, og):
    """One server-optimizer step per element, in the accumulator dtype A, with coef = (b1, c1, b2, c2, lr, tau)
    rounded to A once (each product and sum below rounds once; no multiply-add is fused)::

        d = acc / W
        momentum:  m = b1*m + d;                 x = x + lr*m
        nesterov:  m = b1*m + d;                 x = x + lr*(d + b1*m)
        adam:      m = b1*m + c1*d;  v = b2*v + c2*d*d;                 x = x + (lr*m) / (sqrt(v) + tau)
        yogi:      m = b1*m + c1*d;  v = v - (c2*d*d) * sign(v - d*d);  x = ...
        adagrad:   m = b1*m + c1*d;  v = v + d*d;                       x = ...
        out = out_t(x)

    x, m, v are updated in place. A fused kernel reads acc, x, m (and v) and writes x, m (and v) and out: for
    FedAdam with f32 state and output, 32 bytes per parameter."""
    A = acc.dtype
    b1, c1, b2, c2, lr, tau = (A.type(c) for c in coef)
    out_t = np_dtype(og.out_dtype)
    for r, out in enumerate(og.outs):
        sl = slice(int(og.off[r]), int(og.off[r]) + int(og.n[r]))
        d = acc[sl] / A.type(og.total_w[r])
        X, M = x[sl], m[sl]
        if kind in (MOMENTUM, NESTEROV):
            M[...] = b1 * M + d
            X[...] = X + lr * (d + b1 * M if kind == NESTEROV else M)
        else:
            M[...] = b1 * M + c1 * d
            dd = d * d
            V = v[sl]
            if kind == ADAM:
                V[...] = b2 * V + c2 * dd
            elif kind == YOGI:
                V[...] = V - (c2 * dd) * np.sign(V - dd)
            else:
                V[...] = V + dd
            X[...] = X + (lr * M) / (np.sqrt(V) + tau)
        with np.errstate(over="ignore"):  # past the output dtype's range it rounds to inf (IEEE), as the kernels do
            out.reshape(-1)[...] = X.astype(out_t)


def set_num_threads(n: int) -> None:
    pass
