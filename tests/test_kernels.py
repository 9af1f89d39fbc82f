"""Every backend's primitives against the numpy reference, over dtypes x layouts x awkward inputs.

Element-wise primitives (fold, finalize) must match bit for bit: the spec fixes each element's operations and order.
The stats pass is a reduction: equal within a tolerance that scales with n, eps and the sum of squares.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import backends
from jitkernels.backends import numpy_ref
from jitkernels.batch import CHUNK, build_groups, leaf_entry
from jitkernels.layout import Layout

from strategies import CPU_BACKENDS, FLOAT_DTYPES, finalize_outputs, leaf_shapes, make_batch, make_update, seeds

INPUTS = FLOAT_DTYPES + ("int8",)
CHUNKS = st.sampled_from([64, 300, CHUNK])  # work items of 64 and 300 elements: leaves split over several
ABSENT = st.sampled_from([0.0, 0.0, 0.3])  # partial updates in a third of the examples


def _module(backend, dtype):
    if dtype not in backends.get(backend).DTYPES:
        with pytest.raises(jk.BackendUnavailable):
            backends.choose(backend, dtype)
        pytest.skip(f"{backend} does not run {dtype} (raises BackendUnavailable, as checked)")
    return backends.choose(backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), k=st.one_of(st.integers(1, 5), st.integers(17, 20)), with_base=st.booleans(),
       ties=st.booleans(), block=st.sampled_from([None, 1, 7, 64]), chunk=CHUNKS, misalign=st.booleans(),
       absent=ABSENT)
def test_fold_bit_exact(backend, in_dtype, acc_dtype, seed, shapes, k, with_base, ties, block, chunk, misalign, absent):
    mod = _module(backend, in_dtype)
    rng = np.random.default_rng(seed)
    lay, groups, _ = make_batch(rng, shapes, in_dtype, k, ties=ties, block=block, chunk=chunk, misalign=misalign,
                                absent=absent)
    _assert_fold_bit_exact(mod, rng, lay, groups, acc_dtype, with_base, backend)


def _assert_fold_bit_exact(mod, rng, lay, groups, acc_dtype, with_base, backend):
    """``mod``'s fold of each group, from a random start (and base), gives numpy's bits."""
    start = rng.standard_normal(lay.size).astype(acc_dtype)
    base = rng.standard_normal(lay.size).astype(acc_dtype) if with_base else None
    for g in groups.values():
        want, got = start.copy(), start.copy()
        numpy_ref.fold(want, base, g)
        mod.fold(got, base, g)
        assert got.tobytes() == want.tobytes(), f"{backend} {g.in_dtype} fold differs from numpy"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), k=st.one_of(st.integers(1, 4), st.integers(17, 20)),
       base_kind=st.sampled_from([None, "random", "near"]), scale=st.sampled_from([1e-30, 1.0, 1e4]),
       nonfinite=st.sampled_from([None, np.nan, np.inf, -np.inf]), chunk=CHUNKS, misalign=st.booleans(),
       ties=st.booleans(), absent=ABSENT)
def test_stats_close(backend, in_dtype, acc_dtype, seed, shapes, k, base_kind, scale, nonfinite, chunk, misalign,
                     ties, absent):
    """``base_kind="near"``: a base a hair from the first update, so that its deltas cancel (|u - b| ~ 1e-6 |u|)."""
    mod = _module(backend, in_dtype)
    rng = np.random.default_rng(seed)
    lay, groups, leaves = make_batch(rng, shapes, in_dtype, k, scale=scale, chunk=chunk, misalign=misalign,
                                     ties=ties, absent=absent)
    if nonfinite is not None and in_dtype != "int8":
        j = int(rng.integers(k))
        sizable = [a for a in leaves[j] if a is not None and a.size]
        if sizable:
            a = sizable[int(rng.integers(len(sizable)))]
            a.reshape(-1)[int(rng.integers(a.size))] = nonfinite
    base = None
    if base_kind == "random":
        base = rng.standard_normal(lay.size).astype(acc_dtype)
    elif base_kind == "near":
        first = np.concatenate([np.zeros(leaf.size) if a is None else np.asarray(
            a.dequantize() if isinstance(a, jk.Quantized) else a, np.float64).reshape(-1)
            for leaf, a in zip(lay.leaves, leaves[0])]) if lay.size else np.zeros(0)
        with np.errstate(invalid="ignore", over="ignore"):
            base = (first * (1 + 1e-6 * rng.standard_normal(lay.size))).astype(acc_dtype)
        base[~np.isfinite(base)] = 0.0
    eps = np.finfo(np.float32 if (acc_dtype == "float32" and in_dtype != "float64") else np.float64).eps
    for g in groups.values():
        _assert_stats_close(mod.stats(base, g, acc_dtype), numpy_ref.stats(base, g, acc_dtype), g, eps)


def _assert_stats_close(got, want, g, eps):
    """The stats pass within its bounds: non-finite counts equal; sums of squares within 4 eps |x|^2 (values formed
    in the accumulator's precision, with a base) plus the float64 sum's n eps64; maxima within 2 eps."""
    (nf, ss, mx), (nf_ref, ss_ref, mx_ref) = got, want
    np.testing.assert_array_equal(nf, nf_ref)
    n = g.n[:, None].astype(np.float64)
    tol_ss = (4 * eps + (n + 8) * np.finfo(np.float64).eps) * ss_ref + 1e-300
    assert np.all(np.abs(ss - ss_ref) <= tol_ss), (ss, ss_ref)
    assert np.all(np.abs(mx - mx_ref) <= 2 * eps * mx_ref), (mx, mx_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), with_base=st.booleans(), magnitude=st.sampled_from([1e-3, 1.0, 6e4]))
def test_finalize_bit_exact(backend, out_dtype, acc_dtype, seed, shapes, with_base, magnitude):
    mod = backends.get(backend)
    rng = np.random.default_rng(seed)
    tmpl = make_update(rng, shapes, out_dtype)
    lay = Layout.from_template(tmpl)
    acc = (rng.standard_normal(lay.size) * magnitude).astype(acc_dtype)
    base = rng.standard_normal(lay.size).astype(acc_dtype) if with_base else None
    total_w = rng.uniform(0.5, 50.0, len(lay))
    for got, want in zip(finalize_outputs(mod.finalize, lay, acc, base, total_w, out_dtype),
                         finalize_outputs(numpy_ref.finalize, lay, acc, base, total_w, out_dtype)):
        assert got.tobytes() == want.tobytes(), f"{backend} finalize to {out_dtype} differs from numpy"


def test_unknown_backend_and_unavailable_reasons():
    with pytest.raises(ValueError, match="unknown backend"):
        jk.Aggregator(np.zeros(3, np.float32), backend="fortran")
    ab = jk.available_backends()
    assert ab["numpy"] is True
    assert isinstance(ab["cupy"], str) and ab["cupy"]  # no GPU here: a reason, not True
    with pytest.raises(jk.BackendUnavailable, match="cupy"):
        jk.Aggregator(np.zeros(3, np.float32), backend="cupy")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("JITKERNELS_BACKEND", "numpy")
    assert jk.Aggregator(np.zeros(3, np.float32)).backend == "numpy"
    monkeypatch.setenv("JITKERNELS_BACKEND", "numba")
    agg = jk.Aggregator(np.zeros(3, np.float16))
    with pytest.raises(jk.BackendUnavailable, match="float16"):
        agg.fold(np.ones(3, np.float16), party="a")  # named backends are honored, never swapped
    assert agg.count == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", INPUTS)
@given(seed=seeds, shapes=leaf_shapes(), k=st.integers(1, 5), with_base=st.booleans(), ties=st.booleans(),
       bound_log2=st.integers(8, 40), chunk=CHUNKS, misalign=st.booleans(), absent=ABSENT, zero=st.booleans())
def test_fold_binned_bit_exact(backend, in_dtype, seed, shapes, k, with_base, ties, bound_log2, chunk, misalign,
                               absent, zero):
    """Into zeros with the ``zero`` hint, or twice (the second fold adding to the sums of the first)."""
    mod = _module(backend, in_dtype)
    rng = np.random.default_rng(seed)
    lay, groups, _ = make_batch(rng, shapes, in_dtype, k, ties=ties, chunk=chunk, misalign=misalign, absent=absent)
    base = rng.standard_normal(lay.size) if with_base else None
    for g in groups.values():
        want = (np.zeros(lay.size), np.zeros(lay.size))
        numpy_ref.fold_binned(*want, base, g, bound_log2)
        got = (np.zeros(lay.size), np.zeros(lay.size))
        if zero:
            _garble_rows(backend, got, g)
            mod.fold_binned(*got, base, g, bound_log2, zero=True)
        else:
            mod.fold_binned(*got, base, g, bound_log2)
            numpy_ref.fold_binned(*want, base, g, bound_log2)
            mod.fold_binned(*got, base, g, bound_log2)
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()


def _garble_rows(backend, arrays, g):
    """With the ``zero`` hint the C++ deterministic fold must not read the sums of the group's rows: NaN there shows
    that it does (the other kernels read them, so theirs stay zeros)."""
    if backend == "cpp":
        for o, n in zip(g.off, g.n):
            for a in arrays:
                a[o:o + n] = np.nan


def _assert_folds_bit_exact(mod, g, start, base32, base64, bound_log2):
    """``mod``'s fold (float32, from ``start``) and deterministic fold (from zeros) of group g equal the numpy
    reference's bit for bit."""
    want, got = start.copy(), start.copy()
    numpy_ref.fold(want, base32, g)
    mod.fold(got, base32, g)
    assert got.tobytes() == want.tobytes()
    n = start.size
    want = (np.zeros(n), np.zeros(n))
    numpy_ref.fold_binned(*want, base64, g, bound_log2)
    for zero in (False, True):
        got = (np.zeros(n), np.zeros(n))
        if zero:
            _garble_rows(mod.__name__.rsplit(".", 1)[-1], got, g)
        mod.fold_binned(*got, base64, g, bound_log2, zero=zero)
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", INPUTS)
@given(seed=seeds, k=st.sampled_from([3, 17, 40]), with_base=st.booleans())
def test_absent_leaves_bit_exact(backend, in_dtype, seed, k, with_base):
    """Partial batches (some updates lack some leaves: null addresses in the tables) with more updates than the
    deterministic kernel keeps in registers at once (16): fold and the deterministic fold skip the absent ones and
    match the reference to the bit."""
    mod = _module(backend, in_dtype)
    rng = np.random.default_rng(seed)
    src = "float32" if in_dtype == "int8" else in_dtype
    shapes = [(37,), (5,), (300,), (1,), (64,)]
    lay = Layout.from_template(make_update(rng, shapes, src))
    leaves = [lay.flatten(make_update(rng, shapes, src, quantize=in_dtype == "int8", block=5)) for _ in range(k)]
    for lv in leaves:
        for r in np.flatnonzero(rng.random(len(lv)) < 0.3):
            lv[r] = None
    entries = [np.array([leaf_entry(a) for a in lv], np.int64).reshape(len(lay), 4) for lv in leaves]
    groups = build_groups(lay, entries, leaves, rng.uniform(0.1, 100.0, k))[0]
    base = rng.standard_normal(lay.size) if with_base else None
    base32 = None if base is None else base.astype(np.float32)
    start = rng.standard_normal(lay.size).astype(np.float32)
    for g in groups.values():
        assert g.mask is not None or k == 3  # some update lacks some leaf of the group
        _assert_folds_bit_exact(mod, g, start, base32, base, 24)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, with_base=st.booleans(), absent=ABSENT, k=st.sampled_from([10, 20]))
