"""Hypothesis strategies: layouts with awkward leaves (empty, one element, uneven sizes) and random updates."""

import numpy as np
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels.dtypes import np_dtype

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
