"""Arrival prediction: per-party response-time models and the distribution of a round's quorum time.

Each party's response time (round start -> its update) is modelled as log-normal with a running location and spread
(exponentially weighted mean and variance of log response time, so drift is followed), and a participation rate
(exponentially weighted share of rounds the party answered in, so intermittent parties and parties that drop out
and return are followed). A party with no history borrows the job's pooled model.

The quorum time T_q of a round, the time the q-th update arrives, has
    P(T_q <= t) = P(sum_i B_i(t) >= q - a),   B_i(t) ~ Bernoulli(pi_i(t)),
over the parties still pending at time tau (a have arrived), with the arrival probability of a pending party
conditioned on its not having arrived by tau:
    pi_i(t) = p_i (F_i(t) - F_i(tau)) / (1 - p_i F_i(tau)).
The sum is Poisson-binomial: exact by dynamic programming for small rounds, a normal approximation with continuity
correction for large ones. The scheduler plans on the alpha-quantile of T_q, alpha being the risk it accepts of
the quorum coming in before the aggregator is ready: a stated risk instead of an ad-hoc safety margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SQRT2 = math.sqrt(2.0)
EXACT_MAX = 64  # pending parties up to which the Poisson-binomial tail is computed exactly (O(n * need) per call)


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / SQRT2)


@dataclass
class PartyModel:
    """Running log-normal model of one party's response time, and its participation rate."""

    halflife: float = 8.0  # rounds
    mu: float = float("nan")  # EW mean of log response time
    var: float = 0.0  # EW variance of log response time
    n: int = 0  # responses seen
    participation: float = 1.0  # EW share of rounds answered
    rounds: int = 0

    @property
    def _a(self) -> float:
        return 1.0 - 0.5 ** (1.0 / self.halflife)

    def observe(self, response_s: float) -> None:
        y = math.log(max(response_s, 1e-9))
        if self.n == 0:
            self.mu, self.var = y, 0.0
        else:
            # first responses weigh more (a running mean) until the EW window takes over
            a = max(self._a, 1.0 / (self.n + 1))
            d = y - self.mu
            self.mu += a * d
            self.var = (1 - a) * (self.var + a * d * d)
        self.n += 1

    def close_round(self, answered: bool) -> None:
        a = max(self._a, 1.0 / (self.rounds + 1))
        self.participation += a * ((1.0 if answered else 0.0) - self.participation)
        self.rounds += 1
        self._last_a = a if not answered else 0.0

    def answered_late(self) -> None:
        """It did answer the round just closed, after its membership was fixed: turn the 'no' into a 'yes'."""
        self.participation += getattr(self, "_last_a", 0.0)
        self._last_a = 0.0


@dataclass(frozen=True)
class LogNormal:
    mu: float
    sigma: float


