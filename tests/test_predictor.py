"""Arrival prediction: quorum-time quantiles are calibrated, follow drift, and track intermittent parties."""

import itertools
import math
import re
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

from scheduler import Predictor, poisson_binomial_tail
from scheduler import predictor as P


def test_poisson_binomial_tail_exact_and_normal():
    probs = [0.1, 0.5, 0.9, 0.3, 0.7]
    for need in range(0, 7):
        brute = sum(math.prod(p if b else 1 - p for p, b in zip(probs, bits))
                    for bits in itertools.product([0, 1], repeat=5) if sum(bits) >= need)
        assert poisson_binomial_tail(probs, need) == pytest.approx(brute, abs=1e-12)
    big = [0.3] * 2000  # normal approximation past EXACT_MAX (and n * need past EXACT_WORK), continuity-corrected:
    for need in (600, 630):  # within 2e-3 of the exact binomial tail (0.50843, 0.07549; uncorrected 0.5, 0.0716)
        exact = float(sum(math.comb(2000, c) * Fraction(3, 10) ** c * Fraction(7, 10) ** (2000 - c)
                          for c in range(need, 2001)))
        assert poisson_binomial_tail(big, need) == pytest.approx(exact, abs=2e-3)
    # few arrivals needed among many pending parties: exact (the normal tail said 0.022 for 0.049 at 65 parties)
    for n in (64, 65, 1000):
        assert poisson_binomial_tail([0.05 / n] * n, 1) == pytest.approx(1 - (1 - 0.05 / n) ** n, rel=1e-9)
    assert poisson_binomial_tail([0.001] * 1000, 2) == pytest.approx(1 - 0.999 ** 1000 - 1000 * 0.001 * 0.999 ** 999,
                                                                      rel=1e-9)


def _round_times(rng, means, jitter):
    return {p: m * math.exp(rng.gauss(0, jitter)) for p, m in means.items()}


@pytest.mark.parametrize("jitter", [0.05, 0.2])
def test_quantile_is_calibrated_on_periodic_arrivals(jitter):
    rng = random.Random(3)
    means = {p: 100 * (1 + 0.05 * p) for p in range(10)}
    pred, alpha, q = Predictor(), 0.1, 8
    hits = trials = 0
    for r in range(400):
        times = _round_times(rng, means, jitter)
        if r >= 30:
            est = pred.quorum_quantile(list(means), q, 0.0, alpha)
            hits += sorted(times.values())[q - 1] < est
            trials += 1
        for p, t in times.items():
            pred.observe(p, t)
        pred.close_round(times, means, r)
    assert alpha / 2.5 <= hits / trials <= alpha * 2.5


def test_conditioning_on_arrivals_so_far():
    rng = random.Random(0)
    means = {p: 100.0 for p in range(5)}
    pred = Predictor()
    for _ in range(30):
        for p, t in _round_times(rng, means, 0.1).items():
            pred.observe(p, t)
    q0 = pred.quorum_quantile(list(means), 5, 0.0, 0.05)
    # 110 s in and nobody has answered: the quorum is later than the unconditional quantile, and after now
    q1 = pred.quorum_quantile(list(means), 5, 110.0, 0.05)
    assert q1 > 110.0 and q1 > q0
    # four answered: one more needed, from one party
    assert pred.quorum_quantile([4], 1, 50.0, 0.05) < q0


def test_follows_drift():
    rng = random.Random(1)
    pred = Predictor(halflife=5)
    for r in range(80):
        scale = 100 if r < 40 else 200
        for p, t in _round_times(rng, {p: scale for p in range(6)}, 0.05).items():
            pred.observe(p, t)
    med = pred.quorum_quantile(list(range(6)), 3, 0.0, 0.5)
    assert 170 < med < 230


def test_parties_that_drop_out_and_return():
    rng = random.Random(2)
    means = {p: 100.0 for p in range(4)}
    pred = Predictor(halflife=4)
    for r in range(10):
        times = _round_times(rng, means, 0.1)
        for p, t in times.items():
            pred.observe(p, t)
        pred.close_round(times, means, r)
    assert math.isfinite(pred.quorum_quantile(list(means), 4, 0.0, 0.05))
    for r in range(10, 30):  # party 0 stops answering
        times = {p: t for p, t in _round_times(rng, means, 0.1).items() if p != 0}
        for p, t in times.items():
            pred.observe(p, t)
        pred.close_round(times, means, r)
    assert pred.model(0).participation < 0.1
    assert math.isinf(pred.quorum_quantile(list(means), 4, 0.0, 0.05))  # all four: unlikely now
    assert math.isfinite(pred.quorum_quantile(list(means), 3, 0.0, 0.05))
    for r in range(30, 50):  # it comes back
        times = _round_times(rng, means, 0.1)
        for p, t in times.items():
            pred.observe(p, t)
        pred.close_round(times, means, r)
    assert pred.model(0).participation > 0.9
    assert math.isfinite(pred.quorum_quantile(list(means), 4, 0.0, 0.05))


def test_newcomers_borrow_the_pooled_model_and_cold_start_is_unknown():
    pred = Predictor()
    assert math.isinf(pred.quorum_quantile(["a", "b"], 2, 0.0, 0.05)) and not pred.has_history()
    for t in (90, 100, 110):
        pred.observe("a", t)
    q = pred.quorum_quantile(["new"], 1, 0.0, 0.5)
    assert 80 < q < 120
    assert Predictor(prior_s=60.0).has_history()