def test_int8_mixed_block_sizes_bit_exact(backend, acc_dtype, seed, with_base, absent, k):
    """int8 updates quantized with different block sizes in one batch: the C++ fold takes FOLD_GROUP updates of a
    row through a block together only where they share a block size (their scale segments then fall at the same
    elements), in runs of consecutive updates (7, 7 | 5, 5 | 7 | 64, 64, 64 | ...), and falls back to fewer, down to
    one, where they differ. Each update's scales must be read at its own block boundaries: folding a group at the
    first update's block size would read the others' scales at the wrong elements. Leaves of 300 and 5000 elements
    hold many blocks of 5 and 7 (different scales: random values), and split over several work items (chunk 300)."""
    mod = _module(backend, "int8")
    rng = np.random.default_rng(seed)
    shapes = [(5000,), (37,), (300,), (1,), (64, 33)]
    lay = Layout.from_template(make_update(rng, shapes, "float32"))
    blocks = [(7, 7, 5, 5, 7, 64, 64, 64, 5, None)[j % 10] for j in range(k)]
    leaves = [lay.flatten(make_update(rng, shapes, "float32", quantize=True, block=b)) for b in blocks]
    for lv in leaves if absent else ():
        for r in np.flatnonzero(rng.random(len(lv)) < absent):
            lv[r] = None
    entries = [np.array([leaf_entry(a) for a in lv], np.int64).reshape(len(lay), 4) for lv in leaves]
    groups = build_groups(lay, entries, leaves, rng.uniform(0.1, 100.0, k), chunk=300)[0]
    _assert_fold_bit_exact(mod, rng, lay, groups, acc_dtype, with_base, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_updates_bit_exact_across_tiles_and_threads(backend, in_dtype, threads):
    """k > 16 updates over leaves longer than a tile, shared unevenly between threads: the C++ kernels walk each
    thread's share in update-major tiles (csrc/kernels.h for_blocks), and every element still sees the updates in
    batch order, so fold and the deterministic fold match the reference to the bit; the stats pass does not depend
    on the thread count."""
    mod = _module(backend, in_dtype)
    rng = np.random.default_rng(threads)
    lay, groups, _ = make_batch(rng, [(70001,), (3,), (40000,), (1,), (90000,), (8193,)], in_dtype, 20, block=7)
    start = rng.standard_normal(lay.size).astype(np.float32)
    old = jk.set_num_threads(threads)
    try:
        for g in groups.values():
            _assert_folds_bit_exact(mod, g, start, None, None, 30)
            # the stats pass walks the same tiles: per (leaf, update) one span, whatever the thread count
            got = mod.stats(None, g, "float32")
            jk.set_num_threads(1)
            one = mod.stats(None, g, "float32")
            jk.set_num_threads(threads)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(got, one))
            # (the bounds of test_stats_close: rtol 1e-5 passed sums of squares kept in float32 lanes, and a term
            # lost at a tile's edge)
            _assert_stats_close(got, numpy_ref.stats(None, g, "float32"), g, np.finfo(np.float32).eps)
    finally:
        jk.set_num_threads(old)


