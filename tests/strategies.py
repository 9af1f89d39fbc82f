"""Hypothesis strategies: layouts with awkward leaves (empty, one element, uneven sizes) and random updates."""

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels.batch import CHUNK, build_groups, build_out_groups, leaf_entry
from jitkernels.dtypes import np_dtype
from jitkernels.layout import Layout

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
CPU_BACKENDS = [b for b in ("numpy", "numba", "cpp") if jk.available_backends()[b] is True]


@st.composite
def leaf_shapes(draw, max_leaves=6, max_size=3000):
    n = draw(st.integers(1, max_leaves))
    shapes = []
    for _ in range(n):
        kind = draw(st.sampled_from(["empty", "one", "vector", "matrix", "scalar"]))
        if kind == "empty":
            shapes.append((0,))
        elif kind == "one":
            shapes.append((1,))
        elif kind == "scalar":
            shapes.append(())
        elif kind == "vector":
            shapes.append((draw(st.integers(2, max_size)),))
        else:
            shapes.append((draw(st.integers(1, 60)), draw(st.integers(1, 50))))
    return shapes


def make_values(rng, shape, dtype, scale=1.0, ties=False):
    """Random values exactly representable in ``dtype``; ``ties`` draws from a few levels (repeats, cancellations)."""
    if ties:
        x = rng.choice(np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]), size=shape) * scale
    else:
        x = rng.standard_normal(shape) * scale
    return np.asarray(x).astype(np_dtype(dtype))


def make_update(rng, shapes, dtype, scale=1.0, ties=False, quantize=False, block=None):
    leaves = {}
    for i, s in enumerate(shapes):
        x = make_values(rng, s, dtype, scale, ties)
        leaves[f"l{i}"] = jk.Quantized.quantize(x.astype(np.float32), block=block) if quantize else x
    return leaves


seeds = st.integers(0, 2**32 - 1)
weights = st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False)


def finalize_outputs(fin, lay, acc, base, total_w, out_dtype, chunk=CHUNK):
    """Every leaf finalized by ``fin`` (a backend's finalize) into fresh outputs pre-filled with 7s."""
    outs = [np.full(l.shape, 7, np_dtype(out_dtype)) for l in lay.leaves]
    for og in build_out_groups(lay, list(range(len(lay))), outs, total_w, chunk=chunk):
        fin(acc, base, og)
    return outs


def misaligned(a):
    """A copy of ``a`` one element past an aligned address (what a leaf sliced out of a flat buffer looks like)."""
    buf = np.empty(a.size + 1, a.dtype)
    out = buf[1:].reshape(a.shape)
    out[...] = a
    return out


def make_batch(rng, shapes, in_dtype, k, ties=False, scale=1.0, block=None, chunk=CHUNK, device=None,
               misalign=False, absent=0.0):
    """(layout, {in_dtype: Group}, leaves) of k random updates with random weights; ``device`` marks updates as
    GPU-resident (for the GPU backend's shim); ``misalign`` moves the odd updates' leaves off vector boundaries;
    ``absent``: the chance that an update lacks a leaf (a partial update: a null address in the tables); ``chunk``
    below CHUNK splits leaves over several work items without large arrays."""
    src = "float32" if in_dtype == "int8" else in_dtype
    lay = Layout.from_template(make_update(rng, shapes, src))
    ups = [make_update(rng, shapes, src, scale, ties, quantize=in_dtype == "int8", block=block) for _ in range(k)]
    if misalign and in_dtype != "int8":
        ups = [{n: misaligned(a) for n, a in u.items()} if j % 2 else u for j, u in enumerate(ups)]
    leaves = [lay.flatten(u) for u in ups]
    if absent:
        for lv in leaves:
            for r in np.flatnonzero(rng.random(len(lv)) < absent):
                lv[r] = None
    entries = [np.array([leaf_entry(a) for a in l], np.int64).reshape(len(lay), 4) for l in leaves]
    w = rng.uniform(0.1, 100.0, k)
    groups = build_groups(lay, entries, leaves, w, chunk=chunk, device=device)[0]
    return lay, groups, leaves


def robust_rules() -> dict:
    """Every buffered robust rule, by short name, as a factory (one configuration each that 7-8 updates allow)."""
    from jitkernels import robust as R

    return {"median": lambda: R.FedMedian(), "trimmed": lambda: R.FedTrimmedAvg(beta=0.2),
            "krum": lambda: R.Krum(f=1, m=2), "bulyan": lambda: R.Bulyan(f=1), "geomed": lambda: R.GeometricMedian(),
            "centered": lambda: R.CenteredClipping(tau=1.0)}


class GramCase(NamedTuple):
    padded: np.ndarray  # [k, n + pad]: the slab is its first n columns (row stride > n when pad > 0)
    n: int
    mode: int
    refrow: int
    ref: np.ndarray | None
    diag_only: bool
    tile: int  # T, of cuda_source.GRAM_TILES
    columns: int = 1  # U, kernels.cu's JK_GRAM_COLUMNS

    @property
    def defines(self) -> dict:
        return {} if self.columns == 1 else {"JK_GRAM_COLUMNS": self.columns}

    @property
    def X(self):
        return self.padded[:, :self.n]


