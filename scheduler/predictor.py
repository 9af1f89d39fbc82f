"""Arrival prediction: per-party response-time models and the distribution of a round's quorum time.

Each party's response time (round start -> its update) is modelled as log-normal with a running location and spread
(exponentially weighted mean and variance of log response time, so drift is followed), and a participation rate
(exponentially weighted share of rounds the party answered in, so intermittent parties and parties that drop out
and return are followed). A party with no history borrows the job's pooled model.

The participation rate starts from a prior: a party is expected to answer (p_0 = 1, what is assumed of a party no
round has closed for), and that expectation weighs as n_0 = ``prior_rounds`` rounds (1 by default). After round r
(x_r = 1 if the party answered it, in time or late, else 0)
    p_{r+1} = p_r + a_r (x_r - p_r),   a_r = max(a, 1 / (n_0 + r + 1)),   a = 1 - 2^(-1 / halflife),
so while 1 / (n_0 + r + 1) > a it is the posterior mean of a Beta(n_0, 0) prior, (n_0 + answered) / (n_0 + rounds),
and then the exponentially weighted share with the prior's weight decaying like any old round's. Without the prior
(n_0 = 0, the first round's step 1) one missed first round set p to exactly 0: the party was taken never to answer,
and a quorum that needed it had an infinite quantile (10 parties, quorum 9, 2 of them skipping round 0: inf in round
1, where the quorum came with probability ~0.74), so JIT waited like lazy. With it one miss gives 1/2, two 1/3; an
experienced party's rate follows drift as before (the same step a), and a party that always answered stays at
exactly 1 (which _pending_prep reads as "it is late, not absent" once it is overdue). A prior mean below 1, the
job's pooled rate or Laplace's 1/2, would take that from every reliable party for good. The price of the optimistic
mean: parties answering 70-75% of rounds look likelier early on, and JIT deploys a little earlier (2026-11-28, shipped
mixes: capture of lazy's saving mixed 0.898 -> 0.896, cross_device 0.962 -> 0.957; p95 latency shares within their
seed-to-seed noise).

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

import functools
import math
from dataclasses import dataclass, field

import numba
import numpy as np

SQRT2 = math.sqrt(2.0)
MIN_SPREAD_PARTIES = 3  # parties with three responses or more before their spread stands in for the young ones
SPREAD_PRIOR = 3.0  # the weight, in responses, of the parties' typical spread where it widens an experienced party's
EXACT_MAX = 64  # pending parties up to which the Poisson-binomial tail is computed exactly (O(n * need) per call)
_HI_MAX = 1e300  # (s) the quantile's bracket stays finite: a search from an inf bracket would not end
_LOG_HI_MAX = math.log(_HI_MAX)
GRID = 1e-5  # the quorum quantile's grid in log time: its points are exp(k GRID), 1e-5 relative apart
NEAR_STEPS = 2000  # a re-plan's search starts with the grid points 2% either side of the last plan's quantile (it
# moved less than that in about half the re-plans of the 1,000-job simulation, median 1.8%; the rest widen it)
EXACT_WORK = 1 << 14
"""Past EXACT_MAX parties the tail is still exact while n * min(need, n - need + 1) is at most this: the normal
approximation's tail is poor where few more arrivals are needed (asked for risk 0.05 at need = 1 among 200 pending
parties, it gave 0.069-0.070; and the tail jumped at 64 parties) and where few misses are allowed."""


def ew_step(halflife: float) -> float:
    """The exponential window's step a = 1 - 2^(-1 / halflife): an observation's weight halves every ``halflife``."""
    return 1.0 - 0.5 ** (1.0 / halflife)


@dataclass(slots=True)
class PartyModel:
    """Running log-normal model of one party's response time, and its participation rate (started from the prior
    p = 1 weighing ``prior_rounds`` rounds: see the module docstring). Slotted: a simulation of 1,000 jobs x 1,000
    parties holds a million of them, at 120 bytes each where an instance dict made 352."""

    halflife: float = 8.0  # rounds
    prior_rounds: float = 1.0  # the weight, in rounds, of the prior that the party answers
    mu: float = float("nan")  # EW mean of log response time
    var: float = 0.0  # EW variance of log response time
    n: int = 0  # responses seen
    participation: float = 1.0  # EW share of rounds answered
    rounds: int = 0
    closed_round: int | None = None  # the last round closed, and the step its 'no' took (0.0 for a 'yes')
    closed_no: float = 0.0
    late_round: int | None = None  # a round not yet closed that the party answered late
    _a: float = field(init=False, repr=False, compare=False)  # the EW step, 1 - 2^(-1 / halflife)

    def __post_init__(self):
        self._a = ew_step(self.halflife)

    def observe(self, response_s: float) -> None:
        if not math.isfinite(response_s):  # one NaN would poison mu and var for good
            raise ValueError(f"response time must be finite, got {response_s!r}")
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

    def close_round(self, answered: bool, round: int) -> None:
        answered = answered or self.late_round == round
        # the posterior mean of the prior (p = 1, prior_rounds rounds) and the rounds seen, until the EW window
        # takes over (a first round weighing 1 made one missed round say "never answers": p = 0)
        a = max(self._a, 1.0 / (self.prior_rounds + self.rounds + 1))
        self.participation += a * ((1.0 if answered else 0.0) - self.participation)
        self.rounds += 1
        self.closed_round, self.closed_no = round, (0.0 if answered else a)

    def answered_late(self, round: int) -> None:
        """It answered ``round`` after its membership was fixed. If that round is the one closed last (counted as a
        'no'), turn the 'no' into a 'yes'; if it is still open, it closes as a 'yes'. (Reversing whatever was closed
        last instead credited an answer that came before its round closed to the round before, and closed its own
        round as a 'no'.) An answer to an older round stays a 'no': a party that answers more than a round late
        does not answer in time for a round's quorum, which is what participation predicts."""
        if self.closed_round == round:
            self.participation += self.closed_no
            self.closed_no = 0.0
        elif self.closed_round is None or round > self.closed_round:  # (an older round's answer: it held the open
            self.late_round = round  # round's late answer, which then closed as a 'no')