def test_young_parties_take_the_pooled_within_party_spread():
    """A party with one or two responses is given the spread the experienced parties share (their running
    variances made unbiased), widened by its own mean's uncertainty (sqrt(1 + 1/n)), once three parties have three
    responses or more; before that, the prior CV (as a log-normal's sigma: it was taken as one, 0.5 for 0.47)."""
    rng = random.Random(3)
    pred = Predictor(prior_cv=0.5)
    pred.observe("young", 100.0)
    prior = math.sqrt(math.log1p(0.5 ** 2))
    assert pred.distribution("young")[0].sigma == prior  # nobody experienced yet: the prior
    for p in ("a", "b"):
        for _ in range(4):
            pred.observe(p, 100.0 * math.exp(rng.gauss(0.0, 0.1)))
    assert pred.distribution("young")[0].sigma == prior  # two experienced parties are not enough
    for _ in range(4):
        pred.observe("c", 100.0 * math.exp(rng.gauss(0.0, 0.1)))
    want = math.sqrt(sum(pred.parties[p].var * 4 / 3 for p in "abc") / 3) * math.sqrt(2.0)  # n = 1
    got = pred.distribution("young")[0].sigma
    assert got == pytest.approx(want) and 0.02 < got < 0.3
    q_young = pred.quorum_quantile(["young"], 1, 0.0, 0.05)
    assert 60 < q_young < 100  # the 5% quantile of a 10%-ish spread around 100 s, not of a 50% one (~44 s)


def test_late_answers_count_as_answers_and_inform_the_model():
    """Parties that answer after the quorum must not look absent: that would censor the slow ones and bias the
    quorum time late (a measured effect: JIT's p95 latency on the cross-device mix fell from 8.7 s to 2.7 s)."""
    pred = Predictor(halflife=4)
    for r in range(10):
        pred.observe("fast", 10.0)
        pred.close_round({"fast"}, ["fast", "slow"], r)  # the round closed before "slow" came in
        pred.observe_late("slow", 50.0, r)
    assert pred.model("slow").participation == pytest.approx(1.0)
    assert pred.model("slow").n == 10
    med = pred.quorum_quantile(["fast", "slow"], 2, 0.0, 0.5)
    assert 45 < med < 55


def test_a_late_answer_counts_for_its_own_round_whenever_it_comes():
    """A late update may come before its round closes (the quorum is in, the fold still running) or after; either
    way it is that round's answer. Crediting it to the round closed last made an always-answering party's
    participation settle near 0.92, and a party always late before the close fall to 0."""
    pred = Predictor(halflife=4)
    for r in range(40):
        pred.observe("fast", 10.0)
        if r % 2:
            pred.observe_late("slow", 50.0, r)  # before the close
            pred.close_round({"fast"}, ["fast", "slow"], r)
        else:
            pred.close_round({"fast"}, ["fast", "slow"], r)
            pred.observe_late("slow", 50.0, r)  # after it
    assert pred.model("slow").participation == pytest.approx(1.0, abs=1e-12)
    pred.close_round({"fast"}, ["fast", "slow"], 40)  # a round it really missed counts as one
    pred.observe_late("slow", 50.0, 39)  # an answer to an older round changes nothing more
    assert pred.model("slow").participation < 1.0
    with pytest.raises(ValueError, match="finite"):
        pred.observe("slow", float("nan"))
    saved = Predictor(halflife=4)
    saved.load_json(pred.to_json())
    assert saved.to_json() == pred.to_json()


@pytest.mark.parametrize("row, named", [
    (["b", 3, float("nan"), 0.01, 1.0, 3], "mu = nan"), (["b", 3, 0.1, float("nan"), 1.0, 3], "var = nan"),
    (["b", 3, 0.1, -0.01, 1.0, 3], "var = -0.01"), (["b", 3, 0.1, 0.01, 1.5, 3], "participation = 1.5"),
    (["b", -1, 0.1, 0.01, 1.0, 3], "n = -1"), (["b", 3, 0.1, 0.01, 1.0, 3, 2, 0.0], "6 or 9"), ("b", "6 or 9")])
def test_load_json_refuses_a_model_no_party_can_have_and_changes_nothing(row, named):
    """load_json took a NaN mean or variance of a party with responses as it came (a state file edited or written
    by another program): every party's shared spread went NaN with it (found in review, 2026-11-29). It checks
    every row first, with the rule the state directory's check applies (one function: ``model_row_error``)."""
    pred = Predictor()
    for t in (10.0, 11.0, 12.0):
        pred.observe("a", t)
    before = pred.to_json()
    with pytest.raises(ValueError, match=re.escape(named)):
        pred.load_json([["a", 1, 0.0, 0.0, 1.0, 1], row])
    assert pred.to_json() == before and list(pred.parties) == ["a"]
    pred.load_json([["c", 0, float("nan"), 0.0, 1.0, 2]])  # no response yet: its mean is NaN, as to_json writes it
    assert pred.model("c").rounds == 2 and pred.to_json()[0] == before[0]


@pytest.mark.filterwarnings("error")  # far past the model, S(tau) underflows: no overflow warning on the way
@pytest.mark.parametrize("times", [[100.0] * 8, [100.0, 101.0, 99.0, 100.5] * 2])
def test_an_overdue_party_that_always_answers_is_expected_next(times):
    """tau far past a party's model (S(tau) < 1e-16): one that always answered is late and comes next, so the
    quorum it completes is just after now; one that sometimes skips a round most likely skipped this one."""
    pred = Predictor()
    for r, t in enumerate(times):
        pred.observe("a", t)
        pred.observe("b", t)
        pred.close_round({"a", "b"}, ["a", "b"], r)
    for tau in (130.0, 200.0, 1e4):
        q = pred.quorum_quantile(["a"], 1, tau, 0.05)
        assert tau <= q < tau * 1.05
        assert tau <= pred.quorum_quantile(["a", "b"], 2, tau, 0.5) < tau * 1.1
    pred.close_round({"a"}, ["a", "b"], len(times))  # b skipped a round: p < 1
    assert pred.model("b").participation < 1.0
    assert math.isinf(pred.quorum_quantile(["b"], 1, 200.0, 0.05))
    assert math.isinf(pred.quorum_quantile(["b"], 1, 300.0, 0.05))
    assert math.isfinite(pred.quorum_quantile(["b"], 1, 0.0, 0.05))


