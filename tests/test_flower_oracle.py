"""Oracle tests against Flower's own strategies (flwr, installed with the test extra): identical inputs over several
rounds into Flower's ``aggregate_fit`` and into ours (``variant="flower"`` where Flower's math differs from the
papers').

Inputs keep every delta far above float32 rounding (|delta| >> eps * |x|): Flower forms the average of the models and
then subtracts the global model, which turns rounding noise into steps; we fold ``u - x`` directly. The two agree to
a tolerance derived from float32's eps, the rounds and how much a step amplifies a delta's error (:func:`atol`).
Where Flower's result is wrong, the test checks that ours is right.
"""

import numpy as np
import pytest

import jitkernels as jk
from jitkernels import algorithms as A

flwr = pytest.importorskip("flwr", reason="Flower (flwr) is a test dependency: pip install -e '.[test]'")
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import strategy as fl  # noqa: E402

ROUNDS, K = 4, 5


def _fit_res(arrays, n):
    return None, FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                        num_examples=int(n), metrics={})


def _model(rng):
    return [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal(30).astype(np.float32),
            rng.standard_normal((3, 3, 4)).astype(np.float32)]


def _run_both(ours, theirs, *, seed=0, scale=0.05):
    """ROUNDS rounds of K parties (each round's updates drawn around the current global model of Flower's run) into
    both; returns the per-round models of each."""
    rng = np.random.default_rng(seed)
    x0 = _model(rng)
    strat = theirs(ndarrays_to_parameters(x0))
    agg = jk.Aggregator(x0, ours, base=x0)
    glob = x0
    got, want = [], []
    for r in range(1, ROUNDS + 1):
        ups = [[(a + scale * rng.standard_normal(a.shape)).astype(np.float32) for a in glob] for _ in range(K)]
        ns = rng.integers(10, 500, K)
        params, _ = strat.aggregate_fit(r, [_fit_res(u, n) for u, n in zip(ups, ns)], [])
        want.append(parameters_to_ndarrays(params))
        for j, (u, n) in enumerate(zip(ups, ns)):
            agg.fold(u, weight=float(n), party=j)
        got.append(agg.finalize())
        agg.reset()
        glob = [a.astype(np.float32) for a in want[-1]]
    return got, want


def momentum_gain(lr=1.0, momentum=0.0, rounds=ROUNDS) -> float:
    """How far an error in one round's average delta can move the model by the last round, summed over the rounds'
    errors: round t's delta enters the steps of rounds t, t+1, ... with weights lr * momentum^s (FedAvg: lr 1,
    momentum 0, one step per error)."""
    return lr * sum(momentum ** s for t in range(1, rounds + 1) for s in range(t))


def adaptive_gain(lr, tau, rounds=ROUNDS) -> float:
    """The same for FedAdam, FedYogi, FedAdagrad: their step lr_t m / (sqrt(v) + tau) moves by at most lr / tau per
    unit of delta (where |delta| ~ tau; far less where |delta| >> tau), in each round (lr_t <= lr here)."""
    return rounds * lr / tau


def atol(want, gain) -> float:
    """Flower rounds its float32 average of the models and the difference to x: each round's delta is off by up to
    2 eps |x|; the folded u - x is not. Each output is rounded to float32 (eps |x| / 2 on each side). Over the rounds
    of ``want`` (lists of arrays), |x| <= their max: eps max|x| (1 + 2 gain)."""
    xmax = max(float(np.abs(w).max()) for w_round in want for w in w_round)
    return float(np.finfo(np.float32).eps) * xmax * (1 + 2 * gain)


def _close(got, want, gain):
    tol = atol(want, gain)
    for g_round, w_round in zip(got, want):
        for g, w in zip(g_round, w_round):
            np.testing.assert_allclose(g, w.astype(np.float32), rtol=0, atol=tol)


def test_fedavg_matches_flower():
    got, want = _run_both(A.FedAvg(), lambda p: fl.FedAvg(initial_parameters=p))
    _close(got, want, momentum_gain())  # 9 eps |x|: 4.3e-6 here (measured 4.8e-7, seeds 0-4)