@dataclass(frozen=True)
class LogNormal:
    mu: float
    sigma: float


class Predictor:
    """Per-party models of one job, and quorum-time quantiles for its rounds."""

    def __init__(self, *, halflife: float = 8.0, min_sigma: float = 0.02, prior_s: float | None = None,
                 prior_cv: float = 0.5, prior_rounds: float = 1.0):
        if not (isinstance(prior_rounds, (int, float)) and not isinstance(prior_rounds, bool)
                and 0.0 <= prior_rounds < math.inf):
            raise ValueError(f"prior_rounds must be a finite number >= 0, got {prior_rounds!r}")
        self.halflife = halflife
        self.prior_rounds = float(prior_rounds)  # weight of the participation prior p = 1, in rounds
        self.min_sigma = min_sigma
        self.prior_s = prior_s
        self.prior_cv = prior_cv
        self.parties: dict = {}
        self._raw = None  # (index, n, mu, var, participation): arrays mirroring the party models, kept in sync
        self._stale = {}  # party -> model: changed since _raw was last brought up to date
        self._cache = None  # what planning reads, derived from _raw

    def model(self, party) -> PartyModel:
        m = self.parties.get(party)
        if m is None:
            m = self.parties[party] = PartyModel(halflife=self.halflife, prior_rounds=self.prior_rounds)
            self._raw = self._cache = None
        return m

    def to_json(self) -> list:
        """The per-party models, JSON-ready: what a restart needs to plan as well as before it."""
        return [[p, m.n, m.mu, m.var, m.participation, m.rounds, m.closed_round, m.closed_no, m.late_round]
                for p, m in self.parties.items()]

    def load_json(self, rows) -> None:
        """Restore models saved by :meth:`to_json` (replacing those of the same parties). All or nothing: a row
        :func:`model_row_error` refuses (a NaN mean or variance where the party has responses, which made every
        party's shared spread NaN; a negative count; a rate outside [0, 1]) raises ValueError naming it, and no model
        changes."""
        for i, row in enumerate(rows):
            why = model_row_error(row)
            if why is not None:
                raise ValueError(f"party model row {i} ({str(row)[:120]}): {why}")
        for p, n, mu, var, part, rounds, *late in rows:  # rows saved before late answers were kept by round: 6
            m = self.model(p)
            m.n, m.mu, m.var, m.participation, m.rounds = n, float(mu), float(var), float(part), rounds
            if late:
                m.closed_round, m.closed_no, m.late_round = late[0], float(late[1]), late[2]
        self._raw = self._cache = None

    def observe(self, party, response_s: float) -> None:
        m = self.model(party)
        m.observe(response_s)
        self._sync(party, m)

    def _sync(self, party, m: PartyModel) -> None:
        """Note that one party's model changed, in O(1): an arrival must not cost a rebuild over thousands of
        parties (that rebuild was most of a large round's planning time). The arrays take the changes at their next
        read (planning reads them every ~2% of a round's arrivals), each changed party's once, element by element
        (for the ~20 parties a plan finds changed, 3 us, where four vector assignments from lists took 7)."""
        self._cache = None
        if self._raw is not None:
            self._stale[party] = m

    def observe_late(self, party, response_s: float, round: int) -> None:
        """An update to ``round`` that came after its quorum: its response time still informs the model, and the
        party counts as having answered that round. Leaving it out would censor the slow parties (only the first
        q of every round would be seen) and bias the quorum time."""
        m = self.model(party)
        m.observe(response_s)
        m.answered_late(round)
        self._sync(party, m)

    def has_history(self) -> bool:
        return self.prior_s is not None or any(m.n > 0 for m in self.parties.values())

    def close_round(self, answered, expected, round: int) -> None:
        """Update participation: ``answered`` parties (and those that answered late) responded in ``round``, the
        rest of ``expected`` did not."""
        answered = set(answered)
        for p in expected:
            self.model(p).close_round(p in answered, round)
        self._raw = self._cache = None

    def _raw_arrays(self):
        if self._stale:
            if self._raw is not None:
                index, n, mu, var, part = self._raw
                for p, m in self._stale.items():
                    i = index[p]
                    n[i], mu[i], var[i], part[i] = m.n, m.mu, m.var, m.participation
            self._stale = {}
        if self._raw is None:
            order = list(self.parties)
            ms = [self.parties[p] for p in order]
            self._raw = ({p: i for i, p in enumerate(order)}, np.array([m.n for m in ms], np.int64),
                         np.array([m.mu for m in ms], np.float64), np.array([m.var for m in ms], np.float64),
                         np.array([m.participation for m in ms], np.float64))
        return self._raw

    # --- quorum time -------------------------------------------------------------------------------------------
    def _derived(self):
        """((mu, sigma, participation, known) per party, the pooled model or None), derived again after a change
        (planning re-derives them after every ~2% of a round's arrivals): two compiled passes, the reductions
        (:func:`_shared_model`) and the per-party arrays (:func:`_party_arrays`), where two dozen numpy calls had
        cost about as much as the plan's quantile."""
        if self._cache is None:
            _, n, mu, var, part = self._raw_arrays()
            prior = math.sqrt(math.log1p(self.prior_cv ** 2))  # (the prior CV as a log-normal's sigma)
            seen, pooled_mu, pooled_sigma, shared, young, widens = _shared_model(n, mu, var, prior, self.min_sigma)
            pooled = (LogNormal(pooled_mu, pooled_sigma) if seen else None if self.prior_s is None else
                      LogNormal(math.log(self.prior_s) - prior * prior / 2, prior))
            mu, sigma, known = _party_arrays(n, mu, var, shared, young, widens, ew_step(self.halflife),
                                             self.min_sigma, pooled is not None,
                                             *((pooled.mu, pooled.sigma) if pooled is not None else (0.0, 0.0)))
            self._cache = ((mu, sigma, part, known), pooled)
        return self._cache

    def _arrays(self):
        """Per-party (mu, sigma, participation, known) as arrays indexed like the models."""
        return self._derived()[0]

    def _pooled(self) -> LogNormal | None:
        """The model of a party with no response: the pooled one (every seen party's mean and spread), else the
        prior's, else None."""
        return self._derived()[1]

    def distribution(self, party, pooled=None) -> tuple[LogNormal | None, float]:
        """(response-time distribution, participation rate) of a party (pooled if it has no history; pass
        ``pooled`` when asking for many parties). O(parties): its spread pools in the others'
        (:func:`_shared_model`)."""
        m = self.parties.get(party)
        if m is None or m.n == 0:
            return (pooled if pooled is not None else self._pooled()), (m.participation if m is not None else 1.0)
        index = self._raw_arrays()[0]
        return LogNormal(m.mu, float(self._arrays()[1][index[party]])), m.participation

    def indices(self, parties) -> np.ndarray:
        """The parties' positions in the model arrays (registering new ones). Positions never change: parties are
        only ever added. A scheduler keeps them per job, so that a round's pending set is one vector operation."""
        for p in parties:
            if p not in self.parties:
                self.model(p)
        index = self._raw_arrays()[0]
        return np.fromiter((index[p] for p in parties), np.int64, len(parties))

    def _prepared(self, pending, tau: float):
        """((mu, sigma, w, log S(tau)) of the pending parties that may still arrive, and what every evaluation of the
        quorum CDF reuses: (mu, 1 / sigma, w, log S(tau), S(tau), w / S(tau))); (None, None) when none may. w is the
        probability that a party answers this round given that it has not by ``tau``, w = p S(tau) / (1 - p +
        p S(tau)) with S the survival function of its response time. ``pending``: party ids, their :meth:`indices`
        (an int64 array), or (indices, arrived): a round's expected parties and a bool array of those that have
        arrived, which the pass skips (a scheduler's plans: no pending set made for each). One compiled pass
        (:func:`_pending_prep`)."""
        mu, sigma, w, lsf_tau, isig, s_tau, ws = _pending_prep(*self._pending_pair(pending), *self._arrays(), tau)
        if mu.size == 0:
            return None, None
        return (mu, sigma, w, lsf_tau), (mu, isig, w, lsf_tau, s_tau, ws)

    def _pending_pair(self, pending) -> tuple:
        """(indices, arrived flags or None) of ``pending`` as :meth:`_prepared` takes it."""
        if isinstance(pending, tuple) and len(pending) == 2 and isinstance(pending[1], np.ndarray):  # (a tuple of
            idx, arrived = pending  # party ids is ids: no id is an array)
            if arrived.shape != idx.shape:  # (the compiled pass reads the flags unchecked)
                raise ValueError(f"pending: {arrived.shape} arrived flags for {idx.shape} parties")
            return idx, arrived
        return (pending if isinstance(pending, np.ndarray) else self.indices(pending)), None

    def quorum_cdf_fn(self, pending, need: int, tau: float):
        """t -> P(T_q <= t) for ``need`` more arrivals among ``pending`` parties, given none arrived by ``tau``."""
        arrays, prep = self._prepared(pending, tau)
        return (lambda t: _cdf(prep, need, t)), arrays

    def quorum_quantile(self, pending, need: int, tau: float, alpha: float, near: float | None = None) -> float:
        """The alpha-quantile of the quorum time (seconds since round start), or ``inf`` when the quorum is not
        reached with probability alpha at all (too few parties left, or nothing learned yet). Past ``tau`` it is a
        point of a grid in log time (``GRID``: 1e-5 relative, a tenth of a second in three hours), the first whose
        CDF reaches alpha. ``near``: a guess (the round's last quantile, for a re-plan), where the search starts; it
        changes how fast the answer is found, never the answer."""
        if need <= 0:
            return tau
        arrays, prep = self._prepared(pending, tau)
        if arrays is None or arrays[0].size < need:
            return math.inf
        step = 6.0 * max(float(arrays[1].max()), 1e-3)
        top = float(arrays[0].max()) + step  # (the latest party's mu + 6 sigma: where the cold bracket starts)
        hi = _HI_MAX if top >= _LOG_HI_MAX else min(max(math.exp(top), tau * 2 + 1e-6), _HI_MAX)
        log_near = math.log(near) if near is not None and 0.0 < near < math.inf else math.nan
        found, k = _quantile_search(tau, hi, step, alpha, log_near, *prep, need)  # (compiled)
        return math.inf if found < 0 else tau if found == 0 else math.exp(k * GRID)

    def quantile_after(self, pending, need: int, tau: float, alpha: float, t: float) -> bool:
        """Whether :meth:`quorum_quantile` is later than ``t`` (to its tolerance), from one evaluation of the CDF:
        the quantile is the first time the CDF reaches alpha, so it lies past t exactly where P(T_q <= t) < alpha."""
        if need <= 0 or t < tau:  # (the quantile is tau, or at least tau)
            return tau > t
        n, cdf = _pending_cdf(*self._pending_pair(pending), *self._arrays(), tau, t, need)
        return n < need or cdf < alpha