def test_the_quantile_of_an_overdue_wide_party_is_finite_and_grows_with_the_time_waited():
    """The bracket's upper end ignored the time already waited: past ~5.5 sigma a party that always answers got a
    quantile of inf at alpha 0.9 (finite again at 10 sigma)."""
    p = Predictor()
    for r, t in enumerate([10.0, 1000.0] * 10):  # a wide party: sigma ~ 2.3
        p.observe("a", t)
        p.close_round({"a"}, ["a"], r)
    d = p.distribution("a")[0]
    qs = []
    for k in (5.0, 5.5, 5.9, 7.0, 10.0):
        tau = math.exp(d.mu + k * d.sigma)
        q = p.quorum_quantile(["a"], 1, tau, 0.9)
        assert tau < q < math.inf
        qs.append(q)
    assert qs == sorted(qs)


def test_an_overdue_party_on_the_spread_floor_is_expected_at_every_time_waited():
    """S(tau) between 1e-323 and 1e-300 was clipped at 1e-300 in w / S(tau): over that band (2.10-2.16x the usual
    time of a party at the 0.02 spread floor) a reliable overdue party 'never' arrived, the quantile was inf, and
    JIT stopped planning (a start-up added to the round's latency)."""
    p = Predictor()
    m = p.model("a")
    m.n, m.mu, m.var, m.participation = 10, math.log(100.0), 0.02 ** 2, 1.0
    for tau in (150.0, 205.0, 210.0, 212.0, 215.0, 216.0, 220.0, 300.0):
        q = p.quorum_quantile(["a"], 1, tau, 0.05)
        assert tau < q < tau * 1.001, tau


def test_one_missed_first_round_does_not_make_a_party_a_never_answerer():
    """Participation starts from the prior p = 1 weighing ``prior_rounds`` (1) rounds. Without it the first round
    weighed 1: a party that skipped round 0 had participation exactly 0, and a quorum of 9 of 10 that needed two such
    parties got an infinite quantile in round 1 (the quorum came with probability ~0.74), so JIT waited like lazy."""
    pred = Predictor()
    answered = [p for p in range(10) if p not in (8, 9)]
    for p in answered:
        pred.observe(p, 100.0 + p)
    pred.close_round(answered, range(10), 0)
    assert pred.model(8).participation == pytest.approx(0.5) and pred.model(0).participation == 1.0
    q = pred.quorum_quantile(list(range(10)), 9, 0.0, 0.05)
    assert 50.0 < q < 200.0
    cdf, _ = pred.quorum_cdf_fn(list(range(10)), 9, 0.0)
    assert cdf(1e6) == pytest.approx(0.75, abs=1e-6)  # one of the two skippers (1/2 each) must answer
    # the running phase is the Beta(n_0, 0) posterior mean: (n_0 + answered) / (n_0 + rounds)
    for r, yes in enumerate([False, True, False, True, True], start=1):
        pred.close_round(answered + ([8] if yes else []), range(10), r)
    assert pred.model(8).participation == pytest.approx((1 + 3) / (1 + 6))
    assert pred.model(0).participation == 1.0  # always answered: exactly 1 (an overdue one is late, not absent)
    # an experienced party follows drift as before: once the EW window takes over, a miss costs the factor 1 - a
    for r in range(6, 40):
        pred.close_round(answered, range(10), r)
    a = 1.0 - 0.5 ** (1.0 / pred.halflife)
    before = pred.model(0).participation
    pred.close_round([], range(10), 40)
    assert pred.model(0).participation == pytest.approx(before * (1.0 - a), rel=1e-12)
    # weight 0 is the old rule, on request; the weight must be a finite number >= 0
    bare = Predictor(prior_rounds=0)
    bare.close_round([], ["x"], 0)
    assert bare.model("x").participation == 0.0
    for bad in (-1.0, math.inf, math.nan, "1", True):
        with pytest.raises(ValueError, match="prior_rounds"):
            Predictor(prior_rounds=bad)


def test_an_answer_to_an_older_round_keeps_the_open_rounds_late_answer():
    """A late answer to the open round, then a stale one to a round older than the one closed last: the stale one
    took the open round's place, which then closed as a 'no' (participation 0.25 where it is 0.5)."""
    from scheduler.predictor import PartyModel

    def closes(old_answer):
        m = PartyModel()
        m.close_round(False, 0)
        m.close_round(False, 1)
        m.answered_late(2)  # round 2, still open, answered late
        if old_answer:
            m.answered_late(0)
        m.close_round(False, 2)
        return m.participation

    assert closes(True) == closes(False) > 0.25


def test_a_quantile_whose_bracket_overflows_still_ends():
    """A job's prior_response_s of 1e308 (finite, accepted) put exp(mu + 6 sigma) at inf as the bracket's upper end,
    and the compiled bisection from it never ended: add_job hung for good. The bracket is capped."""
    p = Predictor(prior_s=1e308)
    q = p.quorum_quantile(p.indices(["a", "b"]), 2, 0.0, 0.05)
    assert q == math.inf or q > 1e300


