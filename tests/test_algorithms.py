"""Algorithms: the server-optimizer step kernel on every backend against the numpy reference (bit for bit: it is
element-wise), each algorithm against its equations written out in float64, rounds carried across reset and
save/load, and the typed errors of per-update values."""

import math
import shutil

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import algorithms as A
from jitkernels import robust as R
from jitkernels.backends import numpy_ref
from jitkernels.batch import build_out_groups
from jitkernels.dtypes import np_dtype
from jitkernels.layout import Layout

from strategies import CPU_BACKENDS, FLOAT_DTYPES, leaf_shapes, make_update, seeds

OPTIMIZERS = {
    "fedavgm": lambda v: A.FedAvgM(lr=0.7, momentum=0.9),
    "nesterov": lambda v: A.FedAvgM(lr=0.7, momentum=0.9, nesterov=True),
    "fedadam": lambda v: A.FedAdam(lr=0.05, tau=1e-3, variant=v),
    "fedyogi": lambda v: A.FedYogi(lr=0.05, variant=v),
    "fedadagrad": lambda v: A.FedAdagrad(lr=0.05, beta1=0.5, tau=1e-3, variant=v),
}


def _step_backends():
    out = [(b, None) for b in CPU_BACKENDS if b != "numpy"]
    if shutil.which("g++"):
        out.append(("cupy", "shim"))
    return out


def _run_step(backend, lay, acc, x, m, v, kind, coef, total_w, out_dtype, seed):
    """Every leaf stepped by ``backend``'s step into outputs pre-filled with 7s; returns (outs, x, m, v)."""
    x, m, v = x.copy(), m.copy(), None if v is None else v.copy()
    outs = [np.full(l.shape, 7, np_dtype(out_dtype)) for l in lay.leaves]
    chunk = 100 if backend == "cupy" else 4096
    groups = build_out_groups(lay, list(range(len(lay))), outs, total_w, chunk=chunk)
    if backend == "cupy":
        import gpu_shim
        from jitkernels.backends import cupy_backend
        with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed)):
            for og in groups:
                cupy_backend.step(acc, x, m, v, kind, coef, og)
    else:
        mod = numpy_ref if backend == "numpy" else jk.backends.get(backend)
        for og in groups:
            mod.step(acc, x, m, v, kind, coef, og)
    return outs, x, m, v


@pytest.mark.parametrize("backend,_", _step_backends())
@pytest.mark.parametrize("kind", [A.MOMENTUM, A.NESTEROV, A.ADAM, A.YOGI, A.ADAGRAD])
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(max_size=700), out_dtype=st.sampled_from(FLOAT_DTYPES),
       magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), ties=st.booleans())
def test_step_bit_exact(backend, _, kind, acc_dtype, seed, shapes, out_dtype, magnitude, ties):
    rng = np.random.default_rng(seed)
    lay = Layout.from_template(make_update(rng, shapes, out_dtype))
    n = lay.size
    acc = (rng.standard_normal(n) * magnitude).astype(acc_dtype)
    x = rng.standard_normal(n).astype(acc_dtype)
    m = (rng.standard_normal(n) * magnitude).astype(acc_dtype)
    v = (rng.random(n) * magnitude * magnitude).astype(acc_dtype) if kind >= A.ADAM else None
    total_w = rng.uniform(0.5, 20.0, len(lay))
    if ties and v is not None:  # Yogi's sign(v - d*d) = 0 and v = 0 exactly
        d = acc / np.asarray(np.repeat(total_w, [l.size for l in lay.leaves]), acc_dtype)
        v[::3] = d[::3] * d[::3]
        v[1::5] = 0
    coef = (0.9, 0.1, 0.99, 0.01 if kind != A.ADAGRAD else 1.0, float(rng.uniform(0.01, 1.0)), 1e-3)
    got = _run_step(backend, lay, acc, x, m, v, kind, coef, total_w, out_dtype, seed)
    ref = _run_step("numpy", lay, acc, x, m, v, kind, coef, total_w, out_dtype, seed)
    for g, r in zip(got[0], ref[0]):
        assert g.tobytes() == r.tobytes()
    for g, r in zip(got[1:], ref[1:]):
        assert (g is None and r is None) or g.tobytes() == r.tobytes()


# --- algorithms against their equations ---------------------------------------------------------------------------

def _model(rng, n=(50, 7)):
    return {"w": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n[1]).astype(np.float32)}


def _updates(rng, base, k, scale=0.05):
    return [{name: (a + scale * rng.standard_normal(a.shape)).astype(np.float32) for name, a in base.items()}
            for _ in range(k)]


def _reference_step(alg, x, d, m, v, t):
    """The optimizer's equations in float64, written out from the papers (docstrings of jitkernels.algorithms)."""
    if isinstance(alg, A.FedAvgM):
        m = alg.momentum * m + d
        return x + alg.lr * (d + alg.momentum * m if alg.nesterov else m), m, v
    m = alg.beta1 * m + (1 - alg.beta1) * d
    if isinstance(alg, A.FedAdam):
        v = alg.beta2 * v + (1 - alg.beta2) * d * d
    elif isinstance(alg, A.FedYogi):
        v = v - (1 - alg.beta2) * d * d * np.sign(v - d * d)
    else:
        v = v + d * d
    return x + alg.step_size(t) * m / (np.sqrt(v) + alg.tau), m, v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("variant", ["reddi", "flower"])
def test_optimizers_follow_their_equations_over_rounds(backend, name, variant):
    rng = np.random.default_rng(7)
    alg = OPTIMIZERS[name](variant)
    base = _model(rng)
    agg = jk.Aggregator(base, alg, backend=backend, base=base, acc_dtype="float64")
    x = {k: a.astype(np.float64) for k, a in base.items()}
    m = {k: np.zeros_like(a) for k, a in x.items()}
    v = {k: np.full_like(a, alg.v0()) for k, a in x.items()}
    for t in range(1, 5):
        ups = _updates(rng, {k: a.astype(np.float32) for k, a in x.items()}, 4)
        ws = rng.uniform(1, 100, 4)
        for j, (u, w) in enumerate(zip(ups, ws)):
            agg.fold(u, weight=w, party=j)
        got = agg.finalize()
        for key in x:
            d = sum(w * (u[key].astype(np.float64) - x[key]) for u, w in zip(ups, ws)) / ws.sum()
            x[key], m[key], v[key] = _reference_step(alg, x[key], d, m[key], v[key], t)
            np.testing.assert_allclose(got[key], x[key].astype(np.float32), rtol=1e-5, atol=1e-6)
        assert agg.state.round == t
        agg.reset(reuse=t % 2 == 0)


def test_a_finalized_optimizer_round_is_closed_until_reset():
    rng = np.random.default_rng(1)
    base = _model(rng)
    agg = jk.Aggregator(base, A.FedAdam(), base=base)
    u = _updates(rng, base, 2)
    agg.fold(u[0], party="a")
    first = agg.finalize()
    again = agg.finalize()  # the same model, not a second step
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert agg.state.round == 1
    with pytest.raises(jk.RoundClosed):
        agg.fold(u[1], party="b")
    with pytest.raises(ValueError, match="model"):
        agg.finalize(output="delta")
    agg.reset()
    assert agg.state.count == 0 and agg.state.round == 1
    for leaf in agg.layout.leaves:  # the next round starts from the stepped model
        np.testing.assert_array_equal(agg.state.base[leaf.offset:leaf.offset + leaf.size], first[leaf.name].reshape(-1))


def test_optimizers_need_a_base():
    with pytest.raises(ValueError, match="base="):
        jk.Aggregator(_model(np.random.default_rng(0)), A.FedYogi())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_save_load_between_and_within_rounds_gives_the_same_bits(tmp_path, name):
    rng = np.random.default_rng(3)
    base = _model(rng)
    rounds = [_updates(rng, base, 3, scale=0.1) for _ in range(3)]

    def run(stop_at=None):
        agg = jk.Aggregator(base, OPTIMIZERS[name]("reddi"), base=base)
        outs = []
        for r, ups in enumerate(rounds):
            for j, u in enumerate(ups):
                if (r, j) == stop_at:  # save, "crash", load, go on
                    agg.state.save(tmp_path / "s.jks")
                    agg = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "s.jks"))
                agg.fold(u, weight=j + 1, party=j)
            outs.append(agg.finalize())
            agg.reset()
        return outs, agg.state

    ref, ref_state = run()
    for stop in [(1, 0), (2, 2)]:
        got, state = run(stop)
        assert all(g[k].tobytes() == r[k].tobytes() for g, r in zip(got, ref) for k in r)
        assert state.same_bits(ref_state)