def model_row_error(row) -> str | None:
    """Why ``row`` is not one :meth:`Predictor.to_json` writes, or None: [party, n, mu, var, participation, rounds,
    closed round, closed_no, late round] (the first 6 in state files written before late answers were kept by round),
    with values a model can hold: counts >= 0, mu finite once there are responses (NaN before), a finite variance
    >= 0, rates in [0, 1]."""
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    rate = lambda x: num(x) and 0.0 <= x <= 1.0  # noqa: E731
    count = lambda x: type(x) is int and x >= 0  # noqa: E731
    if not isinstance(row, list) or len(row) not in (6, 9):
        return "not a list of 6 or 9 values"
    checks = [(isinstance(row[0], (str, int)) and not isinstance(row[0], bool), "party id"), (count(row[1]), "n"),
              (num(row[2]) and (row[1] == 0 or math.isfinite(row[2])), "mu"),
              (num(row[3]) and 0.0 <= row[3] < math.inf, "var"), (rate(row[4]), "participation"),
              (count(row[5]), "rounds")]
    if len(row) == 9:
        checks += [(row[6] is None or type(row[6]) is int, "closed round"), (rate(row[7]), "closed_no"),
                   (row[8] is None or type(row[8]) is int, "late round")]
    bad = [f"{name} = {row[i]!r}" for i, (ok, name) in enumerate(checks) if not ok]
    return f"party {row[0]!r}: " + ", ".join(bad) if bad else None