@st.composite
def device_gram_cases(draw, kmax=20, nmax=700, columns=(1, 2, 3)):
    """Inputs of the GPU Gram kernel (cupy_backend.gram): float32/float64 slabs of rows with very different
    magnitudes, some far from the origin, viewed with row stride >= n; every centering; both tile sizes; U
    (JK_GRAM_COLUMNS) from ``columns``."""
    from jitkernels import robust_gram as rg
    from jitkernels.backends import cuda_source

    k = draw(st.integers(1, kmax))
    n = draw(st.integers(0, nmax))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** rng.integers(-20, 20, size=(k, 1))
    P = (draw(st.sampled_from([0.0, 1e3])) + scale * rng.standard_normal((k, n + draw(st.sampled_from([0, 3])))))
    mode = draw(st.sampled_from([rg.MODE_NONE, rg.MODE_ROW, rg.MODE_VECTOR]))
    refrow = draw(st.integers(0, k - 1)) if mode == rg.MODE_ROW else 0
    ref = rng.standard_normal(n).astype(draw(st.sampled_from([np.float32, np.float64])))
    return GramCase(P.astype(dtype), n, mode, refrow, ref if mode == rg.MODE_VECTOR else None, draw(st.booleans()),
                    draw(st.sampled_from(cuda_source.GRAM_TILES)), draw(st.sampled_from(columns)))


def check_device_gram(case, run):
    """``run(seed)`` -> (G's lower triangle, sqnorms, centered sqnorms) of ``case`` on a GPU path (cupy_backend.gram),
    checked against the float64 array path (robust_gram._run_gram on numpy): each entry within the bound of a
    float64 sum of n products, 4 n eps (|x_i - r| . |x_j - r|); the same bits from a second run (on a GPU, where
    blocks run in any order; the host emulation runs them in one order, so there it holds by construction)."""
    from jitkernels import robust_gram as rg

    X, n = case.X, case.n
    G, sq, csq = rg._run_gram("numpy", X, case.mode, case.refrow, case.ref, rg.BLOCK, case.diag_only)
    X64 = X.astype(np.float64)
    r = X64[case.refrow] if case.mode == rg.MODE_ROW else case.ref.astype(np.float64) \
        if case.mode == rg.MODE_VECTOR else 0.0
    A = np.abs(X64 - r)
    eps = 4 * max(n, 1) * np.finfo(np.float64).eps
    bound = eps * (A @ A.T) + 1e-300
    (g, s, c), again = run(0), run(1)
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip((g, s, c), again))
    if case.diag_only:
        assert g is None and G is None
    else:
        g = rg.mirrored(g)
        assert np.all(np.abs(g - G) <= bound) and np.array_equal(g, g.T)
    assert np.all(np.abs(c - csq) <= np.diag(bound))
    assert np.all(np.abs(s - sq) <= eps * (X64 * X64).sum(axis=1) + 1e-300)


class CombineCase(NamedTuple):
    padded: np.ndarray  # [k, n + pad]: the slab is its first n columns
    n: int
    idx: np.ndarray
    coef: np.ndarray
    base: np.ndarray | None

    @property
    def X(self):
        return self.padded[:, :self.n]


@st.composite
def combine_cases(draw, kmax=12, nmax=700):
    """Inputs of robust_gram.combine: float32/float64 slabs with row stride >= n, rows chosen in any order (repeats
    too), coefficients of both signs and very different sizes, a float32/float64 base or none."""
    k = draw(st.integers(1, kmax))
    n = draw(st.integers(0, nmax))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    P = (draw(st.sampled_from([0.0, 1e3])) + rng.standard_normal((k, n + draw(st.sampled_from([0, 5]))))).astype(dtype)
    m = draw(st.integers(0, 2 * k))
    idx = rng.integers(0, k, m)
    coef = rng.standard_normal(m) * 10.0 ** rng.integers(-8, 8, m)
    base = None if draw(st.booleans()) else rng.standard_normal(n).astype(draw(st.sampled_from([np.float32,
                                                                                               np.float64])))
    return CombineCase(P, n, idx, coef, base)


def check_combine(case, got):
    """``got``, the combine of ``case`` on a GPU path, against the float64 array path (robust_gram._combine_xp):
    the two sums differ by at most 4 (m + 1) eps64 (|b| + sum_j |c_j (x_j - b)|) before the one rounding to the
    slab's dtype, so by that plus one spacing of the result after it."""
    from jitkernels import robust_gram as rg

    X = case.X
    want = np.empty(case.n, X.dtype)
    rg._combine_xp(X, case.idx, case.coef, case.base, want, rg.BLOCK)
    b = np.zeros(case.n) if case.base is None else case.base.astype(np.float64)
    terms = np.abs(case.coef[:, None] * (X[case.idx].astype(np.float64) - b)).sum(axis=0) + np.abs(b)
    bound = 4 * (len(case.idx) + 1) * np.finfo(np.float64).eps * terms + np.spacing(np.abs(want))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.all(np.abs(got.astype(np.float64) - want) <= bound)
