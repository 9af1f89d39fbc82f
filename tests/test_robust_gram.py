"""Gram-matrix robust rules (jitkernels.robust_gram) against numpy references written from the definitions (data
space, float64, distances by np.linalg.norm), against Flower's aggregate_krum / aggregate_bulyan, and under attack.

Deliberate differences from Flower, each tested below:

* Multi-Krum ties at the cut: we keep the lower row index; Flower's ``np.argsort(scores)[::-1][k - m:]`` keeps
  whatever numpy's default (unstable) argsort puts first, which on AVX-512 machines is not index order even for
  k = 8. With different sample counts the weighted averages then differ (test_flower_multikrum_tie_at_the_cut).
* Flower's ``np.argsort(distance)[1 : num_closest + 1]`` assumes the row's own distance sorts first. With an exact
  duplicate it may skip the duplicate's 0 instead of its own: the multiset left is the same (one zero removed
  either way), so the scores are the same. We exclude the row's own index explicitly; the test shows the scores
  agree with duplicates present (test_flower_self_distance_slice_is_harmless_with_duplicates).
* Bulyan's coordinate step: Flower's median is float32 for float32 data and ``np.argpartition`` leaves ties in
  |x - median| unspecified; ours is float64 and ties go to the smaller value. Identical on float64 data without
  exact ties, to float32 rounding on float32 data.
* We refuse k < 2f + 3 for Krum (Flower runs with max(1, k - f - 2) neighbours, outside the paper's guarantee).
"""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from strategies import check_combine, check_device_gram, combine_cases, device_gram_cases

import jitkernels as jk
from jitkernels import robust_gram as rg
from jitkernels.errors import BackendUnavailable, DuplicateParty, InvalidWeight, NonFiniteUpdate

BACKENDS = [b for b, ok in rg.available_backends().items() if ok is True and b != "cupy"]  # host slabs (test_gpu: cupy)


# --- references, from the definitions ------------------------------------------------------------------------------
def ref_d2(X):
    X = np.asarray(X, dtype=np.float64)
    k = X.shape[0]
    return np.array([[np.linalg.norm(X[i] - X[j]) ** 2 for j in range(k)] for i in range(k)])


def ref_krum_scores(D, f, active):
    n = len(active)
    s = max(1, n - f - 2)
    return np.array([sum(sorted(D[i, j] for j in active if j != i)[:s]) for i in active])


def ref_krum(X, f, m, w):
    X64 = np.asarray(X, dtype=np.float64)
    D = ref_d2(X)
    scores = ref_krum_scores(D, f, list(range(len(X))))
    sel = np.argsort(scores, kind="stable")[:m]
    agg = (w[sel, None] * X64[sel]).sum(0) / w[sel].sum()
    return scores, sel, agg


def ref_bulyan(X, f):
    """Iterated Krum recomputing the distances of the remaining rows from the data at each pick (as Flower), then
    per coordinate: the beta values closest to the median (ties: smaller value), averaged. Also returns whether some
    pick had a near-tie (which rounding could flip)."""
    X64 = np.asarray(X, dtype=np.float64)
    k = len(X)
    theta, beta = k - 2 * f, k - 4 * f
    active, picks, ambiguous = list(range(k)), [], False
    for _ in range(theta):
        D = ref_d2(X64[active])
        s = ref_krum_scores(D, f, list(range(len(active))))
        order = np.argsort(s, kind="stable")
        if len(s) > 1:
            gap = s[order[1]] - s[order[0]]
            ambiguous |= 0 < gap <= 1e-7 * max(1e-300, np.abs(s).max())
        j = active[order[0]]
        picks.append(j)
        active.remove(j)
    V = X64[sorted(picks)]
    out = np.empty(X.shape[1])
    for t in range(X.shape[1]):
        col = V[:, t]
        med = np.median(col)
        out[t] = np.mean(sorted(col, key=lambda v: (abs(v - med), v))[:beta])
    return picks, out, ambiguous