@functools.cache
def warm() -> None:
    """Load (or compile) the compiled code that planning runs, once per process: a quantile over a few parties (the
    exact tail) and over many (the normal approximation), the latter as a scheduler's plans ask (expected parties
    and their arrived flags: a specialization of its own), and the one-evaluation check a slot search makes."""
    p = Predictor()
    for party, t in enumerate(np.geomspace(1.0, 2.0, 300)):
        p.observe(party, float(t))
    p.quorum_quantile(np.arange(3), 2, 0.0, 0.05)
    p.quorum_quantile((np.arange(300), np.zeros(300, np.bool_)), 150, 0.0, 0.05)
    p.quantile_after((np.arange(300), np.zeros(300, np.bool_)), 150, 0.0, 0.05, 1.5)  # (a slot search's check)


def _cdf(prep, need: int, t: float) -> float:
    """P(T_q <= t) from what _prepared makes for it (None: nobody left who may arrive)."""
    if need <= 0:
        return 1.0
    if prep is None or t <= 0:
        return 0.0
    return _quorum_tail_into(np.empty(prep[0].size), math.log(t), *prep, need)


# The quorum CDF is evaluated 10-20 times per plan (the quantile's search) over every pending party: compiled with
# numba, one call per evaluation instead of a dozen numpy passes (planning was most of a large simulation's time).
@numba.njit(cache=True)
def _log_sf(z: float) -> float:
    """log P(Z > z) for a standard normal Z, to ~1e-8 relative over all z: erfc until it nears underflow, then the
    asymptotic series (its first omitted term, 15 / z^6, is 2e-8 at z = 30)."""
    if z < 30.0:
        return math.log(0.5 * math.erfc(z / SQRT2))
    iz2 = 1.0 / (z * z)
    return -0.5 * z * z - math.log(z) - 0.5 * math.log(2.0 * math.pi) + math.log1p(-iz2 + 3.0 * iz2 * iz2)


@numba.njit(cache=True)
def _sf_fast(z: float) -> float:
    """P(Z > z) for a standard normal Z to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26): one exp and a short
    polynomial, where erfc costs about a third more in the quorum CDF's inner loop; used where S(tau) > 0.01."""
    x = abs(z) / SQRT2
    t = 1.0 / (1.0 + 0.3275911 * x)
    erfc = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) \
        * math.exp(-x * x)
    return 0.5 * erfc if z >= 0 else 1.0 - 0.5 * erfc