def test_fedavgm_matches_flower():
    got, want = _run_both(A.FedAvgM(lr=0.8, momentum=0.9),
                          lambda p: fl.FedAvgM(initial_parameters=p, server_learning_rate=0.8, server_momentum=0.9))
    _close(got, want, momentum_gain(0.8, 0.9))  # 15.5 eps |x|: 7.2e-6 (it was 1.6e-3; measured 7.2e-7, seeds 0-4)


def test_fedadam_matches_flower_in_flower_variant():
    got, want = _run_both(A.FedAdam(lr=0.01, tau=1e-3, variant="flower"),
                          lambda p: fl.FedAdam(initial_parameters=p, eta=0.01, tau=1e-3))
    _close(got, want, adaptive_gain(0.01, 1e-3))
    assert want[0][0].dtype == np.float64  # Flower's eta_norm (np.float64) promotes its model under NEP 50


def test_fedadam_reddi_variant_differs_from_flower_by_the_bias_correction():
    got, want = _run_both(A.FedAdam(lr=0.01, tau=1e-3, variant="reddi"),
                          lambda p: fl.FedAdam(initial_parameters=p, eta=0.01, tau=1e-3))
    assert np.abs(got[0][0] - want[0][0]).max() > 1e-3  # Flower's first step is ~sqrt(1-.99^2)/(1-.9^2) = 0.74x


def test_fedyogi_matches_flower_in_flower_variant():
    got, want = _run_both(A.FedYogi(lr=0.01, variant="flower"), lambda p: fl.FedYogi(initial_parameters=p, eta=0.01))
    _close(got, want, adaptive_gain(0.01, 1e-3))  # (Flower's default tau)


def test_fedadagrad_matches_flower_in_flower_variant():
    got, want = _run_both(A.FedAdagrad(lr=0.01, tau=1e-3, variant="flower"),
                          lambda p: fl.FedAdagrad(initial_parameters=p, eta=0.01, tau=1e-3))
    _close(got, want, adaptive_gain(0.01, 1e-3))


def test_where_flower_is_wrong_ours_is_right():
    """Flower's aggregate_inplace scales integer arrays by np.array(n_j / n, int) = 0 (zeroing BatchNorm's
    num_batches_tracked), and its aggregate() multiplies float16 layers by num_examples in float16 (inf past 65504).
    Ours: the rounded weighted mean of integers; fp16 widened to f32 as it is read."""
    counts = [np.array(100, np.int64), np.array(300, np.int64)]
    halves = [np.full(4, 200.0, np.float16), np.full(4, 300.0, np.float16)]
    ns = [400, 600]
    theirs = fl.FedAvg().aggregate_fit(1, [_fit_res([c, h], n) for c, h, n in zip(counts, halves, ns)], [])[0]
    t_count, t_half = parameters_to_ndarrays(theirs)
    assert t_count == 0
    with np.errstate(over="ignore"):
        legacy = fl.aggregate.aggregate([([h], n) for h, n in zip(halves, ns)])[0]
    assert np.isinf(legacy).all()

    agg = jk.Aggregator([counts[0], halves[0]], "fedavg")
    for j, (c, h, n) in enumerate(zip(counts, halves, ns)):
        agg.fold([c, h], weight=n, party=j)
    count, half = agg.finalize()
    assert count == 220  # (100 * 400 + 300 * 600) / 1000
    np.testing.assert_array_equal(half, np.full(4, 260.0, np.float16))


def test_fedadam_small_steps_are_not_rounding_noise():
    """With |delta| near eps * |x|, Flower's (average - x) is mostly rounding; the folded delta is not."""
    x = [np.full(1000, 1000.0, np.float32)]
    delta = 3e-5  # 0.5 ulp of 1000 in float32 is 3.05e-5
    ups = [[(x[0].astype(np.float64) + delta).astype(np.float32)] for _ in range(4)]
    agg = jk.Aggregator(x, A.FedAvg(), base=x, acc_dtype="float64")
    for j, u in enumerate(ups):
        agg.fold(u, party=j)
    d = agg.finalize(output="delta")[0]
    true = ups[0][0].astype(np.float64) - 1000.0  # what the parties actually sent
    np.testing.assert_allclose(d, true, rtol=1e-6)