@given(sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=30), threads=st.integers(1, 5),
       many=st.booleans())
def test_walk_visits_every_work_item_once_in_order(sizes, threads, many):
    """batch.walk (the kernels' visiting order as data): the threads' tiles cover the work items once, in order,
    each thread a contiguous run; with many updates a tile never spans two TILE windows of its thread's share."""
    from jitkernels.batch import TILE, _walk, work_items

    work = work_items(np.array(sizes))
    share, tiles = _walk(work, many, threads)
    assert share.shape == (threads + 1,) and share[0] == 0 and share[-1] == len(tiles)
    assert np.all(np.diff(share) >= 0)
    covered = np.concatenate([np.arange(a, b) for a, b in tiles]) if len(tiles) else np.zeros(0, int)
    assert covered.tolist() == list(range(work.shape[0]))
    if many and work.shape[0]:
        start = np.cumsum(work[:, 2]) - work[:, 2]
        total = int(work[:, 2].sum())
        for t in range(threads):
            lo = total * t // threads
            for a, b in tiles[share[t]:share[t + 1]]:
                assert len({int(x - lo) // TILE for x in start[a:b]}) == 1
                assert all(lo <= x < total * (t + 1) // threads for x in start[a:b])


@pytest.mark.skipif(backends.get("cpp").available() is not True, reason="the C++ extension is not built")
@given(seed=seeds, n=st.one_of(st.integers(0, 40), st.integers(65_500, 65_600), st.integers(131_000, 140_000)),
       dtype=st.sampled_from(["float32", "float64"]), specials=st.integers(0, 5), threads=st.sampled_from([1, 2]))
def test_cpp_finite_maxabs_bit_exact(seed, n, dtype, specials, threads):
    """The threaded finiteness check and max |x| of a base or an output (one pass: numpy's took two reductions and
    isfinite a temporary) against numpy: the count of NaN and inf, and max |x| of the finite values, exactly, with
    NaN, +-inf, -0 and subnormal values anywhere (chunk and lane tails included)."""
    from jitkernels import _core

    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):  # (float32 values past its range: inf, counted as such)
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-45, 39, n)).astype(dtype)
    for _ in range(specials if n else 0):
        x[rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).smallest_subnormal])
    finite = np.isfinite(x)
    want = (int((~finite).sum()), float(np.abs(x[finite]).max()) if finite.any() else 0.0)
    assert _core.finite_maxabs(x, threads) == want