@numba.njit(cache=True)
def _block(a, lo: int, n: int) -> float:
    """The sum of a[lo:lo + n], n <= 128, as numpy's pairwise summation adds a block: eight running sums, then the
    rest in turn (fewer than eight: in turn)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = a[lo:lo + 8].copy()
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        for j in range(8):
            r[j] += a[i + j]
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(end, lo + n):
        res += a[i]
    return res


@numba.njit(cache=True)
def _pairwise(a) -> float:
    """The sum of ``a`` in numpy's order, ``np.add.reduce``'s pairwise summation: blocks of up to 128
    (:func:`_block`), halves (the first a multiple of 8) added above them, so that compiled reductions give numpy's
    bits (tested against it). The halving runs on a stack, not by recursion: numba's cache cannot load a recursive
    function back (it crashed the process)."""
    if a.size <= 128:
        return 0.0 + _block(a, 0, a.size)  # (numpy adds the sum to its identity: +0.0 where the values are all -0.0)
    los = np.empty(64, np.int64)  # the frames from the whole array down: 2^64 elements fit
    ns = np.empty(64, np.int64)
    lefts = np.empty(64)
    right = np.zeros(64, np.bool_)  # the frame's left half is summed (in lefts), its right is on the stack above
    top = 0
    los[0], ns[0] = 0, a.size
    while True:
        if ns[top] > 128:  # split: the left half first
            half = ns[top] // 2
            half -= half % 8
            los[top + 1], ns[top + 1], right[top + 1] = los[top], half, False
            top += 1
            continue
        val = _block(a, los[top], ns[top])
        top -= 1
        while top >= 0 and right[top]:  # right halves done: add them to their left halves, up the stack
            val = lefts[top] + val
            top -= 1
        if top < 0:
            return 0.0 + val
        lefts[top], right[top] = val, True  # a left half done: its right half next
        half = ns[top] // 2
        half -= half % 8
        los[top + 1], ns[top + 1], right[top + 1] = los[top] + half, ns[top] - half, False
        top += 1


@numba.njit(cache=True)
def _shared_model(n, mu, var, prior: float, min_sigma: float):
    """What every party's planning model shares, from the running models' arrays (responses ``n``, log-time mean
    ``mu`` and running variance ``var``): (any party seen, the pooled model's mu and sigma, the experienced parties'
    shared spread, the young parties' spread, whether the latter is the experienced parties' rather than ``prior``).
    Reductions in numpy's order (:func:`_pairwise`): the same bits as the numpy expressions they replaced.

    Pooled model (a party with no response could be any of the seen ones): the mean of their mus, and the mean of
    their within-party variance plus their mean's squared distance from it (at least ``min_sigma``).

    Spreads (sd of log time) of a party's next response: what it will do, not what it did. Experienced parties (n >=
    3 responses), with s2 the typical variance (the mean of the experienced parties' unbiased variances within 10x
    their median, of them all where the median is 0: one erratic party does not move it) widened by the party's
    mean's uncertainty and v its own predictive variance,

        v = var n / (n - 1) (1 + 1/n)   while the running mean lasts (n a <= 1), var / (1 - a) after,
        sigma^2 = max(v, (SPREAD_PRIOR s2 + (n - 1) v) / (SPREAD_PRIOR + n - 1)):

    the typical spread pooled in where it widens (a few responses understate a spread as often as not), never where
    it would narrow (a party's own larger spread is evidence it differs); with many responses the party's own spread
    decides. Younger parties: the larger of their own and the young parties' spread: the experienced parties'
    unbiased variances' mean (the spread of a party that could be any of them), widened by the uncertainty of the
    party's own mean, sqrt(1 + 1/n), once MIN_SPREAD_PARTIES parties have three responses or more; else the prior
    CV as a log-normal's sigma. Parties share the job's jitter more than they share a prior: with the prior CV (0.5 by
    default) for every young party, the intermittent mixes' early rounds planned for quorums far earlier than came,
    and their deployments held slots idle while other jobs' quorums waited (cross_device: 10 jobs on 4 slots; p95
    latency share 19% -> 10%). The raw running variance, which divides by n and leaves out the mean's uncertainty,
    took 2-3x the risk asked for after the third responses (README, "Predictive spread"). The per-party rest (v,
    the widening, sigma) is :func:`_party_arrays`'s."""
    seen = 0
    old = 0
    for k in n:
        seen += k > 0
        old += k >= 3
    pooled_mu = pooled_sigma = 0.0
    if seen:
        mus = np.empty(seen)
        j = 0
        for i in range(n.size):
            if n[i] > 0:
                mus[j] = mu[i]
                j += 1
        pooled_mu = _pairwise(mus) / seen
        within = np.empty(seen)  # spread across parties plus within: a newcomer could be any of them
        j = 0
        for i in range(n.size):
            if n[i] > 0:
                d = mus[j] - pooled_mu
                within[j] = var[i] + d * d
                j += 1
        pooled_sigma = max(math.sqrt(_pairwise(within) / seen), min_sigma)
    shared = young = prior
    if old:
        v = np.empty(old)
        j = 0
        for i in range(n.size):
            if n[i] >= 3:
                v[j] = var[i] * float(n[i]) / float(n[i] - 1)  # (the running variance divides by n)
                j += 1
        mean = _pairwise(v) / old
        median = np.nan if np.isnan(v).any() else np.median(v)  # (numpy's median of values with a NaN is NaN)
        if median > 0:
            typical = v[v <= 10.0 * median]
            shared = math.sqrt(_pairwise(typical) / typical.size)
        else:
            shared = math.sqrt(mean)
        if old >= MIN_SPREAD_PARTIES:
            young = math.sqrt(mean)
    return seen > 0, pooled_mu, pooled_sigma, shared, young, old >= MIN_SPREAD_PARTIES


@numba.njit(cache=True)
def _party_arrays(n, mu, var, shared: float, young: float, young_widens: bool, a: float, min_sigma: float,
                  pooled: bool, pooled_mu: float, pooled_sigma: float):
    """Per party: (mu, sigma, known) of :meth:`Predictor._arrays`, from the shared spreads of
    :func:`_shared_model` (each widened by sqrt(1 + 1/n): the young parties' only where ``young_widens``, else
    it is the prior's, a constant), ``a`` (the running model's step) and the pooled model that parties with no
    response take, if any; in the order of operations of the array expressions it replaces (the same bits)."""
    mu_out = np.empty(n.size)
    sigma = np.empty(n.size)
    known = np.empty(n.size, np.bool_)
    for i in range(n.size):
        k = n[i]
        widen = math.sqrt(1.0 + 1.0 / max(k, 1))
        if k >= 3:
            s = shared * widen
            m = float(k)
            # PartyModel.observe takes the n-th response at weight max(a, 1 / n): a running mean through n <= 1 / a
            own = var[i] * m / (m - 1) * (1.0 + 1.0 / m) if k * a <= 1.0 else var[i] / (1.0 - a)
            spread = math.sqrt(max(own, (SPREAD_PRIOR * s * s + (m - 1) * own) / (SPREAD_PRIOR + m - 1)))
        else:
            spread = max(math.sqrt(var[i]), young * widen if young_widens else young)
        if k > 0 or not pooled:
            mu_out[i], sigma[i] = mu[i], max(spread, min_sigma)
        else:
            mu_out[i], sigma[i] = pooled_mu, pooled_sigma
        known[i] = k > 0 or pooled
    return mu_out, sigma, known