def test_merged_partial_states_step_like_one_state():
    rng = np.random.default_rng(5)
    base = _model(rng)
    ups = _updates(rng, base, 6)
    alg = A.FedAdam(lr=0.1, tau=1e-3)
    whole = jk.Aggregator(base, alg, base=base, acc_dtype="float64")
    left = jk.Aggregator(base, alg, base=base, acc_dtype="float64")
    right = jk.Aggregator(base, alg, base=base, acc_dtype="float64")
    for j, u in enumerate(ups):
        whole.fold(u, weight=j + 1, party=j)
        (left if j % 2 else right).fold(u, weight=j + 1, party=j)
    left.merge(right)
    a, b = whole.finalize(), left.finalize()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(jk.IncompatibleStates, match="closed the round"):
        left.merge(jk.Aggregator(base, alg, base=base, acc_dtype="float64"))


def test_a_rejected_update_leaves_an_optimizer_state_bit_identical():
    rng = np.random.default_rng(2)
    base = _model(rng)
    agg = jk.Aggregator(base, A.FedYogi(), base=base)
    good, bad = _updates(rng, base, 2)
    agg.fold(good, party="ok")
    agg.finalize()
    agg.reset()
    agg.fold(_updates(rng, base, 1)[0], party="ok")
    before = agg.state.copy()
    bad["w"][3, 2] = np.nan
    with pytest.raises(jk.NonFiniteUpdate):
        agg.fold(bad, party="nan")
    assert agg.state.same_bits(before)


# --- streaming algorithms -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fednova_normalizes_by_local_steps(backend):
    rng = np.random.default_rng(11)
    base = _model(rng)
    ups = _updates(rng, base, 4)
    n, tau = np.array([10.0, 20.0, 5.0, 40.0]), np.array([3.0, 1.0, 7.0, 2.0])
    agg = jk.Aggregator(base, A.FedNova(), backend=backend, base=base, acc_dtype="float64")
    for j, u in enumerate(ups):
        agg.fold(u, weight=n[j], party=j, steps=tau[j])
    got = agg.finalize()
    p = n / n.sum()
    tau_eff = (p * tau).sum()
    for k in base:
        x = base[k].astype(np.float64)
        want = x + tau_eff * sum(p[j] * (ups[j][k] - x) / tau[j] for j in range(4))
        np.testing.assert_allclose(got[k], want.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("staleness,a,b,fn", [
    ("constant", 0.5, 4.0, lambda s: 1.0),
    ("polynomial", 0.5, 4.0, lambda s: 1 / math.sqrt(1 + s)),  # FedBuff / FedScale
    ("hinge", 2.0, 3.0, lambda s: 1.0 if s <= 3 else 1 / (2.0 * (s - 3) + 1)),
    ("nvflare", 0.5, 4.0, lambda s: 1 / (1 + math.sqrt(s))),
])
def test_fedbuff_discounts_stale_updates(staleness, a, b, fn):
    rng = np.random.default_rng(13)
    base = _model(rng)
    ups = _updates(rng, base, 5)
    stale = [0, 1, 3, 6, 10]
    agg = jk.Aggregator(base, A.FedBuff(staleness=staleness, a=a, b=b, server_lr=0.5), base=base, acc_dtype="float64")
    for j, u in enumerate(ups):
        agg.fold(u, party=j, staleness=stale[j])
    got = agg.finalize()
    for k in base:
        x = base[k].astype(np.float64)
        want = x + 0.5 * sum(fn(s) * (u[k] - x) for s, u in zip(stale, ups)) / len(ups)
        np.testing.assert_allclose(got[k], want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_fedprox_is_fedavg_on_the_server_and_records_mu(tmp_path):
    rng = np.random.default_rng(4)
    base = _model(rng)
    ups = _updates(rng, base, 3)
    prox = jk.Aggregator(base, A.FedProx(mu=0.01), base=base)
    avg = jk.Aggregator(base, "fedavg", base=base)
    for j, u in enumerate(ups):
        prox.fold(u, weight=j + 1, party=j)
        avg.fold(u, weight=j + 1, party=j)
    a, b = prox.finalize(), avg.finalize()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    prox.state.save(tmp_path / "p.jks")
    loaded = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "p.jks"))
    assert loaded.algorithm.mu == 0.01


def test_per_update_values_are_checked_with_the_party_named():
    rng = np.random.default_rng(6)
    base = _model(rng)
    u = _updates(rng, base, 1)[0]
    nova = jk.Aggregator(base, A.FedNova(), base=base)
    with pytest.raises(jk.InvalidUpdateInfo, match="'p1'.*steps.*required"):
        nova.fold(u, party="p1")
    with pytest.raises(jk.InvalidUpdateInfo, match="'p1'.*steps = -2"):
        nova.fold(u, party="p1", steps=-2)
    for sent in ("3", True, np.True_):  # (float() took them: a string or a bool is not a count of steps)
        with pytest.raises(jk.InvalidUpdateInfo, match="'p1'.*steps.*must be a number"):
            nova.fold(u, party="p1", steps=sent)
    with pytest.raises(jk.InvalidUpdateInfo, match="staleness.*not used"):
        jk.Aggregator(base, "fedavg").fold(u, party="p1", staleness=1)
    with pytest.raises(jk.InvalidUpdateInfo, match="'p2'.*staleness = nan"):
        jk.Aggregator(base, A.FedBuff(), base=base).fold(u, party="p2", staleness=float("nan"))
    assert nova.state.count == 0
    adm = jk.admit(u, nova.layout, party="p3", base=nova.state.base)  # admitted elsewhere, without the steps
    with pytest.raises(jk.InvalidUpdateInfo, match="'p3'"):
        nova.fold(adm)
    assert nova.state.count == 0


def test_updates_admitted_elsewhere_bring_their_info():
    """jk.admit / jk.admit_many take each update's info (FedNova's steps), which the folding aggregator checks: a
    server that admits on arrival, away from the aggregator, could not give FedNova its steps."""
    rng = np.random.default_rng(16)
    base = _model(rng)
    us = _updates(rng, base, 3)
    direct = jk.Aggregator(base, A.FedNova(), base=base)
    for j, u in enumerate(us):
        direct.fold(u, weight=j + 1, party=f"p{j}", steps=4 * j + 2)
    nova = jk.Aggregator(base, A.FedNova(), base=base)
    info = {"steps": 2}
    first = jk.admit(us[0], nova.layout, weight=1, party="p0", info=info, base=nova.state.base)
    info["steps"] = 99  # what folds is what was admitted
    rest = jk.admit_many(us[1:], nova.layout, weights=[2, 3], parties=["p1", "p2"],
                         infos=[{"steps": 6}, {"steps": 10}], base=nova.state.base)
    nova.fold_many([first] + rest)
    want, got = direct.finalize(), nova.finalize()
    for name in base:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(TypeError, match=r"infos\[1\] \(party 'b'\).*str"):
        jk.admit_many(us[:2], nova.layout, parties=["a", "b"], infos=[None, "steps=3"])
    bad = jk.admit(us[0], nova.layout, party="q", info={"staleness": 1}, base=nova.state.base)
    nova.reset()
    with pytest.raises(jk.InvalidUpdateInfo, match="'q'.*staleness.*not used"):
        nova.fold(bad)
    assert nova.state.count == 0


@pytest.mark.parametrize("alg", [A.FedAvg(weighted=False), A.FedProx(mu=0.1), A.FedNova(), A.FedBuff(staleness="hinge"),
                                 A.FedAvgM(lr=0.5, momentum=0.9, nesterov=True), A.FedAdam(variant="flower"),
                                 A.FedYogi(), A.FedAdagrad(), A.SCAFFOLD(num_parties=9, server_lr=0.3),
                                 A.DPFixedClipping(A.FedAdam(), clip_norm=2.0, noise_multiplier=0.5, seed=1),
                                 A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=4)])