def _dp_inputs(rng, k=4, scales=(0.01, 0.1, 0.5, 2.0)):
    x0 = _model(rng)
    ups = [[(a + s * rng.standard_normal(a.shape)).astype(np.float32) for a in x0] for s in scales[:k]]
    ns = rng.integers(10, 500, k)
    return x0, ups, ns


def test_dp_fixed_clipping_matches_flower_without_noise():
    rng = np.random.default_rng(3)
    x0, ups, ns = _dp_inputs(rng)
    theirs = fl.DifferentialPrivacyServerSideFixedClipping(fl.FedAvg(), noise_multiplier=0.0, clipping_norm=2.0,
                                                           num_sampled_clients=4)
    theirs.current_round_params = x0  # what configure_fit records
    want = parameters_to_ndarrays(theirs.aggregate_fit(1, [_fit_res(u, n) for u, n in zip(ups, ns)], [])[0])
    agg = jk.Aggregator(x0, A.DPFixedClipping(A.FedAvg(), clip_norm=2.0, noise_multiplier=0.0), base=x0)
    for j, (u, n) in enumerate(zip(ups, ns)):
        agg.fold(u, weight=float(n), party=j)
    _close([agg.finalize()], [want], momentum_gain(rounds=1))


def test_dp_noise_has_flowers_std():
    """Flower draws from numpy's global generator, we from Philox: compare the noise statistically. (An update equal
    to the global model makes Flower's clipping divide by a zero norm; ours folds it.)"""
    rng = np.random.default_rng(4)
    x0 = [np.zeros(100_000, np.float32)]
    ups = [[1e-7 * rng.standard_normal(100_000).astype(np.float32)] for _ in range(4)]  # the output is the noise
    sigma, C, m = 0.8, 3.0, 4
    zero = fl.DifferentialPrivacyServerSideFixedClipping(fl.FedAvg(), noise_multiplier=sigma, clipping_norm=C,
                                                         num_sampled_clients=m)
    zero.current_round_params = x0
    with pytest.raises(ZeroDivisionError):
        zero.aggregate_fit(1, [_fit_res(x0, 10)], [])
    np.random.seed(0)
    theirs = fl.DifferentialPrivacyServerSideFixedClipping(fl.FedAvg(), noise_multiplier=sigma, clipping_norm=C,
                                                           num_sampled_clients=m)
    theirs.current_round_params = x0
    want = parameters_to_ndarrays(theirs.aggregate_fit(1, [_fit_res(u, 10) for u in ups], [])[0])[0]
    agg = jk.Aggregator(x0, A.DPFixedClipping(clip_norm=C, noise_multiplier=sigma, num_sampled=m), base=x0)
    for j, u in enumerate(ups):
        agg.fold(u, party=j)
    agg.fold(x0, party="unchanged")  # a zero delta is folded (clip factor 1)
    got = agg.finalize()[0]
    n, std = got.size, sigma * C / m
    for sample in (got, want):
        assert abs(sample.std() / std - 1) < 6 / np.sqrt(2 * n)
        assert abs(sample.mean()) < 6 * std / np.sqrt(n)


def test_adaptive_clipping_grows_the_norm_where_flowers_shrinks_it():
    """All updates clipped (norms >> C): the unclipped fraction 0 is below the target 0.5, so Andrew et al.'s rule
    raises C. Flower counts clipped updates in the same rule and lowers it."""
    rng = np.random.default_rng(5)
    x0, ups, ns = _dp_inputs(rng, scales=(1.0, 1.0, 1.0, 1.0))
    theirs = fl.DifferentialPrivacyServerSideAdaptiveClipping(fl.FedAvg(), noise_multiplier=0.0, num_sampled_clients=4,
                                                              initial_clipping_norm=0.5, clipped_count_stddev=0.0)
    theirs.current_round_params = x0
    theirs.aggregate_fit(1, [_fit_res(u, n) for u, n in zip(ups, ns)], [])
    assert theirs.clipping_norm < 0.5
    agg = jk.Aggregator(x0, A.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=4, initial_clip_norm=0.5,
                                                 count_stddev=0.0), base=x0)
    for j, u in enumerate(ups):
        agg.fold(u, party=j)
    agg.finalize()
    assert agg.state.scalars["clip_norm"] > 0.5