@numba.njit(cache=True)
def _pending_prep(idx, arrived, mu, sigma, part, known, tau: float):
    """Of the parties at ``idx`` (less those ``arrived`` marks, where it is not None) that are ``known`` and may
    still arrive (w > 0), given none arrived by ``tau``:
    (mu, sigma, w, log S(tau), 1 / sigma, S(tau), w / S(tau)), S the survival function of a party's log-normal
    response time (log S = 0 for tau <= 0) and w = p S(tau) / (1 - p + p S(tau)) the probability that it answers
    this round (p = 1: 1 whatever S(tau) is; S(tau) -> 0 with p < 1: -> 0).

    Survival form, in logs, because an overdue party (tau far past its model: S(tau) below 1e-16) is still
    pending. Computed as 1 - p F(tau), the denominator rounded to 0 and the party was dropped; a quorum that needed
    it had an infinite quantile and JIT planned nothing. Here it keeps w = 1 if it always answered (p = 1: it is
    late and comes next) and w -> 0 if it sometimes does not (it most likely skipped the round). S(tau) = 0 where it
    is below 1e-300: those parties take the log path in the CDF (w / S(tau) with S(tau) clipped at 1e-300 made an
    overdue party between 1e-300 and 1e-323 never arrive, and JIT stopped planning)."""
    out = np.empty((7, idx.size))
    logt = math.log(tau) if tau > 0 else 0.0
    m = 0
    for j in range(idx.size):
        i = idx[j]
        if (arrived is not None and arrived[j]) or not known[i]:
            continue
        w, lsf, isig, s_tau, ws = _party_prep(mu[i], sigma[i], part[i], tau, logt)
        if not w > 0.0:
            continue
        out[0, m], out[1, m], out[2, m], out[3, m] = mu[i], sigma[i], w, lsf
        out[4, m], out[5, m], out[6, m] = isig, s_tau, ws
        m += 1
    return out[0, :m], out[1, :m], out[2, :m], out[3, :m], out[4, :m], out[5, :m], out[6, :m]


@numba.njit(cache=True)
def _party_prep(mu, sigma, p, tau, logtau):
    """(w, log S(tau), 1 / sigma, S(tau), w / S(tau)) of one party (see :func:`_pending_prep`). Its arguments are
    numbers: the passes over pending parties each keep their loop (a step that took the arrays and the arrived flags,
    inlined or not, made a 1,000-party pass 3x slower: 18 -> 56 us)."""
    lsf = _log_sf((logtau - mu) / max(sigma, 1e-12)) if tau > 0 else 0.0
    if p >= 1.0:
        w = 1.0
    elif p <= 0.0:
        w = 0.0
    else:  # 1 / (1 + (1 - p) / (p S)), in logs: S may be far below the smallest double
        e = math.log1p(-p) - math.log(p) - lsf
        w = 0.0 if e > 700.0 else 1.0 / (1.0 + math.exp(e))
    s_tau = math.exp(lsf) if lsf > -690.0 else 0.0
    return w, lsf, 1.0 / max(sigma, 1e-12), s_tau, (w / max(s_tau, 1e-300) if s_tau > 0.0 else 0.0)


@numba.njit(cache=True)
def _arrival_p(logt, mu, isig, w, lsf_tau, s_tau, ws):
    """A pending party's probability of arriving by log time ``logt``, given none by tau: p = w (1 - S(t) / S(tau)),
    one erfc (in logs only where S(tau) underflows: an overdue party)."""
    z = (logt - mu) * isig
    if s_tau > 0.01:  # 1.5e-7 absolute in S(t) is <= 1.5e-5 of S(tau): the cheap form does
        return ws * (s_tau - _sf_fast(z))
    if s_tau > 0.0:
        return ws * (s_tau - 0.5 * math.erfc(z / SQRT2))
    return -w * math.expm1(_log_sf(z) - lsf_tau)


@numba.njit(cache=True)
def _pending_cdf(idx, arrived, mu, sigma, part, known, tau: float, t: float, need: int):
    """(how many of the pending parties may still arrive, P(T_q <= t)): :func:`_pending_prep` and one
    :func:`_quorum_tail_into` in one pass, each party's arithmetic the same (the same bits), no arrays made: for a
    check that reads the CDF once (a slot search asks it of up to SEARCH_MAX deployments, ~200k times a round of the
    1,000-job simulation)."""
    logtau = math.log(tau) if tau > 0 else 0.0
    logt = math.log(t) if t > 0 else 0.0
    probs = np.empty(idx.size)
    n = m = 0
    mean = var = 0.0
    for j in range(idx.size):
        i = idx[j]
        if (arrived is not None and arrived[j]) or not known[i]:
            continue
        w, lsf, isig, s_tau, ws = _party_prep(mu[i], sigma[i], part[i], tau, logtau)
        if not w > 0.0:
            continue
        n += 1
        p = _arrival_p(logt, mu[i], isig, w, lsf, s_tau, ws)
        if p > 0.0:
            probs[m] = p
            m += 1
            mean += p
            var += p * (1.0 - p)
    if need <= 0:
        return n, 1.0
    if n == 0 or t <= 0:
        return n, 0.0
    if need > m or _exact(n, need):
        return n, _tail(probs[:m], need)
    return n, _normal_tail(mean, var, need)


@numba.njit(cache=True)
def _exact(n: int, need: int) -> bool:
    """Whether the tail of ``need`` among ``n`` is computed exactly: up to EXACT_MAX parties, or where the DP's
    work, n x the counts it keeps (the shorter side: arrivals short of ``need``, or misses allowed), is at most
    EXACT_WORK. The normal approximation is poor at both ends: where few arrivals are needed, and where nearly every
    party must arrive (a quorum of all 129 parties: the quantile 3% early, risk 0.027 for 0.05, 4.5% late at 0.5)."""
    return n <= EXACT_MAX or n * min(need, n - need + 1) <= EXACT_WORK