def test_algorithms_round_trip_through_their_params(alg):
    again = A.from_params(alg.params())
    assert type(again) is type(alg) and again.params() == alg.params()


# --- differential privacy -------------------------------------------------------------------------------------------

def _norm(u, base):
    return math.sqrt(sum(float(((u[k].astype(np.float64) - base[k]) ** 2).sum()) for k in base))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fixed_clipping_scales_each_delta_to_the_clip_norm(backend):
    rng = np.random.default_rng(21)
    base = _model(rng)
    ups = [_updates(rng, base, 1, scale=s)[0] for s in (0.001, 0.05, 0.2, 1.0)]
    C = 1.5
    agg = jk.Aggregator(base, A.DPFixedClipping(clip_norm=C, noise_multiplier=0.0), backend=backend, base=base,
                        acc_dtype="float64")
    for j, u in enumerate(ups):
        agg.fold(u, weight=10 * (j + 1), party=j)  # unweighted inner FedAvg: weights do not count
    got = agg.finalize()
    for k in base:
        x = base[k].astype(np.float64)
        want = x + sum(min(1.0, C / _norm(u, base)) * (u[k] - x) for u in ups) / len(ups)
        np.testing.assert_allclose(got[k], want.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrapper", [
    lambda **kw: A.DPFixedClipping(clip_norm=1.0, **kw),
    lambda **kw: A.DPAdaptiveClipping(num_sampled=4, count_stddev=1.0, **kw)])
def test_dp_refuses_integer_leaves_it_would_release_un_noised(wrapper):
    """Integer leaves are averaged exactly, neither clipped nor noised: one party's BatchNorm counter of 1e7 moved
    the released model's by 1e7 / k, outside the guarantee. The layout is refused by name when the aggregator is made."""
    t = {"w": np.zeros(3, np.float32), "bn.num_batches_tracked": np.zeros((), np.int64)}
    with pytest.raises(jk.LayoutMismatch, match="'bn.num_batches_tracked'.*int64.*un-noised"):
        jk.Aggregator(t, wrapper(noise_multiplier=1.0, seed=0), base=t)
    floats = {"w": t["w"]}
    jk.Aggregator(floats, wrapper(noise_multiplier=1.0, seed=0), base=floats)


def _dp_round(backend, seed, *, threads=None, ups=None, base=None):
    alg = A.DPFixedClipping(clip_norm=1e6, noise_multiplier=1.0, seed=seed)
    agg = jk.Aggregator(base, alg, backend=backend, base=base)
    old = jk.set_num_threads(threads) if threads else None
    try:
        for j, u in enumerate(ups):
            agg.fold(u, party=j)
        return agg.finalize(), agg
    finally:
        if old:
            jk.set_num_threads(old)


def test_dp_noise_is_bit_identical_across_backends_and_threads_and_runs():
    rng = np.random.default_rng(8)
    base = _model(rng)
    ups = _updates(rng, base, 3)  # inside the clip norm: every backend folds the same weights, bit for bit
    ref, _ = _dp_round("numpy", 1234, ups=ups, base=base)
    for backend in CPU_BACKENDS:
        for threads in (1, 2):
            got, _ = _dp_round(backend, 1234, threads=threads, ups=ups, base=base)
            assert all(got[k].tobytes() == ref[k].tobytes() for k in ref)
    other, _ = _dp_round("numpy", 1235, ups=ups, base=base)
    assert not np.array_equal(other["w"], ref["w"])


def test_dp_noise_has_the_stated_std():
    base = {"w": np.zeros(200_000, np.float32)}
    ups = [{"w": np.zeros(200_000, np.float32)} for _ in range(4)]  # zero deltas: the output is the noise
    got, agg = _dp_round("cpp", 77, ups=ups, base=base)
    std = 1.0 * 1e6 / 4  # sigma * C / m
    z = got["w"].astype(np.float64) / std
    n = z.size
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert agg.state.round == 1 and agg.state.closed


def test_dp_noise_covers_the_parties_that_reported():
    """Fewer parties folded than num_sampled (dropouts): the unweighted average divides by the k folded, so one party
    moves it by C / k, and the noise is sigma C / k (it stayed sigma C / m: at k = 2 of m = 10, an effective noise
    multiplier of sigma / 5). More than m folded: Flower's sigma C / m. Adaptive clipping likewise. (Over 50,000
    draws the sample std is within 2% of the std, six standard errors.)"""
    n, C, sigma, m = 50_000, 2.0, 0.8, 10
    base = {"w": np.zeros(n, np.float32)}
    algs = {"fixed": (lambda: A.DPFixedClipping(clip_norm=C, noise_multiplier=sigma, num_sampled=m, seed=7), sigma),
            "adaptive": (lambda: A.DPAdaptiveClipping(noise_multiplier=sigma, num_sampled=m, initial_clip_norm=C,
                                                      seed=7),
                         (sigma ** -2 - (2 * m / 20) ** -2) ** -0.5)}
    for name, (make, multiplier) in algs.items():
        for k, cohort in ((2, 2), (m, m), (m + 3, m)):
            agg = jk.Aggregator(base, make(), base=base, acc_dtype="float64")
            for j in range(k):  # zero deltas: the output is the noise alone
                agg.fold({"w": np.zeros(n, np.float32)}, party=j)
            z = agg.finalize()["w"] / (multiplier * C / cohort)
            assert abs(z.std() - 1) < 0.02 and abs(z.mean()) < 0.02, f"{name}, {k} parties folded"


def test_a_dp_round_is_closed_noise_once_and_restart_reproduces_it(tmp_path):
    rng = np.random.default_rng(10)
    base = _model(rng)
    ups = _updates(rng, base, 3)
    first, agg = _dp_round("cpp", 99, ups=ups, base=base)
    again = agg.finalize()
    assert all(first[k].tobytes() == again[k].tobytes() for k in first)  # no second noise draw
    with pytest.raises(jk.RoundClosed):
        agg.fold(ups[0], party="late")
    # saved before finalize, reloaded elsewhere: the same noise (the seed and round are in the state)
    alg = A.DPFixedClipping(clip_norm=1e6, noise_multiplier=1.0, seed=99)
    pre = jk.Aggregator(base, alg, base=base)
    for j, u in enumerate(ups):
        pre.fold(u, party=j)
    pre.state.save(tmp_path / "dp.jks")
    resumed = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "dp.jks"))
    out = resumed.finalize()
    assert all(first[k].tobytes() == out[k].tobytes() for k in first)
    assert resumed.algorithm.seed == 99 and isinstance(resumed.algorithm.inner, A.FedAvg)


