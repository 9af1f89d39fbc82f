"""The numba backend: the same tables and element order as the C++ kernels, compiled by numba (parallel, cached).

Updates are read in place: an intrinsic turns a table address into a typed pointer and ``numba.carray`` views it, so
one compiled kernel serves any k (no tuple-of-arrays specialization per k). numba has no float16 arithmetic at speed,
so float16 inputs are not offered here (dispatch picks ``cpp``); bfloat16 is widened with a shift and a bitcast.
Thread-safety: :mod:`jitkernels._numba` selects the ``omp`` threading layer (concurrent calls are safe).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _numba
from .._numba import keeps_threads, numba
from ..batch import address, rows_from_items, threads_for, walk, work_items
from ..threads import get_num_threads
from .numpy_ref import binned_constants

if numba is not None:
    from numba import carray, njit, prange, types
    from numba.extending import overload

    from .._numba import bits_f64 as _bits_f64, f64_bits as _f64_bits, typed_ptr as _typed_ptr
    from .._numba import u32_as_f32 as _u32_as_f32

NAME = "numba"
DTYPES = ("float64", "float32", "bfloat16", "int8")
WHOLE_CALLS = True  # a compiled fold call cannot stop part-way (no allocation, no exception, no interrupt inside)


def available():
    return _numba.available()


if numba is not None:

    def _widen(x):  # pragma: no cover - replaced by the overload
        raise NotImplementedError

    @overload(_widen, inline="always")
    def _widen_ov(x):
        if x == types.uint16:  # bfloat16 bits
            return lambda x: _u32_as_f32(np.uint32(x) << np.uint32(16))
        if x == types.int8:
            return lambda x: np.float32(x)
        return lambda x: x

    def _as_acc(x, acc):  # pragma: no cover - replaced by the overload
        raise NotImplementedError

    @overload(_as_acc, inline="always")
    def _as_acc_ov(x, acc):
        if acc.dtype == types.float64:
            return lambda x, acc: np.float64(x)
        return lambda x, acc: np.float32(x)

    # Loops index slices from 0 (a = acc[o:o+n]; a[i]): with offsets inside the index, numba's negative-index
    # wraparound check stays in the loop and blocks vectorization (measured: 2.5x slower).
    # Every kernel below walks the work items in jitkernels.batch.walk's order, as the C++ kernels' walk_blocks
    # does: thread t takes tiles share[t]:share[t+1], each tile's items update-major (one-item tiles too: numba
    # keeps no SUB-blocks); the plain fold takes four updates at a time through them, as the C++ one does.
    @njit(inline="always")
    def _fold_one(a, b, has_base, u, wj, acc):
        if has_base:
            for i in range(a.size):
                a[i] = a[i] + wj * (_as_acc(_widen(u[i]), acc) - b[i])
        else:
            for i in range(a.size):
                a[i] = a[i] + wj * _as_acc(_widen(u[i]), acc)

    @njit(inline="always")
    def _fold_four(a, b, has_base, u0, u1, u2, u3, w0, w1, w2, w3, acc):
        """Four updates in one pass over the block, each element's terms added in batch order (the same operations
        as four _fold_one calls, so the same bits; the C++ kernels' fold_block_g)."""
        if has_base:
            for i in range(a.size):
                x = a[i] + w0 * (_as_acc(_widen(u0[i]), acc) - b[i])
                x = x + w1 * (_as_acc(_widen(u1[i]), acc) - b[i])
                x = x + w2 * (_as_acc(_widen(u2[i]), acc) - b[i])
                a[i] = x + w3 * (_as_acc(_widen(u3[i]), acc) - b[i])
        else:
            for i in range(a.size):
                x = a[i] + w0 * _as_acc(_widen(u0[i]), acc)
                x = x + w1 * _as_acc(_widen(u1[i]), acc)
                x = x + w2 * _as_acc(_widen(u2[i]), acc)
                a[i] = x + w3 * _as_acc(_widen(u3[i]), acc)

    @njit(inline="always")
    def _segment(s, i0, ln, B):
        """(g, i1): the scale block g of item element i0 (leaf element s + i0) and the end of its run in the item,
        for int8 updates with blocks of B: the loops take one scale per run, no division per element."""
        g = (s + i0) // B
        return g, min(ln, (g + 1) * B - s)

    @njit(inline="always")
    def _x(u, b, i, sc, quant, has_base):
        """x = f64(u[i]) [* sc] [- b[i]]: a term's value in float64 (the deterministic fold's and the stats')."""
        x = _as_acc(_widen(u[i]), np.empty(0, np.float64))
        if quant:
            x = x * sc
        if has_base:
            x = x - np.float64(b[i])
        return x

    @njit(inline="always")
    def _fold_four_q(a, b, has_base, u0, u1, u2, u3, c0, c1, c2, c3, B, s, w0, w1, w2, w3, acc):
        """Four int8 updates of one block size: over each scale segment (the same elements for all four: they
        share the item's start), x_j = q_j * scale_j [- b], added in batch order as _fold_four adds."""
        ln = a.size
        i0 = 0
        while i0 < ln:
            g, i1 = _segment(s, i0, ln, B)
            s0, s1, s2, s3 = _as_acc(c0[g], acc), _as_acc(c1[g], acc), _as_acc(c2[g], acc), _as_acc(c3[g], acc)
            aa, q0, q1, q2, q3 = a[i0:i1], u0[i0:i1], u1[i0:i1], u2[i0:i1], u3[i0:i1]
            if has_base:
                bb = b[i0:i1]
                for i in range(i1 - i0):
                    x = aa[i] + w0 * (_as_acc(_widen(q0[i]), acc) * s0 - bb[i])
                    x = x + w1 * (_as_acc(_widen(q1[i]), acc) * s1 - bb[i])
                    x = x + w2 * (_as_acc(_widen(q2[i]), acc) * s2 - bb[i])
                    aa[i] = x + w3 * (_as_acc(_widen(q3[i]), acc) * s3 - bb[i])
            else:
                for i in range(i1 - i0):
                    x = aa[i] + w0 * (_as_acc(_widen(q0[i]), acc) * s0)
                    x = x + w1 * (_as_acc(_widen(q1[i]), acc) * s1)
                    x = x + w2 * (_as_acc(_widen(q2[i]), acc) * s2)
                    aa[i] = x + w3 * (_as_acc(_widen(q3[i]), acc) * s3)
            i0 = i1

    @njit(parallel=True, cache=True, nogil=True)
    def _fold(acc, base, has_base, off, ptr, w, sptr, blk, work, share, tiles, witness, quant):
        """Raw updates go through an item four at a time where all four carry it (_fold_four: the accumulator read
        and written once per four, their streams read side by side; C++ also packs the present ones of a group),
        int8 ones where the four also share a block size (_fold_four_q, over scale segments: 25M x 10 in 37 -> 24 ms
        on 2 vCPUs, interleaved with other work running), else one at a time."""
        k = ptr.shape[1]
        G = 4
        f32 = np.empty(0, np.float32)
        for t in prange(share.size - 1):
            for ti in range(share[t], share[t + 1]):
                for j0 in range(0, k, G):
                    j1 = min(k, j0 + G)
                    for it in range(tiles[ti, 0], tiles[ti, 1]):
                        r, s, ln = work[it, 0], work[it, 1], work[it, 2]
                        a = acc[off[r] + s:off[r] + s + ln]
                        b = base[off[r] + s:off[r] + s + ln] if has_base else base[:0]
                        four = j1 - j0 == 4 and ptr[r, j0] != 0 and ptr[r, j0 + 1] != 0 and ptr[r, j0 + 2] != 0 \
                            and ptr[r, j0 + 3] != 0
                        if four and quant and blk[r, j0] == blk[r, j0 + 1] == blk[r, j0 + 2] == blk[r, j0 + 3]:
                            B, n = blk[r, j0], 1 + (s + ln - 1) // blk[r, j0]
                            _fold_four_q(a, b, has_base, carray(_typed_ptr(ptr[r, j0], witness), (s + ln,))[s:],
                                         carray(_typed_ptr(ptr[r, j0 + 1], witness), (s + ln,))[s:],
                                         carray(_typed_ptr(ptr[r, j0 + 2], witness), (s + ln,))[s:],
                                         carray(_typed_ptr(ptr[r, j0 + 3], witness), (s + ln,))[s:],
                                         carray(_typed_ptr(sptr[r, j0], f32), (n,)),
                                         carray(_typed_ptr(sptr[r, j0 + 1], f32), (n,)),
                                         carray(_typed_ptr(sptr[r, j0 + 2], f32), (n,)),
                                         carray(_typed_ptr(sptr[r, j0 + 3], f32), (n,)), B, s,
                                         w[r, j0], w[r, j0 + 1], w[r, j0 + 2], w[r, j0 + 3], acc)
                            continue
                        if four and not quant:
                            _fold_four(a, b, has_base, carray(_typed_ptr(ptr[r, j0], witness), (s + ln,))[s:],
                                       carray(_typed_ptr(ptr[r, j0 + 1], witness), (s + ln,))[s:],
                                       carray(_typed_ptr(ptr[r, j0 + 2], witness), (s + ln,))[s:],
                                       carray(_typed_ptr(ptr[r, j0 + 3], witness), (s + ln,))[s:],
                                       w[r, j0], w[r, j0 + 1], w[r, j0 + 2], w[r, j0 + 3], acc)
                            continue
                        for j in range(j0, j1):
                            p = ptr[r, j]
                            if p == 0:
                                continue
                            wj = w[r, j]
                            u = carray(_typed_ptr(p, witness), (s + ln,))[s:]
                            if not quant:
                                _fold_one(a, b, has_base, u, wj, acc)
                                continue
                            B = blk[r, j]
                            scales = carray(_typed_ptr(sptr[r, j], np.empty(0, np.float32)),
                                            (1 + (s + ln - 1) // B,))
                            i0 = 0
                            while i0 < ln:
                                g, i1 = _segment(s, i0, ln, B)
                                sc = _as_acc(scales[g], acc)
                                aa, uu = a[i0:i1], u[i0:i1]
                                if has_base:
                                    bb = b[i0:i1]
                                    for i in range(i1 - i0):
                                        aa[i] = aa[i] + wj * (_as_acc(_widen(uu[i]), acc) * sc - bb[i])
                                else:
                                    for i in range(i1 - i0):
                                        aa[i] = aa[i] + wj * (_as_acc(_widen(uu[i]), acc) * sc)
                                i0 = i1

    @njit(inline="always")
    def _binned_add(xh, xl, t_, s1, s2):
        """(xh + q1, xl + q2): jk::binned_step of the term t_, ties away from zero by the last mantissa bit."""
        q1 = (_bits_f64(_f64_bits(t_) | np.uint64(1)) + s1) - s1
        q2 = (_bits_f64(_f64_bits(t_ - q1) | np.uint64(1)) + s2) - s2
        return xh + q1, xl + q2

    @njit(inline="always")
    def _binned_four(h, lw, b, u0, u1, u2, u3, w0, w1, w2, w3, has_base, s1, s2):
        """Four updates' terms of one item, in batch order, into hi and lo. ``has_base`` is a constant at each
        call: as a run-time flag inside the loop (with int8's) it kept LLVM from vectorizing it (14x slower in a
        model of the loop)."""
        for i in range(h.size):
            xh, xl = _binned_add(h[i], lw[i], w0 * _x(u0, b, i, 1.0, False, has_base), s1, s2)
            xh, xl = _binned_add(xh, xl, w1 * _x(u1, b, i, 1.0, False, has_base), s1, s2)
            xh, xl = _binned_add(xh, xl, w2 * _x(u2, b, i, 1.0, False, has_base), s1, s2)
            h[i], lw[i] = _binned_add(xh, xl, w3 * _x(u3, b, i, 1.0, False, has_base), s1, s2)

    @njit(inline="always")
    def _binned_one(h, lw, b, u, wj, sc, has_base, quant, s1, s2):
        """One update's terms (int8: one scale segment, x = q * scale) into hi and lo; flags constant as above."""
        for i in range(h.size):
            h[i], lw[i] = _binned_add(h[i], lw[i], wj * _x(u, b, i, sc, quant, has_base), s1, s2)

    @njit(parallel=True, cache=True, nogil=True)
    def _fold_binned(hi, lo, base, has_base, off, ptr, w, sptr, blk, work, share, tiles, witness, quant, s1, s2):
        """Each element's terms in batch order, then the carry: the reference's operations, so its bits. Float
        updates pass an item four at a time where all four carry it (hi and lo read and written once per four, as
        _fold does; one term at a time read and wrote them per update: 25M float32 x 10 in 75-79 -> 47-52 ms on 2
        vCPUs, 2.6-2.9x -> 1.6-1.8x the float32 fold_many, interleaved). int8 updates go one at a time over their
        scale segments, as in _fold (a division per element and update had been their scale lookup: 25M int8 x 10
        in 303-374 -> 40-45 ms). Unlike the C++ kernel this one
        reads an empty state's sums (the zero hint), and keeps no registers across more than four updates."""
        k = ptr.shape[1]
        G = 1 if quant else 4
        half = (s1 / 3.0) * 2.0 ** -52  # jk::binned_half
        for t in prange(share.size - 1):
            for ti in range(share[t], share[t + 1]):
                for j0 in range(0, k, G):
                    j1 = min(k, j0 + G)
                    for it in range(tiles[ti, 0], tiles[ti, 1]):
                        r, s, ln = work[it, 0], work[it, 1], work[it, 2]
                        h = hi[off[r] + s:off[r] + s + ln]
                        lw = lo[off[r] + s:off[r] + s + ln]
                        b = base[off[r] + s:off[r] + s + ln] if has_base else base[:0]
                        if j1 - j0 == 4 and ptr[r, j0] != 0 and ptr[r, j0 + 1] != 0 and ptr[r, j0 + 2] != 0 \
                                and ptr[r, j0 + 3] != 0:
                            u0 = carray(_typed_ptr(ptr[r, j0], witness), (s + ln,))[s:]
                            u1 = carray(_typed_ptr(ptr[r, j0 + 1], witness), (s + ln,))[s:]
                            u2 = carray(_typed_ptr(ptr[r, j0 + 2], witness), (s + ln,))[s:]
                            u3 = carray(_typed_ptr(ptr[r, j0 + 3], witness), (s + ln,))[s:]
                            w0, w1, w2, w3 = w[r, j0], w[r, j0 + 1], w[r, j0 + 2], w[r, j0 + 3]
                            if has_base:
                                _binned_four(h, lw, b, u0, u1, u2, u3, w0, w1, w2, w3, True, s1, s2)
                            else:
                                _binned_four(h, lw, b, u0, u1, u2, u3, w0, w1, w2, w3, False, s1, s2)
                            continue
                        for j in range(j0, j1):
                            p = ptr[r, j]
                            if p == 0:
                                continue
                            wj = w[r, j]
                            u = carray(_typed_ptr(p, witness), (s + ln,))[s:]
                            if not quant:
                                if has_base:
                                    _binned_one(h, lw, b, u, wj, 1.0, True, False, s1, s2)
                                else:
                                    _binned_one(h, lw, b, u, wj, 1.0, False, False, s1, s2)
                                continue
                            B = blk[r, j]
                            scales = carray(_typed_ptr(sptr[r, j], np.empty(0, np.float32)),
                                            (1 + (s + ln - 1) // B,))
                            i0 = 0
                            while i0 < ln:
                                g, i1 = _segment(s, i0, ln, B)
                                sc = np.float64(scales[g])
                                if has_base:
                                    _binned_one(h[i0:i1], lw[i0:i1], b[i0:i1], u[i0:i1], wj, sc, True, True, s1, s2)
                                else:
                                    _binned_one(h[i0:i1], lw[i0:i1], b, u[i0:i1], wj, sc, False, True, s1, s2)
                                i0 = i1
                for it in range(tiles[ti, 0], tiles[ti, 1]):  # the carry, once every update has passed the tile
                    r, s, ln = work[it, 0], work[it, 1], work[it, 2]
                    h = hi[off[r] + s:off[r] + s + ln]
                    lw = lo[off[r] + s:off[r] + s + ln]
                    for i in range(ln):
                        c = (lw[i] + s1) - s1
                        h[i] = h[i] + c
                        lw[i] = lw[i] - c
                        if lw[i] == -half:  # (jk::binned_carry: one representation per sum)
                            h[i] = h[i] - 2 * half
                            lw[i] = half

    # Max-abs as an integer max over the magnitude bits of the f64 value: integer max vectorizes where a float
    # compare-select does not (it would need "nnan"), and bits >= those of inf flag NaN/inf in the same pass.
    _MAG = np.uint64(0x7FFFFFFFFFFFFFFF)
    _INF_BITS = np.uint64(0x7FF0000000000000)

    @njit(inline="always")
    def _value(u, b, scales, i, s, B, quant, has_base):
        """_x with the element's scale looked up (the stats' rare exact recount)."""
        return _x(u, b, i, np.float64(scales[(s + i) // B]) if quant else 1.0, quant, has_base)

    @njit(inline="always")
    def _sum_sq(u, b, sc, ss, mxb, has_base, quant):
        """(ss + sum x^2, max(mxb, the magnitude bits of x)) over u's values x (_x's); the flags are constants at each
        call (run-time flags in the loop kept it from vectorizing)."""
        for i in range(u.size):
            x = _x(u, b, i, sc, quant, has_base)
            ss += x * x
            mxb = max(mxb, _f64_bits(x) & _MAG)
        return ss, mxb

    # fastmath "reassoc" only: lets LLVM vectorize the sum (a reduction, held to a tolerance) while no multiply-add
    # is contracted ("contract" is off) and NaN/inf keep their meaning ("nnan"/"ninf" are off).
    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
    def _stats(base, has_base, off, ptr, sptr, blk, work, share, tiles, witness, quant, nonfinite, sumsq, maxabs):
        k = ptr.shape[1]
        for t in prange(share.size - 1):
            for ti in range(share[t], share[t + 1]):
                for j in range(k):
                    for it in range(tiles[ti, 0], tiles[ti, 1]):
                        r, s, ln = work[it, 0], work[it, 1], work[it, 2]
                        p = ptr[r, j]
                        if p == 0:
                            continue
                        b = base[off[r] + s:off[r] + s + ln] if has_base else base[:0]
                        u = carray(_typed_ptr(p, witness), (s + ln,))[s:]
                        B = blk[r, j] if quant else 1
                        scales = carray(_typed_ptr(sptr[r, j], np.empty(0, np.float32)),
                                        (1 + (s + ln - 1) // B if quant else 0,))
                        ss = 0.0
                        mxb = np.uint64(0)
                        if quant:  # over scale segments (a division per element looked its scale up: 25M x 10
                            i0 = 0  # in 208 ms, 25 ms this way)
                            while i0 < ln:
                                g, i1 = _segment(s, i0, ln, B)
                                sc = np.float64(scales[g])
                                if has_base:
                                    ss, mxb = _sum_sq(u[i0:i1], b[i0:i1], sc, ss, mxb, True, True)
                                else:
                                    ss, mxb = _sum_sq(u[i0:i1], b, sc, ss, mxb, False, True)
                                i0 = i1
                        elif has_base:
                            ss, mxb = _sum_sq(u, b, 1.0, ss, mxb, True, False)
                        else:  # the common case
                            ss, mxb = _sum_sq(u, b, 1.0, ss, mxb, False, False)
                        bad = 0
                        if mxb >= _INF_BITS:  # rare: recount, leaving non-finite values out of the sums
                            ss = 0.0
                            mxb = np.uint64(0)
                            for i in range(ln):
                                x = _value(u, b, scales, i, s, B, quant, has_base)
                                xb = _f64_bits(x) & _MAG
                                if xb >= _INF_BITS and has_base and (_f64_bits(_value(
                                        u, b, scales, i, s, B, quant, False)) & _MAG) < _INF_BITS:
                                    mxb = _INF_BITS  # a finite update whose delta overflowed: out of range, as on cpp
                                elif xb >= _INF_BITS:
                                    bad += 1
                                else:
                                    ss += x * x
                                    mxb = max(mxb, xb)
                        nonfinite[it, j] = bad
                        sumsq[it, j] = ss
                        maxabs[it, j] = _bits_f64(mxb)

    @njit(parallel=True, cache=True, nogil=True)
    def _finalize(acc, base, has_base, off, total_w, optr, work, out_witness):
        for it in prange(work.shape[0]):
            r, s, ln = work[it, 0], work[it, 1], work[it, 2]
            W = _as_acc(total_w[r], acc)
            a = acc[off[r] + s:off[r] + s + ln]
            out = carray(_typed_ptr(optr[r], out_witness), (s + ln,))[s:]
            if has_base:
                b = base[off[r] + s:off[r] + s + ln]
                for i in range(ln):
                    out[i] = b[i] + a[i] / W
            else:
                for i in range(ln):
                    out[i] = a[i] / W


    @njit(parallel=True, cache=True, nogil=True)
    def _step(acc, x, m, v, kind, coef, off, total_w, optr, work, out_witness, write_out):
        b1, c1, b2, c2, lr, tau = (_as_acc(coef[0], acc), _as_acc(coef[1], acc), _as_acc(coef[2], acc),
                                   _as_acc(coef[3], acc), _as_acc(coef[4], acc), _as_acc(coef[5], acc))
        one, zero = _as_acc(1.0, acc), _as_acc(0.0, acc)
        for it in prange(work.shape[0]):
            r, s, ln = work[it, 0], work[it, 1], work[it, 2]
            o = off[r] + s
            W = _as_acc(total_w[r], acc)
            a, X, M = acc[o:o + ln], x[o:o + ln], m[o:o + ln]
            V = v[o:o + ln] if kind >= 2 else v[:0]
            out = carray(_typed_ptr(optr[r], out_witness), (s + ln,))[s:] if write_out else out_witness[:0]
            if kind <= 1:  # momentum, nesterov
                for i in range(ln):
                    d = a[i] / W
                    M[i] = b1 * M[i] + d
                    X[i] = X[i] + lr * (d + b1 * M[i] if kind == 1 else M[i])
            else:
                for i in range(ln):
                    d = a[i] / W
                    M[i] = b1 * M[i] + c1 * d
                    dd = d * d
                    if kind == 2:
                        V[i] = b2 * V[i] + c2 * dd
                    elif kind == 3:
                        diff = V[i] - dd
                        V[i] = V[i] - (c2 * dd) * (one if diff > zero else (-one if diff < zero else zero))
                    else:
                        V[i] = V[i] + dd
                    X[i] = X[i] + (lr * M[i]) / (np.sqrt(V[i]) + tau)
            if write_out:
                for i in range(ln):
                    out[i] = X[i]


_WITNESS = {"float64": np.float64, "float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}


@functools.lru_cache(maxsize=None)
def _none(dt) -> np.ndarray:
    """A zero-length array of ``dt``: a dtype witness, or the absent base (nothing can write into it, so one serves
    every call; a small fold spent ~0.3 us on each new one)."""
    return np.empty(0, dt)


def _base_arg(base, dt):
    return (base, True) if base is not None else (_none(np.dtype(dt)), False)


def _set_threads(g=None):
    return _numba.use_threads(get_num_threads() if g is None else threads_for(g, get_num_threads()))


def _walk(g):
    """Set numba's threads for g and return (share, tiles) for that many: one share per thread."""
    return walk(g, _set_threads(g))


@keeps_threads
def fold(acc, base, g):
    """:func:`numpy_ref.fold`'s math, element order and bytes, compiled (``_fold``)."""
    b, has = _base_arg(base, acc.dtype)
    _fold(acc, b, has, g.off, g.ptr, g.w.astype(acc.dtype), g.scale_ptr, g.block, g.work, *_walk(g),
          _none(_WITNESS[g.in_dtype]), g.in_dtype == "int8")


@keeps_threads
def fold_binned(hi, lo, base, g, bound_log2, zero=False):
    """:func:`numpy_ref.fold_binned` (deterministic mode), bit for bit (``zero``: see there; unused here)."""
    s1, s2 = binned_constants(bound_log2)
    b, has = _base_arg(base, np.float64)
    _fold_binned(hi, lo, b, has, g.off, g.ptr, g.w, g.scale_ptr, g.block, g.work, *_walk(g),
                 _none(_WITNESS[g.in_dtype]), g.in_dtype == "int8", s1, s2)


@keeps_threads
def stats(base, g, acc_dtype):
    """:func:`numpy_ref.stats`, per work item, summed into rows in their order (``rows_from_items``)."""
    b, has = _base_arg(base, np.dtype(acc_dtype))
    m, k = g.work.shape[0], g.ptr.shape[1]
    nf, ss, mx = np.zeros((m, k), np.int64), np.zeros((m, k)), np.zeros((m, k))
    _stats(b, has, g.off, g.ptr, g.scale_ptr, g.block, g.work, *_walk(g), _none(_WITNESS[g.in_dtype]),
           g.in_dtype == "int8", nf, ss, mx)
    return rows_from_items(g, nf, ss, mx)


@keeps_threads
def finalize(acc, base, og):
    """float32/float64 outputs are written in place; float16/bfloat16 ones go through an acc-dtype buffer of at most
    HALF_BLOCK elements and numpy's rounding (numba cannot round to half types itself): a whole leaf's buffer and
    the cast's temporary had held 3x a large leaf's output."""
    _set_threads()
    b, has = _base_arg(base, acc.dtype)
    if og.out_dtype in ("float32", "float64"):
        _finalize(acc, b, has, og.off, og.total_w, og.ptr, og.work, _none(np.dtype(og.out_dtype)))
        return
    buf = np.empty(min(HALF_BLOCK, int(og.n.max(initial=0))), acc.dtype)
    one = np.array([address(buf)], np.int64)
    for r, out in enumerate(og.outs):
        flat = out.reshape(-1)
        for s in range(0, int(og.n[r]), HALF_BLOCK):
            n = min(HALF_BLOCK, int(og.n[r]) - s)
            _finalize(acc, b, has, og.off[r:r + 1] + s, og.total_w[r:r + 1], one, work_items(np.array([n])),
                      np.empty(0, acc.dtype))
            with np.errstate(over="ignore"):  # past the output dtype's range it rounds to inf (IEEE)
                np.copyto(flat[s:s + n], buf[:n], casting="unsafe")


HALF_BLOCK = 1 << 20


@keeps_threads
def step(acc, x, m, v, kind, coef, og):
    """The optimizer step of numpy_ref.step; float16/bfloat16 outputs are rounded by numpy from the updated x."""
    _set_threads()
    direct = og.out_dtype in ("float32", "float64")
    _step(acc, x, m, np.empty(0, acc.dtype) if v is None else v, kind, np.asarray(coef, np.float64), og.off,
          og.total_w, og.ptr, og.work, np.empty(0, og.out_dtype if direct else acc.dtype), direct)
    if not direct:
        for r, out in enumerate(og.outs):
            o = int(og.off[r])
            with np.errstate(over="ignore"):  # past the output dtype's range it rounds to inf (IEEE)
                np.copyto(out.reshape(-1), x[o:o + int(og.n[r])], casting="unsafe")