def ref_scale(D):
    """Lower median over rows of each row's lower-median nonzero distance (robust to f < k/2 attackers)."""
    per = []
    for i in range(len(D)):
        d = sorted(np.sqrt(D[i, j]) for j in range(len(D)) if j != i and D[i, j] > 0)
        if d:
            per.append(d[(len(d) - 1) // 2])
    return sorted(per)[(len(per) - 1) // 2] if per else 0.0


def ref_geomed(X, alpha, nu_abs, tol, max_iter):
    """The median at a row p if |sum_{x_j != p} alpha_j (x_j - p) / |x_j - p|| <= alpha_p (summed over the copies
    of p); else smoothed Weiszfeld in data space from the weighted mean, until a step <= tol."""
    X64 = np.asarray(X, dtype=np.float64)
    for p in range(len(X64)):
        eq = np.all(X64 == X64[p], axis=1)
        u = X64[~eq] - X64[p]
        pull = (alpha[~eq] / np.linalg.norm(u, axis=1)) @ u
        if np.linalg.norm(pull) <= alpha[eq].sum():
            return X64[p], alpha @ np.linalg.norm(X64 - X64[p], axis=1), True
    z, ok = alpha @ X64, False
    for _ in range(max_iter):
        d = np.linalg.norm(X64 - z, axis=1)
        b = alpha / np.maximum(d, nu_abs)
        z_new = (b / b.sum()) @ X64
        step = np.linalg.norm(z_new - z)
        z = z_new
        if step <= tol:
            ok = True
            break
    return z, alpha @ np.linalg.norm(X64 - z, axis=1), ok


def ref_centered_clipping(X, tau, v, iters, w):
    X64 = np.asarray(X, dtype=np.float64)
    v = np.zeros(X.shape[1]) if v is None else np.asarray(v, dtype=np.float64)
    om = w / w.sum()
    for _ in range(iters):
        dv = X64 - v
        nr = np.linalg.norm(dv, axis=1)
        c = np.minimum(1.0, tau / np.where(nr > 0, nr, np.inf))
        v = v + (om * c) @ dv
    return v


def out_tol(X):
    return 2e-7 if X.dtype == np.float32 else 1e-12


# --- inputs ------------------------------------------------------------------------------------------------------
@st.composite
def slabs(draw, kmin=3, kmax=12, nmax=200):
    """Random [k, N] slabs, float32 or float64, some far from the origin, with exact duplicate rows (ties)."""
    k = draw(st.integers(kmin, kmax))
    n = draw(st.integers(1, nmax))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, 1.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0]))
    ndup = draw(st.integers(0, k // 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = offset + scale * rng.standard_normal((k, n))
    for _ in range(ndup):
        i, j = rng.choice(k, 2, replace=False)
        X[j] = X[i]
    return X.astype(dtype)


def honest_and_attackers(kind, k, f, n=1000, dtype=np.float64, first=True, seed=0):
    """k - f honest rows (center + 0.01 noise) and f attackers; attackers in the first rows if ``first``."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(n)
    H = c + 0.01 * rng.standard_normal((k - f, n))
    big = 1e30 if dtype == np.float64 else 1e18
    if kind == "huge":
        A = big * rng.standard_normal((f, n)) / np.sqrt(n)
    elif kind == "signflip":
        A = -5.0 * c + 0.01 * rng.standard_normal((f, n))
    else:  # colluding duplicates, far enough to be excluded
        A = np.tile(c + rng.standard_normal(n), (f, 1))
    X = np.vstack([A, H] if first else [H, A]).astype(dtype)
    bad = set(range(f)) if first else set(range(k - f, k))
    return X, bad


# --- Gram ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(X=slabs(kmin=1))
def test_gram_distances_match_reference(backend, X):
    g = rg.gram(X, backend=backend)
    D = ref_d2(X)
    tol = 1e-9 * max(D.max(), 1e-300)
    np.testing.assert_allclose(g.distances(), D, rtol=1e-9, atol=tol)
    np.testing.assert_allclose(g.sqnorms, (X.astype(np.float64) ** 2).sum(1), rtol=1e-12)
    assert g.passes == 1
    for i in range(len(X)):  # exact duplicates: 0 up to the tie allowance of the rules (BLAS may round G_ij and
        for j in range(len(X)):  # G_ii by different paths)
            if np.array_equal(X[i], X[j]):
                assert g.distances()[i, j] <= rg.TIE_RTOL * (g.G[i, i] + g.G[j, j])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cancellation_centered_vs_uncentered(backend, dtype):
    """Updates 1e4 from the origin, 1e-3 apart: the centered Gram keeps the distances to 1e-6 (in fact ~1e-14);
    uncentered float32 (``X @ X.T``, what a plain sgemm/ssyrk gives) loses them entirely and uncentered float64 keeps
    ~2 digits."""
    rng = np.random.default_rng(3)
    X = (1e4 + 1e-3 * rng.standard_normal((8, 100_000))).astype(dtype)
    D = ref_d2(X)
    off = ~np.eye(8, dtype=bool)

    def rel(Dg):
        return np.max(np.abs(Dg - D)[off] / D[off])

    assert rel(rg.gram(X, backend=backend).distances()) < 1e-6
    X32 = X.astype(np.float32)
    assert rel(rg.sq_distances((X32 @ X32.T).astype(np.float64))) > 1e-1
    assert rel(rg.gram(X, center=False, backend=backend).distances()) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_reference_robust_to_a_huge_attacker_in_row_0(backend):
    X, bad = honest_and_attackers("huge", 9, 2, dtype=np.float64)
    g = rg.gram(X, backend=backend)
    assert g.reference not in bad
    D, H = ref_d2(X), sorted(set(range(9)) - bad)
    Dh, Gh = D[np.ix_(H, H)], g.distances()[np.ix_(H, H)]
    off = ~np.eye(len(H), dtype=bool)
    assert np.max(np.abs(Gh - Dh)[off] / Dh[off]) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_redoes_the_pass_when_the_pilot_picks_a_hidden_attacker(backend):
    """An attacker equal to the honest mean on the pilot's columns (so the pilot's medoid) and 1e30 on one column
    the pilot does not read: the full Gram exposes it and the second pass centers on an honest row. Centered on the
    attacker, the honest distances would be noise (shown with center=<its row>)."""
    rng = np.random.default_rng(5)
    n = 10_000
    H = 1.0 + 0.01 * rng.standard_normal((8, n))
    a = H.mean(0)
    pilot = set(np.linspace(0, n - 1, min(n, rg.PILOT)).astype(np.int64).tolist())
    hidden = next(c for c in range(n) if c not in pilot)
    a[hidden] = 1e30
    X = np.vstack([a, H])
    D = ref_d2(X)[1:, 1:]
    off = ~np.eye(8, dtype=bool)
    g = rg.gram(X, backend=backend)
    assert g.passes == 2 and g.reference != 0
    assert np.max(np.abs(g.distances()[1:, 1:] - D)[off] / D[off]) < 1e-6
    bad = rg.gram(X, center=0, backend=backend).distances()[1:, 1:]
    assert np.max(np.abs(bad - D)[off] / D[off]) >= 0.5  # noise of size 1e-16 * 1e60: clamped to 0


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba not installed")
def test_gram_numba_is_bitwise_independent_of_thread_count():
    X = np.random.default_rng(0).standard_normal((6, 1 << 16)).astype(np.float32)
    old = jk.set_num_threads(1)
    try:
        g1 = rg.gram(X, block=4096, backend="numba")
        jk.set_num_threads(2)
        g2 = rg.gram(X, block=4096, backend="numba")
    finally:
        jk.set_num_threads(old)
    assert np.array_equal(g1.G, g2.G) and np.array_equal(g1.sqnorms, g2.sqnorms)
    np.testing.assert_allclose(rg.gram(X, block=4096, backend="numpy").G, g1.G, rtol=1e-12, atol=1e-9)


# --- Krum ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(X=slabs(), data=st.data())
def test_krum_matches_reference(backend, X, data):
    k = len(X)
    f = data.draw(st.integers(0, (k - 3) // 2))
    m = data.draw(st.integers(1, k))
    w = data.draw(st.sampled_from([None, "counts"]))
    wv = np.ones(k) if w is None else np.random.default_rng(k).integers(1, 100, k).astype(np.float64)
    r = rg.krum(X, f, m, weights=None if w is None else wv, backend=backend)
    scores, sel, agg = ref_krum(X, f, m, wv)
    np.testing.assert_allclose(r.info["scores"], scores, rtol=1e-8, atol=1e-8 * max(scores.max(), 1e-300))
    s = np.sort(scores)
    if m < k:
        gap = s[m] - s[m - 1]
        assume(gap == 0 or gap > 1e-7 * max(s.max(), 1e-300))  # a near-tie (not exact) can round either way
    assert sorted(r.selected.tolist()) == sorted(sel.tolist()), (r.selected, sel, scores)
    np.testing.assert_allclose(r.aggregate, agg, rtol=out_tol(X), atol=out_tol(X) * np.abs(agg).max())
    assert r.aggregate.dtype == X.dtype
    if m == 1:
        assert np.array_equal(r.aggregate, X[r.selected[0]])  # Krum returns the row itself


def test_krum_ties_go_to_the_lower_index():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((7, 50))
    X[5] = X[2]  # exact duplicates: equal scores, lowest two
    r = rg.krum(X, 1, 1)
    assert r.selected[0] == 2 and r.info["scores"][2] == r.info["scores"][5]
    r = rg.krum(X, 1, 1, party_ids=list("abcdefg"))
    assert r.parties == ("c",)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["huge", "signflip", "collude"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("first", [True, False])
def test_krum_and_bulyan_exclude_attackers(backend, kind, dtype, first):
    """Krum's selection excludes the f attackers (k >= 2f + 3). Bulyan's selection excludes isolated attackers,
    but not a colluding group: its last picks run Krum on 2f + 1 .. rows with max(1, n - f - 2) = 1 neighbour (the
    paper's and Flower's iteration), where two attackers next to each other score ~0. Its coordinate step then
    keeps the output inside the honest values (beta = theta - 2f values around the median)."""
    for k, f in ((10, 3), (11, 2)):  # even and odd k
        X, bad = honest_and_attackers(kind, k, f, dtype=dtype, first=first)
        r = rg.krum(X, f, m=k - f, backend=backend)
        assert not set(r.selected.tolist()) & bad
        assert np.all(np.isfinite(r.aggregate))
    for k, f in ((11, 2), (12, 2)):  # Bulyan needs k >= 4f + 3
        X, bad = honest_and_attackers(kind, k, f, dtype=dtype, first=first)
        r = rg.bulyan(X, f, backend=backend)
        if kind == "huge":
            assert not set(r.selected.tolist()) & bad
        assert len(set(r.selected.tolist()) & bad) <= f
        hon = X[sorted(set(range(k)) - bad)].astype(np.float64)
        assert np.all(r.aggregate >= hon.min(0) - 1e-6) and np.all(r.aggregate <= hon.max(0) + 1e-6)


# --- Bulyan -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(X=slabs(kmin=3, kmax=12, nmax=60), data=st.data())
def test_bulyan_matches_reference(backend, X, data):
    k = len(X)
    f = data.draw(st.integers(0, (k - 3) // 4))
    picks, agg, ambiguous = ref_bulyan(X, f)
    assume(not ambiguous)
    r = rg.bulyan(X, f, backend=backend)
    assert r.selected.tolist() == picks
    np.testing.assert_allclose(r.aggregate, agg, rtol=out_tol(X), atol=out_tol(X) * np.abs(agg).max())


def test_bulyan_coordinate_ties_take_the_smaller_value():
    # theta = 3, beta = 1 per column; median 0 with -1 and +1 equidistant -> beta=2 would need a tie-break
    V = np.array([[-1.0, 5.0], [0.0, 6.0], [1.0, 7.0]])
    np.testing.assert_array_equal(rg.bulyan_coordinate(V, 2), [-0.5, 5.5])
    X = np.array([[-1.0], [0.0], [1.0], [0.0], [0.0], [3.0], [-3.0]])  # k = 7, f = 1: theta 5, beta 3
    for backend in BACKENDS:
        r = rg.bulyan(X, 1, backend=backend)
        vals = np.sort(X[r.selected, 0])
        ref = np.mean(sorted(vals, key=lambda v: (abs(v - np.median(vals)), v))[:3])
        assert r.aggregate[0] == ref


# --- geometric median ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(X=slabs(kmin=1, kmax=10, nmax=80), weighted=st.booleans(), init=st.sampled_from(["robust", "mean"]))
def test_geometric_median_matches_weiszfeld_in_data_space(backend, X, weighted, init):
    k = len(X)
    w = np.arange(1.0, k + 1) if weighted else np.ones(k)
    r = rg.geometric_median(X, eps=1e-10, max_iter=5000, weights=w if weighted else None, init=init,
                            backend=backend)
    rho = ref_scale(ref_d2(X))
    if rho == 0:  # all rows identical: their weighted mean
        np.testing.assert_allclose(r.aggregate, X[0], rtol=out_tol(X))
        return
    z, F, ok = ref_geomed(X, w / w.sum(), 1e-6 * rho, 1e-10 * rho, 5000)
    assert r.info["objective"] <= F + 1e-7 * rho
    X64 = X.astype(np.float64)
    # rows not on a line: the minimizer is unique. Near a row that is almost (not) the median, Weiszfeld creeps
    # (steps ~ 1/t) and neither side converges: only the objectives are compared then.
    if np.linalg.matrix_rank(X64 - X64[0]) >= 2 and ok and r.info["converged"]:
        assert np.linalg.norm(r.aggregate.astype(np.float64) - z) <= 1e-5 * rho + out_tol(X) * np.linalg.norm(z)
    assert np.all(r.coef >= 0) and abs(r.coef.sum() - 1) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["huge", "signflip", "collude"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_geometric_median_stays_near_the_honest_cluster(backend, kind, dtype):
    for k, f in ((10, 4), (11, 5)):
        X, bad = honest_and_attackers(kind, k, f, dtype=dtype)
        hon = X[sorted(set(range(k)) - bad)].astype(np.float64)
        mu = hon.mean(0)
        spread = np.max(np.linalg.norm(hon - mu, axis=1))
        for init in ("robust", "mean"):
            r = rg.geometric_median(X, init=init, backend=backend)
            assert np.linalg.norm(r.aggregate.astype(np.float64) - mu) <= 2 * spread
            assert r.info["converged"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometric_median_at_a_repeated_row_is_that_row(backend):
    """Four parties of eight sent the same update: the median is that row exactly (the optimality test at a row:
    the pull of the other four, |sum of unit vectors| / 8 ~ sqrt(10) / 8, is below its weight 4/8), where plain
    Weiszfeld would creep towards it with steps ~ 1/t."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((8, 300)).astype(np.float32)
    X[[4, 6, 7]] = X[1]
    r = rg.geometric_median(X, eps=1e-12, max_iter=50, backend=backend)
    assert r.info["converged"] and r.info["at_row"] in (1, 4, 6, 7)
    np.testing.assert_array_equal(r.aggregate, X[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometric_median_reads_the_slab_twice(backend, monkeypatch):
    """One pass for the Gram, one for the final weighted sum, whatever the number of Weiszfeld iterations."""
    calls = []
    run_gram, comb = rg._run_gram, rg.combine
    monkeypatch.setattr(rg, "_run_gram", lambda *a: calls.append("gram") or run_gram(*a))
    monkeypatch.setattr(rg, "combine", lambda *a, **kw: calls.append("sum") or comb(*a, **kw))
    X, _ = honest_and_attackers("signflip", 10, 3)
    r = rg.geometric_median(X, eps=1e-12, backend=backend)
    assert r.info["iterations"] > 5 and calls == ["gram", "sum"] and r.info["passes"] == 2


# --- clipping -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(X=slabs(kmin=1, kmax=10, nmax=80), iters=st.integers(1, 4), centered=st.booleans(), weighted=st.booleans(),
       tau_q=st.floats(0.05, 2.0))
def test_centered_clipping_matches_data_space(backend, X, iters, centered, weighted, tau_q):
    k, n = X.shape
    rng = np.random.default_rng(n)
    v = (X.astype(np.float64).mean(0) + rng.standard_normal(n)).astype(X.dtype) if centered else None
    w = np.arange(1.0, k + 1) if weighted else np.ones(k)
    vv = 0.0 if v is None else v.astype(np.float64)
    d = np.linalg.norm(X.astype(np.float64) - vv, axis=1)
    tau = tau_q * max(np.median(d), 1e-3)
    r = rg.centered_clipping(X, tau, v, iters=iters, weights=w if weighted else None, backend=backend)
    z = ref_centered_clipping(X, tau, v, iters, w)
    np.testing.assert_allclose(r.aggregate, z, rtol=1e-6 if X.dtype == np.float32 else 1e-9,
                               atol=1e-9 * (np.abs(z).max() + d.max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_bound_clips_then_averages(backend):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((6, 300)).astype(np.float32)
    X[0] *= 1e18  # a boosted (backdoor) update
    nr = np.linalg.norm(X.astype(np.float64), axis=1)
    r = rg.norm_bound(X, 5.0, backend=backend)
    ref = ((X.astype(np.float64) * np.minimum(1, 5.0 / nr)[:, None])).mean(0)
    np.testing.assert_allclose(r.aggregate, ref, rtol=1e-6, atol=1e-7)
    r1 = rg.norm_bound(X, 5.0, norms=nr, backend=backend)  # norms from admission: one pass
    np.testing.assert_allclose(r1.aggregate, r.aggregate, rtol=1e-6, atol=1e-7)
    assert r1.info["passes"] == 1 and r.info["passes"] == 2
    assert np.linalg.norm(r.aggregate) <= 5.0 * (1 + 1e-6)


# --- against Flower -----------------------------------------------------------------------------------------------
flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate")


def flower_results(X, counts=None):
    counts = np.ones(len(X), dtype=int) if counts is None else counts
    return [([X[i].copy()], int(counts[i])) for i in range(len(X))]


@pytest.mark.parametrize("k,f", [(7, 1), (10, 2), (12, 3)])
def test_flower_krum_and_multikrum(k, f):
    rng = np.random.default_rng(k)
    X = (rng.standard_normal((k, 500)) * rng.uniform(0.5, 2.0, (k, 1))).astype(np.float32)
    counts = rng.integers(1, 1000, k)
    fl = flwr_agg.aggregate_krum(flower_results(X, counts), f, 0)[0]
    np.testing.assert_array_equal(rg.krum(X, f).aggregate, fl)  # Krum: the same row, bit for bit
    for m in (1, 3, k - f):
        fl = flwr_agg.aggregate_krum(flower_results(X, counts), f, m)[0]
        ours = rg.krum(X, f, m, weights=counts).aggregate  # weighted by sample counts, as Flower's aggregate()
        np.testing.assert_allclose(ours, fl, rtol=1e-6, atol=1e-6)


def test_flower_self_distance_slice_is_harmless_with_duplicates():
    """Flower skips the first entry of each sorted distance row, assuming it is the row's own 0. With an exact
    duplicate it may be the duplicate's 0: the multiset left is the same, so the scores (and Krum's choice) are."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((9, 400)).astype(np.float32)
    X[6] = X[1]
    X[7] = X[1]
    X[8] = X[3]
    f = 2
    Dfl = flwr_agg._compute_distances([[x] for x in X])
    s = max(1, len(X) - f - 2)
    fl_scores = np.array([np.sum(d[np.argsort(d)[1:s + 1]]) for d in Dfl])
    r = rg.krum(X, f)
    np.testing.assert_allclose(r.info["scores"], fl_scores, rtol=1e-5)
    np.testing.assert_array_equal(r.aggregate, flwr_agg.aggregate_krum(flower_results(X), f, 0)[0])


def test_flower_multikrum_tie_at_the_cut():
    """Rows 5 and 6 are exact duplicates with equal scores, just above five central rows: Multi-Krum with m = 6
    must take one of them. We take the lower index (5); Flower takes whichever numpy's unstable argsort puts first.
    With different sample counts the weighted averages differ by which one is kept."""
    rng = np.random.default_rng(6)
    c = rng.standard_normal(200)
    X = np.vstack([c + 0.01 * rng.standard_normal((5, 200)), np.tile(c + 0.05 * rng.standard_normal(200), (2, 1))])
    X = X.astype(np.float64)
    counts = np.array([10, 10, 10, 10, 10, 1, 1000])
    r = rg.krum(X, 1, 6, weights=counts)
    assert r.info["scores"][5] == r.info["scores"][6] and r.info["scores"][5] > r.info["scores"][:5].max()
    assert sorted(r.selected.tolist()) == [0, 1, 2, 3, 4, 5]
    with_5 = ref_krum(X, 1, 6, counts.astype(float))[2]
    keep6 = [0, 1, 2, 3, 4, 6]
    with_6 = (counts[keep6, None] * X[keep6]).sum(0) / counts[keep6].sum()
    np.testing.assert_allclose(r.aggregate, with_5, rtol=1e-12)
    fl = flwr_agg.aggregate_krum(flower_results(X, counts), 1, 6)[0]
    assert np.allclose(fl, with_5, rtol=1e-12) or np.allclose(fl, with_6, rtol=1e-12)
    assert not np.allclose(with_5, with_6, rtol=1e-6)  # the choice matters


@pytest.mark.parametrize("k,f", [(7, 1), (8, 1), (11, 2), (12, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_flower_bulyan(k, f, dtype):
    rng = np.random.default_rng(10 * k + f)
    X = (rng.standard_normal((k, 300)) * rng.uniform(0.5, 2.0, (k, 1))).astype(dtype)
    X[0] = X[0] * 50  # an outlier Krum must skip
    fl = flwr_agg.aggregate_bulyan(flower_results(X), f, flwr_agg.aggregate_krum, to_keep=0)[0]
    for backend in BACKENDS:
        ours = rg.bulyan(X, f, backend=backend)
        assert 0 not in ours.selected.tolist()
        np.testing.assert_allclose(ours.aggregate, fl, rtol=1e-12 if dtype == np.float64 else 1e-6, atol=1e-7)


# --- errors and inputs --------------------------------------------------------------------------------------------
def test_typed_errors():
    X = np.random.default_rng(0).standard_normal((6, 20)).astype(np.float32)
    with pytest.raises(rg.TooFewUpdates):
        rg.krum(X, 2)  # 6 < 2*2 + 3
    with pytest.raises(rg.TooFewUpdates):
        rg.bulyan(X, 1)  # 6 < 4*1 + 3
    with pytest.raises(InvalidWeight, match="'p2'"):
        rg.krum(X, 1, weights=[1, 1, 0, 1, 1, 1], party_ids=[f"p{i}" for i in range(6)])
    with pytest.raises(DuplicateParty):
        rg.geometric_median(X, party_ids=["a", "b", "c", "a", "d", "e"])
    with pytest.raises(BackendUnavailable):
        rg.gram(X, backend="cpp")
    Y = X.copy()
    Y[3, 7] = np.nan
    with pytest.raises(NonFiniteUpdate, match="'d'"):
        rg.krum(Y, 1, party_ids="abcdef")
    with pytest.raises(TypeError):
        rg.gram(X.astype(np.float16))
    with pytest.raises(ValueError):
        rg.gram(np.asfortranarray(X))


def test_update_store_like_input():
    class Store:
        parties = ("h0", "h1", "h2", "h3", "evil", "h4", "h5")

        def __init__(self, rows):
            self._rows = rows

        def rows(self):
            return self._rows

    X, _ = honest_and_attackers("huge", 7, 1, dtype=np.float32, first=False)
    X = np.vstack([X[:4], X[6:], X[4:6]])  # the attacker in row 4
    r = rg.krum(Store(X), 1, m=6)
    assert "evil" not in r.parties and len(r.parties) == 6


def test_gram_products_in_parts_equal_the_whole_tile():
    """On a GPU a tile's products run in column parts (batched GEMMs, then a sum: cuBLAS would give a k x k output
    one thread block); the same code on numpy gives the whole tile's, also with a remainder short of a part."""
    rng = np.random.default_rng(7)
    T = rng.standard_normal((5, 1000))
    for part in (0, 1, 7, 64, 200, 1000, 2000):  # 200 and 1000: no remainder
        np.testing.assert_allclose(rg._syrk(T, part), T @ T.T, rtol=1e-12)
        np.testing.assert_allclose(rg._sumsq(T, part), (T * T).sum(axis=1), rtol=1e-12)


def _coordinate_cases():
    """(rows float32 [k, n], selected row indices, beta): random, tied, huge and signed-zero coordinates, odd and
    even theta, beta from 1 to theta."""
    rng = np.random.default_rng(8)
    for k, theta in ((5, 5), (9, 4), (12, 7), (20, 16)):
        X = rng.standard_normal((k, 301)).astype(np.float32)
        X[:, ::5] = np.round(X[:, ::5])  # ties in value and in distance to the median
        X[:, 1::7] = 0.0
        X[::2, 1::7] = -0.0
        X[0, 2::11] = 3e38  # huge values
        X[1, 2::11] = -3e38
        idx = np.sort(rng.choice(k, theta, replace=False))
        for beta in sorted({1, 2, theta // 2, theta - 1, theta} - {0}):
            yield X, idx, beta


def test_bulyan_coordinate_step_is_the_same_on_every_path():
    """Bulyan's coordinate step: the array path (numpy here, CuPy on a GPU) gives numba's kernel's bits, and the
    values of the specification bulyan_coordinate (which sums in distance order)."""
    for X, idx, beta in _coordinate_cases():
        xp_out = np.empty(X.shape[1], np.float32)
        rg._bulyan_xp(X, idx, beta, xp_out, 64)  # several tiles, the last one ragged
        spec = rg.bulyan_coordinate(X[idx], beta)
        np.testing.assert_allclose(xp_out, spec.astype(np.float32), rtol=1e-6, atol=1e-30)
        if "numba" in BACKENDS:
            nb = np.empty(X.shape[1], np.float32)
            rg._bulyan_numba(X, idx, beta, nb)
            assert nb.tobytes() == xp_out.tobytes(), (len(idx), beta)


def test_bulyan_gpu_kernel_in_the_host_emulation():
    """The GPU's Bulyan step (the generated per-theta kernel, robust_kernel mode 2, run by the backend's launch code
    on the CPU shim): the array path's bits, tile by tile."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the host emulation needs g++")
    import gpu_shim
    from jitkernels.backends import cupy_backend

    for X, idx, beta in _coordinate_cases():
        want = np.empty(X.shape[1], np.float32)
        rg._bulyan_xp(X, idx, beta, want, 1 << 14)
        got = np.empty(X.shape[1], np.float32)
        with cupy_backend.use_runtime(gpu_shim.HostRuntime(len(idx))):
            rg._bulyan_cupy(X, idx, beta, got, 100)
        assert got.tobytes() == want.tobytes(), (len(idx), beta)



@given(case=device_gram_cases())
def test_gram_gpu_kernel_in_the_host_emulation(case):
    """The GPU's Gram kernel (kernels.cu gram_tiles, run by the backend's launch code on the CPU shim: pair tiles,
    rows past k, columns past n in a step of U, row strides > n, every centering) against the float64 array path
    (check_device_gram)."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the host emulation needs g++")
    import gpu_shim
    from jitkernels.backends import cupy_backend

    def run(seed):
        with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed, case.defines)):
            return cupy_backend.gram(case.X, case.mode, case.refrow, case.ref, case.diag_only, case.tile)
    check_device_gram(case, run)


@given(case=combine_cases())
def test_combine_gpu_kernel_in_the_host_emulation(case):
    """The GPU's weighted sum of chosen rows (kernels.cu combine_rows, by the backend's launch code on the CPU shim)
    against the float64 array path (check_combine)."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the host emulation needs g++")
    import gpu_shim
    from jitkernels.backends import cupy_backend

    got = np.full(case.n, np.nan, case.X.dtype)  # every element must be written
    with cupy_backend.use_runtime(gpu_shim.HostRuntime(0)):
        cupy_backend.combine(case.X, case.idx, case.coef, case.base, got)
    check_combine(case, got)


def test_slabs_whose_row_stride_is_not_whole_elements_are_refused():
    """A field of a structured array (row stride 5 bytes for float32 values): the kernels index rows by whole
    elements (the GPU's combine read the wrong rows), so such a slab is refused by name."""
    from jitkernels import robust_coord as rc

    s = np.zeros(4, dtype=[("a", "<f4"), ("b", "u1")])
    s["a"] = [1, 2, 3, 4]
    X = s["a"][:, None]
    for fn in (lambda: rg.combine(X, [1.0, 10.0, 100.0, 1000.0]), lambda: rg.gram(X),
               lambda: rc.coordinate_median(X)):
        with pytest.raises(ValueError, match="row stride"):
            fn()


def test_slabs_not_aligned_to_their_elements_are_refused():
    """A view into a byte buffer at an odd offset: a GPU faults on such loads, so the robust kernels refuse it by
    name on every backend."""
    from jitkernels import robust_coord as rc

    X = np.zeros(3 * 8 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(3, 8)
    for fn in (lambda: rg.combine(X, [1.0, 1.0, 1.0]), lambda: rg.gram(X), lambda: rc.coordinate_median(X)):
        with pytest.raises(ValueError, match="not aligned"):
            fn()


def test_combine_refuses_rows_outside_the_slab():
    X = np.ones((3, 4), np.float32)
    for bad in ([3], [-1]):
        with pytest.raises(ValueError, match=r"rows_idx must be in \[0, 3\)"):
            rg.combine(X, [1.0], rows_idx=bad)


def _exact_sq_distances(X):
    import math

    X = X.astype(np.float64)
    return np.array([[math.fsum(((a - b) * (a - b)).tolist()) for b in X] for a in X])


def test_a_far_colluding_pair_does_not_tie_with_the_honest_minimum():
    """Two attackers 1e5 apart and 1e12 from the honest rows: each one's nearest neighbour is the other, an exact
    score of 1e10 against the honest rows' ~10. The tie rule added the two rows' rounding allowances, and a far row's
    is of the size of its squared distance to the reference (1e12 here): both attackers 'tied' with the honest
    minimum, and Krum (Flower's variant, one neighbour) and Bulyan's last pick chose one by party rank."""
    from jitkernels import robust as R

    rng = np.random.default_rng(0)
    n, f = 10, 2
    X = rng.standard_normal((4 * f + 3, n)).astype(np.float32)
    X[0] = np.float32(1e12)
    X[1] = X[0] + np.float32(1e5) * np.eye(n, dtype=np.float32)[0]
    D = _exact_sq_distances(X)
    Y = X[:5]
    s = np.sort(_exact_sq_distances(Y) + np.diag(np.full(5, np.inf)), axis=1)[:, 0]  # one neighbour each
    assert rg.krum(Y, f, variant="flower").selected.tolist() == [int(np.argmin(s))] and s.argmin() >= 2
    sel = rg.bulyan(X, f, party_ids=list(range(len(X)))).selected.tolist()
    assert 0 not in sel and 1 not in sel and D[np.ix_(sel, sel)].max() < 100
    agg = jk.Aggregator(np.zeros(n, np.float32), R.Krum(f=2, variant="flower"))
    for i, x in enumerate(Y):
        agg.fold(x, party=f"{'evil' if i < 2 else 'honest'}{i}")
    assert np.abs(agg.finalize()).max() < 10 and agg.algorithm.selected[0].startswith("honest")


def test_gram_rules_read_a_slab_in_the_other_byte_order_and_clip_without_floating_point_errors():
    """A big-endian float32 slab was refused as "not float32"; centered clipping's M / norm overflowed to inf for a
    tiny norm (a factor of 1, right), which raised under np.seterr(all="raise")."""
    X = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    assert rg.krum(X.astype(">f4"), 1).selected.tolist() == rg.krum(X, 1).selected.tolist()
    with np.errstate(all="raise"):
        assert rg._clip_factor([1e-300, 0.0, 4.0e10], 1e10).tolist() == [1.0, 0.0, 0.25]


def test_a_base_in_the_other_byte_order_is_read_as_its_values():
    """combine(base=) with a big-endian base raised numba's TypingError (the slab was converted, the base not)."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4, 6)).astype(np.float32)
    base = rng.standard_normal(6).astype(np.float32)
    for backend in [b for b in ("numpy", "numba") if jk.available_backends()[b] is True]:
        want = rg.combine(X, [0.5, 0.25, 0.25, 0.0], base=base, backend=backend)
        got = rg.combine(X, [0.5, 0.25, 0.25, 0.0], base=base.astype(">f4"), backend=backend)
        assert got.tobytes() == want.tobytes()


def test_norm_bound_with_given_norms_weighs_as_without_them():
    """The norms= path (norms from admission's stats) dropped the weights: [1, 3] averaged as [1, 1]."""
    X = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    a = rg.norm_bound(X, 10.0, weights=[1.0, 3.0]).aggregate
    b = rg.norm_bound(X, 10.0, weights=[1.0, 3.0], norms=[1.0, 1.0]).aggregate
    np.testing.assert_allclose(a, [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(b, a, rtol=1e-6)


def test_geometric_median_is_scale_equivariant():
    """Its smoothing is relative to the data's scale (an absolute floor made the median of data scaled by 1e-9 the
    mean's neighbourhood: 10.4 for 0.79 per unit)."""
    X = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [50, 50]], np.float64)
    ref = rg.geometric_median(X).aggregate
    for s in (1e-9, 1e6):
        np.testing.assert_allclose(rg.geometric_median(X * s).aggregate / s, ref, rtol=1e-4)


def test_geometric_median_starts_from_the_half_of_the_rows_nearest_the_medoid():
    """The documented robust start: the mean of the ceil(k/2) rows nearest the medoid (with max_iter=0, the start
    is the result)."""
    X = np.array([[0.0, 0], [1, 0], [0, 1], [5, 5], [9, 1]], np.float32)
    r = rg.geometric_median(X, max_iter=0)
    np.testing.assert_allclose(r.coef, [1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=1e-12)


def test_robust_scale_is_the_lower_median_of_the_rows_medians_and_distances_are_never_negative():
    x = np.array([0.0, 1.0, 5.0, 6.0])
    assert rg.robust_scale((x[:, None] - x[None, :]) ** 2) == 4.0  # row medians 5, 4, 4, 5: the lower median
    G = np.array([[1.0, 1.0 + 2 ** -50, 0], [1.0 + 2 ** -50, 1.0, 0], [0, 0, 4.0]])  # rounding: g_ii + g_jj < 2 g_ij
    D = rg.sq_distances(G)
    assert D.min() >= 0.0 and (rg.krum_scores(D, 0) >= 0).all()