def test_dp_over_a_server_optimizer_noises_the_delta_before_the_step():
    rng = np.random.default_rng(12)
    base = _model(rng)
    ups = _updates(rng, base, 3)
    dp = jk.Aggregator(base, A.DPFixedClipping(A.FedAvgM(lr=1.0), clip_norm=1e6, noise_multiplier=1.0, seed=5),
                       base=base)
    plain = jk.Aggregator(base, A.DPFixedClipping(clip_norm=1e6, noise_multiplier=1.0, seed=5), base=base)
    for j, u in enumerate(ups):
        dp.fold(u, party=j)
        plain.fold(u, party=j)
    a, b = dp.finalize(), plain.finalize()  # FedAvgM(lr=1, momentum=0) on the noised delta = noised FedAvg
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)
    assert dp.state.round == 1 and dp.state.opt is not None


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
@pytest.mark.parametrize("dp", ["fixed", "adaptive"])
def test_dp_over_fedavg_measures_each_round_from_the_model_it_released(backend, dp):
    """reset() opens the next round from the model the closed round released, as a server optimizer's does: it kept
    the first round's base, so each round clipped its parties' drift from the first model (round 1 returned 1.0
    where the parties' own steps of 0.75 give 1.5, and the model never got further than C from where it began)."""
    alg = (A.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0) if dp == "fixed" else
           A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=2, initial_clip_norm=1.0, target_quantile=1.0,
                                count_stddev=0.0))
    x = {"w": np.zeros(1, np.float32)}
    agg = jk.Aggregator(x, alg, base=x, backend=backend)
    models = []
    for r in range(3):
        for j in range(2):  # each party steps 0.75 from the model it was sent: within C = 1
            agg.fold({"w": x["w"] + np.float32(0.75)}, party=j)
        x = agg.finalize()
        models.append(float(x["w"][0]))
        agg.reset()
    assert models == [0.75, 1.5, 2.25]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_next_rounds_base_is_the_released_model_as_its_parties_got_it(tmp_path, dtype):
    """With noise: the base reset() carries is the released model, widened to the accumulator dtype, after a save and
    load of the closed state too. (Taken before its rounding to float16, it was off the float16 grid in nearly every
    coordinate: a party that sent back the model it got was measured at a norm past C, and a small step clipped.)"""
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(21)
    x0 = {"w": rng.standard_normal(20_000).astype(dt)}
    alg = lambda: A.DPFixedClipping(clip_norm=0.01, noise_multiplier=1.0, num_sampled=4, seed=4)  # noqa: E731
    agg = jk.Aggregator(x0, alg(), base=x0)
    for j in range(4):
        agg.fold({"w": (x0["w"].astype(np.float32) + 1e-3 * rng.standard_normal(20_000)).astype(dt)}, party=j)
    released = agg.finalize()["w"]
    agg.state.save(tmp_path / "closed.jks")
    agg.reset()
    base = agg.state.base
    assert base.dtype == np.float32 and base.tobytes() == released.astype(np.float32).tobytes()
    agg.fold({"w": released}, party="unchanged")  # the model it got, sent back: a zero delta, not clipped
    assert agg.state.parties["unchanged"] == 1.0 and not np.any(agg.state.acc)
    again = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "closed.jks"))
    again.reset()
    assert again.state.base.tobytes() == base.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_refused_dp_finalize_released_no_model_and_the_next_round_keeps_the_base(dtype):
    """A closing finalize refused for a leaf past its dtype's range still closes its round (the noise is spent), but
    released no model: reset() took it as the next base all the same (float16: a base of 1.5e5 no party had; float32:
    every reset raised ValueOutOfRange, and a scheduler's next round never opened)."""
    # (float32: updates equal to the base, all the range in the noise)
    b, u, c = (65000.0, 65400.0, 1e5) if dtype == "float16" else (3.3e38, 3.3e38, 1e38)
    base = {"w": np.full(64, b, dtype)}
    agg = jk.Aggregator({"w": np.zeros(64, dtype)}, A.DPFixedClipping(clip_norm=c, noise_multiplier=1.0, seed=3),
                        base=base)
    for p in "ab":
        agg.fold({"w": np.full(64, u, dtype)}, party=p)
    with pytest.raises(jk.ValueOutOfRange):
        agg.finalize()
    before = agg.state.base.copy()
    agg.reset()
    assert agg.state.base.tobytes() == before.tobytes() and agg.state.round == 1


def test_hyperparameters_and_values_an_optimizer_could_not_apply_are_refused():
    """tau = 1e-50 passed the float64 check and was 0 in the float32 accumulator (lr = 1e39: inf): a coordinate
    whose delta was 0 stepped to NaN, and reset() carried the NaN model into every later round; nesterov="no" was
    truthy; bools passed as numbers; info keys of mixed types raised a bare TypeError; FedNova's divisor n / sum n
    tau overflowed for n tau = 1e10 x 1e300, and the round could not be finalized."""
    for make in (lambda: A.FedAdam(tau=1e-50), lambda: A.FedYogi(lr=1e39), lambda: A.FedAvgM(lr=1e39),
                 lambda: A.FedAvgM(lr=True), lambda: A.FedAdam(beta1=False), lambda: A.FedAvgM(momentum=True),
                 lambda: A.FedAdam(lr=1e36, beta1=0.999, variant="flower")):  # (its step size reaches lr / (1 - b1))
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError, match="nesterov"):
        A.FedAvgM(nesterov="no")
    agg = jk.Aggregator({"w": np.zeros(2)}, "fedavg")
    with pytest.raises(jk.InvalidUpdateInfo, match="party 'p'"):
        agg.fold_many([{"w": np.ones(2)}], [1.0], ["p"], [{1: 2, "x": 3}])
    x = {"w": np.zeros(2)}
    nova = jk.Aggregator(x, A.FedNova(), base=x, acc_dtype="float64")
    nova.fold({"w": np.full(2, 3.0)}, weight=1e10, party="a", steps=1e300)
    nova.fold({"w": np.full(2, 3.0)}, weight=1e10, party="b", steps=1e300)
    np.testing.assert_allclose(nova.finalize()["w"], [3.0, 3.0], rtol=1e-15)


def test_a_server_lr_that_divides_the_mass_past_float32_is_refused_when_made():
    """FedBuff's and SCAFFOLD's server_lr divides the round's mass in the accumulator: 1e-39 was taken, every fold
    of the round accepted, and every finalize refused, naming the weights. Refused when made, as the optimizers'
    rates are; one in range that a large mass still pushes past the range is named at finalize."""
    for make in (lambda: A.FedBuff(server_lr=1e-39), lambda: A.SCAFFOLD(num_parties=3, server_lr=1e-300)):
        with pytest.raises(ValueError, match="server_lr must be finite and > 0 .in float32 too"):
            make()
    x = {"w": np.zeros(2, np.float32)}
    agg = jk.Aggregator(x, A.FedBuff(server_lr=2e-38), base=x)  # (unweighted: a mass of 1 a party)
    for p in range(7):
        agg.fold({"w": np.ones(2, np.float32)}, party=p, staleness=0)
    with pytest.raises(jk.ValueOutOfRange, match=r"3.5e\+38 \(its mass 7 scaled by FedBuff's divisor, e.g. "
                                                 r"1 / server_lr\)"):
        agg.finalize()


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_a_server_optimizers_counter_nobody_sent_keeps_its_last_value(backend):
    """With partial updates, a server optimizer's step moved its float leaves in the base it carries, not its integer
    leaves (BatchNorm's num_batches_tracked): a later round that no party sent the counter in returned the first
    round's value from the base (100 went back to 0)."""
    x = {"w": np.ones(3, np.float32), "nbt": np.array(0, np.int64)}
    agg = jk.Aggregator(x, A.FedAvgM(lr=1.0, momentum=0.5), base=x, partial=True, backend=backend)
    agg.fold({"w": np.full(3, 2, np.float32), "nbt": np.array(100, np.int64)}, 1.0, "a")
    assert agg.finalize()["nbt"] == 100
    agg.reset()
    agg.fold({"w": np.full(3, 3, np.float32)}, 1.0, "b")
    assert agg.finalize()["nbt"] == 100


def test_adaptive_clipping_moves_the_norm_toward_the_target_quantile():
    rng = np.random.default_rng(14)
    base = _model(rng)
    alg = A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=4, initial_clip_norm=0.5, count_stddev=0.0,
                               clip_norm_lr=0.2, target_quantile=0.5)
    agg = jk.Aggregator(base, alg, base=base)
    norms = []
    for r in range(3):
        for j, u in enumerate(_updates(rng, base, 4, scale=1.0)):  # norms ~ 20: all clipped
            agg.fold(u, party=j)
        agg.finalize()
        norms.append(agg.state.scalars["clip_norm"])
        agg.reset()
    # unclipped fraction 0 < 0.5: C grows by exp(0.2 * 0.5) per round (Andrew et al.)
    np.testing.assert_allclose(norms, 0.5 * np.exp(0.1 * np.arange(1, 4)), rtol=1e-12)