def test_simd_env_selects_the_baseline_path():
    """JITKERNELS_SIMD=baseline makes the C++ backend run its portable kernels (checked in the subprocess below)."""
    if os.environ.get("JITKERNELS_SIMD") != "baseline":
        pytest.skip("runs in the baseline subprocess of test_baseline_isa_bit_exact")
    assert _core_simd() == "baseline"


def test_baseline_isa_bit_exact():
    """The portable (non-AVX2) C++ kernels are compiled from the same source with other code in places (vector
    extensions instead of AVX2 intrinsics): on an AVX2 host they only run when forced, so the cpp bit-exact tests of
    this file run again in a subprocess with JITKERNELS_SIMD=baseline."""
    if not backends.is_available("cpp"):
        pytest.skip("no C++ backend")
    if _core_simd() == "baseline":
        pytest.skip("this host runs the baseline kernels in every test already")
    env = {**os.environ, "JITKERNELS_SIMD": "baseline"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.basename(__file__),
           "-k", "(cpp and (bit_exact or absent) and not baseline_isa) or simd_env"]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "1 skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]


@pytest.mark.skipif(not backends.is_available("cpp"), reason="C++ extension not built")
@pytest.mark.parametrize("value, warns", [("basline", True), ("avx512", True), ("baseline", False), ("auto", False)])
def test_simd_env_typo_warns(value, warns):
    """The extension honours only JITKERNELS_SIMD=baseline: any other value but 'auto' is named in a warning at import
    (a typo had silently run the AVX2 code that the variable was set to rule out)."""
    code = ("import warnings\nwith warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    import jitkernels.backends.cpp\nprint([str(x.message) for x in w if x.category is RuntimeWarning])")
    env = {**os.environ, "JITKERNELS_SIMD": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (f"JITKERNELS_SIMD='{value}'" in done.stdout) is warns, done.stdout


def _core_simd() -> str:
    from jitkernels import _core

    return _core.simd


@pytest.mark.skipif(not backends.is_available("cpp"), reason="C++ extension not built")
def test_cpp_tables_are_taken_as_they_are():
    """The C++ entry points take their tables as given (C-contiguous, of the exact dtype, in native byte order):
    anything else is pybind's TypeError, never a silent conversion (or a swapped address dereferenced)."""
    from jitkernels.backends import cpp

    lay = Layout.from_template({n: np.zeros(4, np.float32) for n in "abc"})
    u = [np.ones(4, np.float32) for _ in "abc"]
    g = build_groups(lay, [np.array([leaf_entry(a) for a in u], np.int64)], [u], [2.0])[0]["float32"]
    acc = np.zeros(12, np.float32)
    args = [g.off, g.ptr, g.w, g.scale_ptr, g.block, *cpp._walk(g)]
    cpp._core.fold(acc, None, 1, *args)
    assert (acc == 2.0).all()
    strided = np.repeat(g.ptr, 2, axis=1)[:, ::2]
    swapped = (1, g.ptr.astype(">i8")), (2, g.w.astype(">f8"))  # the type numbers match; the byte order does not
    for i, bad in ((0, g.off.astype(np.int32)), (2, g.w.astype(np.float32)), (1, strided), *swapped):
        with pytest.raises(TypeError, match="incompatible function arguments"):
            cpp._core.fold(acc, None, 1, *args[:i], bad, *args[i + 1:])
    assert (acc == 2.0).all()
    # outputs written in place are not converted either (a converted copy took the writes and dropped them)
    for call in (lambda out: cpp._core.robust_median(np.ones((3, 4), np.float32), 0, out, 0, 1),
                 lambda out: cpp._core.robust_trimmed_mean(np.ones((3, 4), np.float32), 0, 1, 2, out, 0, 1)):
        with pytest.raises(TypeError, match="incompatible function arguments"):
            call(np.zeros(4, np.float64))