@numba.njit(cache=True)
def _tail(probs, need: int) -> float:
    """P(sum of Bernoulli(probs) >= need) over positive probs: exact DP where :func:`_exact` says, else normal
    approximation with continuity correction. The DP keeps P(count == c) for c < need, or, where need is more than
    half of n, P(misses == c) for the n - need misses allowed: P(count >= need) = P(misses <= n - need)."""
    n = probs.size
    if need <= 0:
        return 1.0
    if need > n:
        return 0.0
    if _exact(n, need):
        if need <= n - need + 1:
            dist = np.zeros(need)  # dist[c] = P(count == c) for c < need; the rest is folded into the tail
            dist[0] = 1.0
            tail = 0.0
            for p in probs:
                tail += dist[need - 1] * p
                for c in range(need - 1, 0, -1):
                    dist[c] = dist[c] * (1 - p) + dist[c - 1] * p
                dist[0] *= 1 - p
            return min(1.0, max(0.0, tail))
        allowed = n - need
        miss = np.zeros(allowed + 1)  # miss[c] = P(misses == c) for c <= allowed; more misses are dropped
        miss[0] = 1.0
        for p in probs:
            for c in range(allowed, 0, -1):
                miss[c] = miss[c] * p + miss[c - 1] * (1 - p)
            miss[0] *= p
        return min(1.0, max(0.0, miss.sum()))
    mean = 0.0
    var = 0.0
    for p in probs:
        mean += p
        var += p * (1 - p)
    return _normal_tail(mean, var, need)


@numba.njit(cache=True)
def _normal_tail(mean: float, var: float, need: int) -> float:
    """P(count >= need) for a count of this mean and variance: normal approximation with continuity correction."""
    if var <= 1e-12:
        return 1.0 if mean >= need - 0.5 else 0.0
    return 1.0 - 0.5 * math.erfc(-((need - 0.5 - mean) / math.sqrt(var)) / SQRT2)


@numba.njit(cache=True)
def _probit(p: float) -> float:
    """The standard normal quantile of p (clipped to [1e-300, 1 - 1e-16]), to ~1e-9 relative (Acklam's rational
    approximation): only the quantile search's interpolation reads it, never its answer."""
    p = min(max(p, 1e-300), 1.0 - 1e-16)
    if 0.02425 <= p <= 0.97575:
        q = p - 0.5
        r = q * q
        return (((((-39.69683028665376 * r + 220.9460984245205) * r - 275.9285104469687) * r + 138.3577518672690) * r
                 - 30.66479806614716) * r + 2.506628277459239) * q / \
            (((((-54.47609879822406 * r + 161.5858368580409) * r - 155.6989798598866) * r + 66.80131188771082) * r
              - 13.28068155288572) * r + 1.0)
    q = math.sqrt(-2.0 * math.log(p if p < 0.5 else 1.0 - p))
    z = (((((-7.784894002430293e-03 * q - 0.3223964580411365) * q - 2.400758277161838) * q - 2.549732539343734) * q
          + 4.374664141464968) * q + 2.938163982698783) / \
        ((((7.784695709041462e-03 * q + 0.3224671290700398) * q + 2.445134137142996) * q + 3.754408661907416) * q + 1.0)
    return z if p < 0.5 else -z


@numba.njit(cache=True)
def _quantile_search(tau, hi, step, alpha, near, mu, isig, w, lsf_tau, s_tau, ws, need):
    """(-1, _) where the quorum CDF does not reach alpha, (0, _) where it has by ``tau`` (the quantile is tau), else
    (1, k): the quantile is exp(k GRID), k the first index of the grid whose CDF reaches alpha. The bracket [max(tau,
    1e-9), hi] first grows by ``step`` (6 sigmas) in log time while the CDF at its top is short of alpha, at most 8
    times and to _HI_MAX (conditioned on no arrival by tau, a wide party's arrivals lie beyond mu + 6 sigma: a bracket
    that ignored tau gave a false inf); then :func:`_grid_search` closes it. ``near`` (log time, NaN: none): a guess,
    the last plan's quantile, tried first as a bracket of +-NEAR_STEPS around it, moved up or down (4x wider each
    time) while it does not hold the answer, within (tau, the cold bracket's reach]; past them the search goes on
    cold. Either way the answer is the same: a bracket that holds the first grid index reaching alpha closes on that
    index (the CDF rises with t), and one found from the guess lies inside (tau, reach], so the cold search would
    have answered neither -1 nor 0."""
    probs = np.empty(mu.size)
    llo = math.log(max(tau, 1e-9))
    if near == near:
        reach = hi  # the cold bracket's top at its last growth
        for _ in range(7):
            reach = min(reach * math.exp(step), _HI_MAX)
        lreach = math.log(reach)
        ka, kb = math.floor(near / GRID) - NEAR_STEPS, math.floor(near / GRID) + NEAR_STEPS
        if kb * GRID <= lreach:
            if ka * GRID > llo:
                ca = _quorum_tail_into(probs, ka * GRID, mu, isig, w, lsf_tau, s_tau, ws, need)
            else:  # (the guess is at tau or before it, a round whose quorum is due: from tau up, as cold)
                ca = _quorum_tail_into(probs, llo, mu, isig, w, lsf_tau, s_tau, ws, need)
                if ca >= alpha:
                    return 0, 0
                ka, kb = math.floor(llo / GRID), max(kb, math.floor(llo / GRID) + 1)
            width = 2 * NEAR_STEPS
            if ca < alpha:  # the answer is above ka: a bracket [ka, kb], moved up 4x wider each time it is not
                while kb * GRID <= lreach:
                    cb = _quorum_tail_into(probs, kb * GRID, mu, isig, w, lsf_tau, s_tau, ws, need)
                    if cb >= alpha:
                        return 1, _grid_search(ka, kb, ca, cb, alpha, mu, isig, w, lsf_tau, s_tau, ws, need)
                    ka, ca, width = kb, cb, 4 * width
                    kb = ka + width
            else:  # at or below ka: the same downwards
                kb, cb = ka, ca
                ka = kb - width
                while ka * GRID > llo:
                    ca = _quorum_tail_into(probs, ka * GRID, mu, isig, w, lsf_tau, s_tau, ws, need)
                    if ca < alpha:
                        return 1, _grid_search(ka, kb, ca, cb, alpha, mu, isig, w, lsf_tau, s_tau, ws, need)
                    kb, cb, width = ka, ca, 4 * width
                    ka = kb - width
    for grown in range(8):
        c_hi = _quorum_tail_into(probs, math.log(hi), mu, isig, w, lsf_tau, s_tau, ws, need)
        if c_hi >= alpha:
            break
        if hi >= _HI_MAX or grown == 7:
            return -1, 0
        hi = min(hi * math.exp(step), _HI_MAX)
    c_lo = _quorum_tail_into(probs, llo, mu, isig, w, lsf_tau, s_tau, ws, need)
    if c_lo >= alpha:
        return 0, 0
    # (the grid points around the bracket's ends: the CDF there is no higher at the bottom one and no lower at the
    # top one, so the values read at the ends place the first steps)
    return 1, _grid_search(math.floor(llo / GRID), math.ceil(math.log(hi) / GRID), c_lo, c_hi, alpha, mu, isig, w,
                           lsf_tau, s_tau, ws, need)