def test_adaptive_clipping_noise_uses_the_norm_it_clipped_to():
    m, C0 = 40, 2.0
    alg = A.DPAdaptiveClipping(noise_multiplier=1.0, num_sampled=m, initial_clip_norm=C0, seed=3)
    base = {"w": np.zeros(50_000, np.float32)}
    agg = jk.Aggregator(base, alg, base=base, acc_dtype="float64")
    for j in range(m):  # zero deltas: the output is the noise alone
        agg.fold({"w": np.zeros(50_000, np.float32)}, party=j)
    sigma_delta = (1.0 ** -2 - (2 * m / 20) ** -2) ** -0.5
    z = agg.finalize()["w"] / (sigma_delta * C0 / m)
    assert abs(z.std() - 1) < 0.02  # (six standard errors; the next round's norm is 10% off C0)
    assert abs(agg.state.scalars["clip_norm"] / C0 - 1) > 0.05  # updated after, for the next round
    with pytest.raises(ValueError, match="count_stddev"):
        A.DPAdaptiveClipping(noise_multiplier=1.0, num_sampled=10)  # m/20 = 0.5 is too little count noise


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scaffold_moves_model_and_control_variate_in_one_fold(backend):
    """Karimireddy et al. 2020, Alg. 1, with partial participation: |S| = 4 of N = 10 parties report, each with its
    own control variate c_i (not the server's c); c moves by (1/N) sum_S (c_i^+ - c_i) and stays the mean of all N
    parties' c_i (folding c_i^+ against c instead moved it by (1/N) sum_S (c_i^+ - c))."""
    rng = np.random.default_rng(15)
    x = _model(rng)
    N, S, lr = 10, [1, 4, 6, 9], 0.5
    c_old = [_model(rng) for _ in range(N)]  # the parties' control variates; the server's is their mean
    c = {k: np.mean([ci[k] for ci in c_old], axis=0, dtype=np.float64).astype(np.float32) for k in x}
    c_new = {i: _updates(rng, c_old[i], 1, scale=0.3)[0] for i in S}
    y = {i: _updates(rng, x, 1)[0] for i in S}
    sent = {i: A.SCAFFOLD.party_control(c, c_new[i], c_old[i]) for i in S}
    for i in S:
        for k in x:
            assert sent[i][k].dtype == np.float32 and np.array_equal(sent[i][k], c[k] + (c_new[i][k] - c_old[i][k]))
    base = {"model": x, "control": c}
    agg = jk.Aggregator(base, A.SCAFFOLD(num_parties=N, server_lr=lr), backend=backend, base=base,
                        acc_dtype="float64")
    for i in S:
        agg.fold({"model": y[i], "control": sent[i]}, weight=7.0 * (i + 1), party=i)  # unweighted: the paper's 1/|S|
    got = agg.finalize()
    for k in x:
        dx = sum(y[i][k] - x[k].astype(np.float64) for i in S) / len(S)
        np.testing.assert_allclose(got["model"][k], (x[k] + lr * dx).astype(np.float32), rtol=1e-6, atol=1e-7)
        # (float32 rounding: c's, and each party's c + (c_i^+ - c_i), ~0.5 ulp of |c| ~ 1)
        paper = c[k] + sum(c_new[i][k].astype(np.float64) - c_old[i][k] for i in S) / N
        np.testing.assert_allclose(got["control"][k], paper, rtol=0, atol=1e-6)
        mean_of_parties = np.mean([(c_new[i] if i in S else c_old[i])[k] for i in range(N)], axis=0, dtype=np.float64)
        np.testing.assert_allclose(got["control"][k], mean_of_parties, rtol=0, atol=1e-6)


def test_scaffold_takes_one_array_trees_and_refuses_trees_of_other_leaves():
    """{"model": array, "control": array} names its leaves "model" and "control" (no dot): it folds and finalizes
    (finalize refused it). Model and control trees whose leaves differ (names, shapes, dtypes) are refused when the
    aggregator is made, naming the leaf (they were folded, and only a missing prefix failed at finalize)."""
    x = {"model": np.zeros(3), "control": np.full(3, 2.0)}
    agg = jk.Aggregator(x, A.SCAFFOLD(num_parties=4), base=x)
    for j in range(3):
        agg.fold({"model": np.ones(3), "control": np.full(3, 3.0)}, party=j)
    got = agg.finalize()
    np.testing.assert_array_equal(got["model"], np.ones(3))
    np.testing.assert_array_equal(got["control"], np.full(3, 2.0 + 3 / 4 * 1.0))
    z = np.zeros(3, np.float32)
    bad = [({"model": {"w": z}, "control": {"v": z}}, r"model.w: float32 \(3,\); control.w: missing"),
           ({"model": [z], "control": [z[:2]]}, r"model.0: float32 \(3,\); control.0: float32 \(2,\)"),
           ({"model": z, "control": z.astype(np.float64)}, "model: float32 .*control: float64"),
           ({"model": z}, r"keys \['model'\]"),
           ([z, z], "got a list"),
           ({"model": z, "control": z, "extra": z}, "keys")]
    for tmpl, match in bad:
        with pytest.raises(ValueError, match=match):
            A.SCAFFOLD(num_parties=4).check_layout(Layout.from_template(tmpl))
        with pytest.raises(ValueError, match=match):  # when the aggregator is made, before any fold
            jk.Aggregator(tmpl, A.SCAFFOLD(num_parties=4), base=tmpl)
    A.SCAFFOLD(num_parties=4).check_layout(Layout.from_template({"control": {"a": z, "b": [z]},
                                                                 "model": {"b": [z], "a": z}}))  # any order


def test_fednova_and_scaffold_refuse_partial_updates():
    """Both scale the aggregate by a sum over every party folded (FedNova's tau_eff, SCAFFOLD's |S| / N), not over a
    leaf's carriers: with partial updates a leaf only some parties sent came out wrong (FedNova: 50.5 where each
    carrier moved it by 1; SCAFFOLD: a control leaf moved 3x the paper's). They are refused when made."""
    x = {"model": {"a": np.zeros(3), "b": np.zeros(3)}, "control": {"a": np.zeros(3), "b": np.zeros(3)}}
    for alg in (A.FedNova(), A.SCAFFOLD(num_parties=4),
                A.DPFixedClipping(A.FedNova(), clip_norm=1.0, noise_multiplier=0.0)):
        with pytest.raises(ValueError, match="partial=False"):
            jk.Aggregator(x, alg, base=x, partial=True)
        agg = jk.Aggregator(x, alg, base=x)
        with pytest.raises(ValueError, match="partial=False"):
            jk.Aggregator.from_state(agg.state, partial=True)


def test_dp_noise_scales_with_the_inner_step_and_integer_leaves_average_plainly():
    """DP noise goes on the average delta before the inner algorithm scales it (FedBuff's server_lr used to leave
    the noise at sigma C / m while one party moved the model by lr C / m); integer leaves take the plain weighted
    mean, not divided by the algorithm's scale (counters came out lr times too large)."""
    import jitkernels as jk

    n = 200_000
    t = {"w": np.zeros(n, np.float32)}
    for lr in (0.5, 4.0):
        alg = jk.algorithms.DPFixedClipping(jk.algorithms.FedBuff(server_lr=lr), clip_norm=1.0,
                                            noise_multiplier=1.0, num_sampled=1, seed=3)
        agg = jk.Aggregator(t, alg, base=t)
        agg.fold({"w": np.zeros(n, np.float32)}, 1.0, "p", staleness=0)
        assert np.std(agg.finalize()["w"]) == pytest.approx(lr * 1.0, rel=0.02)
    ints = {"f": np.zeros(2, np.float32), "nbt": np.zeros((), np.int64)}
    agg = jk.Aggregator(ints, jk.algorithms.FedBuff(server_lr=2.0), base=ints)
    for j, c in enumerate((100, 110, 120)):
        agg.fold({"f": np.ones(2, np.float32), "nbt": np.array(c, np.int64)}, 1.0, f"p{j}", staleness=0)
    assert int(agg.finalize()["nbt"]) == 110
    with pytest.raises(ValueError, match="count_stddev"):
        jk.algorithms.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=10, count_stddev=float("nan"))