class Predictor:
    """Per-party models of one job, and quorum-time quantiles for its rounds."""

    def __init__(self, *, halflife: float = 8.0, min_sigma: float = 0.02, prior_s: float | None = None,
                 prior_cv: float = 0.5):
        self.halflife = halflife
        self.min_sigma = min_sigma
        self.prior_s = prior_s
        self.prior_cv = prior_cv
        self.parties: dict = {}
        self._cache = None

    def model(self, party) -> PartyModel:
        m = self.parties.get(party)
        if m is None:
            m = self.parties[party] = PartyModel(halflife=self.halflife)
            self._cache = None
        return m

    def observe(self, party, response_s: float) -> None:
        self.model(party).observe(response_s)
        self._cache = None

    def observe_late(self, party, response_s: float) -> None:
        """An update that came after the quorum: its response time still informs the model. Leaving it out would
        censor the slow parties (only the first q of every round would be seen) and bias the quorum time."""
        m = self.model(party)
        m.observe(response_s)
        m.answered_late()
        self._cache = None

    def has_history(self) -> bool:
        return self.prior_s is not None or any(m.n > 0 for m in self.parties.values())

    def close_round(self, answered, expected) -> None:
        """Update participation: ``answered`` parties responded this round, the rest of ``expected`` did not."""
        answered = set(answered)
        for p in expected:
            self.model(p).close_round(p in answered)
        self._cache = None

    def _pooled(self) -> LogNormal | None:
        seen = [m for m in self.parties.values() if m.n > 0]
        if not seen:
            if self.prior_s is None:
                return None
            s = math.sqrt(math.log1p(self.prior_cv ** 2))
            return LogNormal(math.log(self.prior_s) - s * s / 2, s)
        mu = sum(m.mu for m in seen) / len(seen)
        # spread across parties plus within: a newcomer could be any of them
        var = sum(m.var + (m.mu - mu) ** 2 for m in seen) / len(seen)
        return LogNormal(mu, max(math.sqrt(var), self.min_sigma))

    def distribution(self, party, pooled=None) -> tuple[LogNormal | None, float]:
        """(response-time distribution, participation rate) of a party (pooled if it has no history; pass
        ``pooled`` when asking for many parties, it costs O(parties) to compute)."""
        m = self.parties.get(party)
        if m is None or m.n == 0:
            return (pooled if pooled is not None else self._pooled()), (m.participation if m is not None else 1.0)
        # one observation says little about spread: widen towards the pooled spread until a few are in
        sigma = math.sqrt(m.var) if m.n >= 3 else max(math.sqrt(m.var), self.prior_cv)
        return LogNormal(m.mu, max(sigma, self.min_sigma)), m.participation

    # --- quorum time -------------------------------------------------------------------------------------------
    def _arrays(self):
        """Per-party (mu, sigma, participation) as arrays indexed like ``self._order``, rebuilt only after a change:
        planning a round of thousands of parties then costs a few vector operations, not a Python loop."""
        if self._cache is None:
            self._order = list(self.parties)
            self._index = {p: i for i, p in enumerate(self._order)}
            ms = [self.parties[p] for p in self._order]
            n = np.array([m.n for m in ms], np.int64)
            mu = np.array([m.mu for m in ms], np.float64)
            sd = np.sqrt(np.array([m.var for m in ms], np.float64))
            part = np.array([m.participation for m in ms], np.float64)
            # one or two observations say little about spread: widen to the prior CV until three are in
            sigma = np.maximum(np.where(n >= 3, sd, np.maximum(sd, self.prior_cv)), self.min_sigma)
            pooled = self._pooled()
            if pooled is not None:
                mu = np.where(n > 0, mu, pooled.mu)
                sigma = np.where(n > 0, sigma, pooled.sigma)
            known = (n > 0) | (pooled is not None)
            self._cache = (mu, sigma, part, known)
        return self._cache

    def _pending_arrays(self, pending, tau: float):
        """(mu, sigma, participation, F(tau), 1 - p F(tau)) of the pending parties that have a model."""
        for p in pending:
            if p not in self.parties:
                self.model(p)
        mu, sigma, part, known = self._arrays()
        idx = np.fromiter((self._index[p] for p in pending), np.int64, len(pending))
        idx = idx[known[idx]]
        if idx.size == 0:
            return None
        mu, sigma, part = mu[idx], sigma[idx], part[idx]
        f_tau = _lognormal_cdf(tau, mu, sigma)
        denom = 1.0 - part * f_tau
        keep = denom > 1e-12
        return mu[keep], sigma[keep], part[keep], f_tau[keep], denom[keep]

    def quorum_cdf_fn(self, pending, need: int, tau: float):
        """t -> P(T_q <= t) for ``need`` more arrivals among ``pending`` parties, given none arrived by ``tau``."""
        arrays = self._pending_arrays(pending, tau)

        def cdf(t: float) -> float:
            if need <= 0:
                return 1.0
            if arrays is None:
                return 0.0
            mu, sigma, part, f_tau, denom = arrays
            probs = np.maximum(part * (_lognormal_cdf(t, mu, sigma) - f_tau) / denom, 0.0)
            return poisson_binomial_tail(probs, need)

        return cdf, arrays

    def quorum_quantile(self, pending, need: int, tau: float, alpha: float) -> float:
        """The alpha-quantile of the quorum time (seconds since round start), or ``inf`` when the quorum is not
        reached with probability alpha at all (too few parties left, or nothing learned yet)."""
        if need <= 0:
            return tau
        cdf, arrays = self.quorum_cdf_fn(pending, need, tau)
        if arrays is None or arrays[0].size < need:
            return math.inf
        mu, sigma = arrays[0], arrays[1]
        hi = max(float(np.exp(mu + 6.0 * np.maximum(sigma, 1e-3)).max()), tau * 2 + 1e-6)
        if cdf(hi) < alpha:
            return math.inf
        lo = max(tau, 1e-9)
        if cdf(lo) >= alpha:
            return tau
        # bisection in log time, to 1e-5 relative (a tenth of a second in three hours)
        llo, lhi = math.log(lo), math.log(hi)
        while lhi - llo > 1e-5:
            mid = 0.5 * (llo + lhi)
            if cdf(math.exp(mid)) >= alpha:
                lhi = mid
            else:
                llo = mid
        return math.exp(lhi)


def _lognormal_cdf(t: float, mu, sigma):
    if t <= 0:
        return np.zeros_like(mu)
    z = (math.log(t) - mu) / np.maximum(sigma, 1e-12)
    return _norm_cdf(z)


def _norm_cdf(z):
    """Standard normal CDF, vectorized (Abramowitz & Stegun 7.1.26 for erf: |error| < 1.5e-7)."""
    x = np.abs(z) / SQRT2
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def poisson_binomial_tail(probs, need: int) -> float:
    """P(sum of independent Bernoulli(p_i) >= need): exact (dynamic programming over counts, vectorized) for up to
    EXACT_MAX parties, a normal approximation with continuity correction beyond."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs[probs > 0.0]
    n = probs.size
    if need <= 0:
        return 1.0
    if need > n:
        return 0.0
    if n <= EXACT_MAX:
        dist = np.zeros(need)  # dist[c] = P(count == c) for c < need; the rest is folded into the tail
        dist[0] = 1.0
        tail = 0.0
        for p in probs:
            tail += dist[-1] * p
            dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
            dist[0] *= 1 - p
        return float(min(1.0, max(0.0, tail)))
    mean = float(probs.sum())
    var = float((probs * (1 - probs)).sum())
    if var <= 1e-12:
        return 1.0 if mean >= need - 0.5 else 0.0
    return 1.0 - _phi((need - 0.5 - mean) / math.sqrt(var))