def test_the_tail_is_exact_where_nearly_every_party_must_arrive():
    """The exact DP was chosen by n * need only, so a quorum of nearly all of 129+ parties took the normal
    approximation, poor there: the quantile of a quorum of all 129 was 3% early (risk 0.027 for 0.05). Such tails
    are computed over the misses allowed, and agree with a direct sum."""
    import numpy as np

    rng = random.Random(7)
    for n in (30, 64, 129, 500):
        probs = [rng.uniform(0.05, 0.999) for _ in range(n)]
        direct = [1.0]  # P(count == c), every count
        for p in probs:
            direct = [(direct[c] if c < len(direct) else 0.0) * (1 - p) + (direct[c - 1] * p if c else 0.0)
                      for c in range(len(direct) + 1)]
        for need in {n, n - 1, n - 5, 1} | ({n // 2 + 1} if n <= 64 else set()):  # (the middle: exact up to 64)
            assert poisson_binomial_tail(probs, need) == pytest.approx(sum(direct[need:]), rel=1e-9, abs=1e-300)
    p = np.full(129, 0.9)
    assert poisson_binomial_tail(p, 129) == pytest.approx(0.9 ** 129, rel=1e-12)


def test_a_partys_first_responses_take_a_running_mean_of_their_logs():
    """Until the exponential window takes over, each response weighs as much as the ones before (the EW weight alone
    left the first answer dominant: 11.8 s after answers of 10, 20 and 40 s, not their geometric mean, 20 s)."""
    from scheduler.predictor import PartyModel

    m = PartyModel()
    logs = [math.log(r) for r in (10.0, 20.0, 40.0)]
    for r in (10.0, 20.0, 40.0):
        m.observe(r)
    mean = sum(logs) / 3
    assert m.mu == pytest.approx(mean, abs=1e-12)
    assert m.var == pytest.approx(sum((y - mean) ** 2 for y in logs) / 3, abs=1e-12)  # (the population variance)


# --- contracts a mutation review found untested (2026-11-28); each test kills its mutant ----------------------------
def test_a_newcomer_borrows_the_spread_between_parties():
    """The pooled model a party without history plans on holds the spread of the parties' means, not only the
    spread within each (dropped, a newcomer's 5% quantile was 9.7 s where the parties answer in 1-100 s)."""
    pr = Predictor()
    for p, y in (("a", 1.0), ("b", 10.0), ("c", 100.0)):
        for _ in range(5):
            pr.observe(p, y)
    d, _ = pr.distribution("newcomer")
    assert d.sigma == pytest.approx(float(np.std(np.log([1.0, 10.0, 100.0]))), rel=1e-6)


def test_a_party_with_three_responses_plans_on_its_own_spread():
    """distribution() and the planning arrays must agree on when a party is experienced (three responses)."""
    pr = Predictor()
    for p, ys in (("a", [10, 10.1, 9.9]), ("b", [5, 20, 9, 30]), ("c", [5, 20, 9, 30]), ("d", [4, 25, 8, 31])):
        for y in ys:
            pr.observe(p, y)
    d, _ = pr.distribution("a")
    _, sigma, _, _ = pr._arrays()
    assert float(sigma[pr.indices(["a"])[0]]) == pytest.approx(d.sigma, rel=1e-12)


def test_an_overdue_party_has_not_arrived_by_the_time_it_is_overdue():
    """Its arrival chance is conditioned on its absence so far: 0 at tau, so the quorum time lies after tau."""
    pr = Predictor()
    for y in (1.0, 1.2, 0.8, 1.1, 0.9):
        pr.observe("a", y)
    d, _ = pr.distribution("a")
    tau = math.exp(d.mu + 40 * d.sigma)  # 40 sigmas overdue: its survival underflows
    cdf, _ = pr.quorum_cdf_fn(["a"], 1, tau)
    assert cdf(tau) == 0.0
    assert pr.quorum_quantile(["a"], 1, tau, 0.5) > tau


def test_the_prior_is_the_mean_response_time():
    """prior_s is the mean of the log-normal a party without history gets: mu = log(prior_s) - sigma^2 / 2."""
    d, _ = Predictor(prior_s=10.0, prior_cv=1.0).distribution("x")
    assert math.exp(d.mu + d.sigma ** 2 / 2) == pytest.approx(10.0, rel=1e-12)


def test_sub_millisecond_responses_are_learned():
    """The log floor (1e-9 s) lies far below such answers: a party answering in ~15 us has that median."""
    pr = Predictor()
    ys = (1e-5, 2e-5, 1.5e-5, 1e-5)
    for y in ys:
        pr.observe("a", y)
    assert pr.quorum_quantile(["a"], 1, 0.0, 0.5) == pytest.approx(math.exp(np.mean(np.log(ys))), rel=0.05)


def test_poisson_binomial_tail_checks_its_probabilities_and_count():
    """NaN, 1.5 and -0.5 were dropped or clipped in silence, need = 2.7 read as 2, and need = 10**30 overflowed
    numba's integer."""
    for bad in ([np.nan], [1.5], [-0.5, 0.5]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            poisson_binomial_tail(bad, 1)
    assert poisson_binomial_tail([0.5], 10 ** 30) == 0.0
    assert poisson_binomial_tail([0.5, 0.5], 1.5) == poisson_binomial_tail([0.5, 0.5], 2) == 0.25


def _random_pending(rng, max_n=2500, cvs=(0.02, 0.05, 0.2, 0.5, 1.5), max_rounds=5):
    """A predictor of 2 to max_n parties with 1 to max_rounds - 1 rounds of log-normal response times (one CV of
    ``cvs``; 80% answer, half of them counted as answering), and a random pending subset (positions)."""
    pred = Predictor()
    n = int(rng.integers(2, max_n))
    cv = float(rng.choice(cvs))
    for r in range(int(rng.integers(1, max_rounds))):
        for i in range(n):
            if rng.random() < 0.8:
                pred.observe(i, float(np.exp(rng.normal(4.0, cv))))
        pred.close_round(range(0, n, 2), range(n), r)
    idx = pred.indices(range(n))
    return pred, idx[rng.random(n) < rng.random()]


def test_the_quantile_search_closes_its_bracket_on_the_first_time_the_cdf_reaches_alpha():
    """The search interpolates (on the CDF's probit) instead of bisecting; its answer must still be the bisection's:
    the CDF reaches alpha there and not 1e-5 (the search's tolerance, in log time) before it, over random party mixes,
    sizes, risks and times already waited, and in about half bisection's evaluations."""
    from scheduler import predictor as P

    rng = np.random.default_rng(7)
    checked = 0
    evaluations = []
    real_tail = P._quorum_tail_into
    for _ in range(150):
        pred, pending = _random_pending(rng)
        if pending.size == 0:
            continue
        need = int(rng.integers(1, pending.size + 1))
        tau = float(rng.choice([0.0, 10.0, 50.0, 200.0]))
        alpha = float(rng.choice([0.001, 0.05, 0.2, 0.5, 0.9]))
        q = pred.quorum_quantile(pending, need, tau, alpha)
        if not math.isfinite(q) or q == tau:
            continue
        _, prep = pred._prepared(pending, tau)
        assert P._cdf(prep, need, q) >= alpha > P._cdf(prep, need, q * math.exp(-1e-5))
        checked += 1
        if checked <= 20:  # count the search's evaluations (the compiled one calls the compiled tail: count it
            calls = [0]  # through the pure-Python version of the same function)

            def counted(*a):
                calls[0] += 1
                return real_tail(*a)
            P._quorum_tail_into = counted
            try:
                _, prep = pred._prepared(pending, tau)
                lo, hi = max(tau, 1e-9), q * 4.0
                c_lo, c_hi = P._cdf(prep, need, lo), P._cdf(prep, need, hi)
                if c_lo < alpha <= c_hi:
                    P._grid_search.py_func(math.floor(math.log(lo) / P.GRID), math.ceil(math.log(hi) / P.GRID),
                                           c_lo, c_hi, alpha, *prep, need)
                    evaluations.append((calls[0], math.ceil(math.log2((math.log(hi) - math.log(lo)) / 1e-5))))
            finally:
                P._quorum_tail_into = real_tail
    assert checked >= 60
    ours, bisection = sum(e for e, _ in evaluations), sum(b for _, b in evaluations)
    assert len(evaluations) >= 10 and ours <= 0.75 * bisection, evaluations


def test_a_quantile_is_the_same_whatever_guess_its_search_starts_from():
    """A re-plan's search starts from the last plan's quantile (``near``): on a fixed grid in log time the answer is
    the first point whose CDF reaches alpha, which no starting bracket changes, whether the guess is right, close,
    far, below tau or past the cold bracket's reach (then the search runs cold: inf and tau come out as before). A
    close guess takes few evaluations: two to check its bracket, then the closing steps."""
    from scheduler import predictor as P

    rng = np.random.default_rng(11)
    counts = {"cold": [], "near": []}
    real_tail = P._quorum_tail_into
    for case in range(60):
        pred, pending = _random_pending(rng, 1500, (0.02, 0.05, 0.2, 0.5), 4)
        if pending.size == 0:
            continue
        need = int(rng.integers(1, pending.size + 2))
        tau = float(rng.choice([0.0, 10.0, 50.0, 200.0]))
        alpha = float(rng.choice([0.001, 0.05, 0.5]))
        q = pred.quorum_quantile(pending, need, tau, alpha)
        base = q if 0 < q < math.inf else 60.0
        for near in (q, base * 1.003, base * 0.99, base * 1.019, base * 1.5, base * 0.2, tau * 0.5, 1e-300, 1e300,
                     math.inf, math.nan, None):
            assert pred.quorum_quantile(pending, need, tau, alpha, near=near) == q, (case, near)
        if 0 < q < math.inf and q != tau and len(counts["near"]) < 12:
            calls = [0]

            def counted(*a):
                calls[0] += 1
                return real_tail(*a)
            _, prep = pred._prepared(pending, tau)
            step = 6.0 * max(float(pred._prepared(pending, tau)[0][1].max()), 1e-3)
            hi = min(max(float(np.exp(pred._prepared(pending, tau)[0][0] + step).max()), tau * 2 + 1e-6), 1e300)
            real_grid = P._grid_search  # (the pure-Python versions, which call the counted tail)
            P._quorum_tail_into, P._grid_search = counted, real_grid.py_func
            try:
                for name, guess in (("cold", math.nan), ("near", math.log(q * 1.01))):
                    calls[0] = 0
                    found, k = P._quantile_search.py_func(tau, hi, step, alpha, guess, *prep, need)
                    assert found == 1 and math.exp(k * P.GRID) == q
                    counts[name].append(calls[0])
            finally:
                P._quorum_tail_into, P._grid_search = real_tail, real_grid
    assert len(counts["near"]) >= 8
    assert sum(counts["near"]) <= 0.65 * sum(counts["cold"]), counts


@pytest.mark.parametrize("cdf, llo, lhi, alpha", [
    # a plateau just below alpha, then a jump: interpolation keeps landing on the low side
    (lambda x: (0.05 - 1e-12 if x > -10 else 0.0) + (0.95 if x >= 5 else 0.0), math.log(1e-9), math.log(1e300), 0.05),
    # probits clipped at both ends (alpha past what the probit resolves): fb = 0 all along
    (lambda x: 0.5 * math.erfc(-(x - 4.0) / math.sqrt(2)), 0.0, 40.0, 1 - 1e-16),
    (lambda x: 0.5 * math.erfc(-(x - 4.0) * 30 / math.sqrt(2)), -20.0, 40.0, 1e-300),
    (lambda x: 1.0 if x >= 5.0 else 0.0, math.log(1e-9), math.log(1e300), 0.05),  # a step
])
def test_the_quantile_search_takes_at_most_about_three_times_bisections_evaluations(cdf, llo, lhi, alpha):
    """Every third step bisects where the two before it did not halve the bracket, so a CDF that defeats the
    interpolation costs at most ~3x bisection's count (the width was taken before the third step's evaluation, so a
    bisection counted as the next check's halving, and these took 4.6-5.5x: 119-123 evaluations for 22-27)."""
    from scheduler import predictor as P

    calls = [0]

    def tail(probs, x, *rest):
        calls[0] += 1
        return cdf(x)
    real, P._quorum_tail_into = P._quorum_tail_into, tail
    try:
        b = P._grid_search.py_func(math.floor(llo / P.GRID), math.ceil(lhi / P.GRID), cdf(llo), cdf(lhi), alpha,
                                   *(np.zeros(1),) * 6, 1)
    finally:
        P._quorum_tail_into = real
    bisection = math.ceil(math.log2((lhi - llo) / 1e-5))
    assert cdf(b * P.GRID) >= alpha > cdf((b - 1) * P.GRID) and calls[0] <= 3 * bisection + 3, (calls[0], bisection)


def test_a_quantile_at_a_risk_below_what_the_probit_resolves_is_found_not_a_division_by_zero():
    """alpha = 1e-310 (JIT takes any 0 < alpha < 1) and a party whose participation has decayed to ~1e-301: both
    probits clip, the kept end's value was halved to -0.0, and the interpolation divided 0 by 0 (ZeroDivisionError
    out of quorum_quantile, on the scheduler's clock thread)."""
    for sd in (100.0, 110.0):
        pred = Predictor()
        pred.load_json([[0, 40, math.log(100.0), sd * sd, 1e-301, 9000]])
        q = pred.quorum_quantile([0], 1, 50.0, 1e-310)
        assert 50.0 <= q < 50.01


def test_log_sf_keeps_its_accuracy_where_it_switches_to_the_asymptotic_series():
    """From z = 30 on, log P(Z > z) comes from the asymptotic series (erfc nears underflow): to ~1e-8 relative in
    P, as its docstring says. Where erfc is still a double (to z ~ 37), it is the reference; dropping the series'
    correction terms was 1.1e-3 off at z = 30, and no test saw it."""
    from scheduler.predictor import _log_sf

    for z in (29.9, 30.0, 31.0, 33.0, 35.0, 37.0):
        assert abs(_log_sf(z) - math.log(0.5 * math.erfc(z / math.sqrt(2.0)))) < 1e-7, z


@pytest.mark.parametrize("cv", [0.05, 0.2])
@pytest.mark.parametrize("rounds, most", [(3, 0.07), (12, 0.064), (30, 0.056)])
def test_the_quantile_keeps_the_risk_asked_for_once_parties_have_three_responses(cv, rounds, most):
    """Calibration against known distributions: 10 parties (log-normal, means spread 0.3, jitter ``cv``), ``rounds``
    rounds of responses, then the 5-of-10 quorum's 5% quantile at the round's start; the risk achieved is the true
    P(T_q <= Q), exact over the true parameters, averaged over 300 draws. An experienced party was given its raw
    running variance (which divides by n, and leaves out its mean's uncertainty) as its spread: 0.136 / 0.130
    achieved for 0.05 asked at round 3, 0.072 / 0.069 at 12 (where the running mean gives way to the exponential
    window), 0.057 at 30; now 0.062 / 0.055, 0.057 / 0.054 and 0.051."""
    from scheduler.predictor import poisson_binomial_tail

    rng = np.random.default_rng(11)
    s = math.sqrt(math.log1p(cv * cv))
    achieved = []
    for _ in range(300):
        mu = rng.normal(math.log(10.0), 0.3, 10)
        pred = Predictor()
        for r in range(rounds):
            for p in range(10):
                pred.observe(p, float(np.exp(rng.normal(mu[p], s))))
            pred.close_round(set(range(10)), range(10), r)
        q = pred.quorum_quantile(list(range(10)), 5, 0.0, 0.05)
        probs = 0.5 * (1.0 + np.vectorize(math.erf)((math.log(q) - mu) / (s * math.sqrt(2.0))))
        achieved.append(poisson_binomial_tail(probs, 5))
    assert 0.035 < np.mean(achieved) < most, np.mean(achieved)  # (and not far below: deployed too early)


def test_one_erratic_party_does_not_widen_the_steady_parties_spreads():
    """An experienced party's spread is pooled with the parties' typical one where that widens it: the plain mean of
    their variances (a version of this session's, e53e737) let one erratic party (CV 1) among nine steady ones
    (CV 0.05) give every steady party a spread of 0.23 at its third response (true 0.05), which planned 10% early;
    pooling it down shrank the erratic one's."""
    rng = np.random.default_rng(5)
    pred = Predictor()
    for _ in range(3):
        for p in range(10):
            pred.observe(p, float(10.0 * np.exp(rng.normal(0.0, 0.83 if p == 9 else 0.05))))
    assert pred.distribution(0)[0].sigma < 0.1 and pred.distribution(9)[0].sigma > 0.4
    pred = Predictor()  # half the parties never vary: their median variance is 0, and pooling kept only the zeros
    for _ in range(3):
        for p in range(10):
            pred.observe(p, float(10.0 * np.exp(rng.normal(0.0, 0.5))) if p >= 5 else 10.0)
    own = math.sqrt(pred.parties[9].var * 3 / 2 * (1 + 1 / 3))
    assert pred.distribution(9)[0].sigma >= own * (1 - 1e-12)


_histories = st.lists(st.lists(st.floats(1e-3, 1e5), max_size=12), min_size=1, max_size=25)
_predictor_kw = st.fixed_dictionaries({"halflife": st.sampled_from([1.0, 2.0, 8.0, 40.0]),
                                       "prior_cv": st.sampled_from([0.1, 0.5, 2.0]),
                                       "prior_s": st.sampled_from([None, 3.0, 500.0]),
                                       "min_sigma": st.sampled_from([0.0, 0.02, 0.5])})


def _observed(kw, histories, unseen=2):
    pr = Predictor(**kw)
    for party, times in enumerate(histories):
        pr.model(party)
        for t in times:
            pr.observe(party, t)
    for party in range(len(histories), len(histories) + unseen):
        pr.model(party)  # (no response yet: the pooled model, or unknown)
    return pr


def _typical(v):
    """The reference of the shared spread's typical variance: the mean of the values within 10x their median (of
    them all where the median is 0), in numpy."""
    median = float(np.median(v))
    return float(v[v <= 10.0 * median].mean()) if median > 0 else float(v.mean())


@given(_histories, _predictor_kw)
def test_party_arrays_are_the_array_expressions_bit_for_bit(histories, kw):
    """Planning's per-party (mu, sigma, known) and the pooled model come from two compiled passes since 2026-11-29
    (_shared_model's reductions in numpy's order, then _party_arrays); the numpy expressions they replaced are the
    reference here, to the bit."""
    pr = _observed(kw, histories)
    _, n, mu, var, part = pr._raw_arrays()
    old = n >= 3  # the shared spreads: the experienced parties' typical and mean unbiased variance
    v = var[old] * n[old] / (n[old] - 1)
    prior = math.sqrt(math.log1p(pr.prior_cv ** 2))
    shared = float(np.sqrt(_typical(v))) if old.any() else prior
    young_widens = old.sum() >= P.MIN_SPREAD_PARTIES
    young = float(np.sqrt(np.mean(v))) if young_widens else prior
    seen = n > 0
    if seen.any():  # the pooled model: across parties plus within
        m = float(mu[seen].mean())
        pooled = P.LogNormal(m, max(math.sqrt(float((var[seen] + (mu[seen] - m) ** 2).mean())), pr.min_sigma))
    else:
        pooled = None if pr.prior_s is None else P.LogNormal(math.log(pr.prior_s) - prior * prior / 2, prior)
    assert P._shared_model(n, mu, var, prior, pr.min_sigma)[3:] == (shared, young, young_widens)
    assert pr._pooled() == pooled
    a = 1.0 - 0.5 ** (1.0 / pr.halflife)
    m = np.maximum(n, 2).astype(np.float64)
    widen = np.sqrt(1.0 + 1.0 / np.maximum(n, 1))
    own = np.where(n * a <= 1.0, var * m / (m - 1) * (1.0 + 1.0 / m), var / (1.0 - a))
    s = shared * widen
    experienced = np.sqrt(np.maximum(own, (P.SPREAD_PRIOR * s * s + (m - 1) * own) / (P.SPREAD_PRIOR + m - 1)))
    young = np.maximum(np.sqrt(var), young * widen if young_widens else np.full(n.shape, young))
    sigma = np.maximum(np.where(n >= 3, experienced, young), pr.min_sigma)
    if pooled is not None:
        mu, sigma = np.where(n > 0, mu, pooled.mu), np.where(n > 0, sigma, pooled.sigma)
    got = pr._arrays()
    for want, have in zip((mu, sigma, part, (n > 0) | (pooled is not None)), got):
        assert want.dtype == have.dtype and want.tobytes() == have.tobytes()
    for party in range(len(histories)):  # (a party with responses: its own row of the arrays)
        d, _ = pr.distribution(party)
        if pr.model(party).n:
            assert (d.mu, d.sigma) == (mu[party], sigma[party])


@given(st.integers(0, 3000), st.integers(0, 2 ** 32 - 1), st.sampled_from([0.0, 1.0, 6.0]))
def test_pairwise_is_numpys_sum_to_the_bit(n, seed, decades):
    """The compiled reductions' sum is np.add.reduce's, bit for bit, at every length (blocks of 8 and 128, halves
    at multiples of 8 above) and over magnitudes that make the order show."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n) * 10.0 ** rng.uniform(-decades, decades, n)
    assert P._pairwise(a) == np.add.reduce(a)
    assert P._pairwise(a[::-1].copy()) == np.add.reduce(a[::-1].copy())
    zeros = np.full(n, -0.0)  # (numpy adds to its identity, +0.0: the sum of -0.0s is +0.0; review, 2026-11-29)
    assert str(P._pairwise(zeros)) == str(np.add.reduce(zeros))


def test_the_shared_model_is_numpys_where_a_loaded_variance_is_nan():
    """A state file can carry a NaN variance (observe refuses NaN times, load_json does not): numpy's median is NaN
    then, and so were the shared spreads; numba's median is not, and the compiled pass had given the other parties
    finite spreads that differed from numpy's (review, 2026-11-29)."""
    n = np.full(6, 3, np.int64)
    var = np.array([np.nan, 0.01, 0.02, 0.005, 0.01, 0.02])
    got = P._shared_model(n, np.zeros(6), var, 0.47, 0.02)
    assert math.isnan(got[3]) and math.isnan(got[4])


@given(_histories, _predictor_kw, st.sampled_from([0.0, 0.5, 30.0, 3e4, 1e9]), st.data())
def test_pending_prep_is_the_conditioned_arrival_model(histories, kw, tau, data):
    """_pending_prep against its definition in numpy: the known pending parties with w > 0, in order, each with
    log S(tau), w = p S(tau) / (1 - p + p S(tau)) and what the CDF reuses (1 / sigma, S(tau), w / S(tau))."""
    pr = _observed(kw, histories)
    n_all = len(histories) + 2
    for party in range(n_all):  # participation below 1 for some (w < 1, and w -> 0 when long overdue)
        pr.model(party).participation = data.draw(st.sampled_from([1.0, 1.0, 0.5, 0.01, 0.0]))
    pr._raw = pr._cache = None
    idx = np.array(data.draw(st.lists(st.integers(0, n_all - 1), unique=True, max_size=n_all)), np.int64)
    mu, sigma, part, known = pr._arrays()
    sel = idx[known[idx]]
    z = (math.log(tau) - mu[sel]) / np.maximum(sigma[sel], 1e-12) if tau > 0 else np.zeros(sel.size)
    lsf = np.array([P._log_sf(float(x)) for x in z]) if tau > 0 else np.zeros(sel.size)
    p = part[sel]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        e = np.log1p(-p) - np.log(p) - lsf
        w = np.where(p >= 1.0, 1.0, np.where(p <= 0.0, 0.0, np.where(e > 700.0, 0.0, 1.0 / (1.0 + np.exp(e)))))
    keep = w > 0.0
    s_tau = np.where(lsf > -690.0, np.exp(lsf), 0.0)[keep]
    want = (mu[sel][keep], sigma[sel][keep], w[keep], lsf[keep], 1.0 / np.maximum(sigma[sel][keep], 1e-12), s_tau,
            np.where(s_tau > 0.0, w[keep] / np.maximum(s_tau, 1e-300), 0.0))
    got = P._pending_prep(idx, None, mu, sigma, part, known, tau)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=0.0)
    # a round's expected parties with those that arrived marked: the same as the pending ones alone, to the bit
    expected = np.array(data.draw(st.permutations(range(n_all))), np.int64)
    arrived = np.isin(expected, idx, invert=True)
    marked = P._pending_prep(expected, arrived, mu, sigma, part, known, tau)
    alone = P._pending_prep(expected[~arrived], None, mu, sigma, part, known, tau)
    assert [x.tobytes() for x in marked] == [x.tobytes() for x in alone]
    assert [x.tobytes() for x in pr._prepared((expected, arrived), tau)[1] or ()] == \
        [x.tobytes() for x in pr._prepared(expected[~arrived], tau)[1] or ()]
    arrays, prep = pr._prepared(idx, tau)
    if keep.any():
        assert [x.tobytes() for x in arrays + prep] == [x.tobytes() for x in got[:4] + (got[0], got[4], got[2], got[3],
                                                                                        got[5], got[6])]
    else:
        assert arrays is None and prep is None


@given(_histories, _predictor_kw, st.sampled_from([0.0, 0.5, 30.0, 3e4, 1e9]), st.data())
def test_the_one_pass_check_reads_the_cdf_of_the_two_passes_to_the_bit(histories, kw, tau, data):
    """quantile_after's one compiled pass (_pending_cdf: the pending parties' model and the CDF at t, no arrays made)
    against _pending_prep followed by one CDF evaluation, which it replaced: the same count of parties that may still
    arrive and the same CDF, bit for bit, with arrived flags, participation below 1 and overdue parties."""
    pr = _observed(kw, histories)
    n_all = len(histories) + 2
    for party in range(n_all):
        pr.model(party).participation = data.draw(st.sampled_from([1.0, 1.0, 0.5, 0.01, 0.0]))
    pr._raw = pr._cache = None
    idx = np.arange(n_all, dtype=np.int64)
    arrived = np.array(data.draw(st.lists(st.booleans(), min_size=n_all, max_size=n_all)), np.bool_)
    need = data.draw(st.integers(0, n_all + 1))
    t = tau + data.draw(st.sampled_from([0.0, 1e-3, 1.0, 60.0, 1e4]))
    arrays, prep = pr._prepared((idx, arrived), tau)
    n, cdf = P._pending_cdf(idx, arrived, *pr._arrays(), tau, t, need)
    assert n == (0 if arrays is None else arrays[0].size)
    assert str(cdf) == str(P._cdf(prep, need, t))


def test_the_one_pass_check_is_the_two_passes_to_the_bit_where_the_tail_is_normal():
    """The same on large rounds (1,500 parties: the normal approximation's tail), the shape a slot search checks."""
    rng = np.random.default_rng(3)
    pr = Predictor()
    for r in range(4):
        for i in range(1500):
            if rng.random() < 0.9:
                pr.observe(i, float(np.exp(rng.normal(5.0, 0.3))))
        pr.close_round(range(0, 1500, 3), range(1500), r)
    idx = pr.indices(range(1500))
    arrived = rng.random(1500) < 0.3
    for tau in (0.0, 100.0, 150.0):
        for need in (1, 40, 700, 1040):
            for t in (tau, tau + 5.0, 160.0, 400.0):
                arrays, prep = pr._prepared((idx, arrived), tau)
                n, cdf = P._pending_cdf(idx, arrived, *pr._arrays(), tau, t, need)
                assert n == arrays[0].size and str(cdf) == str(P._cdf(prep, need, t)), (tau, need, t)


def test_the_quorum_cdf_never_falls_as_t_grows():
    """(Review, 2026-11-29.) The tail was exact or normal by the count of parties with p > 0 at t, so the method
    switched as t grew and the CDF could fall back (820 pending, 20 needed: 0.0322 -> 0.0258 at t = 0.5232): the
    quantile's search could settle on a later crossing, and one CDF evaluation (quantile_after, which the search for
    a slot to take back asks) disagreed with it. The method goes by the pending parties now: the CDF is monotone, and
    the two agree."""
    pr = Predictor()
    a = 1.0 - 0.5 ** (1.0 / 8.0)
    pr.load_json([[p, 100, 0.0, 0.09 * (1 - a), 1.0, 100] for p in range(819)] + [[819, 100, 0.30, 0.01, 1.0, 100]])
    idx = np.arange(820, dtype=np.int64)
    cdf, _ = pr.quorum_cdf_fn(idx, 20, 0.0)
    ts = np.exp(np.linspace(-1.5, 0.5, 4001))
    assert np.all(np.diff([cdf(t) for t in ts]) >= 0.0)
    for alpha in (1e-3, 0.029, 0.05, 0.5, 0.9):
        q = pr.quorum_quantile(idx, 20, 0.0, alpha)
        for x in ts[::20]:
            if abs(x - q) > 1e-4 * q:  # (the quantile is solved to 1e-5 relative)
                assert pr.quantile_after(idx, 20, 0.0, alpha, x) == (q > x)


def test_pending_parties_as_a_tuple_of_ids_are_ids():
    """A tuple of party ids is parties, as a list is (a pair was once read as (positions, arrived flags), the form a
    scheduler's plans pass)."""
    pred = Predictor()
    for p, y in (("a", 10.0), ("b", 20.0), ("a", 11.0), ("b", 19.0), ("a", 9.0), ("b", 21.0)):
        pred.observe(p, y)
    for ids in (["a", "b"], ("a", "b"), ("a",), ("a", "b", "a")[:2]):
        assert pred.quorum_quantile(ids, 1, 0.0, 0.05) == pred.quorum_quantile(list(ids), 1, 0.0, 0.05)
    idx = pred.indices(["a", "b"])
    assert pred.quorum_quantile((idx, np.array([True, False])), 1, 0.0, 0.05) == \
        pred.quorum_quantile(["b"], 1, 0.0, 0.05)
    with pytest.raises(ValueError, match="arrived flags"):  # (the compiled pass reads them unchecked)
        pred.quorum_quantile((idx, np.array([True])), 1, 0.0, 0.05)