@pytest.mark.parametrize("backend", ["numpy", "cpp"])  # numba runs no float16
def test_float16_model_overflow_is_refused_naming_the_leaf(backend):
    """A server step that takes a float16 model past 65504 is refused by name, not handed on as inf (the next
    round's deltas would be NaN). The step has been applied: the round is closed and the new model is in the
    state's base, in the accumulator dtype."""
    base = {"w": np.array([65000, 1, 2, 3], np.float16), "b": np.zeros(3, np.float16)}
    agg = jk.Aggregator(base, A.FedAdam(lr=1000.0), base=base, backend=backend)
    agg.fold({"w": np.array([65504, 1, 2, 3], np.float16), "b": np.ones(3, np.float16)}, weight=1.0, party=1)
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'w'.*65504.*state.base"):
        agg.finalize()
    st_ = agg.state
    assert st_.closed and st_.round == 1
    w = st_.base[:4]
    assert np.isfinite(w).all() and w[0] > 65504
    for out in ({"w": np.zeros(4, np.float16), "b": np.zeros(3, np.float16)}, None):
        with pytest.raises(jk.ValueOutOfRange, match="leaf 'w'"):
            agg.finalize(out=out)  # the closed round answers the same, whatever out held
    ok = jk.Aggregator(base, A.FedAdam(lr=0.1), base=base, backend=backend)
    ok.fold({"w": np.array([65504, 1, 2, 3], np.float16), "b": np.ones(3, np.float16)}, weight=1.0, party=1)
    first = ok.finalize()
    assert np.isfinite(first["w"]).all()
    stale = {"w": np.full(4, np.inf, np.float16), "b": np.full(3, np.inf, np.float16)}
    again = ok.finalize(out=stale)  # checked as written, not as the buffer held it before
    assert again["w"].tobytes() == first["w"].tobytes()


@pytest.mark.parametrize("make", [
    lambda **k: A.DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, num_sampled=3, **k),
    lambda **k: A.DPAdaptiveClipping(noise_multiplier=0.5, num_sampled=3, **k)], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("kw, what", [({"seed": -1}, "seed must be in"), ({"seed": 2 ** 64}, "seed must be in"),
                                      ({"seed": 1.9}, "seed must be an integer")])
def test_dp_seeds_are_checked_when_the_algorithm_is_made(make, kw, what):
    with pytest.raises((ValueError, TypeError), match=what):
        make(**kw)


@pytest.mark.parametrize("make, name, required", [
    (lambda x: A.DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, num_sampled=x), "num_sampled", False),
    (lambda x: A.DPAdaptiveClipping(noise_multiplier=0.1, num_sampled=x), "num_sampled", True),
    (lambda x: A.SCAFFOLD(num_parties=x), "num_parties", True)])
def test_counts_are_integers_not_truncated(make, name, required):
    """2.7 was truncated to 2 (the noise's std off by 35%); None, NaN and inf failed without naming the parameter."""
    for bad in (2.7, float("nan"), float("inf"), True, 0, -3, "3") + ((None,) if required else ()):
        with pytest.raises(ValueError, match=name):
            make(bad)
    assert getattr(make(3.0), name) == 3 and getattr(make(np.int64(4)), name) == 4


def test_one_dp_instance_noises_each_aggregate_by_what_it_holds():
    """A fresh Aggregator per round with one DP instance starts its round counter at 0 each time: the same aggregate
    gets the same release (nothing new), another aggregate other noise (test_aggregator's
    test_dp_noise_is_keyed_by_the_aggregate_it_noises), and one Aggregator across rounds (reset) new noise each
    round."""
    x = {"w": np.zeros(64, np.float32)}
    dp = A.DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, num_sampled=2, seed=5)
    first = jk.Aggregator(x, dp, base=x)
    first.fold({"w": np.full(64, 0.1, np.float32)}, party="a")
    out0 = first.finalize()["w"].copy()
    second = jk.Aggregator(x, dp, base=x)
    second.fold({"w": np.full(64, 0.1, np.float32)}, party="a")
    assert second.finalize()["w"].tobytes() == out0.tobytes()
    first.reset()
    first.fold({"w": np.full(64, 0.1, np.float32)}, party="a")
    assert not np.array_equal(first.finalize()["w"], out0)  # round 1: other noise


@given(seed=st.integers(0, 2**64 - 1), rnd=st.integers(0, 2**32 - 1), n=st.integers(1, 64), bit=st.integers(0, 63),
       at=st.integers(0, 63), split=st.integers(0, 64))
def test_aggregate_key_is_a_function_of_every_bit(seed, rnd, n, bit, at, split):
    """The same seed, round and bytes give the same key; another seed, round, any one bit flipped, or the same bytes
    split into other arrays give another (two aggregates must not share noise)."""
    from jitkernels.noise import aggregate_key

    x = np.random.default_rng(seed % 2**32).standard_normal(n)
    key = aggregate_key(seed, rnd, [x])
    assert aggregate_key(seed, rnd, [x.copy()]) == key
    flipped = x.copy()
    flipped.view(np.uint64)[at % n] ^= np.uint64(1) << np.uint64(bit)
    split = split % (n + 1)
    others = {aggregate_key(seed ^ 1, rnd, [x]), aggregate_key(seed, rnd ^ 1, [x]), aggregate_key(seed, rnd, [flipped])}
    if 0 < split < n:
        others.add(aggregate_key(seed, rnd, [x[:split], x[split:]]))
    assert key not in others