@numba.njit(cache=True)
def _grid_search(a, b, clo, chi, alpha, mu, isig, w, lsf_tau, s_tau, ws, need):
    """The first grid index in (a, b] whose quorum CDF (at log t = index GRID) reaches alpha, given CDF values at
    the ends (``clo`` < alpha <= ``chi``): a bracket of indices [a, b] with CDF(a) < alpha <= CDF(b), closed until
    they are adjacent. On a fixed grid the answer is a function of the CDF alone, not of the path to it (a plan's
    quantile is the same whether its search started from the last plan's or cold).

    Each step interpolates linearly (regula falsi) on the CDF's probit, probit(CDF) - probit(alpha), which is
    nearly linear in log t where the count of arrivals is nearly normal (the CDF itself is a steep sigmoid there, and
    interpolating on it crept along its flat side), with the Illinois rule (an end kept twice in a row has its value
    halved, so that both ends close in), each step at least one index inside the bracket so that the last one can
    close it: 9-12 evaluations of the CDF on a large round's cold plans where bisection took 18-20, each a pass over
    every pending party. Every third step bisects instead where the two before it did not halve the bracket, so a
    CDF that defeats interpolation (a plateau just below alpha, a step, an alpha whose probit is clipped) costs at
    most about 3x bisection's count; the ends' values stay on their sides of 0, so a step never divides by 0."""
    probs = np.empty(mu.size)
    za = _probit(alpha)
    fa, fb = min(_probit(clo) - za, -1e-300), max(_probit(chi) - za, 0.0)
    kept = 0  # +1: b moved last, -1: a did
    ref = b - a  # the bracket's width after the last third step
    step = 0
    while b - a > 1:
        step += 1
        if step % 3 == 0 and b - a > 0.5 * ref:
            x = math.floor(0.5 * (a + b))
        else:
            x = min(max(math.floor((a * fb - b * fa) / (fb - fa) + 0.5), a + 1), b - 1)
        c = _quorum_tail_into(probs, x * GRID, mu, isig, w, lsf_tau, s_tau, ws, need)
        if c >= alpha:  # (the decision reads the CDF itself; the probit only places the next step)
            b, fb = x, max(_probit(c) - za, 0.0)
            if kept == 1:  # (fa stays below 0, fb - fa above it: halved ~80 times it underflowed, and with fb
                fa = min(0.5 * fa, -1e-300)  # at 0 (a clipped probit) the next step was 0 / 0)
            kept = 1
        else:
            a, fa = x, min(_probit(c) - za, -1e-300)
            if kept == -1:
                fb *= 0.5
            kept = -1
        if step % 3 == 0:  # (after the step: taken before it, a bisection counted as the next check's halving)
            ref = b - a
    return b


@numba.njit(cache=True)
def _quorum_tail_into(probs, logt, mu, isig, w, lsf_tau, s_tau, ws, need):
    """P(at least ``need`` of the pending parties arrive by log time ``logt``): each party's conditional arrival
    probability p = w (1 - S(t) / S(tau)), one erfc per party (in logs only where S(tau) underflows: an overdue
    party), then the Poisson-binomial tail: exact (over the positive p) where :func:`_exact` allows it for all the
    pending parties, else its normal approximation, whose mean and variance are summed in the same loop (no second
    pass). The method goes by the pending parties, not by how many have p > 0 at t: that count grows with t, and
    the method switched with it, so the CDF could fall back below a level it had reached (review, 2026-11-29: 820
    pending, 20 needed, 0.032 -> 0.026); the quantile's search could then settle on a later crossing."""
    m = 0
    mean = 0.0
    var = 0.0
    for i in range(mu.size):
        p = _arrival_p(logt, mu[i], isig[i], w[i], lsf_tau[i], s_tau[i], ws[i])
        if p > 0.0:
            probs[m] = p
            m += 1
            mean += p
            var += p * (1.0 - p)
    if need <= 0 or need > m or _exact(mu.size, need):
        return _tail(probs[:m], need)
    return _normal_tail(mean, var, need)


def poisson_binomial_tail(probs, need: int) -> float:
    """P(sum of independent Bernoulli(p_i) >= need): exact (dynamic programming over counts, or over misses) where
    :func:`_exact` says, a normal approximation with continuity correction beyond. ``probs`` in [0, 1] (else
    ValueError: they were clipped or dropped, NaN too); ``need`` rounded up (2.7 was 2)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if not np.all((probs >= 0.0) & (probs <= 1.0)):
        raise ValueError(f"probabilities must be in [0, 1], got {probs[~((probs >= 0.0) & (probs <= 1.0))][:3]}")
    need = math.ceil(need)
    pos = probs[probs > 0.0]
    return float(_tail(pos, min(need, pos.size + 1)))  # (a count of 10^30 overflowed numba's int)
