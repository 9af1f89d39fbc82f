"""Hypothesis strategies: layouts with awkward leaves (empty, one element, uneven sizes) and random updates."""

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
               misalign=False):
    """(layout, {in_dtype: Group}, leaves) of k random updates with random weights; ``device`` marks updates as
    GPU-resident (for the GPU backend's shim); ``misalign`` moves the odd updates' leaves off vector boundaries."""
    src = "float32" if in_dtype == "int8" else in_dtype
    lay = Layout.from_template(make_update(rng, shapes, src))
    ups = [make_update(rng, shapes, src, scale, ties, quantize=in_dtype == "int8", block=block) for _ in range(k)]
    if misalign and in_dtype != "int8":
        ups = [{n: misaligned(a) for n, a in u.items()} if j % 2 else u for j, u in enumerate(ups)]
    leaves = [lay.flatten(u) for u in ups]
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