def test_aggregate_key_does_not_depend_on_the_threads(monkeypatch):
    """Past _KEY_PARALLEL bytes the chunks are hashed on the kernel threads: the same key on one thread."""
    from jitkernels import noise

    x = np.arange(noise._KEY_PARALLEL // 8 + 12345, dtype=np.float64)
    old = jk.set_num_threads(2)
    try:
        key = noise.aggregate_key(7, 3, [x, x[:5]])
        jk.set_num_threads(1)
        assert noise.aggregate_key(7, 3, [x, x[:5]]) == key
    finally:
        jk.set_num_threads(old)


def test_adaptive_clipping_keys_its_count_noise_by_the_count():
    """The noised count of unclipped updates sets the next clip norm. Keyed by (seed, round), two aggregates of one
    instance got the same z: the difference of their next clip norms (in log space) gave the difference of their
    counts exactly. Keyed by the count, rounds with other counts draw other noise, and the same count the same (the
    same clip norm released again)."""
    x = {"w": np.zeros(4)}
    dp = A.DPAdaptiveClipping(noise_multiplier=0.5, num_sampled=4, initial_clip_norm=1.0, clip_norm_lr=0.2,
                              count_stddev=1.0, seed=9)

    def next_log_clip(norms):
        agg = jk.Aggregator(x, dp, base=x)
        for j, v in enumerate(norms):
            agg.fold({"w": np.full(4, v / 2)}, party=j)  # (norm v: 4 elements of v / 2)
        agg.finalize()
        return math.log(agg.state.scalars["clip_norm"])

    small, large = next_log_clip([0.5, 0.5, 0.5, 0.5]), next_log_clip([0.5, 0.5, 3.0, 3.0])  # 4 and 2 unclipped
    assert not math.isclose(small - large, -0.2 * (4 - 2) / 4, rel_tol=0, abs_tol=1e-12)
    assert next_log_clip([0.5, 0.5, 0.5, 0.5]) == small == next_log_clip([0.5, 0.25, 0.5, 0.5])



def test_adaptive_clipping_survives_a_count_noise_far_above_the_sample_and_closes_its_round_once():
    """A count noise far above num_sampled overflowed exp() after the noise and the step were applied, and left the
    round open: a second finalize noised and stepped again. The clip norm is now updated in log space, within
    float64's normal range."""
    x = {"w": np.zeros(4, np.float32)}
    dp = A.DPAdaptiveClipping(A.FedAvgM(lr=1.0, momentum=0.5), noise_multiplier=0.0, num_sampled=1,
                              count_stddev=1e6, seed=2)
    agg = jk.Aggregator(x, dp, base=x)
    agg.fold({"w": np.full(4, 0.05, np.float32)}, party="a")
    out = agg.finalize()["w"].copy()
    st_ = agg.state
    assert st_.closed and st_.round == 1 and 1e-300 <= st_.scalars["clip_norm"] <= 1e300
    np.testing.assert_array_equal(agg.finalize()["w"], out)  # the closed round answers the same


def test_weighted_must_be_a_bool():
    """A state file's {"weighted": "no"} (or a caller's) made a weighted mean: "no" is truthy."""
    with pytest.raises(TypeError, match="weighted must be True or False, got 'no'"):
        A.FedAvg(weighted="no")
    assert A.FedAvg(weighted=np.bool_(False)).weighted is False


# --- contracts a mutation review found untested (2026-11-28); each test kills its mutant ----------------------------
def test_reddi_adam_starts_its_second_moment_at_tau_squared():
    """Reddi et al.'s v_{-1} = tau^2: the first step is lr * m / (sqrt(v) + tau) with v = b2 tau^2 + (1 - b2) d^2."""
    lr, tau, b1, b2 = 0.1, 0.1, 0.9, 0.99
    assert A.FedAdam(tau=tau).v0() == pytest.approx(tau * tau)
    d = np.array([1e-2, -2e-2, 0.5])
    x = {"w": np.zeros(3, np.float32)}
    agg = jk.Aggregator(x, A.FedAdam(lr=lr, tau=tau, beta1=b1, beta2=b2), base=x, acc_dtype="float64")
    agg.fold({"w": d.astype(np.float32)}, party=0)
    m, v = (1 - b1) * d.astype(np.float32), b2 * tau * tau + (1 - b2) * d.astype(np.float32) ** 2
    np.testing.assert_allclose(agg.finalize()["w"], lr * m / (np.sqrt(v) + tau), rtol=1e-5)


def test_adaptive_clipping_follows_the_papers_count_update():
    """b~ = (sum_j [||d_j|| <= C] + N(0, sigma_b^2)) / m with m = num_sampled (not the parties folded), the count's
    noise keyed by (its key, round, COUNT_LEAF, 0), the key the count's with what makes it the next norm
    (DPAdaptiveClipping.close), and an update whose norm equals C counted as unclipped."""
    from jitkernels import noise

    base = {"w": np.zeros(4, np.float32)}
    alg = A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=4, initial_clip_norm=1.0, count_stddev=0.5,
                               clip_norm_lr=0.2, target_quantile=0.5, seed=7)
    agg = jk.Aggregator(base, alg, base=base)
    for j, v in enumerate((0.1, 0.2)):  # 2 of the 4 sampled report, both unclipped
        agg.fold({"w": np.array([v, 0, 0, 0], np.float32)}, party=j)
    agg.finalize()
    key = noise.aggregate_key(7, 0, [np.array([2.0, 0.5, 4, 1.0, 0.2, 0.5])])
    z = noise.gaussian(key, 0, A.COUNT_LEAF, 0, 1)[0]
    assert agg.state.scalars["clip_norm"] == pytest.approx(math.exp(-0.2 * ((2 + 0.5 * z) / 4 - 0.5)), rel=1e-12)
    alg = A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=2, initial_clip_norm=0.5, count_stddev=0.0,
                               clip_norm_lr=0.2, target_quantile=0.5)
    agg = jk.Aggregator(base, alg, base=base)
    agg.fold({"w": np.array([0.5, 0, 0, 0], np.float32)}, party=0)  # its norm is C exactly
    agg.fold({"w": np.array([0.3, 0, 0, 0], np.float32)}, party=1)
    agg.finalize()
    assert agg.state.scalars["clip_norm"] == pytest.approx(0.5 * math.exp(-0.2 * (1.0 - 0.5)), rel=1e-12)


@pytest.mark.parametrize("how", ["fold", "fold_many", "admit", "merge"])
def test_scaffold_refuses_more_parties_than_the_federation_has(how):
    """|S| <= N (with N = 2 and four parties each sending a control change of 1, c moved by 2, twice the mean): a
    party past num_parties is refused on arrival, the state as it was (it was refused at finalize, when the round
    could no longer be finished without losing it all); the N parties' round finalizes."""
    x = {"model": np.zeros(3), "control": np.full(3, 2.0)}
    u = {"model": np.ones(3), "control": np.full(3, 3.0)}
    agg = jk.Aggregator(x, A.SCAFFOLD(num_parties=2), base=x)
    agg.fold_many([u, u], parties=[0, 1])
    before = agg.state.copy()
    other = jk.Aggregator(x, A.SCAFFOLD(num_parties=2), base=x)
    other.fold(u, party=2)
    with pytest.raises(jk.ValueOutOfRange, match="2 parties in all"):
        {"fold": lambda: agg.fold(u, party=2), "fold_many": lambda: agg.fold_many([u], parties=[2]),
         "admit": lambda: agg.admit(u, party=2), "merge": lambda: agg.merge(other)}[how]()
    assert agg.state.same_bits(before)
    np.testing.assert_allclose(agg.finalize()["control"], np.full(3, 3.0))


def test_hyperparameters_at_their_bounds():
    """A beta of 1 divides by zero in Flower's bias correction, a server learning rate of 0 in FedBuff's finalize:
    refused when made; FedProx's mu = 0 (plain FedAvg on the server) is valid."""
    for make in (lambda: A.FedAdam(beta1=1.0, variant="flower"), lambda: A.FedAvgM(momentum=1.0),
                 lambda: A.FedBuff(server_lr=0.0)):
        with pytest.raises(ValueError):
            make()
    assert A.FedProx(mu=0.0).mu == 0.0


def test_admission_by_the_aggregator_checks_the_weight_its_fold_multiplies_by():
    """agg.admit() checked weight * max|x| against the headroom, not the algorithm's fold weight: an unweighted
    FedBuff update of 6e32 at sample weight 1/3 was admitted, then refused by every fold (the fused batch path
    refused it at once: two verdicts for one update)."""
    t = {"z": np.zeros(3, np.float32)}
    u = {"z": np.full(3, 6e32, np.float32)}
    for be in CPU_BACKENDS:
        agg = jk.Aggregator(t, A.FedBuff(staleness="constant"), base=t, backend=be)
        with pytest.raises(jk.ValueOutOfRange, match="fold weight 1"):
            agg.admit(u, weight=1 / 3, party="p", staleness=0)
        with pytest.raises(jk.ValueOutOfRange):
            agg.fold(u, weight=1 / 3, party="p", staleness=0)
        assert agg.count == 0


def _scaffold_template(x):
    return {"model": x, "control": np.zeros_like(x)}


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
@pytest.mark.parametrize("name", ["fednova", "fedbuff", "scaffold", "normbounding", "fedavg"])
def test_a_plain_reset_after_finalize_starts_the_next_round_from_the_released_model(name, backend):
    """README's loop is ``model = agg.finalize(); agg.reset()``. A rule whose model steps from its base (FedNova,
    FedBuff with a base, SCAFFOLD, norm bounding) kept round 0's base there, so every later round was measured from
    a stale model (FedNova 7%, FedBuff 8%, SCAFFOLD 64% off Algorithm 1 after a few rounds). It now carries the
    model finalize released, as reset(base=model) does, through a save and load too (FedAvg's model does not
    depend on its base: the same within rounding); a round not finalized keeps its base."""
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=32)
    make = {"fednova": A.FedNova, "fedbuff": lambda: A.FedBuff(server_lr=0.5), "fedavg": A.FedAvg,
            "scaffold": lambda: A.SCAFFOLD(num_parties=5, server_lr=0.7),
            "normbounding": lambda: R.NormBounding(max_norm=0.3)}[name]
    tmpl = _scaffold_template if name == "scaffold" else (lambda x: x)
    info = {"fednova": lambda j: {"steps": j + 1}, "fedbuff": lambda j: {"staleness": j}}.get(name, lambda j: {})

    def run(plain: bool, save: bool) -> np.ndarray:
        draws = np.random.default_rng(9)
        agg = jk.Aggregator(tmpl(x0), make(), base=tmpl(x0), acc_dtype="float64", backend=backend)
        x = x0  # the model the parties got
        for r in range(3):
            for j in range(3):
                agg.fold(tmpl(x + draws.normal(size=32) * 0.1 * (j + 1)), weight=10.0 * (j + 1), party=j, **info(j))
            out = agg.finalize()
            x = out["model"] if name == "scaffold" else out
            if save:
                agg = jk.Aggregator.from_state(jk.FoldState.from_bytes(agg.state.to_bytes()), backend=backend)
            agg.reset() if plain else agg.reset(base=out)
        return x

    expected = run(False, False)
    for save in (False, True):
        if name == "fedavg":
            np.testing.assert_allclose(run(True, save), expected, rtol=1e-12, atol=1e-12)
        else:
            assert np.array_equal(run(True, save), expected)
    agg = jk.Aggregator(tmpl(x0), make(), base=tmpl(x0), acc_dtype="float64", backend=backend)
    agg.fold(tmpl(x0 + 1.0), weight=1.0, party=0, **info(0))
    agg.reset()  # not finalized: the round's base stays
    assert np.array_equal(agg.state.base[:32], x0)


def test_adaptive_clipping_without_noise_adds_no_count_noise_by_default():
    """With noise_multiplier=0 the clipped count's std defaulted to m/20 all the same (Flower's default is 0 there):
    a run with the noise off moved C by a seeded random amount (0.1105-0.1126 for the noiseless 0.110517)."""
    alg = A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=20, initial_clip_norm=0.1, target_quantile=0.5)
    assert alg.count_stddev == 0.0 and A.DPAdaptiveClipping(noise_multiplier=1.0, num_sampled=40).count_stddev == 2.0
    base = {"w": np.zeros(4, np.float32)}
    clips = set()
    for seed in (1, 2, 3):
        agg = jk.Aggregator(base, A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=20, initial_clip_norm=0.1,
                                                       seed=seed), base=base)
        for j in range(20):
            agg.fold({"w": np.array([0.05 if j < 10 else 0.5, 0, 0, 0], np.float32)}, party=j)
        agg.finalize()
        clips.add(agg.state.scalars["clip_norm"])
    assert len(clips) == 1 and clips.pop() == pytest.approx(0.1, rel=1e-12)  # half unclipped: the target


@pytest.mark.parametrize("reuse", [False, True])
def test_a_state_torn_after_a_finalize_says_how_to_reset(reuse, monkeypatch):
    """After a finalize, a plain reset() of a rule that steps from its base carries the released model, which a
    torn state cannot give again: it refused with the torn fold's TornState alone, and keeping the old base instead
    started the next round from a model no party had. It now says to pass the model as the base, which resets it;
    and the state reset() returns is no longer guarded by the aggregator's lock (from_state takes it over)."""
    from jitkernels import backends

    tmpl = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float64)}
    base = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float64)}
    agg = jk.Aggregator(tmpl, A.FedNova(), backend="numpy", base=base)
    agg.fold({"a": np.full(3, 2.0, np.float32), "b": np.full(3, 2.0)}, party="p", steps=2)
    released = agg.finalize()
    mod, calls = backends.get("numpy"), []
    real = mod.fold

    def fold(acc, b, g):  # the second dtype group fails: the first is written
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("injected")
        return real(acc, b, g)
    monkeypatch.setattr(mod, "fold", fold)
    with pytest.raises(MemoryError):
        agg.fold_many([{"a": np.full(3, 3.0, np.float32), "b": np.full(3, 3.0)}], parties=["q"], infos=[{"steps": 1}])
    monkeypatch.setattr(mod, "fold", real)
    assert agg.state.torn is not None
    with pytest.raises(jk.TornState, match=r"reset\(base=<that model>\)"):
        agg.reset(reuse=reuse)
    old = agg.reset(released, reuse=reuse)
    assert np.array_equal(agg.state.base, np.full(6, 2.0)) and agg.state.torn is None
    if not reuse:
        assert not old.held and jk.Aggregator.from_state(old).state is old


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("magnitude", [1e154, 1e300, 1e-170, 1e-300])
def test_norms_of_float64_updates_past_the_squares_range_are_measured_scaled(backend, magnitude):
    """The stats kernels sum squares in float64: past |x| ~ 1.3e154 the norm was inf (a clipping rule then folded the
    update at C / inf = 0, refused as "fold weight 0"), below ~1e-162 it was 0. Such updates are measured again,
    scaled by their max |x|, on every path that measures norms: admission with and without the state's base, and
    the delta norms of an update admitted elsewhere."""
    z = {"w": np.zeros(4), "b": np.zeros(3)}
    base = {"w": np.full(4, -magnitude / 2), "b": np.zeros(3)}
    u = {"w": np.full(4, magnitude / 2), "b": np.full(3, magnitude / 2)}
    want_delta = magnitude * math.sqrt(4 + 3 / 4)  # ||u - base||
    plain = jk.admit(u, jk.Layout.from_template(z), backend=backend)
    assert plain.norm == pytest.approx(magnitude / 2 * math.sqrt(7), rel=1e-12, abs=0)
    for clipping in (lambda: A.DPFixedClipping(A.FedAvg(), clip_norm=1.0, noise_multiplier=0.0),
                     lambda: R.NormBounding(max_norm=1.0)):
        for fold in ("raw", "admitted elsewhere"):
            agg = jk.Aggregator(z, clipping(), backend=backend, base=base)
            agg.fold(u, party="p") if fold == "raw" else agg.fold(jk.admit(u, agg.layout, backend=backend, party="p"))
            got = agg.finalize("delta")
            assert got["w"] == pytest.approx(np.full(4, min(1.0, 1.0 / want_delta) * magnitude), rel=1e-12, abs=0)


@pytest.mark.parametrize("make, name", [
    (lambda x: A.FedProx(mu=x), "mu"), (lambda x: A.FedBuff(a=x), "a"), (lambda x: A.FedBuff(server_lr=x), "server_lr"),
    (lambda x: A.SCAFFOLD(num_parties=3, server_lr=x), "server_lr"), (lambda x: A.FedAdam(lr=x), "lr"),
    (lambda x: A.DPFixedClipping(clip_norm=x, noise_multiplier=1.0), "clip_norm"),
    (lambda x: A.DPFixedClipping(clip_norm=1.0, noise_multiplier=x), "noise_multiplier"),
    (lambda x: A.DPAdaptiveClipping(noise_multiplier=0.1, num_sampled=10, target_quantile=x), "target_quantile"),
    (lambda x: A.DPAdaptiveClipping(noise_multiplier=0.1, num_sampled=10, count_stddev=x), "count_stddev"),
    (lambda x: R.FedTrimmedAvg(beta=x), "beta"), (lambda x: R.GeometricMedian(eps=x), "eps"),
    (lambda x: R.CenteredClipping(tau=x), "tau"), (lambda x: R.NormBounding(max_norm=x), "max_norm")])
def test_numeric_hyperparameters_are_numbers_named_when_not(make, name):
    """True was taken as 1 and "3" as 3 by several constructors; None and "0.1" raised inside math.isfinite, naming
    no parameter. Each is ValueError naming it."""
    for bad in (True, "3") + (() if name == "count_stddev" else (None,)):  # (count_stddev=None: its default)
        with pytest.raises(ValueError, match=f"{name} must be a number"):
            make(bad)


def test_dp_noise_keys_the_divisor_too():
    """The key hashed the sums and the parties' masses, not the divisor: FedNova's effective steps (the parties'
    step counts, never noised) divided two aggregates with equal sums differently under one noise draw, and the
    ratio of the two released deltas gave the ratio of their divisors exactly (found in review)."""
    n = 1000
    rng = np.random.default_rng(3)
    b = {"w": np.zeros(n)}
    d, e = 0.001 * rng.standard_normal(n), 0.001 * rng.standard_normal(n)

    def release(steps, delta):
        agg = jk.Aggregator(b, A.DPFixedClipping(A.FedNova(weighted=False), clip_norm=1.0, noise_multiplier=1.0,
                                                 seed=11), base=b, acc_dtype="float64")
        agg.fold({"w": delta}, party=0, steps=steps)  # (steps 2 and 2d: the same sum of d / steps)
        agg.fold({"w": e}, party=1, steps=1)
        return agg.finalize()["w"]
    ratio = release(2, 2 * d) / release(1, d)
    assert ratio.max() - ratio.min() > 0.1  # (one draw: exactly 1.5 everywhere)
